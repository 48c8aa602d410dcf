"""The small contract between any LightningModule and the RefusalGuard callbacks.

A LightningModule works with the callbacks when it exposes its Hugging Face causal LM as
``self.model`` (a ``PreTrainedModel`` or PEFT model, built by the time ``fit`` starts), or returns it from
a ``hf_model()`` method, and a tokenizer with a chat template as ``self.tokenizer`` (or the datamodule
has ``tokenizer``). ``CausalLMModule`` does all of this.
"""

from __future__ import annotations

import torch


def hf_model(pl_module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a LightningModule."""
    getter = getattr(pl_module, "hf_model", None)
    model = getter() if callable(getter) else getattr(pl_module, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"{type(pl_module).__name__} does not expose a Hugging Face model: set `self.model` to the "
            "PreTrainedModel (or PEFT model) in `__init__`/`configure_model`, or define `hf_model()`."
        )
    return model


def tokenizer_of(trainer, pl_module):
    """The tokenizer of the module, else of the datamodule."""
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is None and trainer is not None:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is None:
        raise TypeError(
            f"No tokenizer found: give {type(pl_module).__name__} a `tokenizer` attribute "
            "or use a datamodule with one."
        )
    return tokenizer


_SHARDING_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def check_unsharded(trainer, who: str) -> None:
    """Refuse strategies that shard parameters over processes, before anything is measured or trained.

    The guard needs whole weight rows on every rank (``W·U`` and its correction act row by row, the
    interference metric reads whole gradients), and its measurement passes give ranks different numbers of
    prompts, which a sharded forward (one all-gather per layer and batch) would turn into a hang. DDP and
    single-device FSDP keep whole parameters; DeepSpeed wraps the optimizer so the post-step hook is not
    guaranteed to run, so it is refused at any size.
    """
    strategy = type(trainer.strategy)
    names = {cls.__name__ for cls in strategy.__mro__}
    sharding = next((n for n in _SHARDING_STRATEGIES if n in names), None)
    if sharding is None or (sharding != "DeepSpeedStrategy" and trainer.world_size <= 1):
        return
    raise ValueError(
        f"{who} does not support {strategy.__name__} with {trainer.world_size} process(es): it needs whole "
        "parameters on every rank. Use strategy='ddp' (with LoRA or 4-bit QLoRA to fit a large model on "
        "each device) or strategy='fsdp' on a single device."
    )
