"""Row-sharded parameters (FSDP2's ``fully_shard``: DTensors split along dim 0 over one mesh dimension).

The right-side constraint ``W ← W − (W U − W0 U) Uᵀ`` acts on each row of ``W`` alone, so every rank can apply
it to the rows it holds, with the same ``U`` and the matching rows of the anchor: no communication per step.
Only constraints that mix rows (the left side, ``Uᵀ W``) gather the whole tensor.
"""

from __future__ import annotations

import math

from torch import Tensor


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no sharded parameters either
        return None
    return DTensor


def is_sharded(t: Tensor | None) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(t, kind)


def holds_all_rows(t: Tensor) -> bool:
    """Whether this rank holds every row: a plain tensor, or a DTensor replicated on every rank (summing such a
    tensor's per-rank shares over ranks would count it once per rank)."""
    if not is_sharded(t):
        return True
    from torch.distributed.tensor import Replicate

    return all(isinstance(p, Replicate) for p in t.placements)


def whole(t: Tensor) -> Tensor:
    """The full tensor (gathered from every rank when sharded: a collective, so every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def local_rows(t: Tensor) -> tuple[Tensor, int]:
    """The rows this rank holds, as a view that in-place updates write through, and the first row's index."""
    if not is_sharded(t):
        return t, 0
    from torch.distributed.tensor import Replicate, Shard

    placements = t.placements
    if all(isinstance(p, Replicate) for p in placements):
        return t.to_local(), 0
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"only parameters sharded along dim 0 over one mesh dimension are supported, got "
                         f"{placements}; use FSDP2's fully_shard (or DDP)")
    local, rows = t.to_local(), t.shape[0]
    chunk = math.ceil(rows / t.device_mesh.size())
    start = min(t.device_mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != min(chunk, rows - start):
        raise ValueError(f"unexpected shard of {local.shape[0]} rows at row {start} of {rows}")
    return local, start


def _fsdp_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model) -> None:
    """Put every FSDP2 module's parameters back into their shards. A root module stays gathered after a
    forward without backward, and anything written into the gathered copy would be lost at the next reshard."""
    for module in _fsdp_modules(model):
        module.reshard()


def uses_fsdp2(model) -> bool:
    """Whether ``model`` holds FSDP2 modules or row-sharded parameters (the same answer on every rank)."""
    return bool(_fsdp_modules(model)) or any(is_sharded(p) for p in model.parameters())


def prompt_world(model) -> tuple[int, int]:
    """``(rank, world)`` to split measurement prompts over. With FSDP2 modules every forward is a collective
    (each module gathers its weights), so all ranks must run the same batches: then every rank runs every
    prompt, gets the same result, and nothing is reduced: ``(0, 1)``. (Decided by the modules, not by the
    parameters: a root module's parameters stay plain tensors between a forward and the next backward.)"""
    return (0, 1) if uses_fsdp2(model) else process_world()


def process_world() -> tuple[int, int]:
    """``(rank, world size)`` of torch.distributed, ``(0, 1)`` when it is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
