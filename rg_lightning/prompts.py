"""Prompt sets for refusal statistics: a list of strings, a local file, a hub dataset, or the miniature world.

``toy:harmful`` / ``toy:harmless`` (optionally ``toy:alt:harmful``) are the training requests of the
miniature world; anything else goes through :mod:`rg_lightning.sources`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

from rg_lightning.sources import load_source, parse_source

PROMPT_COLUMNS = ("instruction", "prompt", "goal", "Goal", "Behavior", "forbidden_prompt", "text", "question")
DEFAULT_HARMFUL = "walledai/AdvBench"
DEFAULT_HARMLESS = "tatsu-lab/alpaca"


def check_prompt_source(source, what: str) -> None:
    """Refuse now, before any model is loaded, a prompt source that ``load_prompts`` would refuse later: another
    type, a list holding non-text, an unknown ``toy:`` set, a local file that does not exist. Hub ids are only
    checked for their form (nothing is downloaded here)."""
    if isinstance(source, (list, tuple)):
        _strings(list(source), f"`{what}`")
    elif not isinstance(source, str):
        raise TypeError(f"`{what}` must be a list of prompts, a local file, a hub dataset id or "
                        f"toy:<harmful|harmless>, got {type(source).__name__}")
    elif source.startswith("toy:"):
        *variant, kind = source.split(":")[1:]
        if kind not in ("harmful", "harmless") or len(variant) > 1:
            raise ValueError(f"`{what}`={source!r}: the miniature world's prompt sets are toy:harmful, toy:harmless "
                             "and toy:<variant>:harmful / toy:<variant>:harmless")
        if variant:
            from rg_lightning.toy.world import ToyWorld

            ToyWorld(variant[0])
    elif source.endswith(".txt"):
        if not os.path.isfile(os.path.expanduser(source)):
            raise FileNotFoundError(f"`{what}`: prompt file {source!r} does not exist.")
    else:
        try:
            parse_source(source)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"`{what}`: {error}") from None


def load_prompts(source: str | list[str], n: int | None = None, seed: int = 0) -> list[str]:
    """Up to ``n`` prompts (a seeded sample when the source has more), as plain strings."""
    if isinstance(source, (list, tuple)):
        prompts = _strings(list(source), "the list")
    elif source.startswith("toy:"):
        from rg_lightning.toy.world import ToyWorld

        *variant, kind = source.split(":")[1:]
        pool = ToyWorld(variant[0] if variant else "default").requests(kind, "train", seed=seed)  # shuffled, unique
        return pool if n is None else pool[:n]
    elif source.endswith(".json") and os.path.isfile(source) and _is_string_list(strings := _read_json(source)):
        prompts = strings
    elif source.endswith(".txt"):  # one prompt per line (e.g. MaliciousInstruct)
        if not os.path.isfile(os.path.expanduser(source)):
            raise FileNotFoundError(f"Prompt file {source!r} does not exist.")
        with open(os.path.expanduser(source), encoding="utf-8-sig") as handle:
            prompts = handle.read().splitlines()
    else:
        dataset = load_source(parse_source(source))
        if "input" in dataset.column_names and "instruction" in dataset.column_names:  # Alpaca: no-input rows
            dataset = dataset.filter(lambda row: not row["input"])
        if "FunctionalCategory" in dataset.column_names:  # HarmBench's csv: its copyright and contextual
            standard = dataset.filter(lambda row: row["FunctionalCategory"] == "standard")  # behaviours are not
            if len(standard) == 0:
                raise ValueError(f"{source!r} holds no standard HarmBench behaviours, only copyright or contextual "
                                 "ones, which are not harmful requests by themselves; give the standard behaviours.")
            if len(standard) < len(dataset):  # harmful requests by themselves (the latter lack their context)
                warnings.warn(f"{len(dataset) - len(standard)} non-standard HarmBench behaviours (copyright, "
                              f"contextual) dropped from {source!r}.", stacklevel=2)
            dataset = standard
        column = next((c for c in PROMPT_COLUMNS if c in dataset.column_names), None)
        if column is None:
            raise ValueError(
                f"Prompt source {source!r} has columns {dataset.column_names}; none of {PROMPT_COLUMNS} holds prompts."
            )
        prompts = _strings(dataset[column], f"column {column!r} of {source!r}")
    prompts = [p for p in prompts if p.strip()]
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):  # a repeated prompt would weigh twice in every mean and Gram matrix
        warnings.warn(f"{len(prompts) - len(unique)} repeated prompts dropped from {_label(source)}.", stacklevel=2)
        prompts = unique
    if n is not None and len(prompts) > n:
        import random

        prompts = random.Random(seed).sample(prompts, n)
    return prompts


def _label(source) -> str:
    return "the list" if isinstance(source, (list, tuple)) else repr(source)


def _strings(values: list, where: str) -> list[str]:
    """The prompts as strings; a missing value (null, NaN) is refused rather than read as the text "None"."""
    missing = [row for row, value in enumerate(values) if not isinstance(value, str)]
    if missing:
        raise ValueError(f"{len(missing)} prompts in {where} are not text (rows {missing[:5]}: "
                         f"{[values[row] for row in missing[:3]]}); remove those rows or fill them in.")
    return list(values)


def _read_json(path: str):
    """The file's JSON value, or None when it is not one JSON document (JSON Lines saved as .json)."""
    with open(path, encoding="utf-8-sig") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError:
            return None


def _is_string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def prompt_hashes(prompts: list[str]) -> list[str]:
    """One short hash per prompt (surrounding whitespace ignored): which prompts a basis saw, without the text."""
    return [hashlib.sha256(prompt.strip().encode()).hexdigest()[:16] for prompt in prompts]


def fingerprint(prompts: list[str]) -> str:
    """A short hash that identifies a prompt set in checkpoints and saved bases."""
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
