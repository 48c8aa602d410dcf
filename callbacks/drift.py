"""DriftGeometry: watch what fine-tuning does to the geometry that mediates refusal.

Every ``every_n_steps`` optimizer steps it runs the model (no gradient) on fixed harmful and harmless
probe prompts and compares with the same probes at fit start: per-layer cosine between the current and
initial refusal direction, the harmful-vs-harmless gap along the initial direction, Fisher separation,
principal angles between the initial and current harmful-activation subspaces, linear CKA, the mean
refusal score on harmful probes (and the share of them it would refuse, score > 0; a warning when that share
falls by more than ``warn_refusal_drop``) and the KL of harmless next-token distributions against the initial
model. It also measures interference: the share of the task gradient's energy inside the protected
subspaces, right after backward (before any projection, whatever the callbacks' order). Works with or
without RepresentationProjection.
"""

from __future__ import annotations

import json
import math
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from rg_lightning.atomic import atomic_file
from rg_lightning.callbacks.refusal_directions import RefusalDirections
from rg_lightning.chat import render_prompt
from rg_lightning.contract import check_unsharded, hf_model, system_prompt_of, tokenizer_of
from rg_lightning.guard.geometry import cosine, fisher_ratio, kl_divergence, linear_cka, pca_2d, principal_angles
from rg_lightning.guard.projection import subspace_energy
from rg_lightning.guard.shards import is_sharded, local_rows, uses_fsdp2
from rg_lightning.guard.subspace import top_subspace
from rg_lightning.prompts import load_prompts
from rg_lightning.refusal_score import refusal_score, refusal_token_ids

class DriftGeometry(L.Callback):
    """Logs drift metrics every ``every_n_steps`` and writes ``drift_summary.json`` and figures at fit end.

    Args:
        every_n_steps: Measurement cadence in optimizer steps.
        harmful: Harmful probe prompts (list, file, hub id, ``toy:harmful``); default: RefusalDirections' source.
        harmless: Harmless probe prompts, same forms.
        system_prompt: System message of the probes; ``None``: RefusalDirections' (the directions and subspaces
            compared against were measured with it, so the probes must be rendered alike), else the datamodule's;
            ``""``: none.
        n_probes: Probe prompts per set.
        seed: Seed of the probe sampling (differs from RefusalDirections' so probes are other prompts).
        figures: Write PNG figures at fit end.
        warn_refusal_drop: Warn (once) when the share of harmful probes the model would refuse (logit
            refusal score > 0) falls more than this below its value at fit start; ``None``: never.
    """

    def __init__(self, every_n_steps: int = 25, harmful=None, harmless=None, system_prompt: str | None = None,
                 n_probes: int = 32, seed: int = 7, figures: bool = True,
                 warn_refusal_drop: float | None = 0.1) -> None:
        if every_n_steps < 1 or n_probes < 2:
            raise ValueError("every_n_steps must be >= 1 and n_probes >= 2")
        if warn_refusal_drop is not None and not 0.0 <= warn_refusal_drop <= 1.0:
            raise ValueError(f"warn_refusal_drop must be in [0, 1] (or None), got {warn_refusal_drop}")
        self.every_n_steps, self.harmful, self.harmless = every_n_steps, harmful, harmless
        self.system_prompt = system_prompt
        self.n_probes, self.seed, self.figures = n_probes, seed, figures
        self.warn_refusal_drop, self._warned = warn_refusal_drop, False
        self.initial: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self._probes: dict | None = None
        self._interference: float | None = None

    # -- probes ------------------------------------------------------------------------------------------------
    def _sources(self, trainer):
        """Harmful and harmless probe sources and the system prompt: given, else RefusalDirections'."""
        refusal = next((c for c in trainer.callbacks if isinstance(c, RefusalDirections)), None)
        harmful = self.harmful or (refusal.harmful if refusal else None)
        harmless = self.harmless or (refusal.harmless if refusal else None)
        if harmful is None or harmless is None:
            raise ValueError("DriftGeometry needs probe prompts: pass `harmful=` and `harmless=` "
                             "(or add a RefusalDirections callback, whose sources are then used).")
        given = self.system_prompt if self.system_prompt is not None or refusal is None else refusal.system_prompt
        system_prompt = system_prompt_of(given, trainer)
        return harmful, harmless, system_prompt

    def _encode(self, trainer, pl_module):
        if self._probes is None:
            tokenizer = tokenizer_of(trainer, pl_module)
            harmful, harmless, system_prompt = self._sources(trainer)
            side, tokenizer.padding_side = tokenizer.padding_side, "left"
            try:
                self._probes = {
                    kind: tokenizer([render_prompt(tokenizer, p, system_prompt=system_prompt)
                                     for p in load_prompts(src, self.n_probes, self.seed)],
                                    return_tensors="pt", padding=True, add_special_tokens=False)
                    for kind, src in (("harmful", harmful), ("harmless", harmless))
                }
            finally:
                tokenizer.padding_side = side
            self._refusal_ids = refusal_token_ids(tokenizer)
        return self._probes

    @torch.no_grad()
    def measure_states(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        """Last-position output of every decoder block, [layers, n, d], and last-position logits."""
        model = hf_model(pl_module)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = {}
        try:
            for kind, batch in self._encode(trainer, pl_module).items():
                batch = {k: v.to(device) for k, v in batch.items()}
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
                result = model(**batch, position_ids=positions, output_hidden_states=True)
                # outputs of every block (the embedding output of the last template token is the same for all)
                out[f"{kind}_states"] = torch.stack([h[:, -1] for h in result.hidden_states[1:]]).double().cpu()
                out[f"{kind}_logits"] = result.logits[:, -1].double().cpu()
        finally:
            model.train(was_training)
        return out

    # -- metrics -----------------------------------------------------------------------------------------------
    def metrics(self, now: dict[str, torch.Tensor]) -> dict:
        first = self.initial
        layers = first["harmful_states"].shape[0]
        per_layer = {"cos": [], "gap": [], "fisher": [], "cka": [], "angle": []}
        for layer in range(layers):
            h0, s0 = first["harmful_states"][layer], first["harmless_states"][layer]
            h1, s1 = now["harmful_states"][layer], now["harmless_states"][layer]
            direction0 = h0.mean(0) - s0.mean(0)
            unit0 = direction0 / direction0.norm().clamp_min(1e-12)
            per_layer["cos"].append(cosine(h1.mean(0) - s1.mean(0), direction0))
            per_layer["gap"].append(float((h1 @ unit0).mean() - (s1 @ unit0).mean()))
            per_layer["fisher"].append(fisher_ratio(h1, s1, unit0))
            per_layer["cka"].append(linear_cka(torch.cat([h0, s0]), torch.cat([h1, s1])))
            u0 = top_subspace(h0.T @ h0, energy=0.9)
            u1 = top_subspace(h1.T @ h1, k=u0.shape[1])
            per_layer["angle"].append(float(principal_angles(u0, u1).max()))
        scores = refusal_score(now["harmful_logits"], self._refusal_ids)
        summary = {f"{name}_layer{i}": value for name, values in per_layer.items() for i, value in enumerate(values)}
        summary.update({
            "refusal_score": float(scores.mean()),
            "refused_share": float((scores > 0).double().mean()),
            "harmless_kl": kl_divergence(first["harmless_logits"], now["harmless_logits"]),
            "cos_min": min(per_layer["cos"]),
        })
        return summary

    # -- hooks -------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        check_unsharded(trainer, "DriftGeometry")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.initial is None:  # resume restores the fit-start measurement instead
            # Rank zero's measurement for everyone: sharded forwards may round differently per rank.
            self.initial = trainer.strategy.broadcast(self.measure_states(trainer, pl_module), src=0)
            self.history.append({"step": trainer.global_step, **self.metrics(self.initial)})

    def on_after_backward(self, trainer, pl_module) -> None:
        """Interference: energy of the raw (unclipped, unprojected) gradient inside the subspaces.

        Measured right after backward, not in ``on_before_optimizer_step``: there RepresentationProjection,
        when listed first, would already have projected the gradient (its part inside the subspaces ~0).
        With gradient accumulation the last micro-batch before the step sees the accumulated gradient and
        its value is the one kept; AMP's loss scale cancels in the ratio."""
        if (trainer.global_step + 1) % self.every_n_steps:
            return
        refusal = next((c for c in trainer.callbacks if isinstance(c, RefusalDirections)), None)
        if refusal is None or refusal.basis is None:
            return
        model = hf_model(pl_module)
        energy = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # [inside, total], whole gradients
        sharded = torch.zeros_like(energy)  # the same from this rank's rows of row-sharded (FSDP2) gradients
        for name, basis in refusal.basis.subspaces.items():
            module = model.get_submodule(name)
            weights = [a.weight for a in module.lora_A.values()] if hasattr(module, "lora_A") else [module.weight]
            for weight in weights:
                if weight.grad is not None:
                    rows, _ = local_rows(weight.grad)  # never gathered: a large lm_head would cost GBs per rank
                    part = subspace_energy(rows, basis.to(rows.device)).to(energy.device)
                    (sharded if is_sharded(weight.grad) else energy).add_(part)
        if uses_fsdp2(model):  # decided by the model, so every rank calls the reduce
            energy += trainer.strategy.reduce(sharded, reduce_op="sum")
        inside, total = energy.tolist()
        if math.isfinite(inside) and math.isfinite(total):  # an fp16 overflow step (skipped by the scaler) is not
            self._interference = inside / total if total else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or (self.history and self.history[-1]["step"] == step):
            return
        record = {"step": step, **self.metrics(self.measure_states(trainer, pl_module))}
        if self._interference is not None:
            record["interference"] = self._interference
        record = trainer.strategy.broadcast(record, src=0)  # the same numbers on every rank, logged and kept
        self.history.append(record)
        self._check_refusal(record)
        logged = {k: v for k, v in record.items() if k != "step" and ("_layer" not in k or k.startswith("cos_"))}
        pl_module.log_dict({f"drift/{k}": float(v) for k, v in logged.items()}, on_step=True, on_epoch=False)

    def _check_refusal(self, record: dict) -> None:
        start, now = self.history[0].get("refused_share"), record.get("refused_share")
        if self.warn_refusal_drop is None or self._warned or start is None or now is None:
            return
        if now < start - self.warn_refusal_drop:
            self._warned = True
            rank_zero_warn(
                f"DriftGeometry: at step {record['step']} the model would refuse {now:.0%} of the harmful probes "
                f"(logit refusal score > 0), against {start:.0%} at fit start. With RepresentationProjection, "
                "protect more (RefusalDirections energy or ridge), lower the learning rate or set "
                "tail_reference_lr; without it, this is the drift the guard exists to stop."
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.initial is not None:
            # trainer.log_dir broadcasts, so every rank asks for it; only rank zero writes.
            directory = trainer.log_dir or trainer.default_root_dir
            self._write(directory, self.measure_states(trainer, pl_module))

    @rank_zero_only
    def _write(self, directory: str, final: dict) -> None:
        with atomic_file(os.path.join(directory, "drift_summary.json")) as handle:
            json.dump({"history": self.history, "final": self.metrics(final)}, handle, indent=2)
        if self.figures:
            self._figures(directory, final)

    def _figures(self, directory: str, final: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = self.initial["harmful_states"].shape[0]
        steps = [r["step"] for r in self.history]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for layer in range(layers):
            axes[0].plot(steps, [r[f"cos_layer{layer}"] for r in self.history], label=f"layer {layer}")
        axes[0].set(xlabel="step", ylabel="cos(r_t, r_0)", title="Refusal direction drift per layer")
        axes[0].legend(fontsize=7)
        axes[1].plot(steps, [r["refusal_score"] for r in self.history], color="tab:red")
        axes[1].set(xlabel="step", ylabel="mean refusal score", title="Harmful probes")
        if all("refused_share" in r for r in self.history):  # histories resumed from older checkpoints lack it
            share = axes[1].twinx()
            share.plot(steps, [100 * r["refused_share"] for r in self.history], color="tab:gray", linestyle="--")
            share.set(ylabel="refused (score > 0), % (dashed)", ylim=(-5, 105))
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "drift_curves.png"), dpi=120)
        plt.close(fig)
        layer = layers // 2
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
        together = torch.cat([self.initial["harmful_states"][layer], self.initial["harmless_states"][layer],
                              final["harmful_states"][layer], final["harmless_states"][layer]])
        points = pca_2d(together)
        n, m = self.initial["harmful_states"].shape[1], self.initial["harmless_states"].shape[1]
        for axis, offset, title in ((axes[0], 0, "fit start"), (axes[1], n + m, "fit end")):
            axis.scatter(*points[offset:offset + n].T, s=10, c="tab:red", label="harmful")
            axis.scatter(*points[offset + n:offset + n + m].T, s=10, c="tab:blue", label="harmless")
            axis.set(title=f"Layer {layer}, {title}")
            axis.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "activations_pca.png"), dpi=120)
        plt.close(fig)

    def state_dict(self) -> dict:
        return {"initial": self.initial, "history": self.history} if self.initial is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.initial, self.history = state_dict["initial"], list(state_dict["history"])
