"""EvaluationSuite: safety benchmarks × judges plus utility tasks, on one model, sharded across processes.

Every process generates for its own whole batches of each prompt set (batch ``b`` on process ``b % world``,
so every prompt is padded alongside the same neighbours as in one process: left padding changes
low-precision logits, and a round-robin of single prompts moved bf16 greedy answers) and feeds sum/count
metrics; ``compute()`` all-reduces them, so 2 processes report what 1 does. Responses are gathered to rank
zero for the report. Under FSDP2 each forward gathers weights from every process, so there every process
runs every prompt (``guard.shards.prompt_world``) and nothing is reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from rg_lightning.chat import render_prompt, template_fingerprint
from rg_lightning.evaluation.benchmarks import KINDS, Benchmark, benchmark_names, load_benchmark
from rg_lightning.evaluation.judges import Judge, KeywordJudge, LogitRefusalJudge, make_judge
from rg_lightning.evaluation.metrics import AnswerAccuracy, AttackSuccessRate, OverRefusalRate
from rg_lightning.evaluation.tasks import UtilityTask, load_task, task_names
from rg_lightning.generation import generate
from rg_lightning.guard.shards import process_world, prompt_world
from rg_lightning.sources import parse_source


@dataclass
class Row:
    """One line of the report: a benchmark (or task) judged one way."""

    benchmark: str
    kind: str  # harmful | benign | utility
    judge: str
    metric: str  # asr | over_refusal | accuracy | exact_match
    value: float
    n: int
    source: str
    categories: dict[str, float] = field(default_factory=dict)
    mean_refusal_score: float | None = None
    unparsed: int | None = None  # a model judge's outputs that were neither label (counted as not harmful)

    @property
    def log_name(self) -> str:
        if self.kind == "utility":  # a task has no judge: its metric is its scorer
            return f"utility/{self.benchmark}/{self.metric}".replace(":", "_")
        return f"safety/{self.benchmark}/{self.judge}/{self.metric}".replace(":", "_")


def _entry(item, allowed: set[str]) -> dict:
    """``"name"``, ``"name=path"`` or a mapping with ``name`` and keys of ``allowed`` (path, limit, ...)."""
    if isinstance(item, dict):
        unknown = set(item) - allowed - {"name"}
        if "name" not in item or unknown:
            raise ValueError(f"An entry needs `name` and may have {sorted(allowed)}; got {dict(item)}.")
        return dict(item)
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"An entry must be a name, 'name=path' or a mapping, got {item!r}.")
    name, _, path = item.partition("=")
    return {"name": name.strip(), "path": path.strip() or None}


BENCHMARK_KEYS = {"path", "limit", "kind", "prompt_column"}
TASK_KEYS = {"path", "limit", "source", "prompt_column", "reference_column", "score", "template", "metric",
             "max_new_tokens"}


def _judge(item) -> Judge:
    if isinstance(item, dict):
        options = dict(item)
        if "name" not in options:
            raise ValueError(f"A judge mapping needs `name` (e.g. llama_guard_3), got {item}.")
        return make_judge(options.pop("name"), **options)
    return make_judge(item)


class EvaluationSuite:
    """Runs the configured safety benchmarks and utility tasks on a Hugging Face causal LM.

    Args:
        benchmarks: Safety benchmarks: registry names (``advbench``, ``directharm4``, ``jailbreakbench``,
            ``jailbreakbench_benign``, ``harmbench``, ``strongreject``, ``toy:harmful``, ...), ``"name=path"``
            for a local copy, or mappings ``{name, path, limit}``; your own set as ``{name, path, kind:
            harmful|benign, prompt_column}``.
        tasks: Utility tasks, same forms (``gsm8k``, ``sst2``, ``agnews``, ``toy:benign``, ...); your own as
            ``{name, source, prompt_column, reference_column, score, template, metric, max_new_tokens}``.
        judges: Judges applied to every benchmark (``keyword:jailbreakbench``, ``keyword:gcg``, ``logit``,
            ``llama_guard_3``, ``harmbench``), mappings ``{name, <options>}`` (e.g. ``{name: llama_guard_3,
            min_words: 15}``) or Judge objects. Harm judges (Llama Guard, HarmBench) are not
            asked about benign sets: they cannot tell a refusal from a harmless answer.
        limit: At most this many prompts per benchmark and task (a seeded sample; ``None`` = all).
        max_new_tokens: Greedy tokens generated per safety answer.
        task_max_new_tokens: Greedy tokens per task answer (``None``: each task's own default, e.g. 256 for GSM8K).
        batch_size: Prompts per generation batch.
        system_prompt: System prompt of every request (``None`` = none). It changes results: it is reported.
        seed: Seed of the ``limit`` samples.
        progress: Show progress bars on rank zero.
    """

    def __init__(
        self,
        benchmarks: list[str | dict] = ("advbench", "directharm4", "jailbreakbench", "jailbreakbench_benign"),
        tasks: list[str | dict] = (),
        judges: list[str | dict | Judge] = ("keyword:jailbreakbench", "keyword:gcg"),
        limit: int | None = None,
        max_new_tokens: int = 64,
        task_max_new_tokens: int | None = None,
        batch_size: int = 16,
        system_prompt: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        for what, given in (("benchmarks", benchmarks), ("tasks", tasks), ("judges", judges)):
            if isinstance(given, (str, dict)):  # one name where a list is meant would be read letter by letter
                raise ValueError(f"`{what}` must be a list, e.g. [{given!r}], got {given!r}.")
        if not benchmarks and not tasks:
            raise ValueError("Give at least one benchmark or task to evaluate.")
        if task_max_new_tokens is not None and task_max_new_tokens < 1:
            raise ValueError("task_max_new_tokens must be positive or None (each task's own), "
                             f"got {task_max_new_tokens}.")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive or None, got {limit}.")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive.")
        self.benchmark_entries = [_entry(item, BENCHMARK_KEYS) for item in benchmarks]
        self.task_entries = [_entry(item, TASK_KEYS) for item in tasks]
        for entry in self.benchmark_entries:  # names and kinds now; local files below, hub data in load()
            if "kind" not in entry and entry["name"] not in benchmark_names():
                raise ValueError(f"Unknown benchmark {entry['name']!r}; known: {', '.join(benchmark_names())}. "
                                 "Your own set needs `path` and `kind` (harmful or benign).")
            if entry.get("kind") is not None and entry["kind"] not in KINDS:
                raise ValueError(f"Benchmark {entry['name']!r}: kind must be 'harmful' (attack success) or 'benign' "
                                 f"(over-refusal), got {entry['kind']!r}.")
        for entry in self.task_entries:
            if "source" not in entry and entry["name"] not in task_names():
                raise ValueError(f"Unknown task {entry['name']!r}; known: {', '.join(task_names())}. "
                                 "Your own task needs `source`, `prompt_column` and `reference_column`.")
        names = [entry["name"].replace(":", "_") for entry in self.benchmark_entries + self.task_entries]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once (names are compared with ':' written '_'): a name keys "
                             "the logged metrics and the responses file, so one entry would overwrite the other. Give "
                             "each copy its own name, e.g. {name: harmbench_val, path: ..., kind: harmful, "
                             "prompt_column: Behavior}.")
        for entry in self.benchmark_entries:  # a missing local file now, not after the fit
            if entry.get("path"):
                parse_source(entry["path"])
        self.judges = [_judge(judge) for judge in judges]
        judge_names = [judge.name for judge in self.judges]
        twice = sorted({name for name in judge_names if judge_names.count(name) > 1})
        if twice:
            raise ValueError(f"judges {twice} are listed more than once (options such as refusal_words or dtype are "
                             "not part of a judge's name): their verdicts and logged metrics would overwrite each "
                             "other. List each judge once.")
        if self.benchmark_entries and not self.judges:
            raise ValueError("Safety benchmarks need at least one judge, e.g. judges: [keyword:jailbreakbench].")
        self.limit = limit
        self.max_new_tokens = max_new_tokens
        self.task_max_new_tokens = task_max_new_tokens
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.seed = seed
        self.progress = progress
        self.responses: dict[str, list[dict]] = {}

    def load(self) -> tuple[list[Benchmark], list[UtilityTask]]:
        """Load every prompt set up front, so a bad name or file fails before any generation."""
        benchmarks = [load_benchmark(**{"limit": self.limit, **entry, "seed": self.seed})
                      for entry in self.benchmark_entries]
        tasks = [self._load_task(entry) for entry in self.task_entries]
        return benchmarks, tasks

    def _load_task(self, entry: dict) -> UtilityTask:
        entry = {"limit": self.limit, **entry, "seed": self.seed}
        if "source" in entry:  # your own data: a file or hub id with prompt and reference columns
            missing = {"prompt_column", "reference_column"} - set(entry)
            if missing or "path" in entry:
                raise ValueError(f"Task {entry['name']!r} from `source` needs prompt_column and reference_column "
                                 f"(and no `path`); missing {sorted(missing)}.")
            return UtilityTask.from_source(**entry)
        extra = set(entry) - {"name", "path", "limit", "seed"}
        if extra:
            raise ValueError(f"Task {entry['name']!r}: {sorted(extra)} only apply to your own data given by `source`.")
        return load_task(**entry)

    def metadata(self, model, tokenizer) -> dict:
        """What changes the numbers: template, system prompt, decoding, judges."""
        return {
            "model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "chat_template_sha256": template_fingerprint(tokenizer),  # (the first 16 hex digits of its sha256)
            "chat_template": getattr(tokenizer, "chat_template", None) or "",  # a dict for named templates
            "example_prompt": render_prompt(tokenizer, "<request>", system_prompt=self.system_prompt),
            "system_prompt": self.system_prompt,
            "decoding": "greedy",
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,  # low-precision answers depend on which prompts share a padded batch
            "task_max_new_tokens": self.task_max_new_tokens,  # None: each task's own (GSM8K 256, SST-2 8, ...)
            "judges": [judge.name for judge in self.judges],
            "limit": self.limit,
            "seed": self.seed,
            "processes": process_world()[1],
        }

    def run(self, model, tokenizer, benchmarks=None, tasks=None) -> list[Row]:
        """Evaluate ``model``; every process must call this (metrics and responses are synchronised)."""
        if benchmarks is None or tasks is None:
            benchmarks, tasks = self.load()
        # Prompts are split over processes, except under FSDP2: there every forward is a collective, so every
        # process runs every prompt (generation synced) and nothing is gathered.
        self._split = prompt_world(model)
        # every prompt checked on every process before any generation: a prompt too long for the context fails
        # at once and everywhere, not on one rank after the other benchmarks were answered
        for benchmark in benchmarks:  # a judge that reads no answer (logit) still needs the prompt to fit
            generates = any(j.uses_generation for j in self.judges
                            if benchmark.kind == "harmful" or j.measures == "refusal")
            self._check_context(model, tokenizer, benchmark.prompts, self.max_new_tokens if generates else 0,
                                benchmark.name, "max_new_tokens")
        for task in tasks:
            self._check_context(model, tokenizer, task.prompts, self.task_max_new_tokens or task.max_new_tokens,
                                task.name, "task_max_new_tokens")
        rows: list[Row] = []
        for benchmark in benchmarks:
            rows += self._benchmark(model, tokenizer, benchmark)
        for task in tasks:
            rows.append(self._task(model, tokenizer, task))
        return rows

    # -- internals ---------------------------------------------------------------------------------------
    def _shard(self, n: int) -> list[int]:
        """This process's prompts: whole units of the batch sizes (the suite's and its judges'), unit ``u`` on
        process ``u % world``, so each batch holds the prompts it holds in one process."""
        rank, world = self._split
        sizes = [getattr(judge, "batch_size", None) for judge in self.judges]
        unit = math.lcm(self.batch_size, *(size for size in sizes if isinstance(size, int)))
        return [i for start in range(rank * unit, n, world * unit) for i in range(start, min(start + unit, n))]

    def _gather(self, values: list, indices: list[int], total: int) -> list:
        """Every process's (index, value) pairs, put back in the original order (on every process)."""
        pairs = list(zip(indices, values))
        if self._split[1] > 1:
            gathered: list = [None] * self._split[1]
            dist.all_gather_object(gathered, pairs)
            pairs = [pair for part in gathered for pair in part]
        ordered: list = [None] * total
        for index, value in pairs:
            ordered[index] = value
        return ordered

    def _metric(self, kind, device):
        """A rate metric that all-reduces on ``compute()`` only where prompts are split over processes."""
        return kind(sync_on_compute=self._split[1] > 1).to(device)

    def _global_mean(self, values: list[float], device) -> float:
        """The mean over every process's values (sum and count all-reduced where prompts are split)."""
        totals = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
        if self._split[1] > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1]) if totals[1] else math.nan

    def _unparsed(self, judge, benchmark: Benchmark, mine: list[int], record: dict, device) -> int | None:
        """How many of a model judge's outputs were neither label, over every process; their raw text goes into the
        responses, and any at all is warned about: they count as not harmful, so a judge answering off-format (wrong
        tokenizer or template, too few new tokens) would otherwise read as a safe model."""
        outputs = getattr(judge, "last_outputs", None)
        if outputs is None:
            return None
        record[f"{judge.name} output"] = self._gather(list(outputs), mine, len(benchmark.prompts))
        unparsed = torch.tensor([judge.last_unparsed], dtype=torch.float64, device=device)
        if self._split[1] > 1:
            dist.all_reduce(unparsed)
        unparsed = int(unparsed.item())
        if unparsed:
            rank_zero_warn(f"Judge {judge.name!r}: {unparsed} of {len(benchmark.prompts)} outputs on {benchmark.name} "
                           "were neither of its labels and count as not harmful; check the judge's tokenizer, chat "
                           "template and max_new_tokens (its raw outputs are in the report's responses).")
        return unparsed

    def _check_context(self, model, tokenizer, prompts: list[str], max_new_tokens: int, name: str, knob: str) -> None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not limit or not prompts:
            return
        longest = max(len(tokenizer(render_prompt(tokenizer, p, system_prompt=self.system_prompt),
                                    add_special_tokens=False)["input_ids"]) for p in prompts)
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"{name}: the longest prompt has {longest} tokens; with {knob}={max_new_tokens} that is "
                f"beyond the model's context of {limit} tokens. Lower {knob} or drop the longest prompts."
            )

    def _generate(self, model, tokenizer, prompts: list[str], max_new_tokens: int, name: str) -> list[str]:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                        system_prompt=self.system_prompt, progress=self._bar(name, len(prompts)))

    def _bar(self, name: str, total: int):
        if not self.progress or process_world()[0] != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"evaluate {name}", unit="prompt", leave=False)

    def _benchmark(self, model, tokenizer, benchmark: Benchmark) -> list[Row]:
        judges = [j for j in self.judges if benchmark.kind == "harmful" or j.measures == "refusal"]
        if not judges:
            return []
        device = next(model.parameters()).device
        mine = self._shard(len(benchmark.prompts))
        prompts = [benchmark.prompts[i] for i in mine]
        responses = None
        if any(j.uses_generation for j in judges):
            responses = self._generate(model, tokenizer, prompts, self.max_new_tokens, benchmark.name)
        record = {"prompt": self._gather(prompts, mine, len(benchmark.prompts)),
                  "category": benchmark.categories}
        if responses is not None:
            record["response"] = self._gather(responses, mine, len(benchmark.prompts))
        rows = []
        categories = sorted({c for c in benchmark.categories if c is not None})
        for judge in judges:
            mean_score = None
            if isinstance(judge, LogitRefusalJudge):
                scores = judge.scores(prompts, model=model, tokenizer=tokenizer, system_prompt=self.system_prompt)
                verdicts = (scores > judge.threshold).tolist()
                mean_score = self._global_mean(scores.tolist(), device)
            elif benchmark.kind == "benign" and isinstance(judge, KeywordJudge):
                # the "too short to be jailbroken" rule (min_words) says nothing about refusing a harmless request
                verdicts = [judge.is_refusal(response) for response in responses]
            else:
                verdicts = judge(prompts, responses, model=model, tokenizer=tokenizer, system_prompt=self.system_prompt)
            unparsed = self._unparsed(judge, benchmark, mine, record, device)
            if benchmark.kind == "harmful":
                succeeded = [(not v) if judge.measures == "refusal" else bool(v) for v in verdicts]
                metric_name, make = "asr", AttackSuccessRate
            else:
                succeeded = [bool(v) for v in verdicts]
                metric_name, make = "over_refusal", OverRefusalRate
            overall = self._metric(make, device)
            overall.update(torch.tensor(succeeded, dtype=torch.bool, device=device))
            per_category = {}
            for category in categories:
                metric = self._metric(make, device)
                chosen = [s for s, i in zip(succeeded, mine) if benchmark.categories[i] == category]
                metric.update(torch.tensor(chosen, dtype=torch.bool, device=device))
                per_category[category] = float(metric.compute())
            record[judge.name] = self._gather([bool(v) for v in verdicts], mine, len(benchmark.prompts))
            rows.append(Row(benchmark.name, benchmark.kind, judge.name, metric_name, float(overall.compute()),
                            len(benchmark.prompts), benchmark.source, per_category, mean_score, unparsed))
        self.responses[benchmark.name] = [dict(zip(record, values)) for values in zip(*record.values())]
        return rows

    def _task(self, model, tokenizer, task: UtilityTask) -> Row:
        device = next(model.parameters()).device
        mine = self._shard(len(task.prompts))
        prompts = [task.prompts[i] for i in mine]
        max_new_tokens = self.task_max_new_tokens or task.max_new_tokens
        responses = self._generate(model, tokenizer, prompts, max_new_tokens, task.name)
        correct = [bool(task.score(r, task.references[i])) for r, i in zip(responses, mine)]
        metric = self._metric(AnswerAccuracy, device)
        metric.update(torch.tensor(correct, dtype=torch.bool, device=device))
        self.responses[task.name] = [
            {"prompt": p, "reference": ref, "response": r, "correct": c}
            for p, ref, r, c in zip(task.prompts, task.references, self._gather(responses, mine, len(task.prompts)),
                                    self._gather(correct, mine, len(task.prompts)))
        ]
        return Row(task.name, "utility", task.metric, task.metric, float(metric.compute()), len(task.prompts),
                   task.source)
