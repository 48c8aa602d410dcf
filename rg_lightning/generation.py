"""Batched greedy generation with the chat template, for any Hugging Face causal LM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rg_lightning.chat import encode_prompts
from rg_lightning.guard.shards import process_world, reshard, uses_fsdp2
from rg_lightning.modes import enter_eval


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-answer tokens: the tokenizer's EOS and the model's generation config's (Gemma ends a turn with
    ``<end_of_turn>``, Llama 3 with ``<|eot_id|>``, which the tokenizer's EOS alone can miss)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for found in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if found is not None:
            ids += list(found) if isinstance(found, (list, tuple)) else [found]
    return sorted(set(ids))


# What a model's generation config may keep during greedy decoding: how to stop, pad and cache, not how to pick.
_KEPT_FOR_GREEDY = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
                    "cache_implementation", "cache_config")


@contextlib.contextmanager
def plain_greedy(model) -> Iterator[None]:
    """Within the block, ``model.generate`` decodes plain greedy: a hub model's generation config can carry logits
    processors (``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``, ...) that transformers applies
    even with ``do_sample=False``, and answers reported as greedy would then depend on them. Only the stop, pad
    and cache settings of the model's config are kept while the block runs."""
    from transformers import GenerationConfig

    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT generates with the base
    own = getattr(owner, "generation_config", None)
    if own is None:
        yield
        return
    kept = {key: value for key, value in own.to_dict().items() if key in _KEPT_FOR_GREEDY and value is not None}
    owner.generation_config = GenerationConfig(**kept)
    try:
        yield
    finally:
        owner.generation_config = own


def decodes_in_step(model) -> bool:
    """Whether greedy decoding must run until every process is done (``synced_gpus``): under FSDP2 with several
    processes every forward is a collective, and a rank whose answers all end early would leave the others waiting
    in a gather (a sharded forward may round differently per rank, so answers can end at different tokens)."""
    return uses_fsdp2(model) and process_world()[1] > 1


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
             system_prompt: str | None = None, progress=None, return_finished: bool = False):
    """Greedy answers to user ``prompts`` (:func:`plain_greedy`), decoded without special tokens and stripped.

    ``return_finished``: also return, per answer, whether it ended with an end-of-answer token (False: cut off
    at ``max_new_tokens``).

    Left padding puts every prompt's last token at the same edge, which greedy decoding needs. The
    tokenizer's padding side and every module's train/eval mode are restored afterwards. ``progress`` is an
    optional tqdm-like bar, advanced per batch and closed at the end. Under FSDP2 every forward is a
    collective, so every process must call this with as many batches, and decoding runs until every process
    is done (``synced_gpus``); the weights are put back into their shards afterwards.
    """
    sharded, synced = uses_fsdp2(model), decodes_in_step(model)
    device = next(model.parameters()).device
    restore_modes = enter_eval(model)
    answers: list[str] = []
    finished: list[bool] = []
    stops = stop_token_ids(model, tokenizer)
    stop_ids = torch.tensor(stops, device=device)
    try:
        with plain_greedy(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                batch = {k: v.to(device) for k, v in encode_prompts(tokenizer, chunk, system_prompt).items()}
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
                new_tokens = output[:, batch["input_ids"].shape[1]:]
                answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                finished += torch.isin(new_tokens, stop_ids).any(dim=1).tolist()
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        if progress is not None:
            progress.close()
        restore_modes()
        if sharded:
            reshard(model)
    answers = [answer.strip() for answer in answers]
    _warn_on_reasoning(answers)
    return (answers, finished) if return_finished else answers


def _warn_on_reasoning(answers: list[str]) -> None:
    """Reasoning models (Qwen3, R1 distills) write ``<think>…</think>`` before answering (some templates open the
    block in the prompt, so only its end shows); a judge or a task score would read the reasoning as the answer."""
    reasoning = sum(answer.startswith("<think>") or "</think>" in answer for answer in answers)
    if reasoning:
        rank_zero_warn(
            f"{reasoning} of {len(answers)} answers hold a reasoning block (<think>…</think>), which judges and task "
            "scores read as part of the answer. Turn reasoning off with the data module's chat_template_kwargs: "
            "{enable_thinking: false} (`--chat-template-kwargs` for rg_lightning.refusals) where the template has it."
        )
