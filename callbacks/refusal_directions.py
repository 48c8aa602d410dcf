"""RefusalDirections: measure the aligned model once, before any training step, and keep the result.

The SafetyBasis (difference-in-means refusal directions, protected module subspaces, protected token
ids) is computed in ``on_train_start`` — after every strategy has restored callback state — unless a
checkpoint restored it or ``load`` gives a saved one. It goes into checkpoints through ``state_dict``,
so a resumed run never recomputes it on the drifted model.

Two options follow Arditi et al. (2024): ``filter_prompts`` averages only over prompts the model already
treats correctly, and ``select_direction`` picks the (position, layer) whose direction mediates refusal
on held-out prompts; ``basis.direction()`` then returns it. Both run on every rank with sharded,
gathered measurements, and the basis is broadcast from rank zero, so every rank holds the same choice.
"""

from __future__ import annotations

import os
import random
import weakref

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from rg_lightning.arguments import require_bool, require_int, require_number
from rg_lightning.atomic import check_replaceable
from rg_lightning.chat import require_chat_template, template_fingerprint
from rg_lightning.contract import check_unsharded, hf_model, system_prompt_of, tokenizer_of
from rg_lightning.figures import save_png, selection_figure, subspace_figure
from rg_lightning.guard.basis import BASIS_FILES, SafetyBasis
from rg_lightning.guard.collect import collect_basis
from rg_lightning.guard.selection import KL_THRESHOLD, refusal_filter, refusal_scores, select_direction
from rg_lightning.guard.shards import prompt_world
from rg_lightning.guard.subspace import UNIT_WEIGHT, basis_weights
from rg_lightning.prompts import (DEFAULT_HARMFUL, DEFAULT_HARMLESS, check_prompt_source, fingerprint, load_prompts,
                                  prompt_hashes)


class RefusalDirections(L.Callback):
    """Computes (or loads) the SafetyBasis at fit start; other RefusalGuard callbacks read ``.basis``.

    Args:
        harmful: Harmful prompts: a list of strings, a local file, a hub dataset id, or ``toy:harmful``.
        harmless: Harmless prompts, same forms.
        n_prompts: Prompts sampled from each set (seeded).
        energy: Share of the input energy each protected subspace keeps (ignored when ``rank`` is set).
        rank: Fixed number of top directions held exactly in every protected subspace, instead of ``energy``
            (a damped tail (``ridge``) and held differences (``input_differences``) come on top).
        answer_tokens: Greedy answer tokens appended to each harmful prompt, so the refusal itself is protected.
        batch_size: Prompts per forward pass.
        system_prompt: System message used when rendering the prompts; ``None``: the datamodule's
            ``system_prompt`` (the training rows'), ``""``: none.
        load: Directory of a saved basis (``basis.safetensors`` + ``basis.json``) to use instead of computing.
        save: Directory where the computed basis is written (rank zero, atomically), with the figures
            ``subspaces.png`` (how much of each module's input is held) and, after selection, ``selection.png``.
        seed: Seed of the prompt sampling.
        filter_prompts: Keep only harmful prompts the model refuses and harmless ones it answers (refusal
            score > 0 / < 0), for cleaner means; a side left with fewer than 2 keeps all its prompts (warned).
        select_direction: Choose the primary (position, layer) on validation prompts: ablating it must lower
            the harmful refusal score most while harmless KL stays <= ``kl_threshold`` and adding it makes
            harmless prompts refused; when nothing passes, the filters are relaxed (warned). Without it
            ``basis.direction()`` is the last position of the middle layer.
        n_val: Validation prompts per set for ``select_direction``.
        val_harmful: Harmful validation prompts (same forms as ``harmful``); default: more prompts from
            ``harmful``, disjoint from the ones measured.
        val_harmless: Harmless validation prompts, likewise.
        kl_threshold: Largest harmless next-token KL a candidate's ablation may cause (0.1 in the paper).
        max_statistics_gb: Largest total size of the float64 Gram matrices held at once; modules beyond it
            are measured in further passes over the same harmful prompts (``None``: one pass). A 7B model's
            down_proj input alone needs 2.9 GB per layer.
        centered: ``energy`` counts the variance of each module's inputs around their mean (the mean
            direction is always protected) instead of their uncentred energy, which a large common offset
            dominates (see ``guard.subspace.centered_subspace``). It has no damped tail: ``ridge`` must be 0.
        head_answer_only: Protect the logit head (``lm_head``) on its inputs where the answer is generated
            (last prompt position and answer tokens) rather than at every prompt position: the logits at
            earlier positions predict the prompt's own next words, which nothing reads, and protecting them
            cost task learning (miniature world: see experiments/results).
        ridge: 0 (default): the directions below the ``energy`` cutoff are left free. Positive: they are kept
            as a damped tail of each subspace, pulled back at every step with weight ``p / (p + ridge)`` where
            ``p`` is the direction's share of the module's input energy (``guard.subspace.soft_subspace``).
            The hard cutoff leaves ~1% of each module's input energy free; on Gemma-2 the small output changes
            it allows compound over the layers and flip the first answer token. Miniature worlds, 3 seeds:
            energy 0.9 + ridge 0.03 (experiments/tiny.yaml) kept >= 99.7% of held-out harmful requests refused
            on 11 of the 12 shipped miniature worlds, 93.8% on the twelfth, and at three times the steps
            >= 99.3% on 22 of 24 worlds, where ridge 0 kept refusal on 3 of 24
            (experiments/results/README.md). The tail is also part of the guard's task cost. A larger ridge
            loosens it: the drift it allows grows with ridge and with the push of the task's gradient, so
            refusal dips most while the task is being learnt and recovers after (ridge 0.3: goals on 7 of 12
            shipped worlds at three times the steps, 5 of 12 at tiny.yaml's; 0.03: 4 and 9). Costs more anchor
            memory (tail columns).
        input_differences: Also hold exactly, in each module's subspace, the difference between its mean
            input on harmful and on harmless prompts at every post-instruction position (at most one column
            per position on top of the energy cutoff or ``rank``, ``guard.subspace.extend_basis``; the logit
            head with ``head_answer_only``: the last position only): the energy cutoff ranks directions by how
            much of the inputs they carry, not by whether they tell harmful from harmless, and on the
            miniature worlds leaves a quarter to all of that difference's norm outside the held columns.
        request_weight: Weight, from 0 to 1, of each harmful prompt's positions before the post-instruction
            template (the request itself, a system prompt, the template's opening) in the statistics; the
            post-instruction positions, where the model decides to refuse, and the answer tokens weigh 1. Below 1
            the held directions favour what the modules read there and the request's own directions are held
            more loosely (in the damped tail, their shares scaled by the weight): the task, which reads and
            copies the request's words, keeps more room. Miniature worlds, 3 seeds: 0.1 raised the task on 9 of
            12 shipped worlds at 150 steps and refusal where it was short, but met the goals on no more of them;
            0.03 and 0.01 lost refusal on worlds whose refusal reads the request
            (experiments/results/README.md). Not with ``centered``.
        row_energy: 1 (default): the embedding rows of every token in the harmful prompts (and their
            ``answer_tokens``) are held exactly.
            Below 1: the rows of the most frequent of those tokens, covering ``row_energy`` of their
            occurrences, are held exactly and the others are pulled back at every step with weight
            ``p / (p + row_ridge)``, ``p`` the token's share of the occurrences (``guard.subspace.row_weights``):
            the rows' counterpart of ``energy`` and ``ridge``. Rarely read rows can then follow the task.
            Miniature worlds, 3 seeds, 150 steps: 0.5 with ``row_ridge`` 0.3 raised the task on 32 of 36 worlds and
            met the goals on 25 of them (every row exact: 23), but lost more than a point of harmful refusal on six
            (down to 86.5%) (experiments/results/README.md, "Damped embedding rows"). Damped rows need float32
            weights: in bfloat16 a small share of a small drift rounds away.
        row_ridge: The damping of the rows below ``row_energy`` (0: left free); only with ``row_energy`` < 1.
    """

    def __init__(
        self,
        harmful: str | list[str] = DEFAULT_HARMFUL,
        harmless: str | list[str] = DEFAULT_HARMLESS,
        n_prompts: int = 128,
        energy: float | None = 0.99,
        rank: int | None = None,
        answer_tokens: int = 16,
        batch_size: int = 16,
        system_prompt: str | None = None,
        load: str | None = None,
        save: str | None = None,
        seed: int = 42,
        filter_prompts: bool = False,
        select_direction: bool = False,
        n_val: int = 32,
        val_harmful: str | list[str] | None = None,
        val_harmless: str | list[str] | None = None,
        kl_threshold: float = KL_THRESHOLD,
        max_statistics_gb: float | None = 4.0,
        centered: bool = False,
        head_answer_only: bool = True,
        ridge: float = 0.0,
        input_differences: bool = False,
        request_weight: float = 1.0,
        row_energy: float = 1.0,
        row_ridge: float = 0.0,
    ) -> None:
        for argument, value in (("n_prompts", n_prompts), ("answer_tokens", answer_tokens),
                                ("batch_size", batch_size), ("seed", seed), ("n_val", n_val)):
            require_int(argument, value)
        require_int("rank", rank, optional=True)
        for argument, value in (("ridge", ridge), ("request_weight", request_weight), ("kl_threshold", kl_threshold),
                                ("row_energy", row_energy), ("row_ridge", row_ridge)):
            require_number(argument, value)
        require_number("energy", energy, optional=True)
        require_number("max_statistics_gb", max_statistics_gb, optional=True)
        for argument, value in (("filter_prompts", filter_prompts), ("select_direction", select_direction),
                                ("centered", centered), ("head_answer_only", head_answer_only),
                                ("input_differences", input_differences)):
            require_bool(argument, value)
        if ridge < 0 or (ridge and centered):
            raise ValueError(f"ridge must be >= 0 (and 0 with centered=True), got {ridge}")
        if not 0 <= request_weight <= 1 or (request_weight != 1 and centered):
            raise ValueError(f"request_weight must be in [0, 1] (and 1 with centered=True), got {request_weight}")
        if not 0 < row_energy <= 1 or row_ridge < 0:
            raise ValueError(f"row_energy must be in (0, 1] and row_ridge >= 0, got {row_energy} and {row_ridge}")
        if row_ridge and row_energy == 1:
            rank_zero_warn(f"RefusalDirections: row_ridge ({row_ridge}) applies only with row_energy < 1.")
        if n_prompts < 2:
            raise ValueError(f"n_prompts must be at least 2, got {n_prompts}")
        if rank is None and (energy is None or not 0.0 < energy <= 1.0):
            raise ValueError(f"energy must be in (0, 1] (or give `rank`), got {energy}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        if rank is not None and energy not in (None, 0.99):
            rank_zero_warn(f"RefusalDirections: `rank` ({rank}) is given, so `energy` ({energy}) is not used.")
        unused = [name for name, value in (("val_harmful", val_harmful), ("val_harmless", val_harmless),
                                           ("kl_threshold", kl_threshold != KL_THRESHOLD), ("n_val", n_val != 32))
                  if value and not select_direction]
        if unused:
            rank_zero_warn(f"RefusalDirections: {', '.join(unused)} apply only with select_direction=True.")
        if answer_tokens < 0 or batch_size < 1:
            raise ValueError("answer_tokens must be >= 0 and batch_size >= 1")
        if load is not None and not os.path.isdir(load):
            raise FileNotFoundError(f"No saved safety basis at {load!r}; drop `load` to compute one.")
        read = [] if load else [("harmful", harmful), ("harmless", harmless)]  # a loaded basis reads no prompts
        if select_direction:
            read += [("val_harmful", val_harmful), ("val_harmless", val_harmless)]
        for what, source in read:
            if source is not None:
                check_prompt_source(source, what)
        if isinstance(harmful, str) and harmful == harmless:
            raise ValueError("`harmful` and `harmless` name the same prompt source.")
        if n_val < 2:
            raise ValueError(f"n_val must be at least 2, got {n_val}")
        if max_statistics_gb is not None and not max_statistics_gb > 0:
            raise ValueError(f"max_statistics_gb must be positive or None, got {max_statistics_gb}.")
        if not kl_threshold >= 0:
            raise ValueError(f"kl_threshold must be >= 0 (the paper uses 0.1), got {kl_threshold}")
        self.harmful, self.harmless = harmful, harmless
        self.n_prompts, self.energy, self.rank = n_prompts, energy, rank
        self.answer_tokens, self.batch_size = answer_tokens, batch_size
        self.system_prompt, self.load, self.save, self.seed = system_prompt, load, save, seed
        self.rendering_system_prompt = system_prompt or None  # resolved against the datamodule at setup
        self.filter_prompts, self.select_direction, self.n_val = filter_prompts, select_direction, n_val
        self.val_harmful, self.val_harmless, self.kl_threshold = val_harmful, val_harmless, kl_threshold
        self.max_statistics_gb = max_statistics_gb
        self.centered, self.head_answer_only, self.ridge = centered, head_answer_only, ridge
        self.input_differences, self.request_weight = input_differences, request_weight
        self.row_energy, self.row_ridge = row_energy, row_ridge
        self.basis: SafetyBasis | None = None
        self._model = lambda: None  # weak reference to the model the basis belongs to
        self._restored = False  # the basis came from a checkpoint: it belongs to the model being resumed

    def ensure_basis(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SafetyBasis:
        """The basis, computed now if nothing restored or loaded it (idempotent; callbacks may call it first)."""
        model = hf_model(pl_module)
        if self.basis is not None:
            if self._restored or self._model() is model:
                self._restored, self._model = False, weakref.ref(model)
                return self.basis
            # another model object (this callback reused for a second run): its own weights, its own basis
            rank_zero_info("RefusalDirections: a new model; measuring its own safety basis.")
            self.basis = None
        model_id = str(getattr(model.config, "_name_or_path", "") or getattr(pl_module, "model_name", ""))
        if self.load:
            basis = SafetyBasis.load(self.load)
            basis.check_compatible(model, model_id)
            tokenizer = tokenizer_of(trainer, pl_module)
            require_chat_template(tokenizer)
            basis.check_rendering(template_fingerprint(tokenizer), self.rendering_system_prompt)
            rank_zero_info(f"RefusalDirections: loaded the safety basis from {self.load}")
            self._warn_on_other_settings(basis)
        else:
            if trainer.ckpt_path is not None and trainer.global_step > 0:
                rank_zero_warn(f"RefusalDirections: measuring the safety basis at step {trainer.global_step} of a "
                               "resumed fit, on the fine-tuned weights rather than the aligned ones (the checkpoint "
                               "holds no basis: it was made without this callback). Resume from a checkpoint of a "
                               "guarded run, or pass `load=` a basis saved from the aligned model.")
            basis = self._compute(trainer, pl_module, model, model_id)
        if self.select_direction and "selected" not in basis.metadata:
            basis.metadata.update(self._select(tokenizer_of(trainer, pl_module), model, basis))
        # Every rank computed the same all-reduced statistics; broadcasting rank zero's result makes the
        # bases bit-identical even if eigen-solvers differ across devices.
        self.basis = trainer.strategy.broadcast(basis, src=0)
        self._model = weakref.ref(model)
        if self.save and trainer.is_global_zero:
            self.basis.save(self.save)
            self._figures(self.save)
        return self.basis

    def _figures(self, directory: str) -> None:
        """Next to the saved basis: how much of each module's input it holds (``subspaces.png``) and, when
        direction selection ran, every candidate's scores (``selection.png``)."""
        widths = {}
        for name, basis in self.basis.subspaces.items():
            exact = int((basis_weights(basis) > UNIT_WEIGHT).sum())
            widths[name] = (exact, basis.shape[1] - exact, basis.shape[0])
        save_png(subspace_figure(widths), os.path.join(directory, "subspaces.png"))
        if "selection" in self.basis.metadata:
            save_png(selection_figure(self.basis.metadata["selection"]), os.path.join(directory, "selection.png"))

    def _warn_on_other_settings(self, basis: SafetyBasis) -> None:
        """A loaded basis was measured with its own settings, which win over this callback's: say where they differ,
        so a sweep over e.g. ``energy`` with ``load=`` set does not silently reuse one basis."""
        # as _compute passes them: a fixed rank measures without an energy
        mine = {"energy": None if self.rank else self.energy, "rank": self.rank, "ridge": self.ridge,
                "centered": self.centered, "answer_tokens": self.answer_tokens,
                "head_answer_only": self.head_answer_only, "input_differences": self.input_differences,
                "request_weight": self.request_weight, "row_energy": self.row_energy, "row_ridge": self.row_ridge,
                "n_harmful": self.n_prompts}
        # bases saved before an option existed were measured as its default
        saved = {"row_energy": 1.0, "row_ridge": 0.0, **basis.metadata}
        differ = {key: (saved[key], value) for key, value in mine.items()
                  if key in saved and saved[key] != value and not (key == "n_harmful" and saved[key] < value)}
        if differ:
            listed = ", ".join(f"{key} {old!r} (yours: {new!r})" for key, (old, new) in differ.items())
            rank_zero_warn(f"RefusalDirections: the loaded basis was measured with other settings: {listed}. Its own "
                           "apply; drop `load=` to measure one with yours.")

    def _compute(self, trainer, pl_module, model, model_id: str) -> SafetyBasis:
        tokenizer = tokenizer_of(trainer, pl_module)
        require_chat_template(tokenizer)  # before the filter renders anything
        harmful = load_prompts(self.harmful, self.n_prompts, self.seed)
        harmless = load_prompts(self.harmless, self.n_prompts, self.seed)
        for kind, prompts, source in (("harmful", harmful, self.harmful), ("harmless", harmless, self.harmless)):
            if len(prompts) < 2:
                raise ValueError(f"RefusalDirections: the {kind} source {str(source)[:80]!r} gave {len(prompts)} "
                                 "prompt(s); the means and subspaces need at least 2 (a few hundred recommended).")
        filtering = {"measured_prompt_hashes": prompt_hashes(harmful + harmless)}
        if self.filter_prompts:
            harmful, harmless, filtering["filtering"] = self._filter(model, tokenizer, harmful, harmless, "measured")
        total = len(harmful) + len(harmless)
        bar = tqdm(total=total, desc="RefusalDirections", disable=not trainer.is_global_zero or
                   not trainer.progress_bar_callback, leave=False)

        measuring_ranks = prompt_world(model)[1]  # every rank measures its share (all prompts under FSDP2)

        def progress(kind: str, n: int) -> None:
            if kind == "statistics" and bar.n >= bar.total:  # a further memory-bounded pass begins
                bar.total += len(harmful)
                bar.set_description("RefusalDirections (more statistics passes)")
            bar.update(n * measuring_ranks)

        try:
            basis = collect_basis(
                model, tokenizer, harmful, harmless, energy=None if self.rank else self.energy, rank=self.rank,
                answer_tokens=self.answer_tokens, batch_size=self.batch_size,
                system_prompt=self.rendering_system_prompt,
                progress=progress, max_statistics_gb=self.max_statistics_gb, centered=self.centered,
                head_answer_only=self.head_answer_only, ridge=self.ridge, input_differences=self.input_differences,
                request_weight=self.request_weight, row_energy=self.row_energy, row_ridge=self.row_ridge,
                metadata={"model_id": model_id, "chat_template_hash": template_fingerprint(tokenizer),
                          "harmful_hash": fingerprint(harmful), "harmless_hash": fingerprint(harmless),
                          "harmful_source": str(self.harmful)[:200], "harmless_source": str(self.harmless)[:200],
                          **filtering},
            )
        finally:
            bar.close()
        dims = list(basis.metadata["subspace_dims"].values())
        exact = [int((basis_weights(b) > UNIT_WEIGHT).sum()) for b in basis.subspaces.values()]
        tail = (f", held exactly {min(exact, default=0)}-{max(exact, default=0)}, the rest a damped tail"
                if sum(exact) < sum(dims) else "")
        rows = ("" if basis.protected_token_weights is None else
                f" ({basis.metadata['rows_exact']} of their rows held exactly, the rest "
                f"{'damped' if self.row_ridge else 'left free'})")
        rank_zero_info(
            f"RefusalDirections: {len(harmful)} harmful / {len(harmless)} harmless prompts, "
            f"{len(basis.subspaces)} protected modules (subspace dims {min(dims, default=0)}-{max(dims, default=0)}"
            f"{tail}), {basis.protected_token_ids.numel()} protected tokens{rows}"
        )
        return basis

    def _filter(self, model, tokenizer, harmful: list[str], harmless: list[str], which: str):
        """Refusal-score filter of one harmful/harmless pair of prompt lists; returns them and the report."""
        scores = [refusal_scores(model, tokenizer, prompts, batch_size=self.batch_size,
                                 system_prompt=self.rendering_system_prompt) for prompts in (harmful, harmless)]
        harmful, harmless, report = refusal_filter(harmful, harmless, *scores)
        rank_zero_info(f"RefusalDirections: the refusal-score filter kept {report['harmful']['kept']}/"
                       f"{report['harmful']['total']} harmful and {report['harmless']['kept']}/"
                       f"{report['harmless']['total']} harmless {which} prompts")
        if report["fallback"]:
            rank_zero_warn(f"RefusalDirections: refusal-score filter of the {which} prompts: {report['fallback']}.")
        return harmful, harmless, report

    def _validation_prompts(self) -> tuple[list[str], list[str]]:
        """``n_val`` prompts per set from the val sources (else the measured sources), never one that was measured."""
        chosen = []
        for kind, source, val_source in (("harmful", self.harmful, self.val_harmful),
                                         ("harmless", self.harmless, self.val_harmless)):
            measured = set(load_prompts(source, self.n_prompts, self.seed))
            pool = [p for p in dict.fromkeys(load_prompts(source if val_source is None else val_source))
                    if p not in measured]
            if len(pool) < 2:
                raise ValueError(f"Only {len(pool)} {kind} prompts are left for direction selection once the "
                                 f"{len(measured)} measured ones are set aside; pass `val_{kind}=` or lower "
                                 "`n_prompts`.")
            chosen.append(random.Random(self.seed).sample(pool, min(self.n_val, len(pool))))
        return chosen[0], chosen[1]

    def _select(self, tokenizer, model, basis: SafetyBasis) -> dict:
        """Metadata of the selected direction (``selected``, ``selection``), warned about when filters fell back."""
        harmful, harmless = self._validation_prompts()
        filtering = None
        if self.filter_prompts:
            harmful, harmless, filtering = self._filter(model, tokenizer, harmful, harmless, "validation")
        result = select_direction(model, tokenizer, basis.candidates, harmful, harmless,
                                  kl_threshold=self.kl_threshold, batch_size=self.batch_size,
                                  system_prompt=self.rendering_system_prompt)
        summary, chosen = result["selection"], result["selection"]["chosen"]
        summary["filtering"] = filtering
        rank_zero_info(
            f"RefusalDirections: selected position {chosen['position']}, layer {chosen['layer']}: ablating it moves "
            f"the harmful refusal score {summary['harmful_score']:.2f} -> {chosen['ablation_score']:.2f} "
            f"(harmless KL {chosen['harmless_kl']:.3g}); adding it moves harmless {summary['harmless_score']:.2f} -> "
            f"{chosen['addition_score']:.2f}"
        )
        if summary["fallback"]:
            rank_zero_warn(f"RefusalDirections: direction selection fell back: {summary['fallback']} "
                           f"(position {chosen['position']}, layer {chosen['layer']}).")
        return result

    def measured_prompt_hashes(self) -> set[str] | None:
        """Hashes of the prompts the basis is (or will be) measured on; ``None`` when a loaded basis does not say.

        Evaluation drops these prompts from its benchmarks: the guard was fitted to them.
        """
        basis = self.basis if self.basis is not None else (SafetyBasis.load(self.load) if self.load else None)
        if basis is not None:
            hashes = basis.metadata.get("measured_prompt_hashes")
            return None if hashes is None else set(hashes)
        return set(prompt_hashes(load_prompts(self.harmful, self.n_prompts, self.seed)
                                 + load_prompts(self.harmless, self.n_prompts, self.seed)))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_unsharded(trainer, "RefusalDirections")
        if self.save and stage == "fit":  # now, not after the basis pass
            check_replaceable(self.save, BASIS_FILES, "RefusalDirections `save`")
        self.rendering_system_prompt = system_prompt_of(self.system_prompt, trainer)
        self._restored = False  # set again if this run restores a checkpoint (after setup), never left from another

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ensure_basis(trainer, pl_module)

    def state_dict(self) -> dict:
        if self.basis is None:
            return {}
        return {"tensors": self.basis.tensors(), "metadata": self.basis.metadata}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.basis = SafetyBasis.from_tensors(state_dict["tensors"], state_dict["metadata"])
            self._restored = True


def find_refusal_directions(trainer: L.Trainer, required: bool = True) -> RefusalDirections | None:
    """The RefusalDirections callback among the trainer's callbacks (other callbacks read its basis, sources and
    system prompt); None without one when not ``required``. Two would leave it ambiguous which basis is meant."""
    found = [c for c in trainer.callbacks if isinstance(c, RefusalDirections)]
    if len(found) > 1 or (required and not found):
        fix = ("keep one" if found else "add `RefusalDirections(harmful=..., harmless=...)` to the Trainer's "
               "callbacks, or give RepresentationProjection `basis=` a saved one")
        raise RuntimeError(f"Expected exactly one RefusalDirections callback, found {len(found)}: {fix}.")
    return found[0] if found else None

