"""CausalLMModule: a Hugging Face causal LM (full, LoRA or QLoRA fine-tuning) as a LightningModule."""

from __future__ import annotations

import os

import copy
import math
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rg_lightning.atomic import atomic_directory, check_replaceable
from rg_lightning.chat import IGNORE_INDEX
from rg_lightning.contract import system_prompt_of
from rg_lightning.fsdp2 import check_data_parallel_mesh, shard_model
from rg_lightning.generation import generate
from rg_lightning.guard.shards import uses_fsdp2
from rg_lightning.loading import check_model_source, load_tokenizer

EXPORT_FILES = ("config.json", "adapter_config.json")  # what an earlier export holds (it may be replaced)
Quantization = Literal["nf4", "fp4", "int8"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class CausalLMModule(L.LightningModule):
    """Fine-tunes a Hugging Face causal LM on assistant tokens.

    The HF model is built in ``configure_model`` (so strategies can shard it; under ``ModelParallelStrategy``
    it shards itself with FSDP2, see ``rg_lightning.fsdp2``) and is reachable as ``self.model``; the tokenizer
    as ``self.tokenizer``. These two attributes are the contract the
    RefusalGuard callbacks rely on.

    Args:
        model: Hub id (``Qwen/Qwen2.5-7B-Instruct``) or local directory of a causal LM.
        tokenizer: Tokenizer id or directory; default: the same as ``model``.
        dtype: Weight dtype at load: ``auto`` (as saved), ``float32``, ``bfloat16``, ``float16``.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``; default: transformers' choice.
        gradient_checkpointing: Recompute activations in backward (non-reentrant) to save memory.
        lora_r: LoRA rank; 0 trains all weights (full fine-tuning).
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Module names LoRA wraps, or ``all-linear``.
        quantization: Load the base weights in 4-bit ``nf4``/``fp4`` or 8-bit ``int8`` (bitsandbytes); needs LoRA.
        trust_remote_code: Run model code shipped with the checkpoint. Off unless you trust the source.
        optimizer: Optimizer factory applied to the trainable parameters.
        scheduler: Optional LR scheduler factory (stepped every optimizer step); or use ``lr_schedule``.
        lr_schedule: ``linear`` or ``cosine`` decay to zero at the fit's last optimizer step (Lightning's
            ``estimated_stepping_batches``: data size, batch, accumulation, epochs and devices), after
            ``warmup_steps`` of linear warm-up; sized by the run itself, unlike a fixed ``total_iters``.
        warmup_steps: Optimizer steps of linear warm-up from 0 for ``lr_schedule``.
        export_dir: Write a Hugging Face directory here at the end of ``fit``.
        export_merged: Export LoRA merged into the base weights (False: the adapter only).
        loss_normalization: ``batch``: each micro-batch's mean answer-token loss, averaged over gradient
            accumulation (Lightning's way: a token in a short micro-batch weighs more); ``token``: every answer
            token of an optimizer step weighs the same, across micro-batches and processes (transformers'
            Trainer's way), by rescaling the accumulated gradients before the step.
        predict_max_new_tokens: Greedy tokens per answer in ``lightning predict`` (rendered with the
            datamodule's ``system_prompt``; ``rg_lightning.PredictionWriter`` writes the answers to a file).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: DType = "auto",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "all-linear",
        quantization: Quantization | None = None,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=2e-5),
        scheduler: LRSchedulerCallable | None = None,
        lr_schedule: Literal["linear", "cosine"] | None = None,
        warmup_steps: int = 0,
        export_dir: str | None = None,
        export_merged: bool = True,
        loss_normalization: Literal["batch", "token"] = "batch",
        predict_max_new_tokens: int = 256,
    ) -> None:
        super().__init__()
        model = os.fspath(model) if isinstance(model, os.PathLike) else model  # e.g. rg_lightning.toy.ALIGNED_MODEL_DIR
        tokenizer = os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        check_model_source(model)
        if tokenizer is not None:
            check_model_source(tokenizer, "tokenizer")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        if lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = full fine-tuning), got {lora_r}")
        if lora_r and not lora_alpha > 0:
            raise ValueError("lora_alpha must be positive (the adapter's scale is lora_alpha / lora_r), "
                             f"got {lora_alpha}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if lora_r == 0 and (lora_alpha != 16.0 or lora_dropout or lora_target_modules != "all-linear"):
            rank_zero_warn("lora_alpha, lora_dropout and lora_target_modules are set but lora_r is 0: this is full "
                           "fine-tuning, without LoRA. Set lora_r > 0 for LoRA.")
        if quantization is not None and quantization not in ("nf4", "fp4", "int8"):
            raise ValueError(f"quantization must be nf4, fp4, int8 or null, got {quantization!r}")
        if lr_schedule is not None and lr_schedule not in ("linear", "cosine"):
            raise ValueError(f"lr_schedule must be linear, cosine or null, got {lr_schedule!r}")
        if lr_schedule is not None and scheduler is not None:
            raise ValueError("Give either `scheduler` or `lr_schedule`, not both.")
        if warmup_steps < 0 or (warmup_steps and lr_schedule is None):
            raise ValueError(f"warmup_steps must be >= 0 and needs an lr_schedule; got {warmup_steps} with "
                             f"{lr_schedule!r}")
        if loss_normalization not in ("batch", "token"):
            raise ValueError(f"loss_normalization must be batch or token, got {loss_normalization!r}")
        if predict_max_new_tokens < 1:
            raise ValueError(f"predict_max_new_tokens must be positive, got {predict_max_new_tokens}")
        if quantization and lora_r == 0:
            raise ValueError("Quantized weights cannot be trained directly: set `lora_r` > 0 (QLoRA).")
        self.model_name = model
        self.tokenizer_name = tokenizer or model
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = lora_target_modules
        self.quantization = quantization
        self.trust_remote_code = trust_remote_code
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.export_dir = export_dir
        self.export_merged = export_merged
        self.predict_max_new_tokens = predict_max_new_tokens
        self.loss_normalization = loss_normalization
        self._step_tokens: torch.Tensor | None = None  # answer tokens of this optimizer step's micro-batches
        self._token_reference: float | None = None  # `token` normalisation's fixed loss scale (first micro-batch)
        self._resume_rng: list[dict] | None = None  # a loaded checkpoint's random states, until the fit starts
        self.model = None
        self._tokenizer = None
        # Adapter-only checkpoints hold just the trainable weights; the base comes from `model` again.
        self.strict_loading = lora_r == 0
        # no tokenizer recorded when it is the model's own: a data module given one records it, and Lightning
        # refuses to merge two different values of one key
        self.save_hyperparameters(ignore=["optimizer", "scheduler"] + (["tokenizer"] if tokenizer is None else []))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        return self._tokenizer

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the HF model once (idempotent: Lightning may call this more than once). Under
        ``ModelParallelStrategy`` (a device mesh is set) it is sharded with FSDP2 (``rg_lightning.fsdp2``)."""
        mesh = self.device_mesh
        if mesh is not None:
            check_data_parallel_mesh(mesh, quantized=self.quantization is not None)
        if self.model is None:
            self.model = self._build_model()
        if mesh is not None and not uses_fsdp2(self.model):  # also when built before the strategy set the mesh
            layers = shard_model(self.model, mesh["data_parallel"])
            rank_zero_info(f"CausalLMModule: FSDP2 over {mesh['data_parallel'].size()} processes, "
                           f"{layers} decoder layers sharded separately")

    def _build_model(self):
        """The Hugging Face model (PEFT-wrapped with LoRA), loaded from ``model``."""
        from transformers import AutoModelForCausalLM

        # "auto" said explicitly: transformers 4.x loads float32 without it, 5.x as saved
        dtype = "auto" if self.dtype_name == "auto" else getattr(torch, self.dtype_name)
        kwargs = {"trust_remote_code": self.trust_remote_code, "dtype": dtype}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantization:
            kwargs["quantization_config"] = self._bitsandbytes_config()
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            kwargs["device_map"] = {"": str(device)}
        model = AutoModelForCausalLM.from_pretrained(self.model_name, **kwargs)
        if self.quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.gradient_checkpointing:
            model.config.use_cache = False
        if self.lora_r:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=self.lora_r,
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                target_modules=self.lora_target_modules,
                task_type="CAUSAL_LM",
            )
            if self.gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, config)
        # from_pretrained returns the model in eval mode and Lightning keeps each module's mode: left so, dropout
        # (LoRA's included) and gradient checkpointing (transformers checkpoints only in training mode) stay off.
        return model.train()

    def _bitsandbytes_config(self):
        from transformers import BitsAndBytesConfig

        if self.quantization == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = torch.bfloat16 if self.dtype_name == "bfloat16" else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quantization,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )

    def _require_model(self):
        if self.model is None:
            raise RuntimeError("The model is not built yet; call `configure_model()` or run it inside a Trainer.")
        return self.model

    # -- steps ---------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None):
        return self._require_model()(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        output = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        targets = batch["labels"][:, 1:]
        answer = targets != IGNORE_INDEX
        on_step = stage == "train"
        batch_size = batch["input_ids"].shape[0]
        if answer.any():
            predictions = output.logits[:, :-1].argmax(-1)
            accuracy = (predictions[answer] == targets[answer]).float().mean()
        else:  # nothing to learn or score (a custom data module's batch): HF's mean loss is 0/0
            output.loss = accuracy = output.logits.sum() * 0  # a zero gradient, not NaN ones
            batch_size = 0  # and no weight in the epoch's means (logged all the same: every rank logs each key)
        self.log(f"{stage}/loss", output.loss, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 sync_dist=not on_step, batch_size=batch_size)
        self.log(f"{stage}/token_acc", accuracy, on_step=on_step, on_epoch=not on_step,
                 sync_dist=not on_step, batch_size=batch_size)
        return output.loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if self.loss_normalization == "batch":
            return loss
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self._step_tokens = tokens if self._step_tokens is None else self._step_tokens + tokens
        if self._token_reference is None:
            # A fixed scale, the same on every process: the token sum itself would be ~T times a mean loss and
            # overflow fp16 (16-mixed's GradScaler would then skip steps while it backs off by ~T).
            self._token_reference = max(float(self.trainer.strategy.reduce(tokens.float(), reduce_op="mean")), 1.0)
        # the token sum over a fixed scale; on_before_optimizer_step divides by the step's token count
        return loss * tokens / self._token_reference

    def on_before_optimizer_step(self, optimizer) -> None:
        """``token`` normalisation: the accumulated gradients are sums of token losses over the micro-batches
        (each divided by ``accumulate_grad_batches`` by Lightning, averaged over processes by DDP/FSDP2); one
        factor turns them into the gradient of the mean over every answer token of the step."""
        if self.loss_normalization == "batch" or self._step_tokens is None:
            return
        total = float(self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum"))
        self._step_tokens = None
        factor = (self.trainer.accumulate_grad_batches * self.trainer.world_size * self._token_reference
                  / max(total, 1.0))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: list[str], batch_idx: int) -> list[str]:
        """Greedy answers to a batch of requests (``InstructionDataModule.predict_dataloader``: texts, or
        conversations ending with a user turn), with the system prompt the data was trained with unless a
        conversation has its own."""
        return self.generate(batch, max_new_tokens=self.predict_max_new_tokens,
                             system_prompt=system_prompt_of(None, self._trainer), batch_size=len(batch))

    def configure_optimizers(self):
        params = [p for p in self._require_model().parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("No trainable parameters: check `lora_target_modules` or the frozen layers.")
        optimizer = self.optimizer_factory(params)
        if self.lr_schedule is not None:
            scheduler = self._sized_schedule(optimizer)
        elif self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            return optimizer
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return {"optimizer": optimizer, "lr_scheduler": self._plateau_config(scheduler)}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _plateau_config(self, scheduler) -> dict:
        """A plateau scheduler steps on a validation metric, once per validation: every ``val_check_interval``
        training batches when validation counts batches across epochs, else at epoch ends. Not strict: a step with
        no validation metric yet (or no validation data) is skipped with Lightning's warning, not ending the fit."""
        monitor = getattr(scheduler, "monitor", "val/loss")  # lightning.pytorch.cli's variant names its own
        config = {"scheduler": scheduler, "monitor": monitor, "interval": "epoch", "strict": False}
        every = self.trainer.val_check_interval
        if isinstance(every, int) and self.trainer.check_val_every_n_epoch is None:  # validation counted in steps
            config.update(interval="step", frequency=every)
        return config

    def _sized_schedule(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up, then ``lr_schedule`` down to zero at the fit's last optimizer step."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("`lr_schedule` needs a known length: set `trainer.max_steps` (or `max_epochs` with "
                             "training data of known length).")
        total, warmup = int(total), self.warmup_steps
        if warmup >= total:
            raise ValueError(f"warmup_steps={warmup} leaves nothing of the fit's {total} optimizer steps.")

        def factor(step: int) -> float:
            if step < warmup:  # 0, 1/w, ..., (w-1)/w, then the decay from 1 (as transformers' schedules)
                return step / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return 1.0 - progress if self.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # -- generation ----------------------------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[dict]], max_new_tokens: int = 64, system_prompt: str | None = None,
        batch_size: int = 16
    ) -> list[str]:
        """Batched greedy answers with the chat template and left padding."""
        return generate(self._require_model(), self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, system_prompt=system_prompt)

    # -- checkpoints and export ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, keep only the trainable (adapter) weights: the base is reloaded from `model`. Not under
        FSDP2, whose distributed checkpoint loads every key it saved (each process writes its own shards).
        Every process's torch random state goes in too (Lightning saves none), so a resumed fit draws the same
        dropout masks as the uninterrupted one."""
        checkpoint["torch_rng_states"] = self._rng_states()
        if self._token_reference is not None:  # `token` normalisation's scale: a resumed fit keeps the same one
            checkpoint["token_loss_reference"] = self._token_reference
        if self.lora_r and not uses_fsdp2(self._require_model()):
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def _rng_states(self) -> list[dict]:
        """Each process's torch generators (CPU, and CUDA when present), rank by rank; tensors only."""
        state = {"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return [state]
        states: list = [None] * trainer.world_size  # every process dumps the checkpoint; rank zero writes it
        dist.all_gather_object(states, state)
        return states

    def setup(self, stage: str) -> None:
        self._resume_rng = None  # a checkpoint this run restores sets it after setup; one loaded for validate or
        # test must not reseed a later fit

    def on_train_start(self) -> None:
        """A resumed fit takes up its process's random state where the checkpoint left it (after the data loader
        and everything before the first step drew theirs)."""
        states, self._resume_rng = self._resume_rng, None
        if states and len(states) != self.trainer.world_size:
            rank_zero_warn(f"The checkpoint holds the random states of {len(states)} processes and this run has "
                           f"{self.trainer.world_size}: each process keeps its own seeded state, so dropout masks "
                           "will not match those of an uninterrupted run.")
        elif states:
            state = states[self.global_rank]
            torch.set_rng_state(state["cpu"])
            if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """An adapter-only checkpoint is loaded non-strictly (the base is not in it); so check here that it holds
        exactly the trainable weights, else another `lora_target_modules` or rank would load silently. The LoRA
        settings that leave no trace in the weights' names (the scale ``lora_alpha / lora_r``) are compared too."""
        self._resume_rng = checkpoint.get("torch_rng_states")
        self._token_reference = checkpoint.get("token_loss_reference", self._token_reference)
        saved_hparams = checkpoint.get("hyper_parameters", {})
        differ = {key: (saved_hparams[key], self.hparams[key]) for key in ("lora_r", "lora_alpha")
                  if key in saved_hparams and key in self.hparams and saved_hparams[key] != self.hparams[key]}
        if differ:
            raise ValueError(f"The checkpoint was trained with other LoRA settings (saved, here): {differ}; the "
                             "adapter would load with another scale or shape. Use the settings it was trained with.")
        if self.lora_r and self.model is not None and not uses_fsdp2(self.model):
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            saved = set(checkpoint.get("state_dict", {}))
            missing, unexpected = sorted(trainable - saved), sorted(saved - set(self.state_dict()))
            if missing or unexpected:
                raise ValueError(
                    f"The checkpoint's adapter does not fit this model: {len(missing)} trainable weights missing "
                    f"(e.g. {missing[:2]}), {len(unexpected)} unknown (e.g. {unexpected[:2]}). Use the "
                    "`lora_r` / `lora_target_modules` it was trained with."
                )

    def _tokenizer_as_loaded(self):
        """The tokenizer without the pad token ``load_tokenizer`` borrowed from EOS (Llama 3 has none): saved
        with it, a collator that masks pad labels downstream would never teach the exported model to stop."""
        tokenizer = self.tokenizer
        if tokenizer.init_kwargs.get("pad_token") is not None or tokenizer.pad_token != tokenizer.eos_token:
            return tokenizer
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = None
        return tokenizer

    def on_fit_start(self) -> None:
        if self.export_dir:  # before any training, not after it: the export would refuse the directory then
            check_replaceable(self.export_dir, EXPORT_FILES, "`export_dir`")

    def on_fit_end(self) -> None:
        if self.export_dir:
            self.export(self.export_dir, merged=self.export_merged)

    def export(self, directory: str, merged: bool = True) -> str:
        """Write a Hugging Face directory (model + tokenizer) atomically; LoRA merged or as an adapter."""
        model = self._require_model()
        state = None
        if uses_fsdp2(model):  # gather the whole weights (a collective: every rank), write them from rank zero
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self._trainer is not None and not self.trainer.is_global_zero:
            return directory
        if state is not None:
            model = self._build_model()
            model.load_state_dict(state)
        if self.lora_r and merged and self.quantization:
            rank_zero_info("Quantized base: exporting the LoRA adapter only (merging into 4/8-bit weights is lossy).")
            merged = False
        if self.lora_r and merged:
            model = copy.deepcopy(model).merge_and_unload()
        config = getattr(model, "config", None)
        training_cache = getattr(config, "use_cache", None)
        if training_cache is False:  # off only for gradient checkpointing: users of the export want the cache
            config.use_cache = True
        try:
            with atomic_directory(directory, replaces=EXPORT_FILES) as staging:
                model.save_pretrained(staging, safe_serialization=True)
                self._tokenizer_as_loaded().save_pretrained(staging)
        finally:
            if training_cache is False:
                config.use_cache = False
        rank_zero_info(f"Exported {'merged model' if not self.lora_r or merged else 'LoRA adapter'} to {directory}")
        return directory
