"""Safety benchmarks: the prompt sets on which refusal is measured, from the hub or a local copy.

Harmful benchmarks give the attack success rate (the share of harmful requests answered); benign ones give
the over-refusal rate (the share of harmless requests refused). Every registered benchmark is read from its
public hub id by default, or from a local file with ``path=`` (json / jsonl / csv / tsv / parquet). The hub
mirrors and the original files name their columns differently, so each spec lists candidate columns, tried
in order and case-insensitively.

| name | hub id : config @ split | local columns | size | kind |
|---|---|---|---|---|
| advbench | walledai/AdvBench @ train (prompt, target) | goal, target (llm-attacks csv) | 520 | harmful |
| directharm4 | vfleaking/DirectHarm4 @ test (instruction, category) | Goal, Category | 400 (4 x 100) | harmful |
| jailbreakbench | JailbreakBench/JBB-Behaviors : behaviors @ harmful | Goal, Category, ... | 100 | harmful |
| jailbreakbench_benign | JailbreakBench/JBB-Behaviors : behaviors @ benign | Goal, Category, ... | 100 | benign |
| harmbench | walledai/HarmBench : standard @ train | Behavior, SemanticCategory | 159 / 41 | harmful |
| strongreject | walledai/StrongREJECT @ train (prompt, category) | forbidden_prompt, category | 313 | harmful |
| toy:harmful, toy:alt:harmful | the miniature world's held-out harmful requests | generated | 375 | harmful |
| toy:harmless, toy:alt:harmless | the miniature world's held-out harmless requests | generated | 450 | benign |

HarmBench keeps standard behaviours only: rows whose ``FunctionalCategory`` is not ``standard`` are dropped
where that column exists. The hub mirror (prompt, category) holds all 200 standard behaviours, test and
validation together; give the official ``harmbench_behaviors_text_test.csv`` (159) or ``..._val.csv`` (41)
for the published splits. The processed json copies of andyrdt/refusal_direction (``instruction``,
``category``) load as well.

Any other name with ``path=`` and ``kind=`` loads a file of your own; its prompt column is the first of
:data:`DEFAULT_PROMPT_COLUMNS` present, unless ``prompt_column=`` names it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal

from rg_lightning.sources import Source, load_source, parse_source

Kind = Literal["harmful", "benign"]
KINDS = ("harmful", "benign")
DEFAULT_PROMPT_COLUMNS = ("prompt", "instruction", "goal", "behavior", "forbidden_prompt", "question", "text")
DEFAULT_CATEGORY_COLUMNS = ("category", "semanticcategory")
TOY_PREFIX = "toy:"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how to read it; ``size`` is documentation (what a full load returns)."""

    name: str
    kind: Kind
    hub_id: str
    config: str | None
    split: str
    prompt_columns: tuple[str, ...]
    category_columns: tuple[str, ...] = DEFAULT_CATEGORY_COLUMNS
    row_filter: Callable[[dict], bool] | None = None
    size: str = ""


@dataclass
class Benchmark:
    """A loaded prompt set; ``categories`` is parallel to ``prompts`` (``None`` where a set has none)."""

    name: str
    kind: Kind
    prompts: list[str]
    categories: list[str | None]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def _standard_behaviour(row: dict) -> bool:
    """HarmBench's copyright and contextual behaviours need other judges and context strings: keep standard."""
    return row.get("FunctionalCategory", "standard") == "standard"


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec("advbench", "harmful", "walledai/AdvBench", None, "train",
                  ("prompt", "goal", "instruction"), size="520"),
    BenchmarkSpec("directharm4", "harmful", "vfleaking/DirectHarm4", None, "test",
                  ("instruction", "goal"), size="400 (malware, drug, phishing, disinfo: 100 each)"),
    BenchmarkSpec("jailbreakbench", "harmful", "JailbreakBench/JBB-Behaviors", "behaviors", "harmful",
                  ("goal", "prompt", "instruction"), size="100"),
    BenchmarkSpec("jailbreakbench_benign", "benign", "JailbreakBench/JBB-Behaviors", "behaviors", "benign",
                  ("goal", "prompt", "instruction"), size="100"),
    BenchmarkSpec("harmbench", "harmful", "walledai/HarmBench", "standard", "train",
                  ("behavior", "prompt", "instruction"), ("semanticcategory", "category"), _standard_behaviour,
                  size="test 159, val 41 (official csv); 200 from the hub mirror (test + val)"),
    BenchmarkSpec("strongreject", "harmful", "walledai/StrongREJECT", None, "train",
                  ("forbidden_prompt", "prompt", "instruction"), size="313"),
)}
TOY_BENCHMARKS: dict[str, tuple[str, str, Kind]] = {
    f"{TOY_PREFIX}{variant + ':' if variant != 'default' else ''}{request_kind}": (variant, request_kind, kind)
    for variant in ("default", "alt") for request_kind, kind in (("harmful", "harmful"), ("harmless", "benign"))
}


def benchmark_names() -> list[str]:
    """Every name :func:`load_benchmark` knows: hub benchmarks, then the miniature world's."""
    return [*BENCHMARKS, *TOY_BENCHMARKS]


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """A seeded subset of ``range(total)`` in ascending order: the same on every process and every run."""
    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None for all, got {limit}.")
    return sorted(random.Random(seed).sample(range(total), limit))


def find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first candidate present, exact spelling first, then ignoring case (``Goal`` vs ``goal``)."""
    by_lower = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in columns:
            return candidate
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()]
    return None


def source_label(source: Source) -> str:
    """A source as a string that :func:`~rg_lightning.sources.parse_source` reads back."""
    if source.path is not None:
        return source.path
    return f"{source.hub_id}{':' + source.config if source.config else ''}@{source.split}"


def load_benchmark(name: str, path: str | None = None, limit: int | None = None, seed: int = 0,
                   kind: Kind | None = None, prompt_column: str | None = None) -> Benchmark:
    """Load a registered benchmark (from the hub, or from ``path``) or, with ``path`` and ``kind``, your own.

    ``limit`` keeps a seeded sample of that many prompts, in file order. Prompts lose surrounding whitespace
    (some copies carry a trailing space that others lack, and it changes tokenization).
    """
    if name in TOY_BENCHMARKS:
        return _load_toy(name, path, limit, seed)
    spec = BENCHMARKS.get(name)
    if spec is None:
        if path is None or kind is None:
            raise ValueError(
                f"Unknown benchmark {name!r}. Known benchmarks: {', '.join(benchmark_names())}. "
                "For your own prompts give path= (a file or hub id) and kind='harmful' or 'benign'."
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be 'harmful' (attack success) or 'benign' (over-refusal), got {kind!r}.")
        spec = BenchmarkSpec(name, kind, "", None, "train", DEFAULT_PROMPT_COLUMNS)
    elif kind is not None and kind != spec.kind:
        raise ValueError(f"Benchmark {name!r} is {spec.kind}; leave kind= out or use another name for your file.")
    source = parse_source(path) if path is not None else Source(hub_id=spec.hub_id, config=spec.config,
                                                                split=spec.split)
    label = source_label(source)
    dataset = load_source(source)
    columns = list(dataset.column_names)
    prompt_key = _prompt_key(spec, columns, prompt_column, label)
    category_key = find_column(columns, spec.category_columns)
    rows = [row for row in dataset.to_list() if spec.row_filter is None or spec.row_filter(row)]
    if not rows:
        raise ValueError(f"Benchmark {name!r}: no row of {label!r} passes its filter (HarmBench keeps "
                         "FunctionalCategory == 'standard'); give a file with standard behaviours.")
    rows = [rows[i] for i in sample_indices(len(rows), limit, seed)]
    prompts = [row[prompt_key].strip() if isinstance(row[prompt_key], str) else "" for row in rows]
    empty = [i for i, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise ValueError(f"Benchmark {name!r}: {len(empty)} empty prompt(s) in column {prompt_key!r} of "
                         f"{label!r} (first at row {empty[0]}); remove those rows.")
    categories = [None if category_key is None or row[category_key] is None else str(row[category_key])
                  for row in rows]
    return Benchmark(name, spec.kind, prompts, categories, label)


def _prompt_key(spec: BenchmarkSpec, columns: list[str], prompt_column: str | None, label: str) -> str:
    if prompt_column is not None:
        if prompt_column not in columns:
            raise ValueError(f"Benchmark {spec.name!r}: prompt_column {prompt_column!r} is not in {label!r}, "
                             f"whose columns are {columns}.")
        return prompt_column
    key = find_column(columns, spec.prompt_columns)
    if key is None:
        raise ValueError(
            f"Benchmark {spec.name!r}: {label!r} has columns {columns}, none of the expected prompt columns "
            f"{list(spec.prompt_columns)} (any case). Rename the prompt column or give prompt_column=."
        )
    return key


def _load_toy(name: str, path: str | None, limit: int | None, seed: int) -> Benchmark:
    """Held-out requests of the miniature world: unseen objects in unseen templates."""
    from rg_lightning.toy.world import ToyWorld

    if path is not None:
        raise ValueError(f"Benchmark {name!r} is generated by the miniature world; leave path= out.")
    variant, request_kind, kind = TOY_BENCHMARKS[name]
    world = ToyWorld(variant)
    prompts = world.requests(request_kind, "heldout")
    categories = world.request_categories(request_kind, "heldout")
    chosen = sample_indices(len(prompts), limit, seed)
    return Benchmark(name, kind, [prompts[i] for i in chosen], [categories[i] for i in chosen],
                     f"toy world {variant!r}, held-out {request_kind} requests")
