"""``python -m rg_lightning.toy build --out DIR [--seed 0] [--steps N] [--variant default|alt]
[--arch llama|gemma2|qwen3|phi3|gemma3|olmo2] [--threads 2] [--width 128]`` trains and saves
the aligned model; ``python -m rg_lightning.toy collapse [--model DIR] [--task benign] [--lr 1e-3] [--steps 150]
[--harmful-fraction 0]`` measures what plain fine-tuning does to its refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

from rg_lightning.toy.build import ARCHITECTURES, THREADS, WIDTH, valid_width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rg_lightning.toy", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the aligned model and save it",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--out", required=True, default=argparse.SUPPRESS,
                       help="output directory (rg_lightning/toy/aligned replaces the shipped model: a rebuild on "
                            "another machine's CPU kernels can come out as another aligned model)")
    build.add_argument("--seed", type=int, default=0, help="seed of the alignment data and training")
    build.add_argument("--steps", type=int, default=None, help="alignment steps (None: the architecture's own)")
    build.add_argument("--variant", default="default", choices=("default", "alt"), help="world variant")
    build.add_argument("--arch", default="llama", choices=tuple(ARCHITECTURES),
                       help="architecture family (the shipped model is llama)")
    build.add_argument("--threads", type=int, default=THREADS,
                       help="CPU threads, set exactly: the weights depend on it (the shipped model: 2)")
    build.add_argument("--width", type=int, default=WIDTH,
                       help="hidden size, a multiple of 64 (intermediate twice it, heads of width 32); every shipped "
                            "world is 128 wide")
    collapse = commands.add_parser("collapse", help="plain fine-tuning of the aligned model on a downstream task",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    collapse.add_argument("--model", default=None, help="model directory (default: the shipped aligned model)")
    collapse.add_argument("--variant", default=None, choices=("default", "alt"),
                          help="world variant (default: the one recorded in the model's world.json)")
    collapse.add_argument("--task", default="benign", choices=("benign", "sentiment", "arithmetic"))
    collapse.add_argument("--lr", type=float, default=1e-3)
    collapse.add_argument("--steps", type=int, default=150)
    collapse.add_argument("--batch-size", type=int, default=32)
    collapse.add_argument("--harmful-fraction", type=float, default=0.0)
    collapse.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    positive = {"--steps": args.steps, "--threads": getattr(args, "threads", 1),
                "--batch-size": getattr(args, "batch_size", 1), "--lr": getattr(args, "lr", 1.0)}
    wrong = [f"{flag} {value}" for flag, value in positive.items() if value is not None and not value > 0]
    if wrong:
        parser.error(f"must be positive: {', '.join(wrong)}")
    width = getattr(args, "width", WIDTH)
    if not valid_width(width):
        parser.error(f"--width must be a positive multiple of 64, got {width}")
    if args.command == "collapse":
        if args.model and args.variant is None and not (Path(args.model) / "world.json").is_file():
            parser.error(f"--model {args.model!r} has no world.json to read the world variant from: give --variant, "
                         "or a directory that `python -m rg_lightning.toy build --out DIR` wrote")
        if not 0.0 <= args.harmful_fraction <= 1.0:
            parser.error(f"--harmful-fraction must be in [0, 1], got {args.harmful_fraction}")

    if args.command == "build":
        from rg_lightning.atomic import check_replaceable
        from rg_lightning.toy.build import ALIGNED_MODEL_DIR, MODEL_FILES
        from rg_lightning.toy.build import build as run_build

        try:
            check_replaceable(args.out, MODEL_FILES, "--out")
        except OSError as error:
            parser.error(str(error))
        shipped = Path(args.out).resolve() == ALIGNED_MODEL_DIR.resolve()
        run_build(None if shipped else args.out, seed=args.seed, steps=args.steps, variant=args.variant,
                  arch=args.arch, threads=args.threads, width=args.width)
        return

    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rg_lightning.toy.build import ALIGNED_MODEL_DIR
    from rg_lightning.toy.collapse import plain_finetune
    from rg_lightning.toy.world import ToyWorld

    directory = Path(args.model) if args.model else ALIGNED_MODEL_DIR
    variant = args.variant or json.loads((directory / "world.json").read_text())["variant"]
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    plain_finetune(model, tokenizer, ToyWorld(variant), args.task, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, harmful_fraction=args.harmful_fraction, seed=args.seed)


if __name__ == "__main__":
    main()
