"""The baseline the guard has to beat: plain fine-tuning of the aligned model on a downstream task.

``python -m rg_lightning.toy collapse [--model DIR] [--task benign] [--lr 1e-3] [--steps 150] [--harmful-fraction 0]``
fine-tunes with AdamW (no protection), then prints held-out harmful / harmless refusal before and after and
the task score on the task's held-out split.
"""

from __future__ import annotations

import copy
import time

from rg_lightning.toy.build import BATCH_SIZE, deterministic, heldout_refusal, train_sft
from rg_lightning.toy.generation import generate
from rg_lightning.toy.world import ToyWorld


def task_score(model, tokenizer, world: ToyWorld, task: str, n: int = 200, seed: int = 0) -> float:
    """Greedy exact-match score on ``n`` examples of the task's held-out split."""
    examples = world.task_examples(task, "heldout", n, seed=seed)
    prompts = [e["messages"][0]["content"] for e in examples]
    references = [e["messages"][1]["content"] for e in examples]
    return world.score_task(task, prompts, generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=64),
                            references)


def plain_finetune(model, tokenizer, world: ToyWorld, task: str, *, steps: int = 150, lr: float = 1e-3,
                   batch_size: int = BATCH_SIZE, harmful_fraction: float = 0.0, seed: int = 0, n_eval: int = 200,
                   log=print) -> dict:
    """Fine-tune a copy of ``model`` on ``task`` and measure what happened to refusal; returns the numbers."""
    start = time.perf_counter()
    with deterministic():
        before = heldout_refusal(model, tokenizer, world, n=n_eval)
        tuned = copy.deepcopy(model)
        examples = world.task_examples(task, "train", steps * batch_size, harmful_fraction=harmful_fraction, seed=seed)
        train_sft(tuned, tokenizer, examples, steps=steps, lr=lr, batch_size=batch_size, seed=seed, log=log)
        after = heldout_refusal(tuned, tokenizer, world, n=n_eval)
        score = task_score(tuned, tokenizer, world, task, n=n_eval)
    result = {"task": task, "lr": lr, "steps": steps, "batch_size": batch_size,
              "harmful_fraction": harmful_fraction, "refusal_before": before, "refusal_after": after,
              "task_score": score, "seconds": round(time.perf_counter() - start, 1)}
    if log:
        log(f"{task} (harmful_fraction {harmful_fraction}, lr {lr}, {steps} steps of {batch_size}): harmful refusal "
            f"{before['harmful']:.1%} -> {after['harmful']:.1%}, harmless refusal {before['harmless']:.1%} -> "
            f"{after['harmless']:.1%}, task score {score:.1%}")
    return result
