"""Rate metrics: exact shares, reset, the empty case, and exactness under 2-process CPU DDP."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_metrics import SHARDS

from rg_lightning.evaluation.metrics import AnswerAccuracy, AttackSuccessRate, OverRefusalRate, RateMetric, RefusalRate

HERE = Path(__file__).parent


def test_rate_counts_every_input_form():
    metric = AttackSuccessRate()
    metric.update([True, False, True])
    metric.update(torch.tensor([0, 1, 0, 0]))
    metric.update(torch.tensor([[True], [True]]))
    metric.update([])
    assert (int(metric.hits), int(metric.total)) == (5, 9)
    assert metric.compute().item() == 5 / 9  # float64, as computed (float32 reported 173/520 as 0.3326922953)
    assert metric.compute().dtype == torch.float64


def test_reset_forgets_and_empty_is_nan():
    metric = RefusalRate()
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        assert math.isnan(metric.compute().item())
    metric.update([True, True])
    assert metric.compute().item() == 1.0
    metric.reset()
    with pytest.warns(UserWarning):
        assert math.isnan(metric.compute().item())
    metric.update([False])
    assert metric.compute().item() == 0.0


def test_non_binary_values_are_refused():
    with pytest.raises(ValueError, match="bools or 0/1"):
        RefusalRate().update([0.5, 1.0])
    with pytest.raises(ValueError, match="bools or 0/1"):
        AnswerAccuracy().update(torch.tensor([2]))


def test_named_rates_say_which_way_is_better():
    assert issubclass(OverRefusalRate, RateMetric)
    assert [cls.higher_is_better for cls in (AttackSuccessRate, RefusalRate, OverRefusalRate, AnswerAccuracy)] == [
        False, True, False, True]


def test_two_processes_with_uneven_shards_equal_one(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "ddp_metrics.py"), str(tmp_path / "init")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    single = AttackSuccessRate()
    for shard in SHARDS.values():
        for values in shard:
            single.update(values)
    assert len(SHARDS[0][0] + SHARDS[0][1]) != len(SHARDS[1][0])  # the shards really are uneven
    for rank in ranks:
        assert (rank["hits"], rank["total"]) == (int(single.hits), int(single.total)) == (6, 11)
        assert rank["rate"] == single.compute().item()  # exact, not approximately equal
