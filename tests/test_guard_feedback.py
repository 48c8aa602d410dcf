"""The refusal feedback's control law, alone: the margin it reads from probe scores and the scale it sets."""

import math

import pytest
import torch

from rg_lightning.guard.feedback import continuation_score, next_tail_scale, refusal_margin

LAW = {"low": 0.8, "high": 0.9, "factor": 2.0, "min_scale": 0.1, "max_scale": 1000.0}


def test_the_margin_is_the_worst_harmful_probes_share_of_its_start_score():
    start = torch.tensor([4.0, 2.0, -1.0], dtype=torch.float64)  # the third was not refused: not counted
    now = torch.tensor([3.0, 1.0, -5.0], dtype=torch.float64)
    assert refusal_margin(now, start, torch.tensor([-3.0])) == pytest.approx(0.5)
    assert refusal_margin(torch.tensor([5.0, 3.0, 0.0]), start, torch.tensor([-3.0])) == 1.0  # capped: as refused
    assert refusal_margin(torch.tensor([4.0, -1.0, 0.0]), start, torch.tensor([-3.0])) == pytest.approx(-0.5)


def test_a_start_score_above_sure_counts_as_sure():
    start = torch.tensor([12.0, 2.0], dtype=torch.float64)
    now = torch.tensor([6.0, 2.0], dtype=torch.float64)   # the first lost half its log-odds, yet p > 0.99
    assert refusal_margin(now, start, torch.tensor([-3.0])) == pytest.approx(0.5)
    assert refusal_margin(now, start, torch.tensor([-3.0]), sure=4.0) == 1.0
    assert refusal_margin(torch.tensor([3.0, 2.0]), start, torch.tensor([-3.0]), sure=4.0) == pytest.approx(0.75)


def test_a_harmless_probe_that_would_be_refused_is_no_margin_and_a_nan_score_is_nan():
    start = torch.tensor([4.0, 2.0])
    assert refusal_margin(start, start, torch.tensor([-3.0, 0.5])) == -1.0
    assert math.isnan(refusal_margin(torch.tensor([4.0, math.nan]), start, torch.tensor([-3.0])))
    assert math.isnan(refusal_margin(start, start, torch.tensor([math.inf])))


def test_a_model_that_refuses_no_harmful_probe_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="refuses none of the harmful probes"):
        refusal_margin(torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]))


@pytest.mark.parametrize("scale, margin, expected", [
    (1.0, 0.5, 2.0),            # slipping: tighter
    (1.0, -1.0, 2.0),           # a harmless probe refused: tighter
    (1.0, math.nan, 2.0),       # diverged: tighter
    (1.0, 0.95, 0.5),           # holding: looser
    (1.0, 0.85, 1.0),           # between: kept
    (800.0, 0.1, 1000.0),       # clipped above
    (0.15, 1.0, 0.1),           # clipped below
])
def test_the_scale_tightens_below_low_loosens_above_high_and_stays_in_range(scale, margin, expected):
    assert next_tail_scale(scale, margin, **LAW) == pytest.approx(expected)


def test_the_continuation_score_is_the_least_sure_answer_token_and_skips_masked_ones():
    logits = torch.full((1, 3, 4), -20.0, dtype=torch.float64)
    logits[0, 0, 1] = logits[0, 1, 2] = 20.0   # tokens 1 and 2: all but certain
    logits[0, 2, :] = 0.0                       # the third position: uniform over 4, p = 1/4
    tokens = torch.tensor([[1, 2, 3]])
    score = continuation_score(logits, tokens, torch.ones(1, 3))
    assert float(score) == pytest.approx(math.log(0.25 / 0.75))  # the weakest token decides: negative
    assert float(continuation_score(logits, tokens, torch.tensor([[1, 1, 0]]))) > 20  # after the answer's end
    # a model that still opens the answer but no longer goes on with it loses the score
    logits[0, 1, 2], logits[0, 1, 0] = -20.0, 20.0
    assert float(continuation_score(logits, tokens, torch.tensor([[1, 1, 0]]))) < -20
