"""Hooked forward passes over harmful and harmless prompts that produce a SafetyBasis.

One batched, left-padded pass per prompt set: hidden states at the post-instruction positions give
the difference-in-means candidates; forward pre-hooks stream the Gram matrix of each protected
module's inputs on the harmful prompts (and, optionally, the model's own greedy answers to them).
Prompts are sharded over processes and every statistic is all-reduced, so all ranks agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rg_lightning.chat import render_prompt, require_chat_template
from rg_lightning.guard.basis import SafetyBasis
from rg_lightning.guard.statistics import GramAccumulator, MeanAccumulator, capture_linear_inputs
from rg_lightning.guard.subspace import top_subspace


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def post_instruction_length(tokenizer, system_prompt: str | None = None) -> int:
    """Number of template tokens between the end of the user's text and the answer (e.g. 5 for Llama-3)."""
    marker = "\x00MARKER\x00"
    rendered = render_prompt(tokenizer, marker, system_prompt=system_prompt)
    suffix = rendered[rendered.index(marker) + len(marker):]
    n = len(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if n < 1:
        raise ValueError("The chat template puts nothing after the user message; cannot locate the answer start.")
    return n


def protected_modules(model: nn.Module) -> list[str]:
    """Trainable linear layers (and PEFT LoRA layers): the modules whose updates the guard constrains."""
    from peft.tuners.lora import LoraLayer

    names, inside_lora = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoraLayer):
            inside_lora.add(name)
            names.append(name)
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            names.append(name)
    return names


def shared_input_groups(model: nn.Module, names: list[str], probe: dict) -> dict[str, list[str]]:
    """Group modules that read the very same tensor (q/k/v, gate/up): one Gram serves the group."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}  # holding the tensors keeps their memory from being reused

    def record(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, args[0])

        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[object, list[str]] = {}
    for name in names:
        groups.setdefault(id(seen[name]) if name in seen else name, []).append(name)
    return {members[0]: members for members in groups.values()}


def _batches(tokenizer, texts: list[str], batch_size: int, device):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            yield {k: v.to(device) for k, v in batch.items()}
    finally:
        tokenizer.padding_side = side


def _with_answers(model, tokenizer, batch: dict, answer_tokens: int) -> dict:
    """Append the model's greedy answer to each prompt; padding after the end-of-answer is masked."""
    output = model.generate(**batch, max_new_tokens=answer_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = output[:, batch["input_ids"].shape[1]:]
    finished = torch.zeros_like(new, dtype=torch.bool)
    if tokenizer.eos_token_id is not None and new.shape[1] > 1:
        finished[:, 1:] = (new[:, :-1] == tokenizer.eos_token_id).cumsum(1) > 0
    mask = torch.cat([batch["attention_mask"], (~finished).long()], dim=1)
    return {"input_ids": output, "attention_mask": mask}


@torch.no_grad()
def collect_basis(
    model: nn.Module,
    tokenizer,
    harmful: list[str],
    harmless: list[str],
    *,
    energy: float | None = 0.99,
    rank: int | None = None,
    answer_tokens: int = 16,
    batch_size: int = 16,
    system_prompt: str | None = None,
    metadata: dict | None = None,
    progress=None,
) -> SafetyBasis:
    """Measure the aligned model once and return its SafetyBasis (identical on every rank)."""
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError(f"Need at least 2 harmful and 2 harmless prompts, got {len(harmful)} and {len(harmless)}.")
    if set(harmful) == set(harmless):
        raise ValueError("The harmful and harmless prompt sets are identical: the refusal direction would be zero.")
    require_chat_template(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    process, processes = _world()
    n_positions = post_instruction_length(tokenizer, system_prompt)
    names = protected_modules(model)
    render = lambda prompts: [render_prompt(tokenizer, p, system_prompt=system_prompt) for p in prompts]  # noqa
    harmful_texts, harmless_texts = render(harmful), render(harmless)
    probe = next(_batches(tokenizer, harmful_texts[:1], 1, device))
    groups = shared_input_groups(model, names, probe) if names else {}
    means = {"harmful": MeanAccumulator(), "harmless": MeanAccumulator()}
    grams = GramAccumulator()
    token_ids: set[int] = set()
    try:
        for kind, texts in (("harmful", harmful_texts), ("harmless", harmless_texts)):
            shard = texts[process::processes]
            for batch in _batches(tokenizer, shard, batch_size, device):
                prompt_width = batch["input_ids"].shape[1]
                if kind == "harmful" and answer_tokens:
                    batch = _with_answers(model, tokenizer, batch, answer_tokens)
                mask = batch["attention_mask"].bool()
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
                capture_names = list(groups) if kind == "harmful" else []
                with capture_linear_inputs(model, capture_names, grams, mask) as capture:
                    capture.mask = mask
                    output = model(**batch, position_ids=positions, output_hidden_states=True)
                hidden = output.hidden_states[:-1]  # inputs of every decoder block
                for layer, states in enumerate(hidden):
                    for position in range(n_positions):
                        column = prompt_width - n_positions + position
                        means[kind].update((layer, position), states[:, column])
                if kind == "harmful":
                    token_ids.update(batch["input_ids"][mask].tolist())
                if progress is not None:
                    progress(kind, batch["input_ids"].shape[0])
        for accumulator in (*means.values(), grams):
            accumulator.all_reduce_()
        if processes > 1:
            gathered: list = [None] * processes
            dist.all_gather_object(gathered, sorted(token_ids))
            token_ids = {t for ids in gathered for t in ids}
    finally:
        model.train(was_training)

    n_layers = len(hidden)

    def stacked(accumulator: MeanAccumulator) -> torch.Tensor:
        return torch.stack([torch.stack([accumulator.mean((layer, p)) for p in range(n_positions)])
                            for layer in range(n_layers)]).cpu()

    subspaces = {}
    for representative, members in groups.items():
        basis = top_subspace(grams.state()[representative], energy=energy, k=rank).float().cpu()
        subspaces.update({member: basis for member in members})
    meta = dict(metadata or {})
    meta.update({"n_harmful": len(harmful), "n_harmless": len(harmless), "post_instruction_tokens": n_positions,
                 "energy": energy, "rank": rank, "answer_tokens": answer_tokens, "modules": names,
                 "subspace_dims": {name: int(b.shape[1]) for name, b in subspaces.items()},
                 "system_prompt": system_prompt})
    return SafetyBasis(stacked(means["harmful"]), stacked(means["harmless"]), subspaces,
                       torch.tensor(sorted(token_ids), dtype=torch.long), meta)
