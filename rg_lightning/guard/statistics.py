"""Streaming activation statistics (float64 sums + counts) that never store activations.

Why float64: the protected subspaces come from eigendecompositions of these sums; float32 sums over
millions of tokens lose the small eigenvalues that decide how much energy a basis covers.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Hashable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten ``x[..., d]`` to the float64 rows selected by ``mask[...]`` (all rows when None)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None:
        # a module may read the tokens flattened ([batch·seq, d]: Qwen2-MoE's shared expert), row for row
        flattened = x.ndim == 2 and mask.numel() == rows.shape[0]
        if tuple(mask.shape) != tuple(x.shape[:-1]) and not flattened:
            raise ValueError(f"mask shape {tuple(mask.shape)} != input {tuple(x.shape[:-1])}: the module reads another "
                             "set of rows than the prompts' tokens (a routed MoE expert reads the tokens sent to it); "
                             "the guard cannot measure it. Freeze it (requires_grad=False) or leave it out of the LoRA "
                             "targets.")
        rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
    return rows.double()


class _SumAccumulator:
    """Float64 sums and row counts per key, summed over processes by ``all_reduce_``."""

    def __init__(self) -> None:
        self.sums: dict[Hashable, Tensor] = {}
        self.counts: dict[Hashable, int] = {}

    def _add(self, key: Hashable, value: Tensor, n: int) -> None:
        if key in self.sums:
            self.sums[key] += value.to(self.sums[key].device)
        else:
            self.sums[key] = value
        self.counts[key] = self.counts.get(key, 0) + n

    def ensure(self, key: Hashable, shape: tuple[int, ...], device) -> None:
        """Hold ``key`` (zeros, count 0) even without data: a process with an empty shard still all-reduces it."""
        if key not in self.sums:
            self.sums[key] = torch.zeros(shape, dtype=torch.float64, device=device)
            self.counts[key] = 0

    def all_reduce_(self, group=None) -> None:
        """Sum over processes when torch.distributed is initialised; every rank must hold the same keys.

        Keys are reduced in sorted order so all ranks issue identical collectives.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        keys = sorted(self.sums, key=repr)
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, keys, group=group)
        if any(k != keys for k in everyone):
            raise ValueError("all_reduce_: processes hold different keys; update every key on every rank")
        for key in keys:
            dist.all_reduce(self.sums[key], group=group)
            count = torch.tensor([self.counts[key]], dtype=torch.float64, device=self.sums[key].device)
            dist.all_reduce(count, group=group)
            self.counts[key] = int(count.item())


class GramAccumulator(_SumAccumulator):
    """Per-module second moment Σ x xᵀ of inputs; its top eigenvectors span the protected subspace.

    A floating-point ``mask`` weighs each row: Σ w x xᵀ over the rows with w > 0 (counted as rows)."""

    def update(self, name: str, x: Tensor, mask: Tensor | None = None) -> None:
        if mask is None or not mask.is_floating_point():
            rows = _rows(x, mask)
            self._add(name, rows.T @ rows, rows.shape[0])
            return
        if not bool((mask >= 0).all()):
            raise ValueError("row weights must be >= 0")
        kept = mask > 0
        rows = _rows(x, kept)
        weights = mask[kept].to(device=rows.device, dtype=rows.dtype)  # row-major, as _rows keeps them
        self._add(name, (rows * weights[:, None]).T @ rows, rows.shape[0])

    def state(self) -> dict[str, Tensor]:
        """Unnormalised Σ x xᵀ (float64) per name; counts are in ``self.counts``."""
        return dict(self.sums)


class MeanAccumulator(_SumAccumulator):
    """Running means per key, e.g. ``(layer, position)`` for difference-in-means directions."""

    def update(self, key: Hashable, x: Tensor, mask: Tensor | None = None) -> None:
        rows = _rows(x, mask)
        self._add(key, rows.sum(0), rows.shape[0])

    def mean(self, key: Hashable) -> Tensor:
        if self.counts.get(key, 0) == 0:
            raise ValueError(f"no rows accumulated for key {key!r}")
        return self.sums[key] / self.counts[key]

    def state(self) -> dict[Hashable, Tensor]:
        """Float64 mean per key; counts are in ``self.counts``."""
        return {key: self.mean(key) for key in self.sums}


def _unknown_names_error(unknown, known, what: str = "module") -> ValueError:
    """A ValueError that lists the closest known names for each unknown one."""
    known = list(known)
    lines = [f"{n!r} (close: {difflib.get_close_matches(n, known, n=3, cutoff=0.5)})" for n in unknown]
    return ValueError(f"unknown {what} name(s): " + "; ".join(lines))


class _Capture:
    """Handle yielded by :func:`capture_linear_inputs`; set ``mask`` per batch (bool, ``x.shape[:-1]``)."""

    def __init__(self, mask: Tensor | None) -> None:
        self.mask = mask


@contextlib.contextmanager
def capture_linear_inputs(
    model: nn.Module, module_names: list[str], accumulator: GramAccumulator, mask: Tensor | None = None
) -> Iterator[_Capture]:
    """Feed the inputs of the named modules into ``accumulator`` while the context is open.

    Only positions where ``mask`` is True are used (e.g. the tokens of harmful prompts). The mask can
    change per batch through the yielded handle: ``cap.mask = batch_mask`` before each forward.
    Hooks are removed on exit, also when the body raises.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in module_names if name not in modules]
    if unknown:
        raise _unknown_names_error(unknown, modules)
    capture = _Capture(mask)

    def hook_for(name: str):
        def hook(module, args):
            try:
                accumulator.update(name, args[0], capture.mask)
            except ValueError as err:
                raise ValueError(f"capture_linear_inputs[{name}]: {err}") from None

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in module_names]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
