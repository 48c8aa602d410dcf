"""``python -m rg_lightning.toy build [--out DIR] [--seed 0] [--steps N] [--variant default|alt]``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rg_lightning.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the aligned model and save it")
    build.add_argument("--out", default=None, help="output directory (default: the shipped rg_lightning/toy/aligned)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--steps", type=int, default=None)
    build.add_argument("--variant", default="default", choices=("default", "alt"))
    args = parser.parse_args(argv)

    from rg_lightning.toy.build import DEFAULT_STEPS, build as run_build

    run_build(args.out, seed=args.seed, steps=args.steps or DEFAULT_STEPS, variant=args.variant)


if __name__ == "__main__":
    main()
