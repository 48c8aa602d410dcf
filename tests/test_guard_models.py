"""End to end on tiny transformers models: the whole forward pass on protected prompts survives training.

If every module's inputs on the protected prompts are unchanged and so are its outputs on them, the
composition (embedding rows -> norms -> linears -> ... -> lm_head) is unchanged; this only holds when
every trainable parameter is covered, so these tests also prove there are no leaks.
"""

import pytest
import torch
from torch import nn

from rg_lightning.guard import (
    GramAccumulator,
    build_constraints,
    capture_linear_inputs,
    project_out,
    top_subspace,
)

VOCAB = 100
PROTECTED = torch.tensor([[11, 12, 13, 14, 15, 16], [11, 17, 18, 12, 13, 19]])  # "harmful prompts"
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning threads crawl on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str, tied: bool | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if tied is not None:
        common["tie_word_embeddings"] = tied
    config = {
        "qwen2": lambda: Qwen2Config(**common),
        "llama": lambda: LlamaConfig(**common),
        "gemma2": lambda: Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    }[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norm weights, so a norm that moved would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def forward(model, ids):
    out = model(input_ids=ids, output_hidden_states=True)
    return [h.clone() for h in out.hidden_states] + [out.logits.clone()]


def capture_bases(model, ids):
    """Protected input subspace of every linear: the numerical rank of its inputs on protected prompts."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    acc = GramAccumulator()
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), capture_linear_inputs(model, names, acc, mask=mask):
        model(input_ids=ids)
    return {name: top_subspace(gram, energy=1.0) for name, gram in acc.state().items()}


def train(model, constraints=None, steps=6, lr=1e-2):
    """AdamW on *different* data: one fixed batch of random tokens over the whole vocabulary."""
    ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if constraints is not None:
            constraints.apply_()
        losses.append(loss.item())
    return losses


def max_rel_change(before, after):
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before))


OTHER = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "family, tied", [("qwen2", False), ("qwen2", True), ("llama", None), ("gemma2", None)]  # gemma2: tied
)
def test_full_finetune_keeps_every_hidden_state_on_protected_prompts(family, tied):
    model = tiny(family, tied)
    before, other_before = forward(model, PROTECTED), forward(model, OTHER)
    bases = capture_bases(model, PROTECTED)
    assert max(b.shape[1] for b in bases.values()) < 32  # genuinely partial subspaces, not the identity
    cs = build_constraints(model, bases, protected_token_ids=PROTECTED.flatten())
    assert cs.uncovered == [], cs.report()
    kinds = {c.kind for c in cs.constraints}
    assert kinds == {"linear.right", "rows", "param"}
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    losses = train(model, cs)
    assert max_rel_change(before, forward(model, PROTECTED)) < 1e-4  # all layers and the logits
    assert max_rel_change(other_before, forward(model, OTHER)) > 1e-2  # the model did learn elsewhere
    assert losses[-1] < losses[0]


def test_control_without_constraints_protected_states_drift():
    model = tiny("qwen2")
    before = forward(model, PROTECTED)
    train(model)
    assert max_rel_change(before, forward(model, PROTECTED)) > 1e-2


def test_leaving_norms_or_embeddings_free_leaks():
    """The prototype's finding in miniature: linears alone do not keep the forward pass."""
    ids = PROTECTED.flatten()
    for kwargs in ({"freeze_norms": False, "protected_token_ids": ids}, {"protected_token_ids": None}):
        model = tiny("qwen2")
        before = forward(model, PROTECTED)
        cs = build_constraints(model, capture_bases(model, PROTECTED), **kwargs)
        assert cs.uncovered
        train(model, cs)
        assert max_rel_change(before, forward(model, PROTECTED)) > 1e-3


def test_peft_lora_keeps_protected_states_with_base_model_names():
    from peft import LoraConfig, get_peft_model

    model = tiny("qwen2")
    before, other_before = forward(model, PROTECTED), forward(model, OTHER)
    bases = capture_bases(model, PROTECTED)  # plain names: model.layers.0.self_attn.q_proj, lm_head
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, lora_dropout=0.0, init_lora_weights=False,
                        modules_to_save=["lm_head"])  # non-zero B at start: the A-projection must hide it
    peft_model = get_peft_model(model, config).eval()
    assert max_rel_change(before, forward(peft_model, PROTECTED)) > 1e-2
    cs = build_constraints(peft_model, bases, protected_token_ids=PROTECTED.flatten())
    assert cs.uncovered == [], cs.report()
    assert sum(c.kind == "lora.right" for c in cs.constraints) == 2 * len(LINEARS)
    assert any(name.endswith("base_layer") and reason == "frozen weight" for name, reason in cs.skipped)
    assert max_rel_change(before, forward(peft_model, PROTECTED)) < 1e-4  # already at step 0
    train(peft_model, cs)
    assert max_rel_change(before, forward(peft_model, PROTECTED)) < 1e-4
    assert max_rel_change(other_before, forward(peft_model, OTHER)) > 1e-2
    for c in cs.constraints:
        if c.kind == "lora.right":
            assert c.anchor_error() < 1e-5  # A·U = 0
            torch.testing.assert_close(c.param, project_out(c.param, c.basis).detach(), atol=1e-6, rtol=0)


def test_an_adapter_that_already_moves_the_protected_outputs_is_refused_when_the_basis_saw_it():
    """Measured with the adapter in place (RefusalDirections at fit start), A·U = 0 would remove B0·A0 from the
    protected outputs instead of holding them; a guarded adapter (A·U = 0 up to rounding) goes on."""
    from peft import LoraConfig, get_peft_model

    bases = capture_bases(tiny("qwen2"), PROTECTED)
    trained = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS, init_lora_weights=False))
    with pytest.raises(ValueError, match="already changes this layer's output on the protected prompts"):
        build_constraints(trained, bases, protected_token_ids=PROTECTED.flatten(), measured_with_adapters=True)
    guarded = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS))
    train(guarded, build_constraints(guarded, bases, protected_token_ids=PROTECTED.flatten()))
    assert any(m.weight.abs().max() > 1e-3 for n, m in guarded.named_modules() if n.endswith("lora_B.default"))
    before = forward(guarded, PROTECTED)
    build_constraints(guarded, bases, protected_token_ids=PROTECTED.flatten(), measured_with_adapters=True)
    assert max_rel_change(before, forward(guarded, PROTECTED)) < 1e-5


def test_a_frozen_second_adapter_is_left_as_it_is():
    """A reference or earlier-task adapter that does not train does not change in the fit: it is neither refused
    as "already changing the protected outputs" nor rewritten onto the constraint; the trained one is held."""
    from peft import LoraConfig, get_peft_model

    for measured_with_adapters in (True, False):
        model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS))
        model.add_adapter("reference", LoraConfig(r=4, target_modules=LINEARS, init_lora_weights=False))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference" in n}
        assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if ".reference" in n)
        assert any(v.abs().max() > 0 for n, v in frozen.items() if "lora_B" in n)
        cs = build_constraints(model, capture_bases(model, PROTECTED), protected_token_ids=PROTECTED.flatten(),
                               measured_with_adapters=measured_with_adapters)
        assert sum(reason == "frozen adapter" for _, reason in cs.skipped) == 2 * len(LINEARS)
        assert not any(".reference" in c.name for c in cs.constraints) and cs.uncovered == []
        train(model, cs)
        for name, p in model.named_parameters():
            if name in frozen:
                torch.testing.assert_close(p.detach(), frozen[name], atol=0, rtol=0, msg=name)


def test_lora_inits_that_rewrite_the_base_weight_are_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS, init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="init 'pissa' rewrites the base weight"):
        build_constraints(model, capture_bases(tiny("qwen2"), PROTECTED))
    model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS, init_lora_weights="gaussian"))
    build_constraints(model, capture_bases(tiny("qwen2"), PROTECTED))  # B starts at 0: the base is untouched


def test_lora_factor_is_exactly_zero_where_the_subspace_spans_every_input():
    """A·U = 0 for a U spanning the whole input means A = 0: held exactly, so B gets no rounding-noise
    gradient for AdamW to blow up into full-size steps (B only decays with the weight decay)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS, init_lora_weights=False))
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    full = {f"model.layers.0.self_attn.{n}": rotation for n in ("q_proj", "k_proj", "v_proj")}  # every input
    cs = build_constraints(model, full, protected_token_ids=PROTECTED.flatten())
    lora = [c for c in cs.constraints if c.kind == "lora.right"]
    assert len(lora) == 3 and all(torch.count_nonzero(c.param) == 0 for c in lora)
    b_before = {n: p.detach().clone() for n, p in model.named_parameters()
                if "lora_B" in n and any(f"{m}.lora_B" in n for m in full)}
    assert len(b_before) == 3
    train(model, cs)
    assert all(torch.count_nonzero(c.param) == 0 for c in lora)
    decay = (1 - 1e-2 * 0.1) ** 6  # train(): AdamW lr 1e-2, weight_decay 0.1, 6 steps; no gradient step at all
    for name, p in model.named_parameters():
        if name in b_before:
            torch.testing.assert_close(p.detach(), b_before[name] * decay, atol=1e-7, rtol=1e-6, msg=name)


def test_lora_with_strength_zero_changes_nothing():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=LINEARS, init_lora_weights=False))
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    build_constraints(model, capture_bases(model, PROTECTED), strength=0.0)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def test_directions_mode_keeps_what_writers_put_along_the_direction():
    """Output-side primitive: residual writers (embeddings, o_proj, down_proj, LoRA B) keep Uᵀ·W fixed."""
    from peft import LoraConfig, get_peft_model

    direction = torch.randn(32, 1, generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    model = tiny("qwen2")
    writers = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    outputs = {**{n: direction for n in writers}, "model.embed_tokens": direction}
    cs = build_constraints(model, {}, output_bases=outputs)
    weights0 = {n: model.get_submodule(n).weight.detach().clone() for n in [*writers, "model.embed_tokens"]}
    train(model, cs)
    for name, w0 in weights0.items():
        w = model.get_submodule(name).weight.detach()
        along = (lambda m: m @ direction) if name.endswith("embed_tokens") else (lambda m: direction.T @ m)
        torch.testing.assert_close(along(w), along(w0), atol=1e-5, rtol=0)
        assert (w - w0).abs().max() > 1e-3
    assert any("q_proj" in name for name in cs.uncovered)  # directions mode leaves the readers free

    lora = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    cs = build_constraints(lora, {}, output_bases={n: direction for n in writers if "o_proj" in n})
    train(lora, cs)
    for layer in (m for n, m in lora.named_modules() if n.endswith("o_proj")):
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert (direction.T @ delta).abs().max() < 1e-6 < delta.abs().max()
