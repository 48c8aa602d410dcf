"""Evaluation mode for a measurement, with every submodule's own train/eval mode put back afterwards.

``model.train(was_training)`` would set every submodule to the top-level mode; Lightning 2.6 keeps modules'
modes as the user left them (e.g. frozen blocks in eval mode, so their dropout stays off), and a probe must
not switch them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


def enter_eval(model: nn.Module) -> Callable[[], None]:
    """Put ``model`` in eval mode; returns the function that restores every submodule's previous mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()

    def restore() -> None:
        for module, training in modes:
            module.training = training

    return restore


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each submodule's previous mode restored on exit."""
    restore = enter_eval(model)
    try:
        yield model
    finally:
        restore()
