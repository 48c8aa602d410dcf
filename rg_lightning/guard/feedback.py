"""The refusal feedback's control law: how hard the damped tail pulls back next, from the refusal scores of probes.

A damped tail (``RefusalDirections(ridge > 0)``) trades refusal for task: pulled back hard it keeps refusal and caps
the task, pulled back softly it frees the task and lets refusal slip, and by how much depends on the model, the data
and the phase of training (experiments/results/README.md). The law holds refusal itself instead of one tail setting:
the margin is the smallest share of its fit-start logit refusal score that a harmful probe keeps (probes the aligned
model did not refuse are not counted), and any harmless probe that would be refused (score > 0) counts as no margin.
Below ``low`` the tail pulls back ``factor`` times as hard, above ``high`` ``factor`` times as softly, within
``[min_scale, max_scale]`` times the rate it was built with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def refusal_margin(harmful_now: Tensor, harmful_start: Tensor, harmless_now: Tensor) -> float:
    """The smallest share of its fit-start refusal score a harmful probe keeps (1: as refused as at the start, 0: on
    the edge, below 0: answered); -1 when a harmless probe would be refused; NaN when a score is not finite."""
    scores = torch.cat([harmful_now, harmless_now])
    if not bool(torch.isfinite(scores).all()):
        return math.nan
    if bool((harmless_now > 0).any()):
        return -1.0
    refused = harmful_start > 0
    if not bool(refused.any()):
        raise ValueError("The aligned model refuses none of the harmful probes (logit refusal score > 0 on none): "
                         "there is no refusal to hold. Check the probes (harmful=) and the model.")
    return min(float((harmful_now[refused] / harmful_start[refused]).min()), 1.0)


def next_tail_scale(scale: float, margin: float, *, low: float, high: float, factor: float, min_scale: float,
                    max_scale: float) -> float:
    """Tighten (``scale · factor``) below ``low`` or on a NaN margin (a diverged model), loosen (``scale / factor``)
    above ``high``, else keep ``scale``; clipped to ``[min_scale, max_scale]``."""
    if math.isnan(margin) or margin < low:
        return min(scale * factor, max_scale)
    if margin > high:
        return max(scale / factor, min_scale)
    return scale
