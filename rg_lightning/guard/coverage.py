"""Which parameters a text prompt's logits depend on: the parameters the guard must hold or be told to leave."""

from __future__ import annotations

import torch

from rg_lightning.modes import eval_mode

from .shards import reshard, uses_fsdp2


def read_by_text(model, params: list[torch.nn.Parameter], token_ids: torch.Tensor) -> list[bool]:
    """Whether the logits of a text prompt (the protected tokens, in order) depend on each parameter: autograd's
    own answer, so it holds whatever the module types (fused MoE experts, a DoRA magnitude, a raw weight that a
    multimodal projector holds but text never reaches). ``autograd.grad``: nothing is accumulated into ``.grad``."""
    ids = token_ids.reshape(-1)[:16].to(next(model.parameters()).device, torch.long)
    if not params or not ids.numel():
        return [bool(params)] * len(params)
    with eval_mode(model), torch.enable_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits
        if not uses_fsdp2(model):
            return [grad is not None for grad in torch.autograd.grad(logits.float().sum(), params, allow_unused=True)]
        # FSDP2 computes on gathered copies, so the sharded parameters are not in the graph: a real backward on
        # every rank (a collective), then the gradients it left are cleared and the weights put back in shards
        trainable = [p for p in model.parameters() if p.requires_grad]
        had = {id(p): p.grad for p in trainable}
        logits.float().sum().backward()
        read = [p.grad is not None for p in params]
        for p in trainable:
            p.grad = had[id(p)]
        reshard(model)
        return read
