"""SafetyEvaluation: the safety and utility table from ``lightning test`` / ``validate``, and a fast safety
signal during ``fit``.

At the end of a test or validate run it evaluates the full configured suite (generation + judges), logs
every number and writes the report (``evaluation.json``, ``evaluation.md``, ``responses/``) into the run
directory. During fit it can run a cheap subset (by default the logit refusal score, no generation, on a
sample of each benchmark) every ``every_n_steps`` optimizer steps and/or at each validation, so users watch
safety while the model trains.
"""

from __future__ import annotations

import os
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from rg_lightning.atomic import check_replaceable
from rg_lightning.callbacks.refusal_directions import find_refusal_directions
from rg_lightning.contract import check_unsharded, hf_model, log_now, run_directory, system_prompt_of, tokenizer_of
from rg_lightning.evaluation.report import REPORT_FILES, markdown, write_report
from rg_lightning.evaluation.suite import EvaluationSuite
from rg_lightning.prompts import prompt_hashes


class SafetyEvaluation(L.Callback):
    """Runs an :class:`~rg_lightning.evaluation.EvaluationSuite` inside Lightning.

    Args:
        benchmarks: Safety benchmarks (names, ``"name=path"`` or ``{name, path, limit}``); see EvaluationSuite.
        tasks: Utility tasks, same forms.
        judges: Judges of the full evaluation (test / validate): names or ``{name, <options>}`` mappings, e.g.
            ``{name: llama_guard_3, min_words: 15}``.
        limit: Prompts per benchmark and task in the full evaluation (``None`` = all).
        max_new_tokens: Greedy tokens per safety answer.
        task_max_new_tokens: Greedy tokens per task answer (``None``: each task's default, e.g. 256 for GSM8K).
        batch_size: Prompts per generation batch.
        system_prompt: System prompt of every request; ``None``: the datamodule's ``system_prompt`` (the
            training rows'), ``""``: none.
        seed: Seed of the ``limit`` samples.
        every_n_steps: During fit, run the fast subset every this many optimizer steps (``None`` = never).
        on_validation: During fit, run the fast subset at the end of each validation.
        fit_benchmarks: Benchmarks of the fast subset (``None`` = the same as ``benchmarks``).
        fit_judges: Judges of the fast subset; the default needs no generation.
        fit_limit: Prompts per benchmark in the fast subset.
        output_dir: Where the report folder goes (default: ``<log_dir>/evaluation``).
        exclude_basis_prompts: Drop from the benchmarks every prompt a ``RefusalDirections`` callback of the
            same trainer measures the safety basis on (the guard was fitted to those; counting them would
            flatter it). The report lists how many each benchmark lost. Prompts that the data module's ``mix``
            rows answer (``InstructionDataModule.mix_prompts()``, e.g. refusal examples) are always left out:
            the model was trained on them.
    """

    def __init__(
        self,
        benchmarks: list[str | dict] = ("advbench", "directharm4", "jailbreakbench", "jailbreakbench_benign"),
        tasks: list[str | dict] = (),
        judges: list[str | dict] = ("keyword:jailbreakbench", "keyword:gcg"),
        limit: int | None = None,
        max_new_tokens: int = 64,
        task_max_new_tokens: int | None = None,
        batch_size: int = 16,
        system_prompt: str | None = None,
        seed: int = 0,
        every_n_steps: int | None = None,
        on_validation: bool = False,
        fit_benchmarks: list[str | dict] | None = None,
        fit_judges: list[str | dict] = ("logit",),
        fit_limit: int = 32,
        output_dir: str | None = None,
        exclude_basis_prompts: bool = True,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive or None, got {every_n_steps}.")
        if fit_limit < 1:
            raise ValueError(f"fit_limit must be positive (prompts per benchmark in the fast check), got {fit_limit}.")
        if not (every_n_steps or on_validation) and (fit_benchmarks is not None or tuple(fit_judges) != ("logit",)
                                                     or fit_limit != 32):
            rank_zero_warn("SafetyEvaluation: fit_benchmarks, fit_judges and fit_limit set the fast check during fit, "
                           "which runs only with every_n_steps or on_validation; neither is set.")
        self.suite = EvaluationSuite(benchmarks, tasks, judges, limit=limit, max_new_tokens=max_new_tokens,
                                     task_max_new_tokens=task_max_new_tokens, batch_size=batch_size,
                                     system_prompt=system_prompt, seed=seed)
        self.fit_suite = None
        if every_n_steps or on_validation:
            fast = fit_benchmarks if fit_benchmarks is not None else benchmarks
            fast = [{**entry, "limit": min(entry["limit"], fit_limit)}  # the fast check stays fast
                    if isinstance(entry, dict) and entry.get("limit") else entry for entry in fast]
            self.fit_suite = EvaluationSuite(fast, (),
                                             fit_judges, limit=fit_limit, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, system_prompt=system_prompt, seed=seed,
                                             progress=False)
        self.system_prompt = system_prompt
        self.every_n_steps = every_n_steps
        self.on_validation = on_validation
        self.output_dir = output_dir
        self.exclude_basis_prompts = exclude_basis_prompts
        self.excluded: dict[str, int] = {}
        self.excluded_trained: dict[str, int] = {}  # prompts answered by the training data's `mix` rows
        self._loaded: dict[str, tuple] = {}
        self._last_step: int | None = None
        self._checkpoint_step: int | None = None
        self.rows: list = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load every prompt set now, so a bad benchmark name or file fails before any training."""
        check_unsharded(trainer, "SafetyEvaluation")
        if self.output_dir:  # now, not after the evaluation
            check_replaceable(self.output_dir, REPORT_FILES, "SafetyEvaluation `output_dir`")
        self._checkpoint_step = None  # set when this run restores a checkpoint (after setup)
        for suite in (self.suite, self.fit_suite):
            if suite is not None:
                suite.system_prompt = system_prompt_of(self.system_prompt, trainer)
        if stage in ("test", "validate") and "full" not in self._loaded:
            self._loaded["full"] = self._without_basis_prompts(trainer, *self.suite.load())
        if stage == "fit" and self.fit_suite is not None and "fit" not in self._loaded:
            self._loaded["fit"] = self._without_basis_prompts(trainer, *self.fit_suite.load())

    def _without_basis_prompts(self, trainer: L.Trainer, benchmarks: list, tasks: list) -> tuple[list, list]:
        benchmarks = self._without(benchmarks, self._basis_hashes(trainer), self.excluded,
                                   "the safety basis is measured on", "exclude_basis_prompts=false")
        mix_prompts = getattr(trainer.datamodule, "mix_prompts", None)  # InstructionDataModule's; None without one
        trained = set(prompt_hashes(mix_prompts())) if callable(mix_prompts) else set()
        benchmarks = self._without(benchmarks, trained, self.excluded_trained,
                                   "the training data's `mix` rows answer", "drop them from `mix`")
        return benchmarks, tasks

    def _basis_hashes(self, trainer: L.Trainer) -> set[str]:
        refusal = find_refusal_directions(trainer, required=False)
        if not self.exclude_basis_prompts or refusal is None:
            return set()
        hashes = refusal.measured_prompt_hashes()
        if hashes is None:
            rank_zero_warn("SafetyEvaluation: the loaded safety basis does not list the prompts it was measured "
                           "on, so none can be excluded from the benchmarks; some may overlap.")
            return set()
        return hashes

    @staticmethod
    def _without(benchmarks: list, hashes: set[str], counts: dict[str, int], why: str, fix: str) -> list:
        """The benchmarks without the prompts in ``hashes``; ``counts`` gets how many each lost."""
        if not hashes:
            return benchmarks
        kept = []
        for benchmark in benchmarks:
            keep = [h not in hashes for h in prompt_hashes(benchmark.prompts)]
            counts[benchmark.name] = keep.count(False)
            if not any(keep):
                raise ValueError(f"Every prompt of benchmark {benchmark.name!r} is one {why}; evaluate on other "
                                 f"prompts or {fix}.")
            kept.append(replace(benchmark, prompts=[p for p, k in zip(benchmark.prompts, keep) if k],
                                categories=[c for c, k in zip(benchmark.categories, keep) if k]))
        if any(counts.values()):
            rank_zero_info(f"SafetyEvaluation: left out prompts {why}: "
                           + ", ".join(f"{name} {n}" for name, n in counts.items() if n))
        return kept

    # -- full evaluation ---------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._full(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "validate":
            self._full(trainer, pl_module)
        elif self.on_validation and self.fit_suite is not None:
            self._fast(trainer, pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._checkpoint_step = checkpoint.get("global_step")

    def _full(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, tokenizer = hf_model(pl_module), tokenizer_of(trainer, pl_module)
        benchmarks, tasks = self._loaded.get("full") or self.suite.load()
        metadata = self.suite.metadata(model, tokenizer)  # before the long run: a failure here costs nothing
        self.rows = self.suite.run(model, tokenizer, benchmarks, tasks)
        for row in self.rows:
            pl_module.log(row.log_name, row.value, sync_dist=False)
        # `test`/`validate --ckpt_path` restore the weights but not the trainer's step (a fresh trainer's is 0, one
        # that has fitted keeps its own): the checkpoint's is the evaluated model's
        step = trainer.global_step if self._checkpoint_step is None else self._checkpoint_step
        metadata.update({"step": step, "checkpoint": trainer.ckpt_path,
                         "excluded_basis_prompts": dict(self.excluded),
                         "excluded_trained_prompts": dict(self.excluded_trained)})
        self._write(self.output_dir or os.path.join(run_directory(trainer), "evaluation"), metadata)

    @rank_zero_only
    def _write(self, directory: str, metadata: dict) -> None:
        write_report(directory, self.rows, metadata, self.suite.responses)
        rank_zero_info(f"\nSafety and utility evaluation (report in {directory}):\n"
                       + markdown(self.rows, metadata).split("\n\n")[0] + "\n")

    # -- fast subset during fit ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # the step the fit starts at has no new update to check: step 0, or a resumed checkpoint's, whose check ran
        # before it was saved (micro-batches of gradient accumulation end there with the step count unchanged)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        metrics = self._fast_metrics(trainer, pl_module)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        log_now(trainer, metrics)

    def _fast(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in self._fast_metrics(trainer, pl_module).items():
            pl_module.log(name, value, sync_dist=False)

    def _fast_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The fast subset's numbers, named ``fit_safety/<benchmark>/<judge>/<metric>`` (same on every rank)."""
        model, tokenizer = hf_model(pl_module), tokenizer_of(trainer, pl_module)
        benchmarks, tasks = self._loaded.get("fit") or self.fit_suite.load()
        metrics = {}
        for row in self.fit_suite.run(model, tokenizer, benchmarks, tasks):
            metrics[f"fit_{row.log_name}"] = row.value
            if row.mean_refusal_score is not None:
                metrics[f"fit_{row.log_name.rsplit('/', 1)[0]}/refusal_score"] = row.mean_refusal_score
        return metrics
