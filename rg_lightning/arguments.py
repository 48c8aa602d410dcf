"""Type checks for the callbacks' arguments, run in ``__init__`` before any model work.

Why: a value from a YAML typo or a Python slip (``"0.9"``, ``2.5`` prompts, ``True`` as a rank) would
otherwise pass the range checks or fail far from its cause (a slice at fit start, a bare ``'<' not supported``).
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def require_int(name: str, value, optional: bool = False) -> None:
    """``value`` is an integer (not a bool); ``None`` too when ``optional``. Ranges are the caller's."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer{' or None' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")


def require_number(name: str, value, optional: bool = False) -> None:
    """``value`` is a finite real number (not a bool); ``None`` too when ``optional``. Ranges are the caller's."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number{' or None' if optional else ''}, got {value!r} "
                        f"({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def require_bool(name: str, value) -> None:
    """``value`` is ``True`` or ``False`` (a string such as ``"no"`` would be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
