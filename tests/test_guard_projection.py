"""Post-step constraints on plain linears: exact protection after real AdamW steps, learning elsewhere."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rg_lightning.guard import (
    LinearConstraint,
    LoraConstraint,
    ParamFreeze,
    RowFreeze,
    build_constraints,
    interference,
    orthonormalize,
    project_out,
    project_out_left,
)
from rg_lightning.guard.projection import subspace_energy


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning threads crawl on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _basis(d, k, seed):
    return orthonormalize(torch.randn(d, k, generator=torch.Generator().manual_seed(seed))).float()


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4, bias=False)
    )


def _linears(net):
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}


def _train(net, constraints=None, steps=8, lr=5e-2, seed=1, apply=True):
    """AdamW on random regression data; constraints applied after every step (the intended use)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if constraints is not None and apply:
            constraints.apply_()
        losses.append(loss.item())
    return losses


def _protected_setup(seed=0):
    net = _net(seed)
    bases = {name: _basis(m.in_features, 3, i) for i, (name, m) in enumerate(_linears(net).items())}
    probes = {name: torch.randn(20, 3) @ bases[name].T for name in bases}  # random inputs inside span(U)
    before = {name: m(probes[name]).detach() for name, m in _linears(net).items()}
    return net, bases, probes, before


@torch.no_grad()
def _max_rel_change(net, probes, before):
    return max(
        float((m(probes[name]) - before[name]).abs().max() / before[name].abs().max())
        for name, m in _linears(net).items()
    )


def test_protected_outputs_unchanged_after_adamw_steps():
    net, bases, probes, before = _protected_setup()
    initial = [p.detach().clone() for p in net.parameters()]
    cs = build_constraints(net, bases)
    assert cs.uncovered == [] and cs.skipped == []
    _train(net, cs)
    assert _max_rel_change(net, probes, before) < 1e-5
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), initial) if p.ndim == 2)  # W moved
    biases = [m.bias for m in _linears(net).values() if m.bias is not None]
    assert all(torch.equal(b, b0) for b, b0 in zip(biases, [initial[1], initial[3]]))  # policy: restored


def test_without_constraints_protected_outputs_do_change():
    net, _, probes, before = _protected_setup()
    _train(net)
    assert _max_rel_change(net, probes, before) > 1e-2


def test_strength_zero_is_identity_and_half_halves_the_anchor_error():
    net, bases, _, _ = _protected_setup()
    cs = build_constraints(net, bases, strength=0.0)
    _train(net, cs)  # applies with strength 0
    linear = [c for c in cs.constraints if isinstance(c, LinearConstraint)]
    errors = [c.anchor_error() for c in linear]
    assert min(errors) > 1e-3
    snapshot = [p.detach().clone() for p in net.parameters()]
    cs.apply_(0.0)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), snapshot))
    bias_gap = [(c.module.bias - c.bias).abs().max().item() for c in linear if c.bias is not None]
    cs.apply_(0.5)
    for c, err in zip(linear, errors):
        assert c.anchor_error() == pytest.approx(err / 2, rel=1e-4)
    for c, gap in zip([c for c in linear if c.bias is not None], bias_gap):
        assert (c.module.bias - c.bias).abs().max().item() == pytest.approx(gap / 2, rel=1e-4)
    cs.apply_(1.0)
    assert max(c.anchor_error() for c in linear) < 1e-5


@pytest.mark.parametrize("project_grads", [False, True])
def test_unprotected_directions_still_learn(project_grads):
    """A task living in the complement of U is learned; outputs on inputs orthogonal to U move."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 4, bias=False)
    basis = _basis(16, 6, 0)
    cs = build_constraints(layer, {"": basis})
    teacher = torch.randn(4, 16)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-2)
    probe_in, probe_out = torch.randn(8, 6) @ basis.T, project_out(torch.randn(8, 16), basis)
    ref_in, ref_out = layer(probe_in).detach(), layer(probe_out).detach()
    losses = []
    for _ in range(150):
        x = project_out(torch.randn(64, 16, generator=g), basis)
        loss = nn.functional.mse_loss(layer(x), x @ teacher.T)
        opt.zero_grad()
        loss.backward()
        if project_grads:
            cs.project_grads_()
        opt.step()
        cs.apply_()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert (layer(probe_out) - ref_out).abs().max() > 0.5
    assert (layer(probe_in) - ref_in).abs().max() < 1e-5


def test_output_side_keeps_what_a_layer_writes_along_directions():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    directions = _basis(12, 2, 3)
    cs = build_constraints(layer, {}, output_bases={"": directions})
    x = torch.randn(10, 16)
    before = layer(x).detach()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(layer.parameters(), lr=5e-2)
    for _ in range(5):
        loss = (layer(torch.randn(8, 16, generator=g)) - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cs.apply_()
    after = layer(x).detach()
    torch.testing.assert_close(after @ directions, before @ directions, atol=1e-5, rtol=0)
    assert (project_out(after, directions) - project_out(before, directions)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_hold_the_anchor_up_to_their_rounding_without_drift(dtype):
    """Half-precision weights are corrected in their own dtype: the protected response stays within a few
    roundings of the anchor however long training runs (the error is re-measured, never accumulated),
    while the free directions learn."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(dtype)
    basis = _basis(64, 8, 0)
    w0 = layer.weight.detach().float().clone()
    cs = build_constraints(layer, {"": basis})
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, eps=1e-4)  # eps=1e-8 is 0 in float16
    errors = []
    for _ in range(40):
        layer(torch.randn(16, 64, dtype=dtype)).float().square().mean().backward()
        cs.project_grads_()
        opt.step()
        opt.zero_grad()
        cs.apply_()
        errors.append(cs.constraints[0].anchor_error())
    assert layer.weight.dtype == dtype
    scale = float((w0 @ basis).abs().max())
    rounding = torch.finfo(dtype).eps * scale
    assert max(errors) < 4 * rounding, (max(errors), rounding)
    assert float(project_out(layer.weight.float() - w0, basis).abs().max()) > 100 * rounding


def test_state_dict_roundtrip_restores_the_original_anchors():
    net, bases, probes, before = _protected_setup()
    cs = build_constraints(net, bases)
    _train(net, cs, apply=False)  # drifted: anchors now differ from what a rebuild would store
    buffer = io.BytesIO()
    torch.save(cs.state_dict(), buffer)
    resumed = build_constraints(net, bases)
    assert _max_rel_change(net, probes, before) > 1e-2
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    resumed.apply_()
    assert _max_rel_change(net, probes, before) < 1e-5
    with pytest.raises(ValueError, match="constraint set mismatch"):
        build_constraints(net, {"0": bases["0"]}).load_state_dict(cs.state_dict())


def test_extra_memory_counts_shared_bases_once():
    layers = nn.ModuleDict({"q": nn.Linear(8, 6, bias=False), "k": nn.Linear(8, 4, bias=False)})
    basis = _basis(8, 2, 0)
    cs = build_constraints(layers, {"q": basis, "k": basis})
    assert cs.extra_memory_bytes() == 4 * (8 * 2 + 6 * 2 + 4 * 2)  # one basis + two anchors (float32)
    assert "linear.right" in cs.report() and "extra bytes" in cs.report()


def test_bad_inputs_give_clear_errors():
    net = _net()
    named = nn.ModuleDict({"up_proj": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"'up_prj'.*close: \['up_proj'\]"):
        build_constraints(named, {"up_prj": _basis(4, 2, 0)})
    with pytest.raises(ValueError, match=r"2: basis has shape \(16, 2\) but the module has 12 input feat"):
        build_constraints(net, {"2": _basis(16, 2, 0)})
    with pytest.raises(ValueError, match="not orthonormal"):
        build_constraints(net, {"0": torch.ones(16, 2)})
    with pytest.raises(ValueError, match="NaN"):
        build_constraints(net, {"0": torch.full((16, 2), float("nan"))})
    with pytest.raises(ValueError, match="protected token ids"):
        build_constraints(nn.Embedding(5, 4), {}, protected_token_ids=torch.tensor([7]))
    with pytest.raises(ValueError, match="strength"):
        build_constraints(net, {}).apply_(1.5)


def test_uncovered_and_skipped_are_reported():
    net = _net()
    net[0].weight.requires_grad_(False)
    cs = build_constraints(net, {"0": _basis(16, 2, 0), "2": _basis(12, 2, 1)}, freeze_norms=False)
    assert ("0", "frozen weight") in cs.skipped and ("4", "no basis given") in cs.skipped
    assert cs.uncovered == ["0.bias", "4.weight"]


def test_quantized_bitsandbytes_layers_are_skipped():
    bnb = pytest.importorskip("bitsandbytes")
    net = nn.Sequential(bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False), nn.Linear(4, 4))
    cs = build_constraints(net, {"0": _basis(8, 2, 0), "1": _basis(4, 2, 1)})
    assert ("0", "quantized (bitsandbytes)") in cs.skipped
    assert [c.name for c in cs.constraints] == ["1", "0.bias"]  # its float bias is still trainable: restored


def test_projection_primitives_and_interference():
    basis = _basis(16, 3, 0)
    m = torch.randn(5, 16)
    torch.testing.assert_close(project_out(m, basis) @ basis, torch.zeros(5, 3), atol=1e-5, rtol=0)
    left = _basis(5, 2, 1)
    torch.testing.assert_close(left.T @ project_out_left(m, left), torch.zeros(2, 16), atol=1e-5, rtol=0)
    assert interference(torch.randn(5, 3) @ basis.T, basis) == pytest.approx(1.0)
    assert interference(project_out(m, basis), basis) == pytest.approx(0.0, abs=1e-10)
    assert interference(torch.zeros(5, 16), basis) == 0.0
    g = torch.randn(5, 16)
    expected = float((g @ basis).square().sum() / g.square().sum())
    assert interference(g, basis) == pytest.approx(expected, rel=1e-5)
    # Row blocks (a rank's shard of a row-sharded gradient) add up to the whole: a sum-reduce completes them.
    parts = subspace_energy(g[:2], basis) + subspace_energy(g[2:], basis)
    torch.testing.assert_close(parts, subspace_energy(g, basis))
    assert float(parts[0] / parts[1]) == pytest.approx(expected, rel=1e-5)


def _gradients_inside_span(project_grads: bool, steps: int = 20):
    """AdamW on a layer whose every training input lies in span(U): all the gradient is protected."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 4, bias=False)
    basis = _basis(16, 4, 0)
    cs = build_constraints(layer, {"": basis})
    w0 = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    # eps 1e-6: inputs built in float32 lie in span(U) only up to ~1e-7, and AdamW's default eps (1e-8)
    # would normalise even that rounding-level free gradient up to visible steps.
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-6)
    for _ in range(steps):
        x = torch.randn(32, 4, generator=g) @ basis.T
        loss = nn.functional.mse_loss(layer(x), torch.randn(32, 4, generator=g))
        opt.zero_grad()
        loss.backward()
        if project_grads:
            cs.project_grads_()
        opt.step()
        cs.apply_()
    return (layer.weight.detach() - w0), basis


def test_adamw_smears_protected_gradients_into_free_directions_unless_they_are_projected():
    """Post-step restore alone: AdamW's per-coordinate scaling turns a gradient that lies wholly in the
    protected directions into steps in the free ones (no loss term asked for them). Projected gradients:
    (almost) nothing moves."""
    smeared, basis = _gradients_inside_span(project_grads=False)
    assert (smeared @ basis).abs().max() < 1e-5  # the constraint itself holds either way
    assert smeared.abs().max() > 1e-2  # ... but the free directions moved by steps of about lr
    drift, _ = _gradients_inside_span(project_grads=True)
    assert drift.abs().max() < 0.02 * smeared.abs().max()


def test_project_grads_removes_exactly_the_constrained_parts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.Linear(6, 3))
    bases = {"2": _basis(8, 3, 0)}
    outputs = {"3": _basis(3, 1, 1)}
    ids = torch.tensor([1, 4, 7])
    cs = build_constraints(net, bases, output_bases=outputs, protected_token_ids=ids)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    cs.project_grads_(0.0)
    assert all(torch.equal(p.grad, before[n]) for n, p in net.named_parameters())
    cs.project_grads_()
    grads = dict(net.named_parameters())
    u = bases["2"]
    assert (grads["2.weight"].grad @ u).abs().max() < 1e-6  # no part inside the protected inputs
    free = before["2.weight"] - (before["2.weight"] @ u) @ u.T
    assert torch.allclose(grads["2.weight"].grad, free, atol=1e-6)  # the free part untouched
    assert grads["2.bias"].grad.abs().max() == 0  # kept bias
    v = outputs["3"]
    assert (v.T @ grads["3.weight"].grad).abs().max() < 1e-6  # output side: nothing written along v
    emb = grads["0.weight"].grad
    assert emb[ids].abs().max() == 0 and torch.equal(emb[[0, 2, 3]], before["0.weight"][[0, 2, 3]])
    assert grads["1.weight"].grad.abs().max() == 0 and grads["1.bias"].grad.abs().max() == 0  # norm: frozen
    with pytest.raises(ValueError, match="strength"):
        cs.project_grads_(2.0)


def test_weighted_basis_damps_the_drift_per_direction_by_its_weight():
    """A soft_subspace basis: unit columns are held exactly, a column of weight c loses c of its drift per
    step (post-step) and of its gradient (before the step), and free directions are untouched."""
    from rg_lightning.guard import soft_subspace

    torch.manual_seed(0)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    gram = q @ torch.diag(torch.tensor([10.0, 5.0, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)) @ q.T
    basis = soft_subspace(gram, energy=0.9, ridge=0.02).float()  # 2 hard columns + 2 damped
    c = basis.square().sum(0)
    assert basis.shape == (d, 4) and torch.allclose(c[:2], torch.ones(2)) and (c[2:] < 1).all()
    lin = nn.Linear(d, 3)
    con = LinearConstraint("lin", lin, basis)
    u = q.float()  # unit eigenvectors: columns 0..3 protected (2 hard, 2 soft), 4.. free
    w0 = lin.weight.detach().clone()
    delta = torch.randn(3, d)
    with torch.no_grad():
        lin.weight.add_(delta)
    con.apply_()
    drift = (lin.weight.detach() - w0) @ u
    expected = (delta @ u) * torch.cat([1 - c, torch.ones(d - 4)])
    assert torch.allclose(drift, expected, atol=1e-5)
    assert (drift[:, :2]).abs().max() < 1e-5  # hard directions exact
    lin.weight.grad = g = torch.randn(3, d)
    g0 = g.clone()
    con.project_grad_()
    assert torch.allclose(lin.weight.grad @ u, (g0 @ u) * torch.cat([1 - c, torch.ones(d - 4)]), atol=1e-5)
    assert "+2 damped" in con.describe()
    with pytest.raises(ValueError, match="not orthonormal"):
        LinearConstraint("lin", lin, basis * 1.5)


def test_tail_scaled_with_the_learning_rate_leaves_the_same_drift_whatever_the_rate():
    """A steady push along a damped direction settles where the pull-back balances it. With a fixed share
    per step that drift doubles when the learning rate doubles; with the rate scaled by lr / reference lr
    (``ConstraintSet.scale_tails``) it stays put, while exact directions stay exact either way."""
    from rg_lightning.guard import soft_subspace

    torch.manual_seed(0)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    gram = q @ torch.diag(torch.tensor([10.0, 5.0, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)) @ q.T
    basis = soft_subspace(gram, energy=0.9, ridge=0.05).float()  # 2 exact columns, 2 damped
    push = torch.randn(3, d)

    def settled_drift(lr, scaled):
        lin = nn.Linear(d, 3, bias=False)
        w0 = lin.weight.detach().clone()
        cs = build_constraints(lin, {"": basis})
        if scaled:
            cs.scale_tails(lambda param: lr / 1e-2)
        for _ in range(400):
            with torch.no_grad():
                lin.weight.add_(push, alpha=lr)  # what a steady optimizer step does
            cs.apply_()
        return (lin.weight.detach() - w0) @ q.float()

    for scaled in (False, True):
        low, high = settled_drift(1e-2, scaled), settled_drift(2e-2, scaled)
        assert low[:, :2].abs().max() < 1e-5 and high[:, :2].abs().max() < 1e-5  # exact directions
        ratio = high[:, 2:4].norm() / low[:, 2:4].norm()
        if scaled:
            assert abs(ratio - 1) < 1e-3, ratio
        else:
            assert abs(ratio - 2) < 1e-3, ratio
        torch.testing.assert_close(high[:, 4:] / low[:, 4:], torch.full_like(low[:, 4:], 2.0), rtol=1e-3, atol=0)


def test_absent_rows_get_no_gradient_and_micro_batches_accumulate():
    from rg_lightning.guard.projection import batch_token_mask, hold_absent_rows_

    embedding = nn.Embedding(10, 4)
    embedding.weight.grad = torch.ones(10, 4)
    present = batch_token_mask(torch.tensor([[1, 2], [2, 5]]), 10)
    present = batch_token_mask(torch.tensor([7]), 10, present)  # a second micro-batch of the same step
    hold_absent_rows_(embedding.weight, present)
    moved = embedding.weight.grad.abs().sum(1) > 0
    assert moved.tolist() == [i in (1, 2, 5, 7) for i in range(10)]
    with pytest.raises(ValueError, match="token ids"):
        batch_token_mask(torch.tensor([10]), 10)


def test_float64_weights_are_corrected_in_float64_so_free_directions_are_not_rounded():
    torch.manual_seed(0)
    lin = nn.Linear(16, 6).double()
    basis = _basis(16, 3, 0)
    con = LinearConstraint("lin", lin, basis)
    u = basis.double()  # orthonormal to float32 precision only: remove span(U) with its exact projector
    free = torch.randn(6, 16, dtype=torch.float64)
    free = free - free @ u @ torch.linalg.solve(u.T @ u, u.T)  # an update outside span(U)
    with torch.no_grad():
        lin.weight.add_(free, alpha=1e-9)
    before = lin.weight.detach().clone()
    con.apply_()
    assert (lin.weight.detach() - before).abs().max() < 1e-14  # a float32 round trip moved entries by ~1e-9
    lin.weight.grad = free.clone()
    con.project_grad_()
    assert (lin.weight.grad - free).abs().max() < 1e-14


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_scaled_tail_damps_gradients_and_drift_alike_on_either_side(side):
    """``scale_tail(s)``: the update and the gradient lose the same share ``c_i'`` per tail direction; a state
    restored into the constraint gets the gain of its own weights, not of the basis it replaced."""
    from rg_lightning.guard import soft_subspace
    from rg_lightning.guard.subspace import tail_gain

    torch.manual_seed(0)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))

    def weighted(spectrum):
        return soft_subspace(q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T, energy=0.9,
                             ridge=0.05).float()

    basis = weighted([10.0, 5.0, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0])
    lin = nn.Linear(d, d, bias=False)
    con = LinearConstraint("lin", lin, basis, side=side)

    def removed_shares(grad_strength=0.999999):
        """Share of a unit push along each eigenvector that apply_ and project_grad_ remove (at strength 1 the
        gradient gets a second, clean-up pass over the unit columns)."""
        u = q.float()
        w0 = lin.weight.detach().clone()
        push = torch.randn(d, d) if side == "right" else torch.randn(d, d)
        along = (lambda m: m @ u) if side == "right" else (lambda m: u.T @ m)
        with torch.no_grad():
            lin.weight.add_(push)
        con.apply_()
        kept_update = along(lin.weight.detach() - w0) / along(push)
        with torch.no_grad():
            lin.weight.copy_(w0)
        lin.weight.grad = push.clone()
        con.project_grad_(strength=grad_strength)
        kept_grad = along(lin.weight.grad) / along(push)
        dim = 0 if side == "right" else 1
        return 1 - kept_update.mean(dim), 1 - kept_grad.mean(dim)

    c = basis.square().sum(0)
    con.scale_tail(2.0)
    update, grad = removed_shares()
    expected = c * tail_gain(c, 2.0)
    torch.testing.assert_close(update[:4], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(grad[:4], expected, atol=1e-4, rtol=0)
    assert (expected[2:] > c[2:] + 0.01).all()  # twice the rate pulls the tail back harder
    _, grad = removed_shares(grad_strength=1.0)  # the clean-up pass leaves the damped tail as the first left it
    torch.testing.assert_close(grad[:4], expected, atol=1e-4, rtol=0)

    other = LinearConstraint("lin", lin, weighted([10.0, 5.0, 2.0, 0.01, 0.0, 0.0, 0.0, 0.0]), side=side)
    con.load_state_dict(other.state_dict())
    c = con.basis.square().sum(0)
    update, _ = removed_shares()
    torch.testing.assert_close(update[:4], c * tail_gain(c, 2.0), atol=1e-4, rtol=0)


def test_restored_states_are_checked_like_new_ones():
    lin = nn.Linear(8, 4)
    con = LinearConstraint("lin", lin, _basis(8, 2, 0))
    bad = con.state_dict() | {"basis": torch.ones(8, 2)}
    with pytest.raises(ValueError, match="not orthonormal"):
        con.load_state_dict(bad)


def test_token_ids_must_be_integers_not_a_mask():
    from rg_lightning.guard.projection import RowFreeze

    embedding = nn.Embedding(5, 4)
    for ids in (torch.tensor([True, False, True]), torch.tensor([2.7]), torch.tensor([[1, 2]])):
        with pytest.raises(ValueError, match="1-D integer"):
            RowFreeze("embed", embedding, ids)


def test_two_constraints_on_one_side_of_a_tied_weight_are_refused():
    """A tied head and embedding are one matrix: holding W·U for the head and W·R for the embedding as two
    corrections, the second undoes the first (measured: |ΔW·R| 0.1 after five steps)."""
    model = nn.ModuleDict({"embed": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False)})
    model["head"].weight = model["embed"].weight
    with pytest.raises(ValueError, match="share one weight.*merge their bases"):
        build_constraints(model, {"head": _basis(8, 2, 0)}, output_bases={"embed": _basis(8, 1, 1)})


def test_a_bias_stepped_by_another_optimizer_is_restored_by_that_optimizers_hook():
    """Matrices in one optimizer, 1-D parameters in another (e.g. Muon + AdamW): each corrects only what it stepped,
    the kept bias included."""
    lin = nn.Linear(8, 4)
    cs = build_constraints(lin, {"": _basis(8, 2, 0)})
    bias0, weight0 = lin.bias.detach().clone(), lin.weight.detach().clone()
    weights, biases = [lin.weight], [lin.bias]
    with torch.no_grad():
        lin.bias.add_(1.0)
    cs.apply_(params=weights)
    assert torch.equal(lin.weight, weight0) and not torch.equal(lin.bias, bias0)
    cs.apply_(params=biases)
    assert torch.equal(lin.bias, bias0) and torch.equal(lin.weight, weight0)
    lin.weight.grad, lin.bias.grad = torch.ones(4, 8), torch.ones(4)
    cs.project_grads_(params=biases)
    assert torch.equal(lin.weight.grad, torch.ones(4, 8)) and not lin.bias.grad.any()


def test_strength_below_one_moves_each_held_part_that_share_of_the_way_back():
    """``strength`` s: every constraint puts back the share s of the drift (a linear interpolation), also the
    LoRA factor whose subspace spans every input (zeroed only at s = 1), embedding rows, norms and biases."""
    torch.manual_seed(0)
    a = nn.Linear(8, 4, bias=False)
    a0 = a.weight.detach().clone()
    lora = LoraConstraint("a", a, torch.eye(8), strength=0.5)
    torch.testing.assert_close(a.weight.detach(), 0.5 * a0)
    a.weight.grad = torch.ones(4, 8)
    lora.project_grad_(0.5)
    torch.testing.assert_close(a.weight.grad, torch.full((4, 8), 0.5))

    emb = nn.Embedding(10, 4)
    w0 = emb.weight.detach().clone()
    rows = RowFreeze("emb", emb, torch.tensor([1, 3]))
    with torch.no_grad():
        emb.weight.add_(1.0)
    rows.apply_(0.5)
    torch.testing.assert_close(emb.weight.detach()[[1, 3]], w0[[1, 3]] + 0.5)
    torch.testing.assert_close(emb.weight.detach()[0], w0[0] + 1.0)

    norm = nn.LayerNorm(4)
    n0 = norm.weight.detach().clone()
    frozen = ParamFreeze("norm.weight", norm, "weight")
    with torch.no_grad():
        norm.weight.add_(1.0)
    frozen.apply_(0.5)
    torch.testing.assert_close(norm.weight.detach(), n0 + 0.5)

    lin = nn.Linear(8, 4)
    b0 = lin.bias.detach().clone()
    held = LinearConstraint("lin", lin, torch.eye(8)[:, :2])
    with torch.no_grad():
        lin.bias.add_(1.0)
    held.apply_(0.5)
    torch.testing.assert_close(lin.bias.detach(), b0 + 0.5)


def test_absent_rows_are_read_at_this_ranks_offset(monkeypatch):
    """A rank holding rows 5.. of a row-sharded embedding gradient reads the batch's token mask from row 5 on."""
    import rg_lightning.guard.projection as projection

    weight = nn.Parameter(torch.zeros(10, 2))
    weight.grad = torch.ones(10, 2)
    shard = weight.grad[5:]
    monkeypatch.setattr(projection, "local_rows", lambda t: (shard, 5) if t is weight.grad else (t, 0))
    present = torch.zeros(10, dtype=torch.bool)
    present[[1, 7]] = True  # token 1 in another rank's rows, token 7 in this one's
    projection.hold_absent_rows_(weight, present)
    assert shard[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


def test_a_model_without_adapters_is_guarded_without_importing_peft():
    """Importing peft loads bitsandbytes, which prints a notice about its CPU kernels: a plain fine-tune
    (``tiny.yaml``) must not import it just to find no LoRA layers. A fresh process: this one has peft loaded."""
    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from rg_lightning.guard.collect import protected_modules\n"
        "from rg_lightning.guard import build_constraints\n"
        "model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))\n"
        "names = protected_modules(model)\n"
        "build_constraints(model, {n: torch.linalg.qr(torch.randn(8 if n == '0' else 6, 2))[0] for n in names})\n"
        "print(names, 'peft' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "False" and "['0', '1']" in run.stdout, run.stdout


def test_weighted_rows_lose_their_weights_share_of_the_drift_each_step_and_restore_exactly():
    """``RowFreeze`` with row weights: weight 1 holds a row exactly, weight c pulls its drift back by c (and damps its
    gradient by c), weight 0 leaves it free; the weights are part of the state a resume restores."""
    from rg_lightning.guard.subspace import tail_gain

    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    w0 = emb.weight.detach().clone()
    ids, weights = torch.tensor([7, 1, 3, 5]), torch.tensor([0.25, 1.0, 0.5, 0.0])
    rows = RowFreeze("emb", emb, ids, weights)
    assert rows.ids.tolist() == [1, 3, 7] and rows.weights.tolist() == [1.0, 0.5, 0.25]  # sorted, the free row gone
    assert rows.describe() == "1 rows (+2 damped)" and rows.has_tail
    with torch.no_grad():
        emb.weight.add_(1.0)
    rows.apply_()
    drift = emb.weight.detach() - w0
    torch.testing.assert_close(drift[[1, 3, 7, 5, 0]][:, 0], torch.tensor([0.0, 0.5, 0.75, 1.0, 1.0]))
    emb.weight.grad = torch.ones(10, 4)
    rows.project_grad_()
    torch.testing.assert_close(emb.weight.grad[[1, 3, 7, 5]][:, 0], torch.tensor([0.0, 0.5, 0.75, 1.0]))
    rows.scale_tail(2.0)  # as a tail: a larger scale pulls the damped rows back harder, the exact one as before
    emb.weight.grad = torch.ones(10, 4)
    rows.project_grad_()
    gain = tail_gain(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64), 2.0).float()
    torch.testing.assert_close(emb.weight.grad[[1, 3, 7]][:, 0], 1 - torch.tensor([1.0, 0.5, 0.25]) * gain)

    state = {k: v.clone() for k, v in rows.state_dict().items()}
    assert set(state) == {"ids", "rows", "weights"}
    other = RowFreeze("emb", nn.Embedding(10, 4), ids, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert other.weights is None and set(other.state_dict()) == {"ids", "rows"}  # all exact: as before weights
    again = RowFreeze("emb", emb, ids, torch.tensor([0.5, 1.0, 0.1, 0.0]))  # other weights, same rows
    again.scale_tail(2.0)
    again.load_state_dict(state)  # the saved weights, and the tail gain recomputed for them
    assert torch.equal(again.rows, state["rows"]) and torch.equal(again.weights, state["weights"])
    emb.weight.grad = torch.ones(10, 4)
    again.project_grad_()
    torch.testing.assert_close(emb.weight.grad[[1, 3, 7]][:, 0], 1 - torch.tensor([1.0, 0.5, 0.25]) * gain)
    with pytest.raises(ValueError, match=r"must be in \[0, 10\), got 1..12"):  # checked before free rows are dropped
        RowFreeze("emb", emb, torch.tensor([1, 12]), torch.tensor([1.0, 0.0]))
    assert RowFreeze("emb", emb, ids, torch.tensor([0.25, 1.0 - 1e-6, 0.5, 0.0])).weights.tolist()[0] == 1.0
    for strength in (1, 0):  # an int strength, as Python callers may pass, with and without weights
        for constraint in (RowFreeze("emb", emb, ids), RowFreeze("emb", emb, ids, weights)):
            emb.weight.grad = torch.ones(10, 4)
            constraint.project_grad_(strength)
            constraint.apply_(strength)
    with pytest.raises(ValueError, match="one weight per protected token id"):
        RowFreeze("emb", emb, ids, torch.ones(3))
    with pytest.raises(ValueError, match=r"row weights must be in \[0, 1\]"):
        RowFreeze("emb", emb, ids, torch.tensor([0.5, 1.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="distinct"):
        RowFreeze("emb", emb, torch.tensor([1, 1]), torch.tensor([0.5, 0.5]))


def test_damped_rows_keep_the_protected_embedding_outputs_within_their_drift_bound_under_adamw():
    """Property: under guarded AdamW steps the exact rows stay the aligned ones to rounding, a damped row (weight c)
    settles within the drift where its pull-back matches a full AdamW step, ``lr (1 − c) / c`` per coordinate,
    while its free twin goes all the way, and rows no protected prompt reads learn as without the guard."""
    torch.manual_seed(0)
    guarded, free = nn.Embedding(12, 6), nn.Embedding(12, 6)
    free.load_state_dict(guarded.state_dict())
    w0 = guarded.weight.detach().clone()
    lr, c = 0.05, 0.2
    cs = build_constraints(guarded, {}, protected_token_ids=torch.tensor([0, 1, 2]),
                           protected_token_weights=torch.tensor([1.0, c, 1.0]))
    assert cs.has_tail
    target = torch.randn(12, 6) * 2
    for module in (guarded, free):
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(100):
            optimizer.zero_grad()
            (module.weight - target).square().sum().backward()
            if module is guarded:
                cs.project_grads_()
            optimizer.step()
            if module is guarded:
                cs.apply_()
    drift = (guarded.weight.detach() - w0).abs()
    assert drift[[0, 2]].max() < 1e-6
    assert 0 < drift[1].max() <= lr * (1 - c) / c * 1.01
    assert (free.weight.detach() - w0)[1].abs().max() > 3 * lr * (1 - c) / c
    torch.testing.assert_close(guarded.weight.detach()[3:], free.weight.detach()[3:])
