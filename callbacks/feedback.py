"""RefusalFeedback: pull the damped tail back as hard as refusal needs, measured while training.

RepresentationProjection holds the strongest directions of the protected inputs exactly and the rest as a damped
tail (``RefusalDirections(ridge > 0)``). How hard that tail should pull back is not one number: measured on the
miniature worlds, a tight tail caps the task and a loose one loses refusal, early in training on some worlds and
late on others (experiments/results/README.md, "Refusal feedback"). This callback closes the loop. At fit start it
records the aligned model's greedy answer to each harmful probe (its first ``answer_tokens`` tokens). Every
``every_n_steps`` optimizer steps it scores the probes (one forward pass each, no gradient, no generation): how
surely each harmful probe still gets that answer, and the logit refusal score of each harmless one. It then sets how
many times as hard as built the tail pulls back, by the control law of ``rg_lightning.guard.feedback``: tighter when
a harmful probe has lost more than ``1 - low`` of its fit-start score or a harmless probe would be refused, looser
while every harmful probe keeps more than ``high``.

The probes are RefusalDirections' sources without the prompts the basis is measured on (the guard holds those: they
would not show refusal slipping), rendered as the basis prompts are. Rank zero decides and broadcasts the scale, so
every rank pulls back alike; the scale, the fit-start answers and scores and the history are checkpointed and
restored (a resumed fit never measures them again on the drifted model). At fit end rank zero writes the history to
``feedback_history.json`` and draws it in ``feedback.png``, in the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import weakref

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from rg_lightning.arguments import require_bool, require_int, require_number
from rg_lightning.atomic import atomic_file
from rg_lightning.callbacks.drift import probe_fingerprint
from rg_lightning.callbacks.projection import RepresentationProjection
from rg_lightning.callbacks.refusal_directions import find_refusal_directions
from rg_lightning.chat import encode_prompts, position_ids
from rg_lightning.contract import check_unsharded, hf_model, log_now, run_directory, system_prompt_of, tokenizer_of
from rg_lightning.figures import feedback_figure, save_png
from rg_lightning.guard.collect import with_greedy_answers
from rg_lightning.guard.feedback import continuation_score, next_tail_scale, refusal_margin, refused_at_start
from rg_lightning.modes import eval_mode
from rg_lightning.prompts import check_prompt_source, load_prompts, prompt_hashes
from rg_lightning.refusal_score import refusal_score, refusal_token_ids
from rg_lightning.strict_json import finite_or_null


class RefusalFeedback(L.Callback):
    """Sets RepresentationProjection's tail pull-back from the refusal scores of probe prompts.

    Args:
        harmful, harmless: Probe prompts (list, file, hub id, ``toy:harmful``); default: RefusalDirections' sources.
            The prompts the basis is measured on are left out either way.
        every_n_steps: Optimizer steps between measurements (the scale holds in between).
        n_probes: Harmful and as many harmless probe prompts.
        seed: Seed of the probe sampling.
        low, high: Tighten when the harmful probes' margin (the smallest share of its fit-start score a
            probe keeps) falls below ``low``; loosen when it is above ``high``.
        factor: How many times as hard (or softly) each adjustment pulls back (> 1).
        min_scale, max_scale: Range of the scale, times the rate the tail was built with (``min_scale`` ≤ 1 ≤
            ``max_scale``). With ``ridge`` 0.03, 0.1 lets the tail loosen to about ``ridge`` 0.3's rate.
        answer_tokens: How many tokens of the aligned model's greedy answer to each harmful probe are held to (the
            refusal's opening; generated once, at fit start, and checkpointed).
        sure: A harmful probe's score (the least sure answer token's log-odds) above which it counts as fully sure:
            a start score above it is taken as it, so a token that was all but certain may lose certainty that
            greedy decoding never needed (4: p = 0.98).
        batch_size: Probe prompts per forward pass.
        figures: Draw the history in ``feedback.png`` at fit end (``feedback_history.json`` is written either way).
    """

    def __init__(self, harmful=None, harmless=None, every_n_steps: int = 5, n_probes: int = 64, seed: int = 11,
                 answer_tokens: int = 4, sure: float = 4.0, low: float = 0.8, high: float = 0.9, factor: float = 2.0,
                 min_scale: float = 0.1, max_scale: float = 1000.0, batch_size: int = 32, figures: bool = True) -> None:
        for argument, value in (("every_n_steps", every_n_steps), ("n_probes", n_probes), ("seed", seed),
                                ("answer_tokens", answer_tokens), ("batch_size", batch_size)):
            require_int(argument, value)
        for argument, value in (("sure", sure), ("low", low), ("high", high), ("factor", factor),
                                ("min_scale", min_scale), ("max_scale", max_scale)):
            require_number(argument, value)
        require_bool("figures", figures)
        if every_n_steps < 1 or n_probes < 2 or batch_size < 1 or answer_tokens < 1:
            raise ValueError("every_n_steps, answer_tokens and batch_size must be >= 1 and n_probes >= 2")
        if not 0 < low <= high <= 1:
            raise ValueError(f"need 0 < low <= high <= 1 (shares of the fit-start refusal score), got {low}, {high}")
        if not sure > 0:
            raise ValueError(f"sure must be > 0 (a log-odds: 4 is p = 0.98), got {sure}")
        if not factor > 1:
            raise ValueError(f"factor must be > 1 (how many times as hard each adjustment pulls back), got {factor}")
        if not 0 < min_scale <= 1 <= max_scale:
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale (1: the tail as built), got {min_scale}, "
                             f"{max_scale}")
        for what, source in (("harmful", harmful), ("harmless", harmless)):
            if source is not None:
                check_prompt_source(source, what)
        self.harmful, self.harmless = harmful, harmless
        self.every_n_steps, self.n_probes, self.seed, self.batch_size = every_n_steps, n_probes, seed, batch_size
        self.answer_tokens, self.sure = answer_tokens, sure
        self.low, self.high, self.factor = low, high, factor
        self.min_scale, self.max_scale = min_scale, max_scale
        self.figures = figures
        self.scale = 1.0
        self.initial: torch.Tensor | None = None  # the harmful probes' fit-start scores (0: not refused then)
        self.history: list[dict] = []
        self._probes: dict | None = None
        self._answers: dict | None = None  # the harmful probes with the aligned model's greedy answers appended
        self._projection: RepresentationProjection | None = None
        self._restored_probes: str | None = None
        self._model = lambda: None

    def _sources(self, trainer) -> tuple[tuple, str | None]:
        """The probe sources (given, else RefusalDirections') and the system prompt the basis prompts are rendered
        with (RefusalDirections', else the datamodule's)."""
        refusal = find_refusal_directions(trainer, required=False)
        sources = (self.harmful or getattr(refusal, "harmful", None),
                   self.harmless or getattr(refusal, "harmless", None))
        if None in sources:
            raise ValueError("RefusalFeedback needs probe prompts: pass `harmful=` and `harmless=` (or add a "
                             "RefusalDirections callback, whose sources are then used).")
        given = refusal.system_prompt if refusal is not None else None
        return sources, system_prompt_of(given, trainer)

    def _encode(self, trainer, pl_module) -> dict:
        """The harmful and the harmless probes, each kind in one left-padded batch."""
        if self._probes is None:
            (harmful, harmless), system_prompt = self._sources(trainer)
            refusal = find_refusal_directions(trainer, required=False)
            measured = set((refusal.measured_prompt_hashes() if refusal is not None
                            else self._projection.safety_basis.metadata.get("measured_prompt_hashes")) or ())
            tokenizer = tokenizer_of(trainer, pl_module)
            self._probes = {}
            for source, kind in ((harmful, "harmful"), (harmless, "harmless")):
                pool = load_prompts(source)
                unseen = [p for p, h in zip(pool, prompt_hashes(pool)) if h not in measured]
                if len(unseen) < self.n_probes:
                    raise ValueError(
                        f"RefusalFeedback: the {kind} probe source holds {len(unseen)} prompts besides those the "
                        f"safety basis is measured on, fewer than n_probes={self.n_probes}; the feedback must watch "
                        "prompts the guard does not hold exactly. Lower n_probes, or give more prompts (harmful=, "
                        "harmless=).")
                prompts = random.Random(self.seed).sample(unseen, self.n_probes)
                self._probes[kind] = encode_prompts(tokenizer, prompts, system_prompt)
            self._refusal_ids = refusal_token_ids(tokenizer)
        return self._probes

    def _forward(self, model, encoded: dict, keep: int):
        """The last ``keep`` positions' logits of every row, in batches of ``batch_size``."""
        device = next(model.parameters()).device
        for start in range(0, len(encoded["input_ids"]), self.batch_size):
            batch = {k: v[start:start + self.batch_size].to(device) for k, v in encoded.items()}
            yield batch, model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False,
                               logits_to_keep=keep).logits

    @torch.no_grad()
    def _fit_start(self, trainer, pl_module) -> tuple[dict, torch.Tensor]:
        """The harmful probes with the aligned model's greedy answers appended, and their scores (0 where the
        aligned model does not refuse: not counted)."""
        model, probes = hf_model(pl_module), self._encode(trainer, pl_module)
        tokenizer = tokenizer_of(trainer, pl_module)
        answered, refused = [], []
        with eval_mode(model):
            for batch, logits in self._forward(model, probes["harmful"], 1):
                refused.append(refusal_score(logits[:, -1], self._refusal_ids).cpu() > 0)
                answered.append({k: v.cpu() for k, v in
                                 with_greedy_answers(model, tokenizer, batch, self.answer_tokens).items()})
        width = max(a["input_ids"].shape[1] for a in answered)  # generation may stop early in some batches
        answers = {k: torch.cat([torch.nn.functional.pad(a[k], (0, width - a[k].shape[1]),
                                                         value=0 if k == "attention_mask" else tokenizer.pad_token_id)
                                 for a in answered]) for k in ("input_ids", "attention_mask")}
        return answers, self._harmful_scores(model, answers).where(torch.cat(refused), torch.zeros(()))

    def _harmful_scores(self, model, answers: dict) -> torch.Tensor:
        """How surely each harmful probe still gets the aligned model's answer (``continuation_score``)."""
        answer = answers["input_ids"].shape[1] - self._probes["harmful"]["input_ids"].shape[1]
        out = []
        with eval_mode(model):
            for batch, logits in self._forward(model, answers, answer + 1):
                out.append(continuation_score(logits[:, :-1], batch["input_ids"][:, -answer:],
                                              batch["attention_mask"][:, -answer:]).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def scores(self, trainer, pl_module) -> tuple[torch.Tensor, torch.Tensor]:
        """The harmful probes' continuation scores and the harmless probes' logit refusal scores (float64, CPU)."""
        model = hf_model(pl_module)
        harmless_probes = self._encode(trainer, pl_module)["harmless"]
        with eval_mode(model):
            harmless = torch.cat([refusal_score(logits[:, -1], self._refusal_ids).cpu()
                                  for _, logits in self._forward(model, harmless_probes, 1)])
        return self._harmful_scores(model, self._answers), harmless

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_unsharded(trainer, "RefusalFeedback")
        projections = [c for c in trainer.callbacks if isinstance(c, RepresentationProjection)]
        if len(projections) != 1:
            raise RuntimeError(f"RefusalFeedback sets RepresentationProjection's tail, and needs exactly one among the "
                               f"Trainer's callbacks (found {len(projections)}).")
        self._projection = projections[0]
        if stage == "fit":
            for source, what in zip(self._sources(trainer)[0], ("harmful", "harmless")):
                check_prompt_source(source, what)

    def on_train_start(self, trainer, pl_module) -> None:
        model = hf_model(pl_module)
        if self._restored_probes is not None:
            if probe_fingerprint(self._encode(trainer, pl_module)) != self._restored_probes:
                raise ValueError("RefusalFeedback: the checkpoint's fit-start scores were measured on other probes "
                                 "than this run encodes (other sources, n_probes, seed or tokenizer). Resume with "
                                 "the settings of the run that saved it, or start a new fit.")
        elif self.initial is not None and self._model() is not model:  # an earlier fit of another model
            self.initial, self.history, self.scale, self._probes, self._answers = None, [], 1.0, None, None
        self._restored_probes, self._model = None, weakref.ref(model)
        if self.initial is None:  # rank zero's answers and scores for every rank (measured once, on the aligned model)
            self._answers, self.initial = trainer.strategy.broadcast(self._fit_start(trainer, pl_module), src=0)
            refused_at_start(self.initial)  # stops now, not at the first measurement
        else:
            self._encode(trainer, pl_module)
        self._projection.feedback_scale = self.scale

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or (self.history and self.history[-1]["step"] >= step):
            return  # (several batches of one step under gradient accumulation: measured once)
        if not self._projection.constraints.has_tail:
            raise ValueError("RefusalFeedback sets how hard the damped tail pulls back, but the basis has none: give "
                             "RefusalDirections a ridge > 0 (e.g. 0.03), or drop RefusalFeedback.")
        harmful, harmless = self.scores(trainer, pl_module)
        margin = refusal_margin(harmful, self.initial, harmless, self.sure)
        scale = next_tail_scale(self.scale, margin, low=self.low, high=self.high, factor=self.factor,
                                min_scale=self.min_scale, max_scale=self.max_scale)
        self.scale = float(trainer.strategy.broadcast(scale, src=0))  # rank zero's decision for every rank
        self._projection.feedback_scale = self.scale
        refused = float((harmful[self.initial > 0] > 0).double().mean())  # of those refused at fit start
        self.history.append({"step": step, "margin": margin, "refused_share": refused, "scale": self.scale})
        log_now(trainer, {"feedback/margin": margin, "feedback/refused_share": refused, "feedback/scale": self.scale})
        if math.isnan(margin):
            rank_zero_warn("RefusalFeedback: the probes' refusal scores are not finite (a diverged model).")

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.history:
            self._write(run_directory(trainer))

    @rank_zero_only
    def _write(self, directory: str) -> None:
        settings = {key: getattr(self, key) for key in ("every_n_steps", "n_probes", "answer_tokens", "sure", "low",
                                                        "high", "factor", "min_scale", "max_scale")}
        with atomic_file(os.path.join(directory, "feedback_history.json")) as handle:
            json.dump(finite_or_null({"settings": settings, "history": self.history}), handle, indent=2,
                      allow_nan=False)
        if self.figures:
            save_png(feedback_figure(self.history, self.low, self.high, self.min_scale, self.max_scale),
                     os.path.join(directory, "feedback.png"))

    def state_dict(self) -> dict:
        if self.initial is None:
            return {}
        return {"scale": self.scale, "initial": self.initial, "answers": self._answers, "history": self.history,
                "probes": probe_fingerprint(self._probes)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.scale, self.initial, self._answers = state_dict["scale"], state_dict["initial"], state_dict["answers"]
            self.history, self._restored_probes = list(state_dict["history"]), state_dict["probes"]
