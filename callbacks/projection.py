"""RepresentationProjection: after every optimizer step, put the protected responses back where they were.

Why after the step and on the parameters: AdamW divides each coordinate by its own running scale, so a
gradient projected into the null space comes out of the optimizer as an update that is not in it (and
tiny residual gradients are blown up to full-size steps). Acting on the updated weights with
``W <- W - s (W U - W0 U) U^T`` (``guard.projection``) keeps ``W U = W0 U`` exactly whatever the
optimizer did, costs two thin matmuls per module and stores only ``W0 U``, not a copy of ``W``.
With ``project_gradients`` (default) the same constraints are also applied to the gradients in
``on_before_optimizer_step`` (after accumulation and AMP unscaling, before clipping), so AdamW's
per-coordinate scaling never turns the protected part of a gradient into steps in free directions
(see ``guard.projection``; measured: it is what lets a high-energy subspace keep the task learnable).
The hook sits on the optimizer itself (``register_step_post_hook``), so gradient accumulation, clipping and
AMP need no special handling (a step the loss scaler skips never reaches the hook, except with an optimizer that
takes the scaler's inf check itself, e.g. ``AdamW(fused=True)``: its unchanged weights are corrected again, a
no-op at ``strength`` 1 and one more partial pull-back below it); manual optimization works the same (the
corrections run outside autocast), each optimizer's hook corrects only the parameters it steps (several
optimizers pull a damped tail or ``strength`` < 1 back once per step), and an optimizer created during the fit
gets its hook before its first step.

Leak policy (measured: leaving any of these free lost all refusals in the miniature world):
norm weights and other 1-D parameters are restored (frozen); embedding rows of every token seen in the
protected prompts are restored; a tied lm_head is projected first and its protected rows restored after;
biases of protected linears are restored. Frozen and bitsandbytes-quantized weights are skipped.
Sharding: the right-side correction acts row by row, so under FSDP2 (rows sharded as DTensors) each rank
corrects the rows it holds with the same ``U`` and the matching anchor rows (``guard.shards``). FSDP1 over
several processes (flat shards that cut rows apart) and DeepSpeed are refused in ``setup``
(``contract.check_unsharded``).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rg_lightning.arguments import require_bool, require_int, require_number
from rg_lightning.callbacks.refusal_directions import find_refusal_directions
from rg_lightning.chat import require_chat_template, template_fingerprint
from rg_lightning.contract import check_unsharded, hf_model, tokenizer_of
from rg_lightning.guard.basis import SafetyBasis
from rg_lightning.guard.coverage import read_by_text
from rg_lightning.guard.directions import direction_bases
from rg_lightning.guard.projection import (ConstraintSet, LinearConstraint, RowFreeze, batch_token_mask,
                                           build_constraints, frozen_adapter_keys, hold_absent_rows_)
from rg_lightning.guard.shards import reshard


def _input_ids(batch) -> torch.Tensor:
    """The token ids of a training batch: the batch itself when it is a tensor, else its ``input_ids``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"]
    raise TypeError(
        "RepresentationProjection(hold_absent_rows=True) needs the token ids of every training batch: make "
        "the batch a tensor of ids or a mapping with 'input_ids' (as Hugging Face collators do), or set "
        f"hold_absent_rows=False (got a batch of type {type(batch).__name__})"
    )


class RepresentationProjection(L.Callback):
    """Keeps the representations that mediate refusal fixed during fine-tuning.

    Args:
        mode: ``subspace`` (recommended: every protected module's response to the harmful-prompt
            activations is unchanged) or ``directions`` (only the refusal direction per layer).
        strength: 1 enforces the constraint exactly after every step, 0 turns it off.
        basis: Directory of a saved SafetyBasis; default: the ``RefusalDirections`` callback's basis.
        freeze_norms: Restore norm weights and other 1-D parameters (a leak otherwise).
        protect_embeddings: Restore the embedding rows of tokens that occur in the protected prompts.
        project_gradients: Also remove the constrained parts from the gradients before each optimizer
            step, so the optimizer's statistics only see what the constraint lets through.
        tail_reference_lr: Only for a basis with a damped tail (``RefusalDirections(ridge > 0)``, or damped
            rows of a trainable embedding: ``row_energy < 1`` with ``row_ridge > 0``): the learning rate at which
            the tail is pulled back as built. At every step the pull-back rate is
            scaled by the parameter group's current learning rate over this one, so the drift the tail
            allows does not grow with the learning rate (or shrink with a decaying schedule). ``None``:
            the same pull-back share at every step, whatever the learning rate.
        tail_early_steps, tail_early_scale: Only for a basis with a damped tail: during the first
            ``tail_early_steps`` optimizer steps the tail pulls back ``tail_early_scale`` times as hard as built
            (on top of ``tail_reference_lr``'s scaling), i.e. as a tail built with ``ridge / tail_early_scale``.
            Why: the drift a damped tail allows follows the push of the task's gradient, which is strongest while
            the task is being learnt; refusal fell most in the first 50 steps and recovered once the task was
            learnt (experiments/results/README.md, "How loose a tail"). A loose tail (large ``ridge``) held
            tight early keeps refusal through that phase and leaves the task more room after (miniature
            worlds, 450 steps: more refusal than the loose tail alone and more task than a tight one, but
            goals on no more worlds). 0 (default): as built throughout. The scale is at least 1 (1: no change).
        hold_absent_rows: Each optimizer step moves only the input-embedding rows of tokens that occur in
            its batch (the others' gradients are zeroed; under DDP, in any rank's batch). AdamW's momentum still
            moves rows seen in earlier batches and its weight decay shrinks every row, so keep weight decay 0. With a
            tied head the output softmax sends a gradient to every row, which AdamW turns into a full-size step, so
            words the task never uses drift in meaning and the held refusal boundary can then catch harmless
            requests. Needs each batch to be a tensor of token ids or a mapping with ``input_ids``.
        allow_unconstrained: Train, unguarded, the trainable parameters the guard has no constraint for (fused
            MoE experts, DoRA adapters, ...). By default (``subspace`` mode with norms and embedding rows held) such
            a parameter stops the run, unless no protected prompt reaches its module (a vision tower).
    """

    def __init__(
        self,
        mode: Literal["subspace", "directions"] = "subspace",
        strength: float = 1.0,
        basis: str | None = None,
        freeze_norms: bool = True,
        protect_embeddings: bool = True,
        project_gradients: bool = True,
        tail_reference_lr: float | None = None,
        tail_early_steps: int = 0,
        tail_early_scale: float = 1.0,
        hold_absent_rows: bool = False,
        allow_unconstrained: bool = False,
    ) -> None:
        require_number("strength", strength)
        require_number("tail_reference_lr", tail_reference_lr, optional=True)
        require_number("tail_early_scale", tail_early_scale)
        for argument, value in (("freeze_norms", freeze_norms), ("protect_embeddings", protect_embeddings),
                                ("project_gradients", project_gradients), ("hold_absent_rows", hold_absent_rows),
                                ("allow_unconstrained", allow_unconstrained)):
            require_bool(argument, value)
        if mode not in ("subspace", "directions"):
            raise ValueError(f"mode must be 'subspace' or 'directions', got {mode!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (1 exact, 0 off), got {strength}")
        if basis is not None and not os.path.isdir(basis):
            raise FileNotFoundError(f"No saved safety basis at {basis!r} (a directory with basis.safetensors and "
                                    "basis.json); drop `basis` to use the RefusalDirections callback's.")
        self.mode, self.strength, self.basis_path = mode, strength, basis
        self.freeze_norms, self.protect_embeddings = freeze_norms, protect_embeddings
        if tail_reference_lr is not None and not tail_reference_lr > 0:
            raise ValueError(f"tail_reference_lr must be > 0 (or None), got {tail_reference_lr}")
        self.project_gradients, self.tail_reference_lr = project_gradients, tail_reference_lr
        require_int("tail_early_steps", tail_early_steps)
        if tail_early_steps < 0:
            raise ValueError(f"tail_early_steps must be >= 0, got {tail_early_steps}")
        if not tail_early_scale >= 1:
            raise ValueError(f"tail_early_scale must be >= 1 (how many times as hard the tail pulls back early), "
                             f"got {tail_early_scale}")
        if tail_early_scale != 1 and not tail_early_steps:
            rank_zero_warn(f"RepresentationProjection: tail_early_scale ({tail_early_scale}) applies only with "
                           "tail_early_steps > 0.")
        self.tail_early_steps, self.tail_early_scale = tail_early_steps, tail_early_scale
        self._early = False  # in the first tail_early_steps optimizer steps (set before each step)
        # how many times as hard as built the damped tail pulls back, set by a RefusalFeedback callback (None: none)
        self.feedback_scale: float | None = None
        self.hold_absent_rows = hold_absent_rows
        self.allow_unconstrained = allow_unconstrained
        self.constraints: ConstraintSet | None = None
        self.safety_basis: SafetyBasis | None = None  # what the constraints hold (DriftGeometry reads it too)
        self._groups: dict[int, dict] = {}
        self._embedding: torch.nn.Parameter | None = None  # held rows: the trainable input embedding
        self._present: torch.Tensor | None = None  # tokens of the batches since the last optimizer step
        self._restored_state: dict | None = None
        self._hooks: list = []
        self._hooked = weakref.WeakKeyDictionary()  # optimizer -> the parameters it steps (its hook corrects those)
        self._model = lambda: None  # weak reference to the model the constraints were built on

    def _basis(self, trainer, pl_module) -> SafetyBasis:
        if self.basis_path:
            basis = SafetyBasis.load(self.basis_path)
            model = hf_model(pl_module)
            basis.check_compatible(model, str(getattr(model.config, "_name_or_path", "")))
            tokenizer = tokenizer_of(trainer, pl_module)
            require_chat_template(tokenizer)
            basis.check_rendering(template_fingerprint(tokenizer), check_system_prompt=False)  # (not our system prompt)
            return basis
        return find_refusal_directions(trainer).ensure_basis(trainer, pl_module)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_unsharded(trainer, "RepresentationProjection")
        refusal = find_refusal_directions(trainer, required=False) if self.basis_path else None
        if refusal is not None and not (refusal.load and os.path.samefile(refusal.load, self.basis_path)):
            rank_zero_warn("RepresentationProjection holds the basis loaded from `basis` while RefusalDirections "
                           "measures (or loads) its own, which DriftGeometry and SafetyEvaluation read: drop one, or "
                           "give RefusalDirections `load` the same directory.")
        self._restored_state = None  # a checkpoint this run restores sets it after setup; a validate/test run's must
        # not be taken by a later fit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        basis, model = self._basis(trainer, pl_module), hf_model(pl_module)
        self.safety_basis = basis
        if self.mode == "subspace":
            inputs, outputs = basis.subspaces, {}
        else:
            inputs, outputs = direction_bases(model, basis)
        ids = basis.protected_token_ids if self.protect_embeddings else None
        reshard(model)  # FSDP2: constraints must see (and LoRA's first projection write) the real shards
        earlier_fit = self._restored_state is None and self.constraints is not None and self._model() is model
        if earlier_fit:
            # a later fit of the same model continues from the aligned model's anchors, not the drifted weights
            # (with strength < 1 or a damped tail the weights are not back at them); another model starts afresh
            self._restored_state = self.constraints.state_dict()
        self._model = weakref.ref(model)
        restoring = self._restored_state is not None
        if not restoring and trainer.ckpt_path is not None and trainer.global_step > 0:
            rank_zero_warn(
                f"RepresentationProjection: this fit resumes at step {trainer.global_step} from a checkpoint without "
                "the projection's state, so it holds the fine-tuned weights' responses, not the aligned model's. "
                "Resume from a checkpoint of a guarded run, or start from the aligned model.")
        self.constraints = build_constraints(model, inputs, output_bases=outputs, protected_token_ids=ids,
                                             protected_token_weights=basis.protected_token_weights,
                                             strength=self.strength, freeze_norms=self.freeze_norms,
                                             project_lora=not restoring, measured_with_adapters=True)
        if restoring:  # resume: the anchors of the aligned model, not of the drifted one
            if earlier_fit:  # weights frozen since the earlier fit need no constraint; newly trainable ones still
                # fail below (anchoring them on the drifted weights would hold the fine-tuned model, not the aligned)
                built = {c.key for c in self.constraints.constraints}
                new = sorted(built - set(self._restored_state))
                if new:
                    raise ValueError(
                        f"RepresentationProjection: {len(new)} constraints (e.g. {new[:3]}) are for weights that were "
                        "frozen in this model's earlier fit, so only their fine-tuned values are left to anchor, not "
                        "the aligned model's. Keep them frozen, or guard a fresh copy of the aligned model.")
                self._restored_state = {k: v for k, v in self._restored_state.items() if k in built}
            stale = set(frozen_adapter_keys(self.constraints, self._restored_state))
            if stale:
                rank_zero_info(f"RepresentationProjection: the checkpoint holds the constraints of {len(stale)} "
                               f"adapter matrices that do not train in this fit (e.g. {sorted(stale)[:2]}); they are "
                               "dropped.")
                self._restored_state = {k: v for k, v in self._restored_state.items() if k not in stale}
            self.constraints.load_state_dict(self._restored_state)
            self._restored_state = None
        if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
            rank_zero_warn(
                "RepresentationProjection: the base model is 8-bit (bitsandbytes int8), which also quantizes each "
                "layer's input activations, so the adapters' rounding-level residue flips roundings downstream and the "
                "protected outputs move (measured: 9e-3 after 4 steps on a tiny Llama, against 1e-6 with nf4). Load "
                "the base in 4-bit (`quantization: nf4`) for the exact guarantee.")
        # a damped row's pull-back (a small share of a small drift) is rounded away in half precision too
        half_precision = [c for c in self.constraints.constraints
                          if (isinstance(c, LinearConstraint) or (isinstance(c, RowFreeze) and c.has_tail))
                          and c.param.dtype in (torch.bfloat16, torch.float16)]
        if half_precision and self.strength > 0:
            first = half_precision[0]
            rank_zero_warn(
                f"RepresentationProjection: {len(half_precision)} constrained weight(s) are "
                f"{str(first.param.dtype).removeprefix('torch.')} (e.g. {first.name}): each correction holds the "
                "protected outputs only to that dtype's rounding, and the residue grows with how far the weights move "
                "(measured on tiny models, full fine-tuning: the final hidden states moved by 3-5e-2 at lr 1e-4 and "
                "were not held at lr 1e-2; experiments/precision.py). "
                "Load float32 weights (`dtype: float32`, with `precision: bf16-mixed` for speed), or train LoRA "
                "with float32 adapters, for the exact guarantee.")
        if self.tail_early_steps and not self.constraints.has_tail:
            raise ValueError("RepresentationProjection: tail_early_steps tightens the damped tail, but the basis has "
                             "none. Give RefusalDirections a ridge > 0 (or row_energy < 1 with row_ridge > 0, for "
                             "trainable embeddings), or set tail_early_steps: 0.")
        whole = self.constraints.held_whole()
        if whole:
            rank_zero_info(
                f"RepresentationProjection: {len(whole)} modules read only directions the protected prompts span, so "
                f"they are held whole and cannot learn (e.g. {whole[:3]}). A low-rank adapter written by hand is such "
                "a module (its second factor reads r features): use PEFT LoRA, whose first factor the guard "
                "constrains.")
        if self.constraints.uncovered:
            self._check_uncovered(model, basis)
            rank_zero_info("RepresentationProjection: unconstrained trainable parameters: "
                           f"{self.constraints.uncovered}")
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rank_zero_info(
            f"RepresentationProjection ({self.mode}, strength {self.strength}): {len(self.constraints.constraints)} "
            f"constraints, {len(self.constraints.skipped)} skipped, extra memory "
            f"{self.constraints.extra_memory_bytes() / max(weights, 1):.2%} of the weights"
        )
        self._groups = {}  # id(parameter) -> its optimizer's param group (filled by _hook)
        self._trained = self._stepped(trainer)
        embedding = model.get_input_embeddings().weight if self.hold_absent_rows else None
        self._embedding = embedding if embedding is not None and embedding.requires_grad else None
        self._present = None
        for optimizer in trainer.optimizers:
            self._hook(optimizer)

    def _hook(self, optimizer) -> list:
        """After each step of ``optimizer``, correct the parameters it stepped (once per optimizer, also for one
        created during the fit); returns them."""
        if optimizer not in self._hooked:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self._check_numeric_lr(optimizer)
            self._hooked[optimizer] = params
            self._groups.update({id(p): group for group in optimizer.param_groups for p in group["params"]})
            self._hooks.append(optimizer.register_step_post_hook(
                lambda *_: self.constraints.apply_(params=params)))
        return self._hooked[optimizer]

    def _check_numeric_lr(self, optimizer) -> None:
        """``tail_reference_lr`` reads each group's learning rate at every step: refuse one without a number now."""
        if self.tail_reference_lr is None or not self.constraints.has_tail:
            return
        for group in optimizer.param_groups:
            try:
                float(group["lr"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"RepresentationProjection: tail_reference_lr scales the damped tail's pull-back by the learning "
                    f"rate, but {type(optimizer).__name__} has lr={group.get('lr')!r} in a parameter group (e.g. "
                    "Adafactor's relative steps). Give it a numeric lr, or set tail_reference_lr: null (a fixed "
                    "share per step).") from None

    def _check_uncovered(self, model, basis: SafetyBasis) -> None:
        """A trainable parameter with no constraint that protected prompts read would move the protected outputs
        while the run looks guarded. The comparison settings (directions mode, norms or rows left free) leave some
        free on purpose; parameters that a prompt's logits do not depend on (a vision tower's) may train."""
        if self.allow_unconstrained or self.mode != "subspace" or not (self.freeze_norms and self.protect_embeddings):
            return
        params = dict(model.named_parameters())
        flags = read_by_text(model, [params[name] for name in self.constraints.uncovered], basis.protected_token_ids)
        read = [name for name, is_read in zip(self.constraints.uncovered, flags) if is_read]
        if read:
            why = [f"{name}: {reason}" for name, reason in self.constraints.skipped
                   if any(p.startswith(name + ".") for p in read)][:3]
            raise ValueError(
                f"RepresentationProjection: {len(read)} trainable parameters that the protected prompts read have no "
                f"constraint (e.g. {read[:4]}{'; skipped ' + str(why) if why else ''}), so they would move the "
                "protected outputs: the guard holds nn.Linear layers, LoRA on them, embeddings and norms, not e.g. "
                "GPT-2's Conv1D, fused MoE experts or their router, DoRA, aLoRA or LoRA on embeddings. Freeze them "
                "(requires_grad=False) or leave them out of the LoRA targets, or set allow_unconstrained=True to "
                "train them unguarded.")

    def _tail_scale(self, param) -> float:
        """The pull-back rate relative to the built one: the parameter group's current learning rate over
        ``tail_reference_lr`` (1 without one), times ``tail_early_scale`` during the first ``tail_early_steps``,
        times the scale a RefusalFeedback callback sets."""
        group = self._groups.get(id(param))
        by_lr = 1.0 if group is None or self.tail_reference_lr is None else float(group["lr"]) / self.tail_reference_lr
        return by_lr * (self.tail_early_scale if self._early else 1.0) * (self.feedback_scale or 1.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._embedding is not None:
            self._present = batch_token_mask(_input_ids(batch), self._embedding.shape[0], self._present)

    @staticmethod
    def _stepped(trainer) -> set[int]:
        """The parameters the optimizers can step: in a param group and trainable."""
        return {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups
                for p in group["params"] if p.requires_grad}

    def _check_nothing_unfrozen(self, trainer, pl_module) -> None:
        """The basis covers what was trainable at fit start; a weight unfrozen later (``BaseFinetuning``, or a
        staged schedule that freezes one layer, unfreezes another and rebuilds the optimizers) would train
        unconstrained, so it stops the run instead. Compared as sets every step (a set of a few hundred ids): a
        count would miss a swap."""
        late = self._stepped(trainer) - self._trained
        if late:
            names = [n for n, p in pl_module.named_parameters() if id(p) in late]
            raise RuntimeError(f"RepresentationProjection: {len(late)} parameters became trainable after fit start "
                               f"(e.g. {names[:3]}); the safety basis does not cover them, so they would move the "
                               "protected outputs. Unfreeze them before `fit` (the basis is measured then).")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.constraints is None:
            return
        self._check_nothing_unfrozen(trainer, pl_module)
        params = self._hook(optimizer)  # (an optimizer created after fit start gets its hook here, before its step)
        if self._embedding is not None and self._present is not None and any(p is self._embedding for p in params):
            # Every rank holds the rows of any rank's batch: the DDP-averaged gradient is the same everywhere.
            present = trainer.strategy.reduce(self._present.to(self._embedding.device, torch.int32), reduce_op="sum")
            hold_absent_rows_(self._embedding, present > 0)
            self._present = None
        # the step count, not a counter of ours: the same on every rank and right after a resume
        self._early = trainer.global_step < self.tail_early_steps
        # before the gradients and the step-post hook use the tails
        if self.tail_reference_lr is not None or self.tail_early_steps or self.feedback_scale is not None:
            self.constraints.scale_tails(self._tail_scale)
        if self.project_gradients:
            self.constraints.project_grads_(params=params)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._hooked.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict:
        return {"constraints": self.constraints.state_dict()} if self.constraints is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_state = state_dict.get("constraints")
