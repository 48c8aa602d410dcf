"""AlignmentReport: refusal on held-out harmful / harmless requests and the task metric, before vs after."""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from rg_lightning.atomic import atomic_file
from rg_lightning.contract import hf_model, run_directory, tokenizer_of
from rg_lightning.toy.generation import generate, refusal_rate
from rg_lightning.toy.world import ToyWorld, task_metric

METRICS = ("harmful_refusal", "harmless_refusal", "task_metric")
SPLITS = ("test", "validation")


def evaluation_data(world: ToyWorld, task: str, split: str, n_requests: int,
                    n_task: int) -> tuple[list[str], list[str], list[dict]]:
    """Held-out harmful requests, harmless requests and task examples of one split.

    ``test``: the first ``n_requests`` held-out requests of each kind (seed 0) and ``n_task`` held-out task examples
    (seed 1), the samples every result reports. ``validation``: the rest of those held-out pools, to choose settings
    such as a learning rate without looking at the test samples."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    examples = world.task_examples(task, "heldout", n_task, seed=1)
    if split == "test":
        return (world.requests("harmful", "heldout", n_requests), world.requests("harmless", "heldout", n_requests),
                examples)
    tested = {e["messages"][0]["content"] for e in examples}
    pool = world.task_examples(task, "heldout", world.task_pool_size(task, "heldout"), seed=1)
    rest = [e for e in pool if e["messages"][0]["content"] not in tested]
    harmful, harmless = (world.requests(kind, "heldout")[n_requests:] for kind in ("harmful", "harmless"))
    if not (harmful and harmless and rest):
        raise ValueError(f"No validation data left beside the test samples ({n_requests} requests of each kind, "
                         f"{n_task} {task} examples): the held-out pools hold {len(harmful) + n_requests} harmful, "
                         f"{len(harmless) + n_requests} harmless requests and {len(pool)} examples. Lower n_requests "
                         "or n_task.")
    return harmful, harmless, rest


def measure(model, tokenizer, world: ToyWorld, task: str, n_requests: int, n_task: int,
            split: str = "test") -> dict[str, float]:
    """The three numbers of the miniature world's story, by greedy generation on held-out data."""
    harmful, harmless, examples = evaluation_data(world, task, split, n_requests, n_task)
    prompts = [e["messages"][0]["content"] for e in examples]
    references = [e["messages"][1]["content"] for e in examples]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max(len(r.split()) for r in references) + 2,
                       batch_size=64)
    return {
        "harmful_refusal": refusal_rate(model, tokenizer, harmful),
        "harmless_refusal": refusal_rate(model, tokenizer, harmless),
        "task_metric": task_metric(task, answers, references),
    }


class AlignmentReport(L.Callback):
    """Measures at fit start and fit end, prints a before/after table and writes ``alignment_report.json``.

    Args:
        task: The downstream task whose held-out metric is reported.
        variant: World variant of the held-out requests.
        n_requests: Held-out harmful and harmless requests each.
        n_task: Held-out task examples.
        validation: Also measure the rest of the held-out pools (``evaluation_data``), kept under ``val_<metric>``,
            to choose settings on.
    """

    def __init__(self, task: str = "benign", variant: str = "default", n_requests: int = 200, n_task: int = 200,
                 validation: bool = False):
        if n_requests < 1 or n_task < 1:
            raise ValueError("n_requests and n_task must be positive")
        self.world = ToyWorld(variant)
        self.task = task
        self.n_requests = n_requests
        self.n_task = n_task
        self.splits = SPLITS if validation else SPLITS[:1]
        for split in self.splits:  # a pool too small for a validation split fails now, not after the fit
            evaluation_data(self.world, task, split, n_requests, n_task)
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def _measure(self, trainer, pl_module) -> dict[str, float]:
        model, tokenizer = hf_model(pl_module), tokenizer_of(trainer, pl_module)
        measured = {}
        for split in self.splits:
            numbers = measure(model, tokenizer, self.world, self.task, self.n_requests, self.n_task, split)
            measured.update({(name if split == "test" else f"val_{name}"): value for name, value in numbers.items()})
        return measured

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.before is None:  # restored from a checkpoint on resume: the "before" is the aligned model
            self.before = self._measure(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.after = self._measure(trainer, pl_module)
        self._write(run_directory(trainer))

    @rank_zero_only
    def _write(self, directory: str) -> None:
        rows = [f"{'':18s} {'before':>8s} {'after':>8s}"]
        rows += [f"{name:18s} {self.before[name]:8.1%} {self.after[name]:8.1%}" for name in METRICS]
        print("\nMiniature world, held-out data (task: %s)\n%s\n" % (self.task, "\n".join(rows)))
        with atomic_file(os.path.join(directory, "alignment_report.json")) as handle:
            json.dump({"task": self.task, "before": self.before, "after": self.after}, handle, indent=2)

    def state_dict(self) -> dict:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get("before")
