"""RefusalGuard vs plain fine-tuning on the miniature world, over seeds: the project's own benchmark.

    python experiments/benchmark_tiny.py                      # benign task, 3 seeds, shipped model
    python experiments/benchmark_tiny.py --task sentiment --harmful-fraction 0.1
    python experiments/benchmark_tiny.py --variant alt         # a world the guard was never tuned on
    python experiments/benchmark_tiny.py --variant alt --arch gemma2   # ... and another architecture family
    python experiments/benchmark_tiny.py --arch qwen3 --arms guarded --leave-out rows   # where the task cost sits
    python experiments/benchmark_tiny.py --arms plain replay guarded   # against mixing refusal examples into the data

Arms: ``plain`` fine-tuning; ``guarded`` (RefusalGuard, subspace mode); ``directions`` (the guard in directions
mode); ``replay``: plain fine-tuning with ``--replay-fraction`` of the rows replaced by harmful requests of the
basis prompts' split answered with a refusal (the published safety-data mixing defence, Bianchi et al. 2024),
no guard; ``guarded-replay``: the guard on that data; ``constrained-sft``: plain fine-tuning with Qi et al.'s
token-wise constrained objective (ICLR 2025, "Safety alignment should be made more than just a few tokens deep"),
a published fine-tuning-stage defence that needs only the aligned model as a frozen reference (see
``ConstrainedSFT``).

Every arm runs the recipe of experiments/tiny.yaml (AdamW lr 1e-3, batch 32, 150 steps), except that AdamW keeps
its default weight decay 0.01 (tiny.yaml: 0), with which every committed result was measured (``--weight-decay``),
and measures
held-out harmful refusal, held-out harmless refusal and the task metric by greedy generation. Writes
``<out>/<name>.json`` and ``<out>/<name>.md`` (mean ± std over seeds, wall time, machine).

A world is a variant (templates, vocabulary) times an architecture. The default world (``default`` x
``llama``) uses the shipped aligned model, every other one its built weights shipped in
``experiments/worlds/<variant>-<arch>`` (:data:`SHIPPED_WORLDS`): a build's weights depend on the machine's
floating-point kernels, while fine-tuning a given model gives the same results across machines, so shipped
weights make every result reproducible. ``--build-worlds`` ignores them and builds each world once by
``python -m rg_lightning.toy build`` into ``--cache`` (``runs/worlds/<variant>-<arch>``), reused while its
``world.json`` matches: this machine's own builds, worlds no setting was chosen on. ``--world-width`` builds a
wider model of the world there (``<variant>-<arch>-width<W>``; every shipped world is 128 wide).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import lightning as L
import torch

from rg_lightning import CausalLMModule
from rg_lightning.atomic import atomic_file
from rg_lightning.chat import IGNORE_INDEX
from rg_lightning.callbacks import RefusalDirections, RefusalFeedback, RepresentationProjection
from rg_lightning.contract import tokenizer_of
from rg_lightning.guard.projection import RowFreeze
from rg_lightning.toy import ALIGNED_MODEL_DIR
from rg_lightning.toy.build import ARCH_STEPS, ARCHITECTURES, BUILD_VERSION, TIED_ARCHITECTURES, WIDTH, valid_width
from rg_lightning.toy.data import ToyTaskDataModule
from rg_lightning.toy.report import METRICS, AlignmentReport

ARMS = ("plain", "guarded", "directions", "replay", "guarded-replay", "constrained-sft")
GUARD_ARMS = {"guarded", "directions", "guarded-replay"}  # arms that run RefusalGuard
REPLAY_ARMS = ("replay", "guarded-replay")  # arms trained on data with refusal examples mixed in
# the replay arm: share of training rows that are harmful requests answered with a refusal
DEFAULT_REPLAY_FRACTION = 0.1
DEFAULT_STEPS, DEFAULT_LR = 150, 1e-3  # experiments/tiny.yaml (max_steps, AdamW lr)
# AdamW's own default, with which every committed result was measured; experiments/tiny.yaml uses 0
DEFAULT_WEIGHT_DECAY = 0.01
DEFAULT_ENERGY = 0.9  # experiments/tiny.yaml (RefusalDirections energy)
DEFAULT_N_PROMPTS = 128  # experiments/tiny.yaml (RefusalDirections n_prompts); likewise
DEFAULT_CENTERED = False  # experiments/tiny.yaml (RefusalDirections centered); likewise
DEFAULT_RIDGE = 0.03  # experiments/tiny.yaml (RefusalDirections ridge)
DEFAULT_TAIL_REFERENCE_LR = 1e-3  # experiments/tiny.yaml (RepresentationProjection tail_reference_lr)
DEFAULT_HOLD_ABSENT_ROWS = True  # experiments/tiny.yaml (RepresentationProjection hold_absent_rows)
DEFAULT_INPUT_DIFFERENCES = False  # experiments/tiny.yaml (RefusalDirections input_differences)
DEFAULT_REQUEST_WEIGHT = 1.0  # experiments/tiny.yaml (RefusalDirections request_weight)
DEFAULT_ROW_ENERGY, DEFAULT_ROW_RIDGE = 1.0, 0.0  # experiments/tiny.yaml (RefusalDirections row_energy, row_ridge)
WORLD_THREADS = 1  # every non-shipped world in experiments/results was built with one thread (see toy.build.THREADS)
SHIPPED_WORLDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worlds")  # <variant>-<arch>/ each
DEFAULT_ANSWER_TOKENS = 0  # experiments/tiny.yaml (RefusalDirections answer_tokens); likewise
DEFAULT_FEEDBACK = True  # experiments/tiny.yaml (a RefusalFeedback callback with its defaults)


LEAVE_OUT = ("rows", "chat-rows", "template-rows", "mlp", "attention", "attention-qk", "attention-vo", "lm-head",
             "norms")
LINEAR_GROUPS = {  # leave-out group -> which linear constraints (by module name) it drops
    "mlp": lambda name: ".mlp." in name,
    "attention": lambda name: ".self_attn." in name,
    "attention-qk": lambda name: name.endswith(("q_proj", "k_proj")),
    "attention-vo": lambda name: name.endswith(("v_proj", "o_proj")),
    "lm-head": lambda name: name.endswith("lm_head"),
}


class LeavingOut(RepresentationProjection):
    """The guard without some of its constraints: a screen of where the guard's task cost sits.

    ``rows``: every embedding-row freeze; ``chat-rows`` / ``template-rows``: only the rows of the chat template's
    tokens / of the world's request-template words that are not harm words; ``mlp``, ``attention``: those
    linears' constraints; ``attention-qk`` / ``attention-vo``: only the query and key / value and output
    projections' (where attends, what it moves; a fused ``qkv_proj`` is in neither); ``lm-head``: the logit
    head's; ``norms``: the norm weights' (every 1-D freeze). ``layers``: only those decoder layers' constraints of
    the groups (where in the depth the cost sits); the embeddings, the logit head and the final norm stay held.
    """

    def __init__(self, groups: list[str], variant: str, layers: list[int] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        unknown = set(groups) - set(LEAVE_OUT)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)}; choose from {LEAVE_OUT}")
        if layers and not groups:
            raise ValueError("layers narrow the groups left out: name the groups too")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"layers must be decoder layer indices >= 0, got {list(layers)}")
        self.groups, self.variant, self.layers = set(groups), variant, set(layers)

    def _free_tokens(self, tokenizer) -> set[int]:
        from rg_lightning.chat import render_prompt
        from rg_lightning.toy.world import ToyWorld

        free = set()
        if "chat-rows" in self.groups:
            text = tokenizer(render_prompt(tokenizer, "x"), add_special_tokens=False)["input_ids"]
            free |= set(text) - set(tokenizer("x", add_special_tokens=False)["input_ids"])
        if "template-rows" in self.groups:
            world = ToyWorld(self.variant)
            harm = {w for d in world.harmful for part in (d.verbs, d.modifiers, d.nouns, (d.article,))
                    for phrase in part for w in phrase.split()}
            words = {w for t in world.templates for w in t.replace("{task}", "").split()} - harm
            free |= set(tokenizer.convert_tokens_to_ids(sorted(words)))
        return free

    def _left_out(self, constraint) -> bool:
        name, kind = constraint.name, constraint.kind
        if self.layers:
            layer = re.search(r"\.layers\.(\d+)\.", f".{name}.")
            if layer is None or int(layer.group(1)) not in self.layers:
                return False
        if kind == "rows":
            return "rows" in self.groups
        if kind == "param":
            return "norms" in self.groups
        return kind.startswith("linear") and any(LINEAR_GROUPS[g](name) for g in self.groups if g in LINEAR_GROUPS)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        free = self._free_tokens(tokenizer_of(trainer, pl_module))
        kept = []
        for constraint in self.constraints.constraints:
            if isinstance(constraint, RowFreeze) and free:
                held = torch.tensor([t not in free for t in constraint.ids.tolist()], dtype=torch.bool)
                constraint = RowFreeze(constraint.name, constraint.module, constraint.ids[held])
            if not self._left_out(constraint):
                kept.append(constraint)
        print(f"left out {sorted(self.groups)}: {len(self.constraints.constraints) - len(kept)} of "
              f"{len(self.constraints.constraints)} constraints" + (f", {len(free)} token rows freed" if free else ""))
        self.constraints.constraints = kept


class Trajectory(AlignmentReport):
    """The report's held-out numbers also every ``every`` optimizer steps of the fit (``--every``): how refusal and
    the task move during training, not only where they end. Greedy generation on the same samples, in eval mode,
    then back to training: the fit itself is unchanged (same final numbers as a run without it)."""

    def __init__(self, every: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every, self.points = every, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or (self.points and self.points[-1]["step"] == step) or step >= trainer.max_steps:
            return  # the last step is the report's own "after"
        training = pl_module.training
        self.points.append({"step": step, **self._measure(trainer, pl_module)})
        pl_module.train(training)


class ConstrainedSFT(CausalLMModule):
    """Fine-tuning with the token-wise constrained objective of Qi et al. (ICLR 2025): per answer token t,
    ``-(2 / beta_t) * log sigmoid(beta_t * (log p(y_t) - log p_aligned(y_t)))`` instead of ``-log p(y_t)``, with
    the aligned model frozen as the reference. A large ``beta_t`` stops rewarding a token's probability once it
    exceeds the aligned model's (the loss saturates), so the first answer tokens, where refusal is decided, stay
    near the aligned distribution; a small one is close to cross-entropy. The paper's values: 0.5 for the first
    answer token, 2 for tokens 2-5, 0.1 after."""

    BETAS = (0.5, 2.0, 0.1)  # first answer token, tokens 2-5, the rest

    def __init__(self, *args, betas: tuple[float, float, float] = BETAS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(betas) != 3 or not all(beta > 0 for beta in betas):
            raise ValueError(f"betas: three positive values (first token, tokens 2-5, the rest), got {betas}")
        self.betas = tuple(betas)

    def configure_model(self) -> None:
        super().configure_model()
        reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        object.__setattr__(self, "_reference", reference)  # not a submodule: neither trained nor checkpointed

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        targets = batch["labels"][:, 1:]
        answer = targets != IGNORE_INDEX
        index = targets.clamp_min(0)[..., None]
        log_p = self.model(**inputs).logits[:, :-1].float().log_softmax(-1).gather(-1, index)[..., 0]
        with torch.no_grad():
            log_ref = self._reference(**inputs).logits[:, :-1].float().log_softmax(-1).gather(-1, index)[..., 0]
        position = answer.cumsum(-1) - 1  # index of each target within its answer (one answer per toy row)
        first, early, rest = self.betas
        beta = torch.full_like(log_p, rest).masked_fill(position < 5, early).masked_fill(position == 0, first)
        loss = (-(2 / beta) * torch.nn.functional.logsigmoid(beta * (log_p - log_ref)))[answer].mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss


def run_arm(arm: str, model_dir: str, task: str, harmful_fraction: float, variant: str, seed: int, steps: int,
            lr: float, energy: float, answer_tokens: int, project_gradients: bool = True,
            n_prompts: int = DEFAULT_N_PROMPTS, rank: int | None = None, centered: bool = DEFAULT_CENTERED,
            head_answer_only: bool = True, ridge: float = DEFAULT_RIDGE, leave_out: list[str] = (),
            tail_reference_lr: float | None = DEFAULT_TAIL_REFERENCE_LR,
            hold_absent_rows: bool = DEFAULT_HOLD_ABSENT_ROWS,
            input_differences: bool = DEFAULT_INPUT_DIFFERENCES,
            replay_fraction: float = DEFAULT_REPLAY_FRACTION, weight_decay: float = DEFAULT_WEIGHT_DECAY,
            sft_betas: tuple[float, float, float] = ConstrainedSFT.BETAS, validation: bool = False,
            every: int = 0, tail_early: tuple[int, float] = (0, 1.0),
            request_weight: float = DEFAULT_REQUEST_WEIGHT, row_energy: float = DEFAULT_ROW_ENERGY,
            row_ridge: float = DEFAULT_ROW_RIDGE, leave_out_layers: list[int] = (),
            feedback: bool = DEFAULT_FEEDBACK) -> dict:
    L.seed_everything(seed)
    report = (Trajectory(every, task=task, variant=variant, validation=validation) if every
              else AlignmentReport(task=task, variant=variant, validation=validation))
    callbacks = [report]
    if arm in GUARD_ARMS:
        prefix = f"toy:{variant}:" if variant != "default" else "toy:"
        callbacks += [RefusalDirections(harmful=prefix + "harmful", harmless=prefix + "harmless",
                                        energy=energy if rank is None else None, rank=rank, n_prompts=n_prompts,
                                        centered=centered, head_answer_only=head_answer_only,
                                        answer_tokens=answer_tokens, batch_size=32,
                                        seed=seed, ridge=ridge, input_differences=input_differences,
                                        request_weight=request_weight, row_energy=row_energy,
                                        row_ridge=row_ridge),
                      LeavingOut(list(leave_out), variant, layers=list(leave_out_layers),
                                 mode="directions" if arm == "directions" else "subspace",
                                 project_gradients=project_gradients, tail_reference_lr=tail_reference_lr,
                                 tail_early_steps=tail_early[0], tail_early_scale=tail_early[1],
                                 hold_absent_rows=hold_absent_rows)]
        if feedback and arm != "directions":  # (the direction-only arm has no damped tail)
            callbacks.append(RefusalFeedback())
    optimizer = lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay)  # noqa: E731
    module = (ConstrainedSFT(model=model_dir, dtype="float32", optimizer=optimizer, betas=sft_betas)
              if arm == "constrained-sft" else CausalLMModule(model=model_dir, dtype="float32", optimizer=optimizer))
    data = ToyTaskDataModule(task=task, harmful_fraction=harmful_fraction, variant=variant, n_train=steps * 32,
                             seed=seed, refusal_fraction=replay_fraction if arm in REPLAY_ARMS else 0.0)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=root, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(module, data)
        seconds = time.perf_counter() - start
    result = {"arm": arm, "seed": seed, "before": report.before, "after": report.after, "seconds": seconds}
    if every:
        result["trajectory"] = report.points + [{"step": steps, **report.after}]
    if isinstance(callbacks[-1], RefusalFeedback):
        result["feedback"] = callbacks[-1].history  # the margin and scale at every measurement
    return result


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def world_model(variant: str, arch: str, cache: str, shipped: str | None = SHIPPED_WORLDS, seed: int = 0,
                width: int = WIDTH) -> str:
    """Directory of the aligned model of a world: the shipped one (``shipped=None``: none but the package's
    default world), or a cached build (built on demand). A build ``seed`` other than 0 (another initialisation
    and draw of alignment data) or a ``width`` other than the shipped 128 is never shipped: it gives an aligned
    model no setting was chosen on."""
    original = seed == 0 and width == WIDTH
    if original and (variant, arch) == ("default", "llama"):
        return str(ALIGNED_MODEL_DIR)
    if shipped is not None and original:
        directory = os.path.join(shipped, f"{variant}-{arch}")
        if os.path.isfile(os.path.join(directory, "model.safetensors")):
            built = _read_json(os.path.join(directory, "world.json"))
            if (built.get("variant"), built.get("arch")) != (variant, arch):
                raise ValueError(f"{directory} holds the {built.get('variant')!r}/{built.get('arch')!r} world, "
                                 f"not {variant!r}/{arch!r}: restore it (git checkout) or pass --build-worlds")
            return directory
    directory = os.path.join(cache, f"{variant}-{arch}" + (f"-seed{seed}" if seed else "")
                             + (f"-width{width}" if width != WIDTH else ""))
    record = os.path.join(directory, "world.json")
    if os.path.isfile(record):
        built = _read_json(record)
        # everything a build depends on: a record of another seed, recipe version or torch is rebuilt, as is
        # one whose weights are missing
        if ((built.get("variant"), built.get("arch", "llama"), built.get("steps"), built.get("threads"),
             built.get("seed"), built.get("build_version"), built.get("torch"), built.get("width", WIDTH))
                == (variant, arch, ARCH_STEPS[arch], WORLD_THREADS, seed, BUILD_VERSION, torch.__version__, width)
                and bool(built.get("vocabulary_examples")) == (arch in TIED_ARCHITECTURES)
                and os.path.isfile(os.path.join(directory, "model.safetensors"))):
            return directory
    from rg_lightning.toy.build import build

    build(directory, variant=variant, arch=arch, threads=WORLD_THREADS, seed=seed, width=width)
    return directory


def describe_world(model_dir: str) -> str:
    """Which aligned model a result fine-tuned, and on what its build ran (a build differs between machines)."""
    shown = os.path.relpath(model_dir)
    shown = os.path.basename(os.path.abspath(model_dir)) if shown.startswith("..") else shown  # no machine paths
    try:
        built = _read_json(os.path.join(model_dir, "world.json"))
    except (OSError, ValueError):
        return shown
    return (f"{shown} (built with {built.get('threads', 2)} thread(s), torch {built.get('torch', '?')}, "
            f"CPU capability {built.get('cpu_capability', 'not recorded')})")


def mean_std(values: list[float]) -> str:
    """Mean ± sample standard deviation in percent; one run has no spread to show (not a measured 0)."""
    if len(values) < 2:
        return f"{100 * statistics.mean(values):.1f} (one run)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(runs: list[dict], arms: list[str], prefix: str = "") -> str:
    """Mean ± std over seeds of each arm's numbers (``prefix`` "val_": those of the validation split)."""
    metrics = [prefix + m for m in METRICS]
    lines = ["| arm | harmful refusal % | harmless refusal % | task metric % | wall s / run |", "|---|---|---|---|---|"]
    aligned = [r["before"] for r in runs if r["arm"] == arms[0]]
    lines.append("| aligned model (before) | " + " | ".join(mean_std([b[m] for b in aligned]) for m in metrics)
                 + " | — |")
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        cells = [mean_std([r["after"][m] for r in mine]) for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    return "\n".join(lines)


def trajectory_table(runs: list[dict], arms: list[str]) -> str:
    """Mean ± std over seeds at each measured step (``--every``): one row per arm and step."""
    lines = ["| arm | step | harmful refusal % | harmless refusal % | task metric % |", "|---|---|---|---|---|"]
    for arm in arms:
        mine = [r["trajectory"] for r in runs if r["arm"] == arm]
        for i, point in enumerate(mine[0]):
            cells = [mean_std([t[i][m] for t in mine]) for m in METRICS]
            lines.append(f"| {arm} | {point['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="benign", choices=("benign", "sentiment", "arithmetic"))
    parser.add_argument("--harmful-fraction", type=float, default=0.0)
    parser.add_argument("--variant", default="default", choices=("default", "alt"))
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES), help="architecture family")
    parser.add_argument("--model", default=None, help="aligned model directory (default: the world's, see above)")
    parser.add_argument("--cache", default="runs/worlds",
                        help="where aligned models are built (a world without shipped weights, or --build-worlds)")
    parser.add_argument("--world-seed", type=int, default=0,
                        help="build seed of the aligned model (0: the shipped worlds; another: a new aligned model of "
                             "the same world, built into --cache, on which no setting was chosen)")
    parser.add_argument("--world-width", type=int, default=WIDTH,
                        help="hidden size of the aligned model, a multiple of 64 (another than 128: a wider model of "
                             "the same world, built into --cache)")
    parser.add_argument("--build-worlds", action="store_true",
                        help="build the world on this machine (into --cache) instead of using its shipped weights: "
                             "a build differs from machine to machine, so this is a world no setting was chosen on")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["plain", "guarded"], choices=ARMS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                        help="AdamW weight decay, both arms (0.01: every committed result; tiny.yaml: 0)")
    parser.add_argument("--energy", type=float, default=DEFAULT_ENERGY, help="RefusalDirections energy")
    parser.add_argument("--n-prompts", type=int, default=DEFAULT_N_PROMPTS,
                        help="RefusalDirections n_prompts (harmful and harmless prompts measured for the basis)")
    parser.add_argument("--rank", type=int, default=None, help="RefusalDirections rank (fixed subspace dimension)")
    parser.add_argument("--centered", type=lambda v: v.lower() in ("1", "true", "yes"), default=DEFAULT_CENTERED,
                        help="RefusalDirections centered (true/false): energy of the variance around the mean")
    parser.add_argument("--head-positions", default="answer", choices=("answer", "all"),
                        help="positions where the logit head is protected: where answers are generated "
                             "(RefusalDirections head_answer_only, the default) or every prompt position (before)")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                        help="RefusalDirections ridge: damped tail below the energy cutoff (0: hard cutoff)")
    parser.add_argument("--tail-reference-lr", type=float, default=DEFAULT_TAIL_REFERENCE_LR,
                        help="RepresentationProjection tail_reference_lr: the damped tail's pull-back scales with "
                             "lr / this (0: the same share at every step, whatever the learning rate)")
    parser.add_argument("--tail-early", type=float, nargs=2, default=[0, 1.0], metavar=("STEPS", "SCALE"),
                        help="RepresentationProjection tail_early_steps and tail_early_scale: the damped tail pulls "
                             "back SCALE times as hard for the first STEPS optimizer steps (as ridge / SCALE)")
    parser.add_argument("--hold-absent-rows", type=lambda v: v.lower() in ("1", "true", "yes"),
                        default=DEFAULT_HOLD_ABSENT_ROWS,
                        help="RepresentationProjection hold_absent_rows (true/false): a step moves only the "
                             "embedding rows of its batch's tokens")
    parser.add_argument("--input-differences", type=lambda v: v.lower() in ("1", "true", "yes"),
                        default=DEFAULT_INPUT_DIFFERENCES,
                        help="RefusalDirections input_differences (true/false): each module also holds its "
                             "harmful-minus-harmless mean input at the post-instruction positions")
    parser.add_argument("--request-weight", type=float, default=DEFAULT_REQUEST_WEIGHT,
                        help="RefusalDirections request_weight: weight of the prompt positions before the "
                             "post-instruction template in the statistics (1: every position alike)")
    parser.add_argument("--row-energy", type=float, default=DEFAULT_ROW_ENERGY,
                        help="RefusalDirections row_energy: embedding rows of the most frequent protected tokens, "
                             "covering this share of their occurrences, held exactly (1: every row)")
    parser.add_argument("--row-ridge", type=float, default=DEFAULT_ROW_RIDGE,
                        help="RefusalDirections row_ridge: the other protected rows pulled back with weight "
                             "p/(p+row_ridge) (0: left free)")
    parser.add_argument("--replay-fraction", type=float, default=DEFAULT_REPLAY_FRACTION,
                        help="replay arm (the safety-data mixing defence, no guard): share of the training rows "
                             "that are harmful requests from the basis split answered with a refusal")
    parser.add_argument("--sft-betas", type=float, nargs=3, default=list(ConstrainedSFT.BETAS),
                        metavar=("FIRST", "EARLY", "REST"),
                        help="constrained-sft arm: beta of the first answer token, tokens 2-5 and the rest (Qi et al.)")
    parser.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                        help="RefusalDirections answer_tokens")
    parser.add_argument("--leave-out", nargs="+", default=[], choices=LEAVE_OUT,
                        help="screen: run the guard without these constraint groups (see LeavingOut)")
    parser.add_argument("--leave-out-layers", type=int, nargs="+", default=[], metavar="LAYER",
                        help="screen: leave the --leave-out groups out only in these decoder layers (0 = first)")
    parser.add_argument("--post-step-only", action="store_true",
                        help="RepresentationProjection project_gradients=False (the constraint only after each step)")
    parser.add_argument("--validation", action="store_true",
                        help="also measure the rest of the held-out pools (a validation split, to choose a learning "
                             "rate on; see experiments/select_lr.py), reported in a second table")
    parser.add_argument("--every", type=int, default=0,
                        help="also measure the held-out numbers every this many optimizer steps (a trajectory, "
                             "in the results and a second table; slower: each point generates on every sample)")
    parser.add_argument("--feedback", action=argparse.BooleanOptionalAction, default=DEFAULT_FEEDBACK,
                        help="add RefusalFeedback (its defaults) to the guarded arms: the damped tail pulled back as "
                             "hard as held-out probes' refusal scores need")
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    if not (float(args.tail_early[0]).is_integer() and args.tail_early[0] >= 0):
        parser.error(f"--tail-early STEPS must be a whole number of steps >= 0, got {args.tail_early[0]:g}")
    tail_early = (int(args.tail_early[0]), args.tail_early[1])
    if args.leave_out_layers and not args.leave_out:
        parser.error("--leave-out-layers narrows --leave-out: name the groups to leave out too")
    if any(layer < 0 for layer in args.leave_out_layers):
        parser.error(f"--leave-out-layers must be layer indices >= 0, got {args.leave_out_layers}")
    if not valid_width(args.world_width):
        parser.error(f"--world-width must be a positive multiple of 64, got {args.world_width}")
    if args.world_width != WIDTH and args.model:
        parser.error("--world-width builds a wider aligned model: leave out --model")
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    model_dir = args.model or world_model(args.variant, args.arch, args.cache,
                                          shipped=None if args.build_worlds else SHIPPED_WORLDS, seed=args.world_seed,
                                          width=args.world_width)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(arm, model_dir, args.task, args.harmful_fraction, args.variant, seed, args.steps,
                                args.lr, args.energy, args.answer_tokens, not args.post_step_only, args.n_prompts,
                                args.rank, args.centered, args.head_positions == "answer", args.ridge, args.leave_out,
                                args.tail_reference_lr or None, args.hold_absent_rows, args.input_differences,
                                args.replay_fraction, args.weight_decay, tuple(args.sft_betas), args.validation,
                                args.every, tail_early, request_weight=args.request_weight,
                                row_energy=args.row_energy, row_ridge=args.row_ridge,
                                leave_out_layers=args.leave_out_layers, feedback=args.feedback))
            after = runs[-1]["after"]
            print(f"seed {seed} {arm:10s} " + "  ".join(f"{m} {after[m]:.1%}" for m in METRICS), flush=True)
    world = args.variant if args.arch == "llama" else f"{args.variant}_{args.arch}"
    name = f"tiny_{world}" + (f"-seed{args.world_seed}" if args.world_seed else "") + f"_{args.task}"
    name += f"_attack{args.harmful_fraction:g}" if args.harmful_fraction else ""
    if GUARD_ARMS & set(args.arms):  # the guard's settings, when a guarded arm ran
        # energy and ridge are always in the name (results of earlier defaults keep their meaning); the rest only
        # when they differ from experiments/tiny.yaml.
        name += (f"_energy{args.energy:g}" if args.rank is None else "")
        name += (f"_rank{args.rank}" if args.rank is not None else "")
        name += "_head-answer" if args.head_positions == "answer" else ""  # files without it: every position
        name += (("_centered" if args.centered else "_uncentered") if args.centered != DEFAULT_CENTERED else "")
        name += (f"_ridge{args.ridge:g}" if args.ridge else "")  # files without it: hard cutoff
        name += (f"_request{args.request_weight:g}" if args.request_weight != 1 else "")  # without it: weight 1
        name += (f"_rows{args.row_energy:g}r{args.row_ridge:g}" if args.row_energy != 1 else "")  # without: exact
        name += (f"_answer{args.answer_tokens}" if args.answer_tokens != DEFAULT_ANSWER_TOKENS else "")
        name += "".join(f"_no-{group}" for group in args.leave_out)
        name += f"_layers{'-'.join(map(str, args.leave_out_layers))}" if args.leave_out_layers else ""
        name += ((f"_steps{args.steps}" if args.steps != DEFAULT_STEPS else "")
                 + (f"_lr{args.lr:g}" if args.lr != DEFAULT_LR else ""))
        if args.ridge and args.tail_reference_lr != DEFAULT_TAIL_REFERENCE_LR:  # only a damped tail is scaled
            name += f"_tailref{args.tail_reference_lr:g}" if args.tail_reference_lr else "_fixed-tail"
        if tail_early[0]:
            name += f"_early{tail_early[0]}x{tail_early[1]:g}"
        name += "_feedback" if args.feedback else ""  # files without it: no RefusalFeedback
        name += ((f"_prompts{args.n_prompts}" if args.n_prompts != DEFAULT_N_PROMPTS else "")
                 + ("_poststep" if args.post_step_only else ""))
        # files without it: every row moved (the earlier default)
        name += "_batch-rows" if args.hold_absent_rows else ""
        name += (("_differences" if args.input_differences else "_no-differences")
                 if args.input_differences != DEFAULT_INPUT_DIFFERENCES else "")
    else:
        name += ((f"_steps{args.steps}" if args.steps != DEFAULT_STEPS else "")
                 + (f"_lr{args.lr:g}" if args.lr != DEFAULT_LR else ""))
    name += f"_wd{args.weight_decay:g}" if args.weight_decay != DEFAULT_WEIGHT_DECAY else ""
    name += f"_every{args.every}" if args.every else ""  # same final numbers, plus the trajectory
    name += "_directions" if "directions" in args.arms else ""  # the direction-only arm ran
    if "constrained-sft" in args.arms:  # Qi et al.'s objective ran; its betas when not the paper's
        betas = tuple(args.sft_betas)
        name += "_constrained-sft" + ("" if betas == ConstrainedSFT.BETAS
                                      else "-beta" + "-".join(f"{b:g}" for b in betas))
    # one suffix per replay arm: whether the guard ran on the mixed data is in the name
    name += "".join(f"_{arm}{args.replay_fraction:g}" for arm in REPLAY_ARMS if arm in args.arms)
    command = "python experiments/benchmark_tiny.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"1-min load average {load_start:.1f} at start / {os.getloadavg()[0]:.1f} at end")
    guard = ("guard: " + (f"rank {args.rank}" if args.rank is not None else f"energy {args.energy}")
             + (" (centered)" if args.centered else "") + (f", ridge {args.ridge:g}" if args.ridge else "")
             + ((f", tail pull-back scaled by lr / {args.tail_reference_lr:g}" if args.tail_reference_lr
                 else ", tail pull-back fixed per step") if args.ridge else "")
             + (f", tail pulled back {tail_early[1]:g}x as hard for the first {tail_early[0]} steps"
                if tail_early[0] else "")
             + (", tail pull-back set by RefusalFeedback" if args.feedback else "")
             + f", logit head protected at {args.head_positions} positions"
             + (f", without {', '.join(args.leave_out)}" if args.leave_out else "")
             + (f" in decoder layers {', '.join(map(str, args.leave_out_layers))}" if args.leave_out_layers else "")
             + (", embedding rows of tokens absent from the batch held" if args.hold_absent_rows else "")
             + (", harmful-minus-harmless input means held" if args.input_differences else "")
             + (f", request positions weighted {args.request_weight:g}" if args.request_weight != 1 else "")
             + (f", embedding rows covering {args.row_energy:g} of the protected tokens' occurrences held exactly, "
                f"the rest weighted p/(p+{args.row_ridge:g})" if args.row_energy != 1 else "")
             + f", {args.n_prompts} prompts, answer tokens {args.answer_tokens}, gradients "
             + f"{'not ' if args.post_step_only else ''}projected before each step; ")
    aligned = describe_world(model_dir)
    replay = (f"replay: {args.replay_fraction:g} of the training rows are harmful requests answered with a refusal; "
              if set(REPLAY_ARMS) & set(args.arms) else "")
    validation = (f"Validation split (the rest of the held-out pools, to choose settings on):\n\n"
                  f"{table(runs, args.arms, 'val_')}\n\n" if args.validation else "")
    trajectory = (f"During training (every {args.every} steps):\n\n{trajectory_table(runs, args.arms)}\n\n"
                  if args.every else "")
    markdown = (f"### {name}\n\n{table(runs, args.arms)}\n\n{validation}{trajectory}"
                f"Command: `{command.strip()}`; seeds {args.seeds}; {args.steps} steps, AdamW lr {args.lr} "
                f"weight decay {args.weight_decay:g}, batch 32; "
                + (guard if GUARD_ARMS & set(args.arms) else "") + replay
                + f"held-out data, greedy generation. Aligned model: {aligned}. Machine: {machine}. Total wall time "
                f"{time.perf_counter() - start:.0f} s.\n")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name + ".json")
    say_what_is_replaced(path, args)
    with atomic_file(path) as handle:
        json.dump({"args": vars(args), "machine": machine, "aligned_model": aligned, "runs": runs}, handle, indent=2)
    with atomic_file(os.path.join(args.out, name + ".md")) as handle:
        handle.write(markdown)
    print(markdown)


def say_what_is_replaced(path: str, args) -> None:
    """The name carries the settings, not which of plain / guarded ran or the seeds: a run of other arms or seeds
    replaces a file of the same name, so say so rather than lose a result silently."""
    try:
        with open(path) as handle:
            earlier = json.load(handle)["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if (earlier.get("arms"), earlier.get("seeds")) != (args.arms, args.seeds):
        print(f"note: replacing {path}, which held arms {earlier.get('arms')} seeds {earlier.get('seeds')}, with arms "
              f"{args.arms} seeds {args.seeds} (write elsewhere with --out to keep both)", file=sys.stderr)


if __name__ == "__main__":
    main()
