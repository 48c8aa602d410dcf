"""ToyTaskDataModule: a downstream task of the miniature world, generated in memory (no files)."""

from __future__ import annotations

from typing import Literal

from rg_lightning.data import InstructionDataModule
from rg_lightning.toy.world import ToyWorld


class ToyTaskDataModule(InstructionDataModule):
    """Fine-tuning data of the miniature world, with an optional harmful-request attack mixed in.

    Args:
        task: ``benign`` (instruction following on new objects), ``sentiment`` or ``arithmetic``.
        harmful_fraction: Share of training rows that are harmful requests answered compliantly (attack).
        refusal_fraction: Share of training rows that are harmful requests answered with a refusal (the
            safety-data mixing defence, a baseline for the guard).
        n_train: Training rows generated from the task's train split.
        n_val: Validation rows and test rows (each, at most half the task's held-out split: they come from
            disjoint halves of it, so a test score never reuses a validation example).
        variant: World variant, ``default`` or ``alt``.
        batch_size: Samples per batch.
        max_length: Tokens per sample.
        seed: Seed of generation and shuffling.
    """

    def __init__(
        self,
        task: Literal["benign", "sentiment", "arithmetic"] = "benign",
        harmful_fraction: float = 0.0,
        refusal_fraction: float = 0.0,
        n_train: int = 4800,
        n_val: int = 128,
        variant: str = "default",
        batch_size: int = 32,
        max_length: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, max_length=max_length, seed=seed)
        if task not in ("benign", "sentiment", "arithmetic"):
            raise ValueError(f"task must be benign, sentiment or arithmetic, got {task!r}")
        if not (0.0 <= harmful_fraction <= 1.0 and 0.0 <= refusal_fraction <= 1.0
                and harmful_fraction + refusal_fraction <= 1.0):
            raise ValueError(f"harmful_fraction and refusal_fraction must be in [0, 1] with a sum <= 1, got "
                             f"{harmful_fraction} and {refusal_fraction}")
        if n_train < 1 or n_val < 1:
            raise ValueError("n_train and n_val must be positive")
        self.world = ToyWorld(variant)
        self.task = task
        self.harmful_fraction, self.refusal_fraction = harmful_fraction, refusal_fraction
        self.n_train = n_train
        self.n_val = n_val
        self.save_hyperparameters()

    def available_stages(self) -> list[str]:
        return ["train", "val", "test"]

    def load_rows(self, stage: str):
        import datasets

        if stage == "train":
            rows = self.world.task_examples(self.task, "train", self.n_train, self.harmful_fraction, seed=self.seed,
                                            refusal_fraction=self.refusal_fraction)
        else:
            size = self.world.task_pool_size(self.task, "heldout")
            pool, half = self.world.task_examples(self.task, "heldout", size, seed=self.seed), size // 2
            rows = pool[:min(self.n_val, half)] if stage == "val" else pool[half:half + min(self.n_val, size - half)]
        return datasets.Dataset.from_list(rows)
