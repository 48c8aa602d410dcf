"""Harmful requests answered with the aligned model's own refusals, as chat rows to mix into fine-tuning data.

    python -m rg_lightning.refusals --model Qwen/Qwen2.5-7B-Instruct --harmful harmful_train.json --out refusals.jsonl
    lightning fit --config experiments/qwen.yaml --data.mix refusals.jsonl --data.mix_fraction 0.1

Mixing refusal examples into the training data is the published safety-data defence; on the miniature
worlds RefusalGuard on such data kept both refusal goals on all 12 worlds, which neither did alone, and in long
runs it learnt the task on some worlds where the guard alone fell short (experiments/results/README.md). The
refusals are the model's own greedy answers, so the mix teaches nothing the aligned model did not already say.
Dropped: answers whose opening a refusal judge does not read as a refusal (the model complied, refused in words
the judge misses, or mentioned a refusal phrase only later in a compliant answer), and answers cut off at
``--max-new-tokens`` (training on them would teach the model to stop mid-sentence). Take the requests from
prompts you do not evaluate on: ``SafetyEvaluation`` leaves out benchmark prompts found in ``data.mix``, so
mixing AdvBench requests shrinks the AdvBench it scores.
"""

from __future__ import annotations

import argparse
import json

import torch

from rg_lightning.atomic import atomic_file, check_file_target
from rg_lightning.chat import require_chat_template, with_template_defaults
from rg_lightning.evaluation.judges import KeywordJudge, Judge
from rg_lightning.generation import generate
from rg_lightning.prompts import load_prompts

OPENING_CHARS = 160  # a refusal must show in the answer's opening, not in a disclaimer after compliance


def refusal_rows(model, tokenizer, prompts: list[str], judge: Judge | None = None, max_new_tokens: int = 256,
                 batch_size: int = 16, system_prompt: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """``messages`` rows (user request, the model's greedy refusal) for the prompts it refuses, and how many
    prompts were dropped: ``not_refused`` (the judge read no refusal in the answer's first ``OPENING_CHARS``
    characters) and ``cut_off`` (no end-of-answer token within ``max_new_tokens``)."""
    if not prompts:
        raise ValueError("No prompts to answer.")
    judge = judge or KeywordJudge("jailbreakbench")
    if getattr(judge, "measures", None) != "refusal":
        raise ValueError(f"{judge!r} measures {getattr(judge, 'measures', None)!r}; pick a judge that says whether an "
                         "answer is a refusal (e.g. KeywordJudge).")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="answering", unit="request")  # long on a 7B model: show progress
    answers, finished = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 system_prompt=system_prompt, return_finished=True, progress=bar)
    openings = [a[:OPENING_CHARS] for a in answers]
    refused = judge(prompts, openings, model=model, tokenizer=tokenizer, system_prompt=system_prompt)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rows = [{"messages": system + [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a, keep, done in zip(prompts, answers, refused, finished) if keep and done and a.strip()]
    dropped = {"not_refused": sum(not (keep and a.strip()) for a, keep in zip(answers, refused)),
               "cut_off": sum(bool(keep and a.strip()) and not done
                              for a, keep, done in zip(answers, refused, finished))}
    return rows, dropped


def write_jsonl(rows: list[dict], path: str) -> None:
    """All rows or nothing: written next to ``path``, then moved over it."""
    with atomic_file(path) as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rg_lightning.refusals", description=__doc__,
                                     formatter_class=_Help)
    parser.add_argument("--model", required=True, default=argparse.SUPPRESS,
                        help="aligned model: a Hugging Face directory or hub id")
    parser.add_argument("--harmful", required=True, default=argparse.SUPPRESS,
                        help="harmful requests: a local file, a hub dataset id or toy:harmful; not the benchmarks you "
                             "evaluate on (e.g. the refusal-direction harmful_train split, not AdvBench)")
    parser.add_argument("--n", type=int, default=256, help="requests sampled (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="jsonl file of chat rows (messages)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answers cut off here are dropped")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per generation batch")
    parser.add_argument("--system-prompt", default=None, help="keep equal to the fine-tuning data's")
    parser.add_argument("--chat-template-kwargs", type=json.loads, default=None, metavar="JSON",
                        help="chat template variables, e.g. '{\"enable_thinking\": false}'; keep equal to the "
                             "fine-tuning data's")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    args = parser.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--n, --max-new-tokens and --batch-size must be positive")
    from transformers import AutoModelForCausalLM

    from rg_lightning.loading import check_model_source, load_tokenizer

    check_model_source(args.model)
    try:
        check_file_target(args.out, "--out")
    except OSError as error:
        parser.error(str(error))
    prompts = load_prompts(args.harmful, args.n, args.seed)  # a bad source fails before the model loads
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.chat_template_kwargs is not None:
        if not isinstance(args.chat_template_kwargs, dict):
            parser.error("--chat-template-kwargs must be a JSON object")
        try:
            tokenizer.chat_template = with_template_defaults(require_chat_template(tokenizer),
                                                             args.chat_template_kwargs,
                                                             passed=set(tokenizer.special_tokens_map))
        except ValueError as err:
            parser.error(f"--chat-template-kwargs: {err}")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(args.device)
    rows, dropped = refusal_rows(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, system_prompt=args.system_prompt)
    if not rows:
        raise SystemExit(f"No refusal kept of {len(prompts)} requests ({dropped['not_refused']} not refused by the "
                         f"keyword judge, {dropped['cut_off']} cut off at --max-new-tokens); nothing written. Is it "
                         "an aligned chat model?")
    write_jsonl(rows, args.out)
    print(f"{len(rows)} refusals written to {args.out}; of {len(prompts)} requests, {dropped['not_refused']} were "
          f"not refused (keyword judge) and {dropped['cut_off']} refusals were cut off at --max-new-tokens")


if __name__ == "__main__":
    main()
