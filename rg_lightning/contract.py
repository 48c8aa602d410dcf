"""The small contract between any LightningModule and the RefusalGuard callbacks.

A LightningModule works with the callbacks when it exposes its Hugging Face causal LM as
``self.model`` (a ``PreTrainedModel`` or PEFT model, built by the time ``fit`` starts), or returns it from
a ``hf_model()`` method (or holds it as an ``hf_model`` attribute or property), and a tokenizer with a chat
template as ``self.tokenizer`` (or the datamodule has ``tokenizer``; when both have a template, the same one).
``CausalLMModule`` does all of this. A datamodule's ``system_prompt`` attribute, if any, is
what the callbacks render their prompts with unless they are given their own (``system_prompt_of``).
"""

from __future__ import annotations

import torch

from rg_lightning.chat import template_fingerprint


def hf_model(pl_module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a LightningModule."""
    getter = getattr(pl_module, "hf_model", None)
    if isinstance(getter, torch.nn.Module):  # an attribute (or property) holding the model, not a method: a module
        model = getter                       # is callable too, and calling it would run its forward
    else:
        model = getter() if callable(getter) else getattr(pl_module, "model", None)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: measure the model itself, uncompiled
    # (the measurement passes would spend the compiled training forward's recompile budget); same parameters
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not all(
            callable(getattr(model, name, None)) for name in ("generate", "get_input_embeddings")):
        raise TypeError(
            f"{type(pl_module).__name__} does not expose a Hugging Face model (a PreTrainedModel or PEFT model, with "
            "`config`, `generate` and `get_input_embeddings`; a wrapper module of your own is not one): set "
            "`self.model` to it in `__init__`/`configure_model`, or define `hf_model()` returning it."
        )
    return model


def tokenizer_of(trainer, pl_module):
    """The tokenizer of the module, else of the datamodule; the datamodule's when only it has a chat template.
    Two with different chat templates are refused: the callbacks must render prompts as the training rows are."""
    own = getattr(pl_module, "tokenizer", None)
    data = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer is not None else None
    if own is None and data is None:
        raise TypeError(
            f"No tokenizer found: give {type(pl_module).__name__} a `tokenizer` attribute "
            "or use a datamodule with one."
        )
    if own is None or data is None or own is data or not getattr(data, "chat_template", None):
        return own if own is not None else data
    if not getattr(own, "chat_template", None):
        return data
    if template_fingerprint(own) != template_fingerprint(data):
        raise ValueError(
            f"{type(pl_module).__name__}.tokenizer and the datamodule's tokenizer carry different chat templates, so "
            "the guard would measure prompts rendered otherwise than the training rows. Give both the same "
            "`chat_template`, or drop one of the tokenizers.")
    return own


def system_prompt_of(given: str | None, trainer) -> str | None:
    """``given``, or when it is ``None`` the datamodule's ``system_prompt`` (what the training rows were rendered
    with); ``""`` means none. Callbacks that render prompts follow it, so they see what the model is trained on."""
    if given is not None:
        return given or None
    return getattr(getattr(trainer, "datamodule", None), "system_prompt", None) if trainer is not None else None


def check_unsharded(trainer, who: str) -> None:
    """Refuse strategies whose parameter sharding the callback cannot follow, before anything runs.

    The guard acts on whole weight rows. FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) keeps whole
    rows on each rank, sharded along dim 0, and the guard follows it (``guard.shards``). Lightning's
    ``FSDPStrategy`` (FSDP1) flattens parameters into shards that cut rows apart, and only the root module's
    forward gathers them; DeepSpeed wraps the optimizer so the post-step hook is not guaranteed to run.
    """
    strategy = type(trainer.strategy)
    names = {cls.__name__ for cls in strategy.__mro__}
    several = trainer.world_size > 1
    tensor_parallel = getattr(trainer.strategy, "_tensor_parallel_size", 1)
    if tensor_parallel == "auto":  # Lightning's default: tensor parallel over the processes of a node
        tensor_parallel = trainer.world_size
    if "DeepSpeedStrategy" in names or ("FSDPStrategy" in names and several) or (
            "ModelParallelStrategy" in names and several and tensor_parallel > 1):
        fix = ("strategy='ddp' (with LoRA or 4-bit QLoRA to fit a large model on each device), "
               "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with FSDP2's "
               "fully_shard (tensor parallelism splits weights by columns too)")
        raise ValueError(
            f"{who} does not support {strategy.__name__} with {trainer.world_size} process(es): it needs whole "
            f"weight rows on every rank. Use {fix}, or a single device."
        )


def log_now(trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` straight to every logger at the trainer's logging step (rank zero only), as
    LearningRateMonitor does: ``self.log`` in a callback holds step values until Lightning's next
    ``log_every_n_steps`` flush, so a measurement in between is lost or stamped with a later step."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


def run_directory(trainer) -> str:
    """Where a callback writes its fit-end files: the first logger's version folder, else ``default_root_dir``.
    ``trainer.log_dir`` broadcasts, so every rank must call this, even where only rank zero writes."""
    return trainer.log_dir or trainer.default_root_dir
