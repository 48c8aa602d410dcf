"""DriftGeometry: watch what fine-tuning does to the geometry that mediates refusal.

Every ``every_n_steps`` optimizer steps it runs the model (no gradient) on fixed harmful and harmless
probe prompts and compares with the same probes at fit start, per layer as SafetyBasis counts them (the
residual stream at each decoder block's input, last position): cosine between the current and
initial refusal direction, the harmful-vs-harmless gap along the initial direction, Fisher separation,
principal angles between the initial and current subspaces of the harmful probes' variation around their
mean (the mean itself is what the direction metrics follow), linear CKA, the mean
refusal score on harmful probes (and the share of them it would refuse, score > 0; a warning when that share
falls by more than ``warn_refusal_drop``) and the KL of harmless next-token distributions against the initial
model. It also measures interference: the share of the task gradient's energy inside the safety basis's
subspaces (the ones ``subspace`` mode holds; with a damped tail, each direction weighted as the projection
weighs it), right after backward (before any projection, whatever the callbacks' order). It is the same
measure with ``mode="directions"`` or no projection at all, so runs compare. Works with or without
RepresentationProjection. A metric with no defined value is None (null in the JSON, NaN in the
loggers): the direction metrics where the initial direction is 0 (layer 0, the embeddings, when the last
template token is the same for every prompt; the angles too, as the probes do not vary there) and
interference when the gradient in the subspaces' modules is 0 or not finite. A diverged model (NaN or Inf
states) gets NaN, the summary metrics included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import weakref

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from rg_lightning.arguments import require_bool, require_int, require_number
from rg_lightning.atomic import atomic_file
from rg_lightning.callbacks.projection import RepresentationProjection
from rg_lightning.callbacks.refusal_directions import find_refusal_directions
from rg_lightning.chat import encode_prompts, position_ids
from rg_lightning.contract import check_unsharded, hf_model, log_now, run_directory, system_prompt_of, tokenizer_of
from rg_lightning.figures import new_figure, save_png
from rg_lightning.guard.geometry import (
    cosine,
    fisher_ratio,
    kl_divergence,
    linear_cka,
    pca_2d,
    principal_angles,
    projection_gap,
    spread_subspace,
)
from rg_lightning.guard.projection import canonical_name, subspace_energy
from rg_lightning.guard.shards import holds_all_rows, local_rows, uses_fsdp2
from rg_lightning.modes import eval_mode
from rg_lightning.prompts import check_prompt_source, load_prompts, prompt_hashes
from rg_lightning.strict_json import finite_or_null
from rg_lightning.refusal_score import refusal_score, refusal_token_ids


def _defined(value: float) -> float | None:
    """None for NaN (0/0: no defined value); inf stays (e.g. Fisher separation with zero spread)."""
    return None if math.isnan(value) else value


def _layer_metrics(h0: torch.Tensor, s0: torch.Tensor, h1: torch.Tensor, s1: torch.Tensor,
                   subspace0: torch.Tensor | None) -> dict[str, float | None]:
    """One layer's drift from its fit-start (``h0``, ``s0``) to its current harmful and harmless states.

    The direction metrics are None where either refusal direction is 0: there is no direction to compare. A
    diverged model (NaN or Inf states) gets NaN for every metric: logged as such, not a crash of the fit."""
    if not (torch.isfinite(h1).all() and torch.isfinite(s1).all()):
        return dict.fromkeys(("cos", "gap", "fisher", "cka", "angle"), math.nan)
    direction0, direction1 = h0.mean(0) - s0.mean(0), h1.mean(0) - s1.mean(0)
    subspace1 = None if subspace0 is None else spread_subspace(h1, k=subspace0.shape[1])
    angle = None if subspace1 is None else float(principal_angles(subspace0, subspace1).max())
    metrics = {"cka": _defined(linear_cka(torch.cat([h0, s0]), torch.cat([h1, s1]))), "angle": angle}
    if not (direction0.any() and direction1.any()):
        return {"cos": None, "gap": None, "fisher": None, **metrics}
    return {"cos": cosine(direction1, direction0), "gap": projection_gap(h1, s1, direction0),
            "fisher": _defined(fisher_ratio(h1, s1, direction0)), **metrics}


def probe_fingerprint(probes: dict) -> str:
    """Hash of the encoded probes (token ids and padding): a resumed fit must measure the prompts, template and
    system prompt its restored fit-start states were measured on, or every metric compares unlike with unlike."""
    digest = hashlib.sha256()
    for kind in sorted(probes):
        for key in ("input_ids", "attention_mask"):
            digest.update(f"{kind}/{key}/{tuple(probes[kind][key].shape)}".encode())
            digest.update(probes[kind][key].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _reading_weights(model: nn.Module, names) -> dict[str, list[torch.Tensor]]:
    """The trainable weights that read each named module's input: a LoRA layer's ``lora_A``, else a linear's
    own weight (a frozen base layer has no gradient and adds nothing). Found by canonical name, so a basis
    measured on the plain model works on its PEFT version."""
    wanted = {canonical_name(name): name for name in names}
    found = {name: [] for name in names}
    for name, module in model.named_modules():
        key = wanted.get(canonical_name(name))
        if key is not None and hasattr(module, "lora_A"):
            found[key] += [a.weight for a in module.lora_A.values()]
        elif key is not None and isinstance(module, nn.Linear):
            found[key].append(module.weight)
    missing = [name for name, weights in found.items() if not weights]
    if missing:
        raise ValueError(f"DriftGeometry: the basis names modules this model lacks: {missing[:5]}")
    return found


def _safety_basis(trainer):
    """The basis the run is guarded with: RefusalDirections', else a RepresentationProjection's loaded one."""
    refusal = find_refusal_directions(trainer, required=False)
    if refusal is not None and refusal.basis is not None:
        return refusal.basis
    return next((c.safety_basis for c in trainer.callbacks if isinstance(c, RepresentationProjection)), None)


class DriftGeometry(L.Callback):
    """Logs drift metrics every ``every_n_steps`` and writes ``drift_summary.json`` and figures at fit end
    (``drift`` being the default ``name``).

    Args:
        every_n_steps: Measurement cadence in optimizer steps.
        harmful: Harmful probe prompts (list, file, hub id, ``toy:harmful``); default: RefusalDirections' source.
        harmless: Harmless probe prompts, same forms.
        system_prompt: System message of the probes; ``None``: RefusalDirections' (the directions and subspaces
            compared against were measured with it, so the probes must be rendered alike), else the datamodule's;
            ``""``: none.
        n_probes: Probe prompts per set.
        seed: Seed of the probe sampling. The prompts a RefusalDirections callback measures its basis on are
            left out (the guard holds exactly those, so drift on them would look smaller than it is), unless
            fewer than 2 would remain (then they are kept, with a warning).
        figures: Write PNG figures at fit end.
        warn_refusal_drop: Warn (once) when the share of harmful probes the model would refuse (logit
            refusal score > 0) falls more than this below its value at fit start; ``None``: never.
        batch_size: Probe prompts per forward pass (each holds every layer's hidden states).
        name: Prefix of the logged metrics (``drift/...``) and the files (``drift_summary.json``, ...); give each
            of several DriftGeometry callbacks (other probe sets) its own, which also keeps their checkpointed
            states apart.
    """

    def __init__(self, every_n_steps: int = 25, harmful=None, harmless=None, system_prompt: str | None = None,
                 n_probes: int = 32, seed: int = 7, figures: bool = True,
                 warn_refusal_drop: float | None = 0.1, batch_size: int = 16, name: str = "drift") -> None:
        for argument, value in (("every_n_steps", every_n_steps), ("n_probes", n_probes), ("seed", seed),
                                ("batch_size", batch_size)):
            require_int(argument, value)
        require_number("warn_refusal_drop", warn_refusal_drop, optional=True)
        require_bool("figures", figures)
        if every_n_steps < 1 or n_probes < 2 or batch_size < 1:
            raise ValueError("every_n_steps and batch_size must be >= 1 and n_probes >= 2")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError("name must be letters, digits, '_', '.' or '-' (a metric prefix and file name), "
                             f"got {name!r}")
        if warn_refusal_drop is not None and not 0.0 <= warn_refusal_drop <= 1.0:
            raise ValueError(f"warn_refusal_drop must be in [0, 1] (or None), got {warn_refusal_drop}")
        for what, source in (("harmful", harmful), ("harmless", harmless)):
            if source is not None:
                check_prompt_source(source, what)
        self.every_n_steps, self.harmful, self.harmless = every_n_steps, harmful, harmless
        self.system_prompt = system_prompt
        self.n_probes, self.seed, self.figures = n_probes, seed, figures
        self.warn_refusal_drop, self._warned = warn_refusal_drop, False
        self.batch_size, self.name = batch_size, name
        self.initial: dict[str, torch.Tensor] | None = None
        self._subspaces0: list[torch.Tensor] | None = None  # of self.initial, computed once
        self.history: list[dict] = []
        self._probes: dict | None = None
        self._interference: tuple[int, float | None] | None = None  # (batch it was measured in, value)
        self._batches = 0  # training batches begun in this fit (keys an interference measurement to its batch)
        self._batch_start_step = 0  # global_step when the current batch began
        self._steps_per_batch = 0  # the most optimizer steps one batch has taken (manual optimization: several)
        self._step_offset = 0  # a later fit of the same model counts its steps on from the earlier fits'
        self._steps_trained = 0  # optimizer steps of the fits so far, at their ends
        self._model = lambda: None  # weak reference to the model measured at fit start
        self._restored = False  # a checkpoint's state was loaded for this fit
        self._restored_probes: str | None = None  # the fingerprint of the probes a restored state measured

    # -- probes ------------------------------------------------------------------------------------------------
    def _sources(self, trainer):
        """Harmful and harmless probe sources and the system prompt: given, else RefusalDirections'."""
        refusal = find_refusal_directions(trainer, required=False)
        harmful = self.harmful or (refusal.harmful if refusal else None)
        harmless = self.harmless or (refusal.harmless if refusal else None)
        if harmful is None or harmless is None:
            raise ValueError("DriftGeometry needs probe prompts: pass `harmful=` and `harmless=` "
                             "(or add a RefusalDirections callback, whose sources are then used).")
        given = self.system_prompt if self.system_prompt is not None or refusal is None else refusal.system_prompt
        system_prompt = system_prompt_of(given, trainer)
        return harmful, harmless, system_prompt

    def _probe_prompts(self, source, measured: set[str], kind: str) -> list[str]:
        """``n_probes`` prompts of ``source`` (seeded), none of them one the basis is measured on if possible."""
        pool = load_prompts(source)
        unseen = [p for p, h in zip(pool, prompt_hashes(pool)) if h not in measured]
        if len(unseen) < 2:
            rank_zero_warn(f"DriftGeometry: the {kind} probe source holds no prompts besides those the safety basis is "
                           "measured on, so drift is probed on them (the guard holds them: it will look small). "
                           "Give other prompts with `harmful=` / `harmless=`.")
            unseen = pool
        return unseen if len(unseen) <= self.n_probes else random.Random(self.seed).sample(unseen, self.n_probes)

    def _encode(self, trainer, pl_module):
        if self._probes is None:
            tokenizer = tokenizer_of(trainer, pl_module)
            harmful, harmless, system_prompt = self._sources(trainer)
            refusal = find_refusal_directions(trainer, required=False)
            measured = (refusal.measured_prompt_hashes() or set()) if refusal is not None else set()
            self._probes = {kind: encode_prompts(tokenizer, self._probe_prompts(src, measured, kind), system_prompt)
                            for kind, src in (("harmful", harmful), ("harmless", harmless))}
            self._refusal_ids = refusal_token_ids(tokenizer)
        return self._probes

    @torch.no_grad()
    def measure_states(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        """Last-position input of every decoder block, [layers, n, d], and last-position logits.

        Block inputs are ``hidden_states[:-1]``, SafetyBasis' layers (layer 0: the embeddings); the last entry
        is the final norm's output (transformers 5), on another scale than the blocks' residual stream."""
        model = hf_model(pl_module)
        device = next(model.parameters()).device
        out = {}
        with eval_mode(model):
            for kind, encoded in self._encode(trainer, pl_module).items():
                states, logits = [], []
                for start in range(0, len(encoded["input_ids"]), self.batch_size):
                    batch = {k: v[start:start + self.batch_size].to(device) for k, v in encoded.items()}
                    result = model(**batch, position_ids=position_ids(batch["attention_mask"]),
                                   output_hidden_states=True, use_cache=False,
                                   logits_to_keep=1)
                    states.append(torch.stack([h[:, -1] for h in result.hidden_states[:-1]]).double().cpu())
                    logits.append(result.logits[:, -1].double().cpu())
                out[f"{kind}_states"], out[f"{kind}_logits"] = torch.cat(states, 1), torch.cat(logits)
        return out

    # -- metrics -----------------------------------------------------------------------------------------------
    def initial_subspaces(self) -> list[torch.Tensor | None]:
        """Per layer, the span of 90% of the fit-start harmful states' variance (None where they do not vary;
        they never change: cached)."""
        if self._subspaces0 is None:
            self._subspaces0 = [spread_subspace(h, energy=0.9) for h in self.initial["harmful_states"]]
        return self._subspaces0

    def metrics(self, now: dict[str, torch.Tensor]) -> dict:
        first = self.initial
        per_layer = [_layer_metrics(first["harmful_states"][layer], first["harmless_states"][layer],
                                   now["harmful_states"][layer], now["harmless_states"][layer], subspace0)
                     for layer, subspace0 in enumerate(self.initial_subspaces())]
        scores = refusal_score(now["harmful_logits"], self._refusal_ids)
        summary = {f"{name}_layer{i}": layer[name] for name in per_layer[0] for i, layer in enumerate(per_layer)}
        cosines = [layer["cos"] for layer in per_layer if layer["cos"] is not None]
        summary.update({
            "refusal_score": float(scores.mean()),
            # NaN scores compare False, which would read as "refuses none": a diverged model has no share
            "refused_share": float((scores > 0).double().mean()) if torch.isfinite(scores).all() else math.nan,
            "harmless_kl": kl_divergence(first["harmless_logits"], now["harmless_logits"]),
            # min() with a NaN depends on the order (min([1.0, nan]) is 1.0): a diverged layer makes it NaN
            "cos_min": math.nan if any(math.isnan(c) for c in cosines) else min(cosines, default=None),
        })
        return summary

    # -- hooks -------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        check_unsharded(trainer, "DriftGeometry")
        self._restored = False  # set again if this run restores a checkpoint (after setup), never left from another
        if stage == "fit":  # the sources borrowed from RefusalDirections (one that loads its basis never reads them)
            harmful, harmless, _ = self._sources(trainer)
            check_prompt_source(harmful, "harmful")
            check_prompt_source(harmless, "harmless")

    def on_train_start(self, trainer, pl_module) -> None:
        model = hf_model(pl_module)
        if self.initial is not None and not self._restored:  # this callback measured an earlier fit
            if self._model() is not model:  # another model: drift from its own start
                self.initial, self.history, self._warned, self._probes = None, [], False, None
                self._step_offset = self._steps_trained = 0
            elif trainer.global_step + self._step_offset < self._steps_trained:
                # the same model fitted again by a new Trainer (steps from 0): the count goes on from the last fit's end
                self._step_offset = self._steps_trained - trainer.global_step
        if self._restored and self._restored_probes is not None:
            if probe_fingerprint(self._encode(trainer, pl_module)) != self._restored_probes:
                raise ValueError(
                    "DriftGeometry: the checkpoint's fit-start states were measured on other probes than this run "
                    "encodes (other harmful/harmless sources, system_prompt, n_probes, seed or tokenizer), so "
                    "every drift metric would compare different prompts. Resume with the settings of the run "
                    "that saved it, or start a new fit.")
        self._restored, self._model = False, weakref.ref(model)
        if self.initial is None:  # resume restores the fit-start measurement instead
            # Rank zero's measurement for everyone: sharded forwards may round differently per rank.
            self.initial = trainer.strategy.broadcast(self.measure_states(trainer, pl_module), src=0)
            self._subspaces0 = None
            self.history.append({"step": trainer.global_step + self._step_offset, **self.metrics(self.initial)})

    def on_after_backward(self, trainer, pl_module) -> None:
        """Interference: energy of the raw (unclipped, unprojected) gradient inside the subspaces.

        Measured right after backward, not in ``on_before_optimizer_step``: there RepresentationProjection,
        when listed first, would already have projected the gradient (its part inside the subspaces ~0).
        With gradient accumulation the last micro-batch before the step sees the accumulated gradient and
        its value is the one kept; AMP's loss scale cancels in the ratio. None when there is no energy to
        share (LoRA's first step: B = 0, so lora_A gets an exact 0 gradient) or the gradient is not finite
        (an fp16 overflow step, skipped by the scaler)."""
        if not self._batch_may_end_at_a_record(trainer, pl_module):
            return
        safety_basis = _safety_basis(trainer)
        if safety_basis is None:
            return
        model = hf_model(pl_module)
        energy = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # [inside, total], whole gradients
        sharded = torch.zeros_like(energy)  # the same from this rank's rows of row-sharded (FSDP2) gradients
        weights_of = _reading_weights(model, safety_basis.subspaces)
        for name, basis in safety_basis.subspaces.items():
            for weight in weights_of[name]:
                if weight.grad is not None:
                    rows, _ = local_rows(weight.grad)  # never gathered: a large lm_head would cost GBs per rank
                    part = subspace_energy(rows, basis.to(rows.device)).to(energy.device)
                    (energy if holds_all_rows(weight.grad) else sharded).add_(part)
        if uses_fsdp2(model):  # decided by the model, so every rank calls the reduce
            energy += trainer.strategy.reduce(sharded, reduce_op="sum")
        inside, total = energy.tolist()
        usable = math.isfinite(inside) and math.isfinite(total) and total > 0
        self._interference = (self._batches, inside / total if usable else None)

    def _batch_may_end_at_a_record(self, trainer, pl_module) -> bool:
        """Whether the steps this batch can still take reach a multiple of ``every_n_steps``: one under automatic
        optimization, as many as the optimizers (or as a batch has taken before) under manual optimization,
        where one backward may be followed by several optimizers' steps, each counted by ``global_step``."""
        steps = 1 if pl_module.automatic_optimization else max(1, len(trainer.optimizers), self._steps_per_batch)
        return any((trainer.global_step + k) % self.every_n_steps == 0 for k in range(1, steps + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batches += 1
        self._batch_start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self._steps_per_batch = max(self._steps_per_batch, step - self._batch_start_step)
        if (step == 0 or step % self.every_n_steps
                or (self.history and self.history[-1]["step"] == step + self._step_offset)):
            return
        record = {"step": step + self._step_offset, **self.metrics(self.measure_states(trainer, pl_module))}
        if self._interference is not None and self._interference[0] == self._batches:  # this batch's gradient
            record["interference"] = self._interference[1]
            self._interference = None
        record = trainer.strategy.broadcast(record, src=0)  # the same numbers on every rank, logged and kept
        self.history.append(record)
        self._check_refusal(record)
        # undefined values (None) logged as NaN; per-layer metrics other than the cosines stay in the summary
        log_now(trainer, {f"{self.name}/{k}": math.nan if v is None else float(v) for k, v in record.items()
                          if k != "step" and ("_layer" not in k or k.startswith("cos_"))})

    def _check_refusal(self, record: dict) -> None:
        start, now = self.history[0].get("refused_share"), record.get("refused_share")
        if self.warn_refusal_drop is None or self._warned or start is None or now is None:
            return
        if now < start - self.warn_refusal_drop:
            self._warned = True
            rank_zero_warn(
                f"DriftGeometry ({self.name}): at step {record['step']} the model would refuse {now:.0%} of the "
                f"harmful probes (logit refusal score > 0), against {start:.0%} at fit start. With "
                "RepresentationProjection, protect more (RefusalDirections energy or ridge), lower the learning rate "
                "or set tail_reference_lr; without it, this is the drift the guard exists to stop."
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._steps_trained = trainer.global_step + self._step_offset

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.initial is not None:
            self._write(run_directory(trainer), self.measure_states(trainer, pl_module))

    @rank_zero_only
    def _write(self, directory: str, final: dict) -> None:
        with atomic_file(os.path.join(directory, f"{self.name}_summary.json")) as handle:
            ranks = [None if basis is None else basis.shape[1] for basis in self.initial_subspaces()]
            json.dump(finite_or_null({"history": self.history, "final": self.metrics(final),
                                      "angle_subspace_ranks": ranks}), handle, indent=2, allow_nan=False)
        if self.figures:
            self._figures(directory, final)

    def _figures(self, directory: str, final: dict) -> None:
        layers = self.initial["harmful_states"].shape[0]
        steps = [r["step"] for r in self.history]
        fig, axes = new_figure(2, 11, 4)
        for layer in range(layers):
            cosines = [r[f"cos_layer{layer}"] for r in self.history]
            axes[0].plot(steps, [math.nan if c is None else c for c in cosines], label=f"layer {layer}")
        axes[0].set(xlabel="step", ylabel="cos(r_t, r_0)", title="Refusal direction drift per layer")
        axes[0].legend(fontsize=7)
        axes[1].plot(steps, [r["refusal_score"] for r in self.history], color="tab:red")
        axes[1].set(xlabel="step", ylabel="mean refusal score", title="Harmful probes")
        if all("refused_share" in r for r in self.history):  # histories resumed from older checkpoints lack it
            share = axes[1].twinx()
            share.plot(steps, [100 * r["refused_share"] for r in self.history], color="tab:gray", linestyle="--")
            share.set(ylabel="refused (score > 0), % (dashed)", ylim=(-5, 105))
        save_png(fig, os.path.join(directory, f"{self.name}_curves.png"))
        layer = layers // 2
        fig, axes = new_figure(2, 10, 4.5, sharex=True, sharey=True)
        together = torch.cat([self.initial["harmful_states"][layer], self.initial["harmless_states"][layer],
                              final["harmful_states"][layer], final["harmless_states"][layer]])
        points = pca_2d(together)
        n, m = self.initial["harmful_states"].shape[1], self.initial["harmless_states"].shape[1]
        for axis, offset, title in ((axes[0], 0, "fit start"), (axes[1], n + m, "fit end")):
            axis.scatter(*points[offset:offset + n].T, s=10, c="tab:red", label="harmful")
            axis.scatter(*points[offset + n:offset + n + m].T, s=10, c="tab:blue", label="harmless")
            axis.set(title=f"Layer {layer}, {title}")
            axis.legend()
        save_png(fig, os.path.join(directory, f"{self.name}_activations_pca.png"))

    @property
    def state_key(self) -> str:
        # the default name keeps the plain class name, the key of checkpoints written before `name` existed
        return super().state_key if self.name == "drift" else self._generate_state_key(name=self.name)

    def state_dict(self) -> dict:
        if self.initial is None:
            return {}
        return {"initial": self.initial, "history": self.history, "warned": self._warned, "layers": "block_inputs",
                "step_offset": self._step_offset,
                "probes": self._restored_probes if self._probes is None else probe_fingerprint(self._probes)}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if state_dict.get("layers") != "block_inputs":
            raise ValueError("This checkpoint's DriftGeometry state counts layers as block outputs (an earlier "
                             "version), so its fit-start states would be compared with other layers. Resume without "
                             "DriftGeometry, or start a new fit.")
        self.initial, self.history = state_dict["initial"], list(state_dict["history"])
        self._warned = bool(state_dict.get("warned", False))  # the refusal-drop warning is given once per run
        self._step_offset = int(state_dict.get("step_offset", 0))
        self._restored_probes = state_dict.get("probes")  # checkpoints of earlier versions lack it: unchecked
        self._subspaces0, self._restored = None, True
