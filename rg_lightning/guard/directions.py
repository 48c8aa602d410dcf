"""Directions mode: the refusal direction alone, kept out of what the residual stream's readers read and
writers write (the direction-only defence, for comparison with the subspace guard).

A pre-norm reader sees the residual through its norm's gain and a post-norm writer adds through its own, so each
direction is scaled by that gain before it becomes a one-column basis for ``guard.projection``.
"""

from __future__ import annotations

import re

import torch

from .basis import SafetyBasis
from .collect import output_head_name
from .projection import canonical_name
from .shards import whole
from .subspace import orthonormalize

_LAYER = re.compile(r"^(.*\.layers\.(\d+))\.")
# Directions mode names the residual stream's readers and writers (shapes cannot: with heads x head_dim equal
# to the hidden size, o_proj reads and q_proj writes something of that width too).
_READERS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "qkv_proj": "attention",
            "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp"}
_WRITERS = ("o_proj", "down_proj")


def _norm_gain(norm, hidden: int) -> torch.Tensor | None:
    """Per-feature gain of a norm module: ``w`` (RMSNorm, LayerNorm) or Gemma's ``1 + w``. Probed with a zero-mean
    ±1 vector and its negation, so a bias and a mean subtraction cancel; its weights are gathered first (FSDP2)."""
    if norm is None:
        return None
    weights = {name: whole(t.detach()) for name, t in [*norm.named_parameters(), *norm.named_buffers()]}
    reference = next(iter(weights.values()), None)
    probe = torch.ones(hidden, device=getattr(reference, "device", None), dtype=getattr(reference, "dtype", None))
    probe[1::2] = -1
    with torch.no_grad():
        both = torch.func.functional_call(norm, weights, (torch.stack([probe, -probe]),))
    return ((both[0] - both[1]) / (2 * probe)).float()


def _layer_norm(model, name: str, which: str):
    """The norm module ``which`` of the decoder layer holding ``name``, if that layer has it."""
    match = _LAYER.search(name)
    return getattr(model.get_submodule(match.group(1)), which, None) if match else None


def _reader_gain(model, name: str, hidden: int) -> torch.Tensor | None:
    """The gain of the norm in front of a residual reader (pre-norm blocks; a post-norm block such as OLMo-2's
    reads the raw residual: None)."""
    if _LAYER.search(name) is None:  # the logit head reads the final norm's output
        decoder = getattr(getattr(model, "get_base_model", lambda: model)(), "model", None)
        return _norm_gain(getattr(decoder, "norm", None), hidden)
    if _layer_norm(model, name, "input_layernorm") is None:
        return None
    if _READERS[canonical_name(name).rsplit(".", 1)[-1]] == "attention":
        return _norm_gain(_layer_norm(model, name, "input_layernorm"), hidden)
    return _norm_gain(_layer_norm(model, name, "pre_feedforward_layernorm")
                      or _layer_norm(model, name, "post_attention_layernorm"), hidden)


def _writer_gain(model, name: str, hidden: int) -> torch.Tensor | None:
    """The gain of the norm between a residual writer and the residual, in post-norm blocks (Gemma-2/3, OLMo-2:
    ``post_attention_layernorm`` after o_proj, ``post_feedforward_layernorm`` after down_proj); else None."""
    if _layer_norm(model, name, "post_feedforward_layernorm") is None:
        return None
    which = "post_attention_layernorm" if canonical_name(name).endswith("o_proj") else "post_feedforward_layernorm"
    return _norm_gain(_layer_norm(model, name, which), hidden)


def _scaled(direction: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """The unit column of ``direction`` as a norm with ``gain`` passes it on."""
    scaled = direction if gain is None else direction * gain.to(direction.device)
    return (scaled / scaled.norm())[:, None]


def direction_bases(model, basis: SafetyBasis) -> tuple[dict, dict]:
    """Directions mode: residual readers keep the layer's refusal direction (as their norm scales it) in their
    input null space, residual writers keep it out of what they add to the residual (through their post-norm,
    if any) — the direction-only defence, for comparison. Readers and writers are known by name (q/k/v/gate/up
    and the logit head; o/down)."""
    directions = basis.layer_directions().float()
    hidden, n_layers = basis.hidden_size, directions.shape[0]
    readers, writers = {}, {}
    usable = directions.norm(dim=-1) > 0.5  # a layer whose harmful and harmless means coincide has none
    head = output_head_name(model, list(basis.subspaces))
    for name in basis.subspaces:
        short = canonical_name(name).rsplit(".", 1)[-1]
        match = _LAYER.search(name)
        layer = int(match.group(2)) if match else n_layers - 1
        written = min(layer + 1, n_layers - 1)
        if (short in _READERS or name == head) and usable[layer]:
            readers[name] = _scaled(directions[layer], _reader_gain(model, name, hidden))
        if short in _WRITERS and usable[written]:
            writers[name] = _scaled(directions[written], _writer_gain(model, name, hidden))
    if not readers and not writers:
        raise ValueError("mode='directions' found no residual readers (q/k/v/gate/up_proj, the logit head) or "
                         f"writers (o_proj, down_proj) among the protected modules {sorted(basis.subspaces)[:4]}...; "
                         "use mode='subspace'.")
    if usable[0]:
        tokens = model.get_input_embeddings()
        embeddings = [n for n, m in model.named_modules() if m is tokens and m.weight.requires_grad]
        if head in readers and tokens.weight is getattr(model.get_output_embeddings(), "weight", None):
            # tied: one weight, two right-side constraints would undo each other, so the head holds both columns
            readers[head] = orthonormalize(torch.cat([readers[head], directions[0][:, None].to(readers[head])],
                                                     dim=1)).float()
        else:
            writers.update({name: directions[0][:, None] for name in embeddings})
    return readers, writers
