"""JSON that strict parsers accept: Python writes NaN and Infinity, which JSON has not."""

from __future__ import annotations

import math


def finite_or_null(value):
    """``value`` with every non-finite float (an undefined rate, an infinite Fisher separation) made None."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
