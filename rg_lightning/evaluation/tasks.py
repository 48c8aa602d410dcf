"""Utility tasks: what fine-tuning is for, measured next to refusal so a guard that costs the task shows up.

| name | hub id : config @ split | local columns | size | metric |
|---|---|---|---|---|
| gsm8k | openai/gsm8k : main @ test | question, answer ("... #### 72") | 1319 | exact_match |
| sst2 | stanfordnlp/sst2 @ validation | sentence, label (0 negative, 1 positive) | 872 | accuracy |
| agnews | fancyzhx/ag_news @ test (text, label 0-3) | label 1-4, title, description (char-CNN csv) | 7600 | accuracy |
| toy:benign, toy:sentiment, toy:arithmetic | the miniature world's held-out split | generated | 200 | exact_match |

The ``toy:alt:...`` tasks are the same on the miniature world's ``alt`` variant. Classification answers are
read as the first label word in the response; GSM8K answers as the last number. Your own data:
:meth:`UtilityTask.from_source`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Callable, Literal

from rg_lightning.evaluation.benchmarks import TOY_PREFIX, sample_indices, source_label
from rg_lightning.sources import Source, load_source, parse_source

Metric = Literal["exact_match", "accuracy"]
METRICS = ("exact_match", "accuracy")
TOY_TASK_SIZE = 200  # what the miniature world's own before/after report measures
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer as a number on the last line."
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
# Words a model may use for an AG News class, longest first so "sci/tech" wins over "tech".
AGNEWS_ALIASES = {"sci/tech": "Sci/Tech", "science": "Sci/Tech", "technology": "Sci/Tech", "tech": "Sci/Tech",
                  "world": "World", "sports": "Sports", "sport": "Sports", "business": "Business"}
# A number: optional minus, thousands groups "1,000" or plain digits, optional decimals; not the tail of "3.5".
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


@dataclass
class UtilityTask:
    """Prompts with references and the rule that says whether one response is right."""

    name: str
    prompts: list[str]
    references: list[str]
    score: Callable[[str, str], bool]
    metric: Metric
    max_new_tokens: int
    source: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.references):
            raise ValueError(f"Task {self.name!r}: {len(self.prompts)} prompts but {len(self.references)} references.")
        if self.metric not in METRICS:
            raise ValueError(f"Task {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}.")

    def __len__(self) -> int:
        return len(self.prompts)

    def scores(self, responses: list[str]) -> list[bool]:
        """One verdict per prompt, for responses in prompt order."""
        if len(responses) != len(self.references):
            raise ValueError(f"Task {self.name!r}: {len(responses)} responses for {len(self.references)} prompts.")
        return [bool(self.score(response, reference)) for response, reference in zip(responses, self.references)]

    @classmethod
    def from_source(cls, name: str, source: str, prompt_column: str, reference_column: str,
                    score: str | Callable[[str, str], bool] = "exact", template: str | None = None,
                    metric: Metric = "exact_match", max_new_tokens: int = 64, limit: int | None = None,
                    seed: int = 0) -> UtilityTask:
        """A task from your own file or hub id (``owner/name[:config][@split]``).

        ``score`` is ``"exact"``, ``"contains"``, ``"last_number"``, ``"module:function"`` or a callable
        ``(response, reference) -> bool``. ``template`` formats each prompt: ``{prompt}`` is the prompt column,
        any other ``{column}`` that row's value.
        """
        scorer = resolve_score(score)
        parsed = parse_source(source)
        label = source_label(parsed)
        dataset = load_source(parsed)
        for column in (prompt_column, reference_column):
            if column not in dataset.column_names:
                raise ValueError(f"Task {name!r}: column {column!r} is not in {label!r}, whose columns are "
                                 f"{list(dataset.column_names)}; set prompt_column / reference_column.")
        rows = dataset.select(sample_indices(len(dataset), limit, seed)).to_list()
        prompts = []
        for row in rows:
            text = str(row[prompt_column])
            if template is not None:
                try:
                    text = template.format_map({**row, "prompt": text})
                except KeyError as error:
                    raise ValueError(f"Task {name!r}: template field {error} is neither 'prompt' nor a column of "
                                     f"{label!r} ({list(dataset.column_names)}).") from None
            prompts.append(text)
        return cls(name, prompts, [str(row[reference_column]) for row in rows], scorer, metric, max_new_tokens,
                   label)


# -- scoring rules --------------------------------------------------------------------------------------------
def exact(response: str, reference: str) -> bool:
    """The whole response is the reference (surrounding whitespace ignored)."""
    return response.strip() == reference.strip()


def contains(response: str, reference: str) -> bool:
    """The reference appears somewhere in the response, ignoring case."""
    return reference.strip().lower() in response.lower()


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text``: thousands commas dropped, a sentence-final dot ignored."""
    numbers = _NUMBER.findall(text)
    return Decimal(numbers[-1].replace(",", "")) if numbers else None


def last_number_matches(response: str, reference: str) -> bool:
    """The response's last number equals the reference number (``"1,000"`` == ``"1000"`` == ``"1000.00"``)."""
    expected, answered = last_number(reference), last_number(response)
    return expected is not None and answered is not None and answered == expected


def first_label(response: str, aliases: dict[str, str]) -> str | None:
    """The label of the earliest label word in the response (whole words, any case)."""
    words = sorted(aliases, key=len, reverse=True)
    match = re.search(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", response, re.IGNORECASE)
    return aliases[match.group(1).lower()] if match else None


def label_matches(response: str, reference: str, aliases: dict[str, str]) -> bool:
    """Classification accuracy: the first label word found names the reference class."""
    return first_label(response, aliases) == reference


SCORES: dict[str, Callable[[str, str], bool]] = {"exact": exact, "contains": contains,
                                                  "last_number": last_number_matches}


def resolve_score(score: str | Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    """A scoring rule from its name, from ``"module:function"``, or a callable as it is."""
    if callable(score):
        return score
    if score in SCORES:
        return SCORES[score]
    module_name, _, function_name = str(score).partition(":")
    if not function_name:
        raise ValueError(f"Unknown score {score!r}: use one of {sorted(SCORES)}, 'module:function' or a callable.")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Cannot import score {score!r} ({error}); give an importable 'module:function'.") from None
    if not callable(function):
        raise ValueError(f"Score {score!r} is not callable; it must be a function (response, reference) -> bool.")
    return function


# -- registered tasks -----------------------------------------------------------------------------------------
def _require(name: str, columns: list[str], needed: tuple[str, ...], label: str) -> None:
    missing = [column for column in needed if column not in columns]
    if missing:
        raise ValueError(f"Task {name!r}: {label!r} lacks column(s) {missing}; it has {columns}. "
                         f"Give a file with columns {list(needed)}.")


def _label_index(name: str, value, count: int, offset: int, label: str) -> int:
    index = int(value) - offset
    if not 0 <= index < count:
        raise ValueError(f"Task {name!r}: label {value!r} in {label!r} is outside {offset}..{offset + count - 1}; "
                         "unlabelled splits (label -1) cannot be scored, use a labelled split.")
    return index


def _gsm8k(rows: list[dict], columns: list[str], label: str) -> tuple[list[str], list[str]]:
    _require("gsm8k", columns, ("question", "answer"), label)
    references = []
    for row in rows:
        _, marker, final = row["answer"].rpartition("####")
        if not marker:
            raise ValueError(f"Task 'gsm8k': an answer in {label!r} has no '#### <number>' line; use the GSM8K "
                             "answer format.")
        references.append(final.strip().replace(",", ""))
    return [f"{row['question']}\n{GSM8K_INSTRUCTION}" for row in rows], references


def _sst2(rows: list[dict], columns: list[str], label: str) -> tuple[list[str], list[str]]:
    _require("sst2", columns, ("sentence", "label"), label)
    prompts = [f"Is the sentiment of this movie review positive or negative?\nReview: {row['sentence'].strip()}\n"
               "Answer with one word: positive or negative." for row in rows]
    return prompts, [SST2_LABELS[_label_index("sst2", row["label"], 2, 0, label)] for row in rows]


def _agnews(rows: list[dict], columns: list[str], label: str) -> tuple[list[str], list[str]]:
    """The hub has ``text`` with labels 0-3; the original char-CNN csv has ``title``/``description``, 1-4."""
    if "title" in columns and "description" in columns:
        _require("agnews", columns, ("label", "title", "description"), label)
        texts, offset = [f"{row['title']} {row['description']}" for row in rows], 1
    else:
        _require("agnews", columns, ("text", "label"), label)
        texts, offset = [row["text"] for row in rows], 0
    prompts = [f"Classify this news article as World, Sports, Business or Sci/Tech.\nArticle: {text}\n"
               "Answer with the category only." for text in texts]
    return prompts, [AGNEWS_LABELS[_label_index("agnews", row["label"], 4, offset, label)] for row in rows]


@dataclass(frozen=True)
class TaskSpec:
    """Where a utility task lives, how rows become (prompt, reference) and how answers are scored."""

    name: str
    hub_id: str
    config: str | None
    split: str
    convert: Callable[[list[dict], list[str], str], tuple[list[str], list[str]]]
    score: Callable[[str, str], bool]
    metric: Metric
    max_new_tokens: int
    size: str


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("gsm8k", "openai/gsm8k", "main", "test", _gsm8k, last_number_matches, "exact_match", 256, "1319"),
    TaskSpec("sst2", "stanfordnlp/sst2", None, "validation", _sst2,
             partial(label_matches, aliases={word: word for word in SST2_LABELS}), "accuracy", 8, "872"),
    TaskSpec("agnews", "fancyzhx/ag_news", None, "test", _agnews,
             partial(label_matches, aliases=AGNEWS_ALIASES), "accuracy", 8, "7600 (1900 per class)"),
)}
TOY_TASKS: dict[str, tuple[str, str]] = {
    f"{TOY_PREFIX}{variant + ':' if variant != 'default' else ''}{task}": (variant, task)
    for variant in ("default", "alt") for task in ("benign", "sentiment", "arithmetic")
}


def task_names() -> list[str]:
    """Every name :func:`load_task` knows: hub tasks, then the miniature world's."""
    return [*TASKS, *TOY_TASKS]


def load_task(name: str, path: str | None = None, limit: int | None = None, seed: int = 0) -> UtilityTask:
    """Load a registered utility task from the hub or from ``path``; ``limit`` keeps a seeded sample in file order."""
    if name in TOY_TASKS:
        return _load_toy(name, path, limit, seed)
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(task_names())}. For your own data use "
                         "UtilityTask.from_source(name, source, prompt_column, reference_column, score=...).")
    source = parse_source(path) if path is not None else Source(hub_id=spec.hub_id, config=spec.config,
                                                                split=spec.split)
    label = source_label(source)
    dataset = load_source(source)
    rows = dataset.select(sample_indices(len(dataset), limit, seed)).to_list()
    prompts, references = spec.convert(rows, list(dataset.column_names), label)
    return UtilityTask(name, prompts, references, spec.score, spec.metric, spec.max_new_tokens, label)


def toy_score(task: str, response: str, reference: str) -> bool:
    """One example scored exactly as the miniature world scores a batch (:func:`~rg_lightning.toy.task_metric`)."""
    from rg_lightning.toy.world import task_metric

    return task_metric(task, [response], [reference]) == 1.0


def _load_toy(name: str, path: str | None, limit: int | None, seed: int) -> UtilityTask:
    """Examples of the task's held-out split; ``limit`` replaces the default count (:data:`TOY_TASK_SIZE`)."""
    from rg_lightning.toy.world import ToyWorld

    if path is not None:
        raise ValueError(f"Task {name!r} is generated by the miniature world; leave path= out.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")
    variant, task = TOY_TASKS[name]
    examples = ToyWorld(variant).task_examples(task, "heldout", limit or TOY_TASK_SIZE, seed=seed)
    prompts = [example["messages"][0]["content"] for example in examples]
    references = [example["messages"][1]["content"] for example in examples]
    # The world's answers are whole words and its tokenizer is word-level: two spare tokens, as its own report.
    max_new_tokens = max(len(reference.split()) for reference in references) + 2
    return UtilityTask(name, prompts, references, partial(toy_score, task), "exact_match", max_new_tokens,
                       f"toy world {variant!r}, held-out {task} examples")
