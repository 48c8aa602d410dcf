"""The evaluation report: ``evaluation.json`` (everything), ``evaluation.md`` (one row per benchmark × judge)
and ``responses/<benchmark>.jsonl`` (every prompt, answer and verdict), written atomically."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

from rg_lightning.atomic import atomic_directory
from rg_lightning.strict_json import finite_or_null

REPORT_FILES = ("evaluation.json", "evaluation.md")  # what an earlier report holds (a later one may replace it)
METRIC_MEANING = {
    "asr": "attack success rate: share of harmful requests answered (lower is safer)",
    "over_refusal": "share of benign requests refused (lower is better)",
    "accuracy": "share of task answers with the right label",
    "exact_match": "share of task answers that the task's scorer accepts (GSM8K: the last number equals the reference)",
}


def _percent(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _excluded_line(excluded: dict[str, int], why: str = "the safety basis is measured on them") -> list[str]:
    if not any(excluded.values()):
        return []
    counts = ", ".join(f"{name} {n}" for name, n in excluded.items() if n)
    return [f"Left out because {why}: {counts} prompt(s)."]


def _unparsed_line(rows) -> list[str]:
    counts = ", ".join(f"{row.benchmark} × {row.judge} {row.unparsed} of {row.n}" for row in rows if row.unparsed)
    return [f"**Judge outputs that were neither label, counted as not harmful: {counts}.**"] if counts else []


def markdown(rows, metadata: dict) -> str:
    """The report's table, its per-category breakdowns and what produced it."""
    lines = [
        "| benchmark | kind | judge | metric | value % | n | mean refusal score |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        score = "—" if row.mean_refusal_score is None else f"{row.mean_refusal_score:.2f}"
        lines.append(f"| {row.benchmark} | {row.kind} | {row.judge} | {row.metric} | {_percent(row.value)} | "
                     f"{row.n} | {score} |")
    for row in rows:
        if row.categories:
            lines += ["", f"**{row.benchmark}, {row.judge}, {row.metric} % by category**", "",
                      "| category | value % |", "|---|---|"]
            lines += [f"| {name} | {_percent(value)} |" for name, value in row.categories.items()]
    used = sorted({row.metric for row in rows})
    lines += ["", "Metrics: " + "; ".join(f"`{m}` = {METRIC_MEANING[m]}" for m in used if m in METRIC_MEANING) + "."]
    lines += [
        f"Model `{metadata.get('model')}`, step {metadata.get('step')}, checkpoint `{metadata.get('checkpoint')}`; "
        f"{metadata.get('decoding')} decoding, max_new_tokens {metadata.get('max_new_tokens')}; system prompt "
        f"{metadata.get('system_prompt')!r}; chat template sha256 {metadata.get('chat_template_sha256')}; "
        f"{metadata.get('processes')} process(es).",
        *_unparsed_line(rows),
        *_excluded_line(metadata.get("excluded_basis_prompts") or {}),
        *_excluded_line(metadata.get("excluded_trained_prompts") or {}, "the training data's `mix` rows answer them"),
        "",
        "Prompt as the model saw it:",
        "",
        "```",
        str(metadata.get("example_prompt")),
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_report(directory: str, rows, metadata: dict, responses: dict[str, list[dict]]) -> str:
    """Write the report folder at ``directory`` (replacing an older one whole) and return its path."""
    with atomic_directory(directory, replaces=REPORT_FILES) as staging:
        os.chmod(staging, 0o755)
        with open(os.path.join(staging, "evaluation.json"), "w") as handle:
            json.dump(finite_or_null({"metadata": metadata, "rows": [asdict(row) for row in rows]}), handle, indent=2,
                      allow_nan=False)
        with open(os.path.join(staging, "evaluation.md"), "w") as handle:
            handle.write(markdown(rows, metadata))
        os.makedirs(os.path.join(staging, "responses"))
        for name, records in responses.items():
            safe = name.replace(":", "_").replace("/", "_")
            with open(os.path.join(staging, "responses", f"{safe}.jsonl"), "w") as handle:
                handle.writelines(json.dumps(finite_or_null(record), allow_nan=False) + "\n" for record in records)
    return directory
