"""`lightning predict` answers written to a file: LightningCLI drops what `trainer.predict` returns."""

from __future__ import annotations

import json
import os

import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from rg_lightning.atomic import atomic_file, check_file_target


class PredictionWriter(BasePredictionWriter):
    """Writes every answer of a predict run as a JSON line ``{"index", "prompt", "answer"}``, in prompt order.

    Args:
        path: The JSON-lines file; a relative path is taken under the trainer's ``default_root_dir``.

    Under DDP each process answers its share of the prompts; rank zero gathers them (the sampler's padding
    duplicates are dropped) and writes the file atomically. The prompts come from the datamodule's
    ``prompts`` (``InstructionDataModule``: every ``test`` row's request, its text, or the conversation up to
    its last user turn when there is more to it).
    """

    def __init__(self, path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        if not isinstance(path, str) or not path:
            raise ValueError(f"`path` must name a file, e.g. predictions.jsonl; got {path!r}")
        self.path = path

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":  # now, not after every answer is generated
            check_file_target(self.output_path(trainer), "PredictionWriter `path`")

    def output_path(self, trainer) -> str:
        return self.path if os.path.isabs(self.path) else os.path.join(trainer.default_root_dir, self.path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if len(batch_indices) != 1:  # Lightning: indices per dataloader, predictions flat for a single one
            raise ValueError(f"PredictionWriter writes one predict dataloader, got {len(batch_indices)}")
        answers = {i: a for batch, indices in zip(predictions, batch_indices[0]) for i, a in zip(indices, batch)}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, answers)
            answers = {i: a for part in gathered for i, a in part.items()}
        if not trainer.is_global_zero:
            return
        prompts = getattr(trainer.datamodule, "prompts", None) or []
        with atomic_file(self.output_path(trainer)) as out:
            for i in sorted(answers):
                row = {"index": i, "prompt": prompts[i] if i < len(prompts) else None, "answer": answers[i]}
                out.write(json.dumps(row) + "\n")
