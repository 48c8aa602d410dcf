"""Drift metrics against hand-computed values and their invariances."""

import math

import pytest
import torch

from rg_lightning.guard import (
    cosine,
    fisher_ratio,
    kl_divergence,
    kl_rows,
    linear_cka,
    pca_2d,
    principal_angles,
    projection_gap,
    spread_subspace,
)
from rg_lightning.guard.geometry import state_subspace
from rg_lightning.guard.subspace import top_subspace


def test_cosine():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(-1.0)


def test_projection_gap_and_fisher_ratio():
    harmful = torch.tensor([[2.0, 5.0], [4.0, -5.0]])  # projections onto e0: 2, 4 (mean 3, var 1)
    harmless = torch.tensor([[0.0, 1.0], [-2.0, 0.0]])  # projections: 0, -2 (mean -1, var 1)
    direction = torch.tensor([10.0, 0.0])  # scale must not matter
    assert projection_gap(harmful, harmless, direction) == pytest.approx(4.0)
    assert fisher_ratio(harmful, harmless, direction) == pytest.approx(16.0 / 2.0)


def test_principal_angles():
    e = torch.eye(4)
    f64 = dict(dtype=torch.float64)
    same = principal_angles(e[:, :2], e[:, [1, 0]] * 3)
    torch.testing.assert_close(same, torch.zeros(2, **f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(principal_angles(e[:, :2], e[:, 2:]), torch.full((2,), math.pi / 2, **f64))
    half = torch.stack([e[0], (e[1] + e[2]) / math.sqrt(2)], 1)  # shares e0; the rest is 45° from e1
    angles = principal_angles(e[:, :2], half)
    torch.testing.assert_close(angles, torch.tensor([0.0, math.pi / 4], **f64), atol=1e-6, rtol=0)


def test_state_subspace_is_the_gram_eigenvector_subspace():
    """The SVD of the [n, d] states spans what the eigh of the d x d Gram matrix did, with the same cutoff."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(12, 40, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.1, 40, dtype=torch.float64)
    h1 = h0 + 0.3 * torch.randn(12, 40, generator=g, dtype=torch.float64)
    for energy in (0.5, 0.9, 1.0):
        old = top_subspace(h0.T @ h0, energy=energy)
        new = state_subspace(h0, energy=energy)
        assert new.shape == old.shape and new.shape[1] <= 12
        torch.testing.assert_close(new, old, atol=1e-8, rtol=0)  # both sign-fixed
        k = new.shape[1]
        torch.testing.assert_close(principal_angles(new, state_subspace(h1, k=k)),
                                   principal_angles(old, top_subspace(h1.T @ h1, k=k)), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="k must be"):
        state_subspace(h0, k=13)


def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(50, 8, generator=g)) < 0.5
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, x[:10])
    wide_x, wide_y = torch.randn(6, 40, generator=g).double(), torch.randn(6, 40, generator=g).double()
    cx, cy = wide_x - wide_x.mean(0), wide_y - wide_y.mean(0)  # the d x d definition, d > n
    definition = torch.linalg.matrix_norm(cy.T @ cx) ** 2 / (torch.linalg.matrix_norm(cx.T @ cx)
                                                             * torch.linalg.matrix_norm(cy.T @ cy))
    assert linear_cka(wide_x, wide_y) == pytest.approx(float(definition), rel=1e-12)


def test_spread_subspace_sees_the_variation_the_mean_hides():
    """States dominated by their mean: the uncentred 90% subspace is the mean direction alone, so moving all the
    variation to new directions leaves it in place; the spread subspace turns by 90 degrees."""
    g = torch.Generator().manual_seed(0)
    mean = 50.0 * torch.eye(12, dtype=torch.float64)[0]
    noise = torch.randn(40, 3, generator=g, dtype=torch.float64)
    before = mean + noise @ torch.eye(12, dtype=torch.float64)[1:4]
    after = mean + noise @ torch.eye(12, dtype=torch.float64)[4:7]
    uncentred = principal_angles(state_subspace(before, energy=0.9), state_subspace(after, energy=0.9))
    assert state_subspace(before, energy=0.9).shape[1] == 1 and float(uncentred.max()) < 0.02  # ~1 degree
    spread = spread_subspace(before, energy=0.9)
    assert spread.shape[1] >= 2
    angles = principal_angles(spread, spread_subspace(after, k=spread.shape[1]))
    assert float(angles.max()) == pytest.approx(math.pi / 2)
    assert spread_subspace(mean.expand(5, 12)) is None  # identical rows do not vary


def test_kl_divergence():
    logits = torch.randn(2, 3, 10)
    assert kl_divergence(logits, logits + 5.0) == pytest.approx(0.0, abs=1e-12)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q) == pytest.approx(expected)


def test_pca_2d_recovers_main_axes_with_fixed_signs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g) * torch.tensor([10.0, 3.0, 0.1])
    coords = pca_2d(x)
    assert coords.shape == (100, 2)
    centred = x.double() - x.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending: the last two are the main axes
    torch.testing.assert_close(coords.abs(), (centred @ vectors[:, [2, 1]]).abs())
    assert (coords * centred[:, :2]).sum(0).min() > 0  # loadings ≈ +e0, +e1: largest entry made positive
    torch.testing.assert_close(pca_2d(-x), -coords)
    assert torch.equal(pca_2d(x), coords)


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="NaN/Inf or only zeros"):
        state_subspace(torch.full((4, 3), float("nan")), k=1)
    with pytest.raises(ValueError, match="NaN/Inf or only zeros"):
        state_subspace(torch.zeros(4, 3), k=1)
    masked = torch.tensor([[0.0, 1.0, -float("inf")]])  # a token both distributions give probability 0
    assert kl_divergence(masked, masked) == 0.0
    assert math.isfinite(kl_divergence(masked, torch.tensor([[1.0, 0.0, -float("inf")]])))
    # the per-row form direction selection's KL filter uses: a masked token must not turn a row into NaN
    assert kl_rows(masked.double().log_softmax(-1), masked).tolist() == [0.0]
