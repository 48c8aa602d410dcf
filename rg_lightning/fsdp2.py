"""FSDP2 for ``CausalLMModule`` under Lightning's ``ModelParallelStrategy``: every decoder layer, then the model.

``ModelParallelStrategy`` leaves parallelism to ``configure_model``; a module that applies none trains an
unsynchronised copy on every process. Each decoder layer (the classes a Hugging Face model lists in
``_no_split_modules``) becomes one FSDP2 unit, so only one layer's weights are gathered at a time, and the
root unit holds the embeddings, final norm and head. Parameters are sharded by rows (dim 0), which is what
the RefusalGuard constraints follow (``guard.shards``).
"""

from __future__ import annotations

from torch import nn


def check_data_parallel_mesh(mesh, quantized: bool) -> None:
    """Refuse what this sharding does not do: tensor parallelism and bitsandbytes-quantized weights."""
    names = tuple(mesh.mesh_dim_names or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError("CausalLMModule shards with FSDP2 only, not tensor parallelism: use "
                         "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1).")
    if "data_parallel" not in names:
        raise ValueError(f"expected a device mesh with a 'data_parallel' dimension, got {names}")
    if quantized:
        raise ValueError("bitsandbytes-quantized (QLoRA) weights cannot be sharded with FSDP2 here: use "
                         "strategy='ddp' for QLoRA (the 4-bit base fits on each device).")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose class a Hugging Face model names in ``_no_split_modules`` (its decoder layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, mesh) -> int:
    """``fully_shard`` each decoder layer, then ``model`` itself, over ``mesh``; returns the number of layers."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers)
