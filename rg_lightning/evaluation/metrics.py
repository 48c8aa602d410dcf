"""Rates as torchmetrics: integer hit and total counts, summed across processes.

Counts rather than per-process means keep the rate exact under DDP when shards have different sizes
(a mean of means would weight a short shard too much).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class RateMetric(Metric):
    """Share of True among all values seen: ``update`` with bools or 0/1 (tensor or list), ``compute`` the share.

    Before any value is seen ``compute`` returns NaN (a rate of nothing is undefined, not 0 or 1), so an
    empty evaluation shows up in logs instead of passing as a perfect score.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values) -> None:
        values = torch.as_tensor(values, device=self.hits.device).flatten()
        if values.numel() and not bool(((values == 0) | (values == 1)).all()):
            raise ValueError(f"{type(self).__name__} counts yes/no outcomes: pass bools or 0/1 values, "
                             f"got {values.unique().tolist()[:5]}.")
        self.hits += values.sum().long()
        self.total += values.numel()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(float("nan"), device=self.hits.device)
        return self.hits.double().div(self.total)  # float64: a rate of 173/520 is reported as computed


class AttackSuccessRate(RateMetric):
    """Share of harmful requests the model complied with (True = the attack succeeded)."""

    higher_is_better = False


class RefusalRate(RateMetric):
    """Share of requests refused (on harmful prompts: higher is safer)."""

    higher_is_better = True


class OverRefusalRate(RateMetric):
    """Share of harmless requests refused (utility lost to over-caution)."""

    higher_is_better = False


class AnswerAccuracy(RateMetric):
    """Share of task answers judged correct (e.g. GSM8K final number)."""

    higher_is_better = True
