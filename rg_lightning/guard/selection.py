"""Refusal-score filtering of prompts and the choice of one refusal direction (Arditi et al. 2024).

Plain functions on a Hugging Face causal LM and its tokenizer. Every measurement is a batched,
left-padded forward pass that reads the last position's logits only. Candidate directions are batched
as well: one row per (candidate, prompt) pair, each row carrying its own direction through the hooks,
so a selection costs a few passes per measurement instead of one per candidate and prompt. Prompts
(or rows) are sharded over processes and the results gathered or summed, so every rank decides alike.

Selection, as in the paper: candidates are mean(harmful) - mean(harmless) at every post-instruction
position of every layer below ``int(max_layer_fraction * layers)``. A candidate is dropped when ablating
it everywhere moves harmless next-token distributions by more than ``kl_threshold`` (it breaks the
model), or when adding it at its layer does not make harmless prompts refused (it does not cause
refusal); of the rest, the one whose ablation lowers the harmful refusal score most wins. When the
filters leave nothing, :func:`choose_candidate` relaxes them in a fixed order and says so.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rg_lightning.chat import encode_prompts, position_ids
from rg_lightning.guard.basis import nonzero_candidates
from rg_lightning.guard.geometry import kl_rows
from rg_lightning.guard.shards import prompt_world
from rg_lightning.modes import eval_mode
from rg_lightning.refusal_score import refusal_score, refusal_token_ids

MAX_LAYER_FRACTION = 0.8
KL_THRESHOLD = 0.1


# -- hooks ---------------------------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the module list as long as the model's layer count (found inside any wrapper)."""
    config = model.config.get_text_config()
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == config.num_hidden_layers]
    if not lists:
        raise ValueError(f"Found no list of {config.num_hidden_layers} decoder blocks in {type(model).__name__}; "
                         "refusal-direction selection needs a decoder-only transformer.")
    return next((module for name, module in lists if name.endswith("layers")), lists[0][1])


def residual_writers(block: nn.Module) -> list[nn.Module]:
    """Modules whose output is added to the residual stream: the sandwich norms of Gemma-2/3, else attention and MLP."""
    if hasattr(block, "post_feedforward_layernorm"):
        return [block.post_attention_layernorm, block.post_feedforward_layernorm]
    if hasattr(block, "self_attn") and hasattr(block, "mlp"):
        return [block.self_attn, block.mlp]
    raise ValueError(f"{type(block).__name__} has no `self_attn` and `mlp`: directional ablation does not know "
                     "which of its modules write the residual stream (Llama, Qwen, Mistral and Gemma blocks do).")


def _replace_hidden(value, edit):
    """Apply ``edit`` to a hidden-state tensor, or to the first element of a module's tuple output."""
    if isinstance(value, tuple):
        return (edit(value[0]), *value[1:])
    return edit(value)


def _block_input_hook(edit):
    def hook(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return hook


@contextlib.contextmanager
def directional_ablation(model: nn.Module, directions: Tensor):
    """Project ``directions`` ([hidden], or one per batch row: [rows, hidden]) out of the residual stream.

    Applied to every block's input and to every residual writer's output, so no layer sees the direction
    and none writes it back, at every position (generation included). Hooks are removed on exit.
    """
    units = nn.functional.normalize(directions.float().reshape(-1, directions.shape[-1]), dim=-1)

    def ablate(x: Tensor) -> Tensor:
        unit = units.to(x.device)[:, None, :]
        x32 = x.float()
        return (x32 - (x32 * unit).sum(-1, keepdim=True) * unit).to(x.dtype)

    handles = []
    try:
        for block in decoder_blocks(model):
            handles.append(block.register_forward_pre_hook(_block_input_hook(ablate), with_kwargs=True))
            for writer in residual_writers(block):
                handles.append(writer.register_forward_hook(lambda m, a, out: _replace_hidden(out, ablate)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def activation_addition(model: nn.Module, vectors: Tensor, layers: Tensor | int):
    """Add ``vectors[i]`` (unnormalised, [rows, hidden] or [hidden]) to row i's input of block ``layers[i]``.

    Every position of that row is shifted, as in the paper. Hooks are removed on exit.
    """
    vectors = vectors.reshape(-1, vectors.shape[-1])
    layers = torch.as_tensor(layers).reshape(-1).cpu()
    handles = []
    try:
        blocks = decoder_blocks(model)
        for layer in sorted(set(layers.tolist())):
            shift = vectors * (layers == layer).to(vectors)[:, None]

            def add(x: Tensor, shift: Tensor = shift) -> Tensor:
                return x + shift.to(device=x.device, dtype=x.dtype)[:, None, :]

            handles.append(blocks[layer].register_forward_pre_hook(_block_input_hook(add), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- batched measurements ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _evaluating(model: nn.Module):
    with eval_mode(model), torch.no_grad():
        yield


def _last_logits(model: nn.Module, encoded: dict[str, Tensor], rows: Tensor) -> Tensor:
    """Last-position logits of some rows of an encoded batch; columns that are padding in every row are cut."""
    mask = encoded["attention_mask"][rows]
    keep = mask.any(0)
    device = next(model.parameters()).device
    batch = {"input_ids": encoded["input_ids"][rows][:, keep].to(device), "attention_mask": mask[:, keep].to(device)}
    return model(**batch, position_ids=position_ids(batch["attention_mask"]), logits_to_keep=1).logits[:, -1]


def refusal_scores(model: nn.Module, tokenizer, prompts: list[str], *, batch_size: int = 16,
                   system_prompt: str | None = None, refusal_ids: list[int] | None = None) -> Tensor:
    """Refusal score of every prompt, float64 on the CPU, the same on every rank.

    Each process scores its shard (``prompts[rank::world]``) and the shards are all-gathered.
    """
    if not prompts:
        return torch.zeros(0, dtype=torch.float64)
    ids = refusal_ids or refusal_token_ids(tokenizer)
    encoded = encode_prompts(tokenizer, prompts, system_prompt)
    rank, world = prompt_world(model)
    mine = torch.arange(rank, len(prompts), world)  # empty on a rank beyond the prompt count: no forward there
    with _evaluating(model):
        shard = [refusal_score(_last_logits(model, encoded, rows), ids).cpu()
                 for rows in mine.split(batch_size) if rows.numel()]
    scores = torch.cat(shard) if shard else torch.zeros(0, dtype=torch.float64)
    if world == 1:
        return scores
    gathered: list = [None] * world
    dist.all_gather_object(gathered, scores.tolist())
    merged = torch.zeros(len(prompts), dtype=torch.float64)
    for source, values in enumerate(gathered):
        merged[source::world] = torch.tensor(values, dtype=torch.float64)
    return merged


def _candidate_means(model, encoded: dict[str, Tensor], n_candidates: int, batch_size: int, intervene,
                     measure) -> Tensor:
    """Mean of ``measure(logits, prompt_rows)`` over prompts, per candidate, with ``intervene(candidate_rows)`` on.

    Rows of the (candidate, prompt) grid are sharded over processes; per-candidate sums are all-reduced.
    """
    n_prompts = encoded["input_ids"].shape[0]
    rank, world = prompt_world(model)
    device = next(model.parameters()).device
    sums = torch.zeros(n_candidates, dtype=torch.float64, device=device)
    for rows in torch.arange(rank, n_candidates * n_prompts, world).split(batch_size):
        if not rows.numel():  # (split of an empty range gives one empty chunk)
            continue
        candidate, prompt = rows // n_prompts, rows % n_prompts
        with intervene(candidate):
            logits = _last_logits(model, encoded, prompt)
        sums.index_add_(0, candidate.to(device), measure(logits, prompt).to(device))
    if world > 1:
        dist.all_reduce(sums)
    return (sums / n_prompts).cpu()


# -- filtering -----------------------------------------------------------------------------------------------
def _summary(scores: Tensor) -> dict:
    return {"score_mean": float(scores.mean()), "score_min": float(scores.min()), "score_max": float(scores.max())}


def refusal_filter(harmful: list[str], harmless: list[str], harmful_scores: Tensor, harmless_scores: Tensor,
                   min_kept: int = 2) -> tuple[list[str], list[str], dict]:
    """Keep the harmful prompts the model refuses (score > 0) and the harmless ones it answers (score < 0).

    Directions averaged over prompts the model already treats correctly are cleaner. A side left with
    fewer than ``min_kept`` prompts keeps all of them instead (a model that does not separate the sets
    would leave nothing to average); the report names that side and why, under ``fallback``.
    """
    report: dict = {"fallback": None}
    kept_sets, reasons = [], []
    for side, prompts, scores, keep in (("harmful", harmful, harmful_scores, harmful_scores > 0),
                                        ("harmless", harmless, harmless_scores, harmless_scores < 0)):
        kept = [p for p, k in zip(prompts, keep.tolist()) if k]
        fallback = len(kept) < min_kept
        if fallback:
            wanted = "refused (score > 0)" if side == "harmful" else "answered (score < 0)"
            reasons.append(f"only {len(kept)} of {len(prompts)} {side} prompts are {wanted}, so all "
                           f"{len(prompts)} are kept (scores mean {float(scores.mean()):.2f}, "
                           f"min {float(scores.min()):.2f}, max {float(scores.max()):.2f})")
            kept = list(prompts)
        report[side] = {"total": len(prompts), "kept": len(kept), "fallback": fallback, **_summary(scores)}
        kept_sets.append(kept)
    if reasons:
        report["fallback"] = "; ".join(reasons)
    return kept_sets[0], kept_sets[1], report


# -- selection -----------------------------------------------------------------------------------------------
def score_candidates(model: nn.Module, tokenizer, directions: Tensor, layers: Tensor, harmful: list[str],
                     harmless: list[str], *, batch_size: int = 16, system_prompt: str | None = None,
                     refusal_ids: list[int] | None = None) -> dict[str, Tensor]:
    """The three measurements of every candidate ``directions[i]`` (found at block ``layers[i]``), means over prompts.

    ``ablation_score``: harmful refusal score with the direction ablated everywhere (lower: it mediates refusal).
    ``addition_score``: harmless refusal score with the direction added at its layer (> 0: it induces refusal).
    ``harmless_kl``: KL(unablated ‖ ablated) of harmless next-token distributions (small: the model still works).
    """
    ids = refusal_ids or refusal_token_ids(tokenizer)
    harmful_encoded = encode_prompts(tokenizer, harmful, system_prompt)
    harmless_encoded = encode_prompts(tokenizer, harmless, system_prompt)
    device = next(model.parameters()).device
    directions, layers = directions.to(device), torch.as_tensor(layers)
    n = directions.shape[0]
    with _evaluating(model):
        all_harmless = torch.arange(len(harmless))
        clean = torch.cat([_last_logits(model, harmless_encoded, rows).double().log_softmax(-1).cpu()
                           for rows in all_harmless.split(batch_size)])
        score = lambda logits, prompt: refusal_score(logits, ids)  # noqa: E731
        ablate = lambda rows: directional_ablation(model, directions[rows.to(device)])  # noqa: E731
        return {
            "ablation_score": _candidate_means(model, harmful_encoded, n, batch_size, ablate, score),
            "harmless_kl": _candidate_means(model, harmless_encoded, n, batch_size, ablate,
                                            lambda logits, prompt: kl_rows(clean[prompt].to(logits.device), logits)),
            "addition_score": _candidate_means(
                model, harmless_encoded, n, batch_size,
                lambda rows: activation_addition(model, directions[rows.to(device)], layers[rows]), score),
        }


def choose_candidate(table: list[dict], kl_threshold: float = KL_THRESHOLD) -> tuple[int, str | None]:
    """Index of the winning row of ``table`` (dicts with the three measurements), and a fallback reason or None.

    Winner: lowest ``ablation_score`` among rows with ``harmless_kl <= kl_threshold`` and ``addition_score > 0``.
    When no row passes both filters the addition filter is relaxed first: a direction whose ablation removes
    refusal without disturbing harmless prompts still mediates refusal, even if adding it alone does not
    cause refusal (the shipped miniature model is such a case). When no row keeps the KL either (Gemma-2,
    whose ablations move KL above 10) both filters are ignored. The reason says which filter removed how many.
    """
    def ablation(i: int) -> float:
        value = table[i]["ablation_score"]
        return value if math.isfinite(value) else math.inf

    keeps_model = [i for i, row in enumerate(table) if row["harmless_kl"] <= kl_threshold]
    causes_refusal = {i for i, row in enumerate(table) if row["addition_score"] > 0}
    passing = [i for i in keeps_model if i in causes_refusal]
    if passing:
        return min(passing, key=ablation), None
    kls = [row["harmless_kl"] for row in table]
    filtered = (f"none of the {len(table)} direction candidates passes both filters: {len(table) - len(keeps_model)} "
                f"move harmless next-token KL above {kl_threshold} (KL {min(kls):.3g} to {max(kls):.3g}), "
                f"{len(table) - len(causes_refusal)} do not make harmless prompts refused when added (best mean "
                f"score {max(row['addition_score'] for row in table):.3g}); ")
    if keeps_model:
        return min(keeps_model, key=ablation), filtered + (
            f"chose, among the {len(keeps_model)} that keep the KL, the one whose ablation lowers the harmful "
            "refusal score most (the addition filter is ignored)")
    return min(range(len(table)), key=ablation), filtered + (
        "chose the candidate whose ablation lowers the harmful refusal score most, ignoring both filters")


def _nonzero_grid(candidates: Tensor, max_layer: int) -> tuple[list[tuple[int, int]], str | None]:
    """The (layer, position) pairs below ``max_layer`` whose candidate is not zero, and a note when there were none
    there and every layer's were taken. A zero candidate (layer 0 reads the embeddings of the same template tokens
    in every prompt, so its harmful and harmless means coincide) would pass the KL filter by changing nothing."""
    nonzero = nonzero_candidates(candidates)
    if not bool(nonzero.any()):
        raise ValueError("Every refusal direction candidate is zero: the harmful and harmless prompts' mean "
                         "activations coincide at every layer and position. Check that the two prompt sets differ.")
    grid = [(layer, position) for layer, position in nonzero.nonzero().tolist() if layer < max_layer]
    if grid:
        return grid, None
    return [tuple(pair) for pair in nonzero.nonzero().tolist()], (
        f"every candidate below layer {max_layer} is zero, so the later layers' were scored too")


def select_direction(model: nn.Module, tokenizer, candidates: Tensor, harmful: list[str], harmless: list[str], *,
                     max_layer_fraction: float = MAX_LAYER_FRACTION, kl_threshold: float = KL_THRESHOLD,
                     batch_size: int = 16, system_prompt: str | None = None,
                     refusal_ids: list[int] | None = None) -> dict:
    """Choose one (position, layer) of ``candidates`` ([layers, positions, hidden]) on validation prompts.

    Returns ``{"selected": {"position", "layer"}, "selection": {...}}`` for a SafetyBasis' metadata:
    positions count back from the answer start (-1 = last template token); ``selection`` holds every
    candidate's measurements, the unablated scores, the thresholds and ``fallback`` (None when the
    filters left a winner).
    """
    if len(harmful) < 1 or len(harmless) < 1:
        raise ValueError(f"Direction selection needs validation prompts of both kinds, got {len(harmful)} harmful "
                         f"and {len(harmless)} harmless.")
    n_layers, n_positions, _ = candidates.shape
    max_layer = max(1, int(max_layer_fraction * n_layers))  # later layers are dropped, rounded as the paper's code
    grid, note = _nonzero_grid(candidates, max_layer)
    ids = refusal_ids or refusal_token_ids(tokenizer)
    layers = torch.tensor([layer for layer, _ in grid])
    directions = torch.stack([candidates[layer, position] for layer, position in grid]).float()
    measured = score_candidates(model, tokenizer, directions, layers, harmful, harmless, batch_size=batch_size,
                                system_prompt=system_prompt, refusal_ids=ids)
    table = [{"layer": layer, "position": position - n_positions,
              **{key: float(values[i]) for key, values in measured.items()}}
             for i, (layer, position) in enumerate(grid)]
    chosen, fallback = choose_candidate(table, kl_threshold)
    fallback = "; ".join(reason for reason in (note, fallback) if reason) or None
    baseline_harmful = refusal_scores(model, tokenizer, harmful, batch_size=batch_size, system_prompt=system_prompt,
                                      refusal_ids=ids)
    baseline_harmless = refusal_scores(model, tokenizer, harmless, batch_size=batch_size,
                                       system_prompt=system_prompt, refusal_ids=ids)
    selected = {"layer": table[chosen]["layer"], "position": table[chosen]["position"]}
    return {"selected": selected,
            "selection": {"candidates": table, "chosen": {**table[chosen]}, "fallback": fallback,
                          "harmful_score": float(baseline_harmful.mean()),
                          "harmless_score": float(baseline_harmless.mean()),
                          "kl_threshold": kl_threshold, "max_layer_fraction": max_layer_fraction,
                          "n_harmful": len(harmful), "n_harmless": len(harmless)}}
