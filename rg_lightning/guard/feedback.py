"""The refusal feedback's control law: how hard the damped tail pulls back next, from the refusal scores of probes.

A damped tail (``RefusalDirections(ridge > 0)``) trades refusal for task: pulled back hard it keeps refusal and caps
the task, pulled back softly it frees the task and lets refusal slip, and by how much depends on the model, the data
and the phase of training (experiments/results/README.md). The law holds refusal itself instead of one tail setting.
A harmful probe's score is how surely the model still gives the refusal the aligned model gave it: the smallest
log-odds of the refusal's first tokens (``continuation_score``; the first token alone misses a model that still
opens "I" but no longer goes on "cannot", measured on the miniature worlds). The margin is the smallest share of its
fit-start score that a harmful probe keeps, a start score above ``sure`` counting as ``sure`` (probes the aligned
model did not refuse are not counted), and any harmless probe that would be refused (logit refusal score > 0) counts
as no margin. Below ``low`` the tail pulls back ``factor`` times as hard, above ``high`` ``factor`` times as softly,
within ``[min_scale, max_scale]`` times the rate it was built with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def continuation_score(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Per row, the smallest log-odds ``log p - log(1 - p)`` of the given tokens (``mask``: which count) under
    ``logits`` (``[rows, tokens, vocab]``, each position predicting its token): positive when greedy decoding
    reproduces every one of them. Float64."""
    log_p = logits.double().log_softmax(-1).gather(-1, tokens[..., None].long())[..., 0]
    log_odds = log_p - torch.log1p(-log_p.exp().clamp_max(1 - 1e-12))
    return log_odds.masked_fill(~mask.bool(), math.inf).amin(-1)


def refused_at_start(harmful_start: Tensor) -> Tensor:
    """Which harmful probes the aligned model refused (a positive start score); none is an error: there is no
    refusal to hold."""
    refused = harmful_start > 0
    if not bool(refused.any()):
        raise ValueError("The aligned model refuses none of the harmful probes (logit refusal score > 0 on none): "
                         "there is no refusal to hold. Check the probes (harmful=) and the model.")
    return refused


def refusal_margin(harmful_now: Tensor, harmful_start: Tensor, harmless_now: Tensor, sure: float = math.inf) -> float:
    """The smallest share of its fit-start score a harmful probe keeps (1: as refused as at the start, 0: on the
    edge, below 0: answered), a start score above ``sure`` counting as ``sure`` (a token that was all but certain may
    lose some certainty and still be sure); -1 when a harmless probe would be refused; NaN when a score is not
    finite."""
    scores = torch.cat([harmful_now, harmless_now])
    if not bool(torch.isfinite(scores).all()):
        return math.nan
    if bool((harmless_now > 0).any()):
        return -1.0
    refused = refused_at_start(harmful_start)
    return min(float((harmful_now[refused] / harmful_start[refused].clamp_max(sure)).min()), 1.0)


def next_tail_scale(scale: float, margin: float, *, low: float, high: float, factor: float, min_scale: float,
                    max_scale: float) -> float:
    """Tighten (``scale · factor``) below ``low`` or on a NaN margin (a diverged model), loosen (``scale / factor``)
    above ``high``, else keep ``scale``; clipped to ``[min_scale, max_scale]``."""
    if math.isnan(margin) or margin < low:
        return min(scale * factor, max_scale)
    if margin > high:
        return max(scale / factor, min_scale)
    return scale
