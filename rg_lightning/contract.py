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
