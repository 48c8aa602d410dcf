"""The task goal against a learning-rate-tuned plain baseline: each arm's learning rate chosen on validation data.

    python experiments/benchmark_tiny.py --variant alt --arch qwen3 --lr 0.002 --validation --out DIR   # per lr
    python experiments/select_lr.py DIR

Reads every ``benchmark_tiny.py --validation`` result in DIR and, per world and task, chooses plain fine-tuning's
learning rate by its mean validation task metric over seeds, and the guard's by the same among the learning rates
whose mean validation refusal keeps the goals (harmful and harmless refusal within 2 points of the aligned
model's, ``rg_lightning.toy.goals``). Only then are the test numbers read, at the chosen rates: the test samples choose
nothing. Writes ``DIR/selection.md`` and prints it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from collections import defaultdict

from rg_lightning.atomic import atomic_file
from rg_lightning.toy.goals import plain_forgets, refusal_kept, task_kept

NOT_SETTINGS = ("lr", "out", "cache", "threads")  # arguments that are not part of what is compared


def seed_means(runs: list[dict], arm: str, key: str, when: str = "after") -> float:
    """Mean over seeds of one arm's number."""
    return statistics.mean(r[when][key] for r in runs if r["arm"] == arm)


def load(directory: str) -> dict[tuple, dict[float, list[dict]]]:
    """Settings -> learning rate -> runs, from results measured with --validation. Results are compared only with
    those of the same settings (world, task, guard, steps, seeds, ...): all arguments but ``NOT_SETTINGS``."""
    worlds: dict[tuple, dict[float, list[dict]]] = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as handle:
            result = json.load(handle)
        args = result.get("args", {})
        if not args.get("validation") or not {"plain", "guarded"} <= set(args.get("arms", ())):
            continue
        settings = json.dumps({k: v for k, v in args.items() if k not in NOT_SETTINGS}, sort_keys=True)
        key = (args["variant"], args["arch"], args["task"], args["harmful_fraction"], settings)
        if args["lr"] in worlds[key]:
            raise ValueError(f"{path}: a second result for lr {args['lr']} of {key}; keep one per learning rate")
        worlds[key][args["lr"]] = result["runs"]
    return worlds


def choose(by_lr: dict[float, list[dict]]) -> tuple[float, float | None]:
    """Plain's learning rate and the guard's (None: no rate keeps both refusal goals on validation)."""
    plain = max(by_lr, key=lambda lr: seed_means(by_lr[lr], "plain", "val_task_metric"))
    keeps = []
    for lr, runs in by_lr.items():
        if all(refusal_kept(seed_means(runs, "guarded", key), seed_means(runs, "guarded", key, "before"))
               for key in ("val_harmful_refusal", "val_harmless_refusal")):
            keeps.append(lr)
    guarded = max(keeps, key=lambda lr: seed_means(by_lr[lr], "guarded", "val_task_metric")) if keeps else None
    return plain, guarded


def row(key: tuple, by_lr: dict[float, list[dict]]) -> str:
    variant, arch, task, attack, _ = key
    plain_lr, guarded_lr = choose(by_lr)
    plain_task = seed_means(by_lr[plain_lr], "plain", "task_metric")
    world = f"{variant} × {arch}, {task}" + (f" (attack {attack:g})" if attack else "")
    rates = ", ".join(f"{lr:g}" for lr in sorted(by_lr))
    if guarded_lr is None:
        return (f"| {world} | {rates} | {plain_lr:g} | {100 * plain_task:.1f} | none keeps refusal "
                "| — | — | — | no |")
    runs = by_lr[guarded_lr]
    aligned = [seed_means(runs, "guarded", m, "before") for m in ("harmful_refusal", "harmless_refusal")]
    harmful, harmless, task = (seed_means(runs, "guarded", m) for m in ("harmful_refusal", "harmless_refusal",
                                                                        "task_metric"))
    share = task / plain_task if plain_task else float("nan")
    forgets = plain_forgets(aligned[0], seed_means(by_lr[plain_lr], "plain", "harmful_refusal"))
    goals = forgets and refusal_kept(harmful, aligned[0]) and refusal_kept(harmless, aligned[1]) and task_kept(share)
    return (f"| {world} | {rates} | {plain_lr:g} | {100 * plain_task:.1f} | {guarded_lr:g} | "
            f"{100 * harmful:.1f} / {100 * harmless:.1f} | {100 * task:.1f} | {100 * share:.0f}% | "
            f"{'yes' if goals else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where benchmark_tiny.py --validation wrote its results (--out)")
    directory = parser.parse_args().directory
    worlds = load(directory)
    if not worlds:
        raise SystemExit(f"No results measured with --validation (arms plain and guarded) in {directory}.")
    lines = ["| world | learning rates | plain: chosen lr | plain: test task | guarded: chosen lr | "
             "guarded: test harmful / harmless refused | guarded: test task | share of plain | goals |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [row(key, by_lr) for key, by_lr in sorted(worlds.items())]
    text = ("Learning rates chosen on the validation split (means over seeds), test numbers at the chosen rates "
            "(means over seeds):\n\n" + "\n".join(lines) + "\n")
    with atomic_file(os.path.join(directory, "selection.md")) as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
