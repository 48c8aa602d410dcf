"""Protected bases: energy/k selection, orthonormality, deterministic signs, clear errors."""

import math

import pytest
import torch

from rg_lightning.guard import difference_in_means, orthonormalize, top_subspace, unit


def _rotated_diag(values, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T, q


@pytest.mark.parametrize("energy, expected", [(0.4, 1), (0.7, 2), (0.71, 3), (0.9, 3), (0.95, 4), (1.0, 4)])
def test_energy_picks_smallest_covering_rank(energy, expected):
    gram = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    assert top_subspace(gram, energy=energy).shape == (5, expected)


def test_top_subspace_spans_leading_eigenvectors_orthonormal_and_deterministic():
    gram, q = _rotated_diag([5.0, 4.0, 1e-3, 1e-4, 0.0, 0.0])
    basis = top_subspace(gram, k=2)
    assert basis.dtype == torch.float64
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(basis @ basis.T, q[:, :2] @ q[:, :2].T)
    assert (basis.gather(0, basis.abs().argmax(0, keepdim=True)) > 0).all()  # sign convention
    assert torch.equal(basis, top_subspace(gram.clone(), k=2))
    assert torch.equal(top_subspace(gram, k=2), top_subspace(-(-gram), k=2))


def test_full_energy_gives_numerical_rank_of_activations():
    x = torch.randn(3, 16) @ torch.randn(16, 16)  # 3 rows -> rank 3
    gram = x.double().T @ x.double()
    assert top_subspace(gram, energy=1.0).shape == (16, 3)
    assert top_subspace(gram.float(), energy=1.0).dtype == torch.float64
    wide = torch.randn(3, 512, dtype=torch.float64)
    for held in (torch.float64, torch.float32):  # a float32 Gram's zero eigenvalues come out ~1e-7 of the trace
        assert top_subspace((wide.T @ wide).to(held), energy=1.0).shape == (512, 3), held
    from rg_lightning.guard.subspace import energy_rank

    assert energy_rank(torch.ones(1000, dtype=torch.float32), 1.0) <= 1000  # never past the last value


@pytest.mark.parametrize(
    "gram, kwargs, message",
    [
        (torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), {}, "NaN or Inf"),
        (torch.tensor([[math.inf, 0.0], [0.0, 1.0]]), {}, "NaN or Inf"),
        (torch.eye(2), {"energy": 0.0}, r"energy must be in \(0, 1\]"),
        (torch.eye(2), {"energy": 1.5}, r"energy must be in \(0, 1\]"),
        (torch.eye(2), {"energy": None}, "energy must be"),
        (torch.eye(2), {"k": 3}, r"k must be in \[1, 2\]"),
        (torch.eye(2), {"k": 0}, r"k must be in \[1, 2\]"),
        (torch.ones(2, 3), {}, "square"),
        (torch.zeros(3, 3), {}, "zero trace"),
    ],
)
def test_top_subspace_errors(gram, kwargs, message):
    with pytest.raises(ValueError, match=message):
        top_subspace(gram, **kwargs)


def test_orthonormalize_keeps_gram_schmidt_order_when_full_rank():
    v = torch.tensor([[3.0, 1.0], [4.0, 1.0], [0.0, 1.0]])
    q = orthonormalize(v)
    torch.testing.assert_close(q[:, 0], unit(v[:, 0]))
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(orthonormalize(v[:, 0]), unit(v[:, 0])[:, None])


def test_orthonormalize_handles_rank_deficiency():
    e = torch.eye(4)
    v = torch.stack([e[0], e[0], e[1], e[0] + e[1]], dim=1)  # rank 2, dependent column in the middle
    q = orthonormalize(v)
    assert q.shape == (4, 2)
    torch.testing.assert_close(q @ q.T @ v.double(), v.double())
    with pytest.raises(ValueError, match="zero vector"):
        orthonormalize(torch.zeros(4, 2))


def test_difference_in_means_and_unit():
    d = difference_in_means(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0]))
    assert d.dtype == torch.float64
    torch.testing.assert_close(unit(d), torch.tensor([0.6, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="zero"):
        unit(torch.zeros(3))
    with pytest.raises(ValueError, match="shape mismatch"):
        difference_in_means(torch.zeros(2), torch.zeros(3))


def test_centered_subspace_keeps_the_mean_and_the_variance_an_offset_would_hide():
    from rg_lightning.guard import centered_subspace

    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 1.0, 0.5, 0.01, 0.01, 0.01], dtype=torch.float64)
    offset = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 50.0], dtype=torch.float64)  # a large common input
    x = torch.randn(2000, 6, generator=generator, dtype=torch.float64) * scales + offset
    gram, first = x.T @ x, x.sum(0)
    assert top_subspace(gram, energy=0.99).shape[1] == 1  # the offset alone holds 99% of the energy
    basis = centered_subspace(gram, first, len(x), energy=0.95)
    assert basis.shape == (6, 3)  # the mean direction + the two directions holding 95% of the variance
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    mean = first / len(x)
    torch.testing.assert_close(basis[:, 0], mean / mean.norm())  # the mean comes first
    inside = (basis.T @ torch.eye(6, dtype=torch.float64)[:, :2]).norm(dim=0)
    assert (inside > 0.99).all()  # the high-variance axes are protected
    assert torch.equal(basis, centered_subspace(gram.clone(), first.clone(), len(x), energy=0.95))
    assert centered_subspace(gram, first, len(x), k=2).shape == (6, 2)
    assert centered_subspace(gram, first, len(x), k=1).shape == (6, 1)


def test_soft_subspace_is_the_hard_one_plus_a_ridge_weighted_tail():
    from rg_lightning.guard import basis_weights, soft_subspace

    values = [50.0, 30.0, 15.0, 4.0, 0.9, 0.1, 0.0]
    gram, q = _rotated_diag(values, seed=3)
    hard = top_subspace(gram, energy=0.95)
    assert torch.equal(soft_subspace(gram, energy=0.95), hard)  # ridge 0: unchanged
    ridge = 0.01
    soft = soft_subspace(gram, energy=0.95, ridge=ridge, min_weight=1e-3)
    assert torch.equal(soft[:, : hard.shape[1]], hard)  # the hard part first, as before
    share = torch.tensor(values, dtype=torch.float64) / sum(values)
    expected = torch.cat([torch.ones(hard.shape[1], dtype=torch.float64),
                          (share / (share + ridge))[hard.shape[1]:]])
    expected = expected[expected >= 1e-3]  # the zero-energy direction is dropped
    torch.testing.assert_close(basis_weights(soft), expected)
    gram_of_columns = soft.T @ soft
    torch.testing.assert_close(gram_of_columns, torch.diag(torch.diagonal(gram_of_columns)))  # orthogonal
    # span: the tail columns are the next eigenvectors
    unit_tail = soft[:, hard.shape[1]:] / soft[:, hard.shape[1]:].norm(dim=0)
    torch.testing.assert_close((unit_tail @ unit_tail.T), q[:, hard.shape[1]:6] @ q[:, hard.shape[1]:6].T)
    with pytest.raises(ValueError, match="ridge"):
        soft_subspace(gram, ridge=-1.0)


def test_tail_gain_gives_the_shares_of_a_ridge_divided_by_the_scale():
    """Scaling a damped tail's rate by s is the basis built with ridge / s; unit columns never change."""
    from rg_lightning.guard import basis_weights, soft_subspace
    from rg_lightning.guard.subspace import tail_gain

    torch.manual_seed(0)
    x = torch.randn(300, 12, dtype=torch.float64) * torch.linspace(3.0, 0.2, 12, dtype=torch.float64)
    gram = x.T @ x
    ridge = 0.02
    weights = basis_weights(soft_subspace(gram, energy=0.8, ridge=ridge, min_weight=1e-9)).clamp_max(1.0)
    for scale in (0.5, 2.0, 3.0):
        expected = basis_weights(soft_subspace(gram, energy=0.8, ridge=ridge / scale, min_weight=1e-9))
        torch.testing.assert_close(weights * tail_gain(weights, scale), expected.clamp_max(1.0), rtol=1e-10, atol=1e-12)
    unit = weights > 1 - 1e-4
    assert unit.sum() >= 1 and (~unit).sum() >= 3
    assert torch.equal(tail_gain(weights, 1.0), torch.ones_like(weights))
    assert torch.equal(tail_gain(weights, 0.0)[unit], torch.ones(int(unit.sum()), dtype=weights.dtype))
    assert (tail_gain(weights, 0.0)[~unit] == 0).all()
    with pytest.raises(ValueError, match="scale"):
        tail_gain(weights, -1.0)


def test_extend_basis_adds_the_unit_residual_of_each_new_direction_in_order():
    from rg_lightning.guard.subspace import extend_basis

    basis = torch.eye(5, dtype=torch.float64)[:, :2]
    directions = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0],  # inside the span: adds nothing
                               [1.0, 1.0, 0.0, 3.0, 0.0],  # residual along axis 3
                               [0.0, 0.0, 0.0, 1.0, 1e-4],  # a sliver outside the span so far: rounding, skipped
                               [0.0] * 5,  # zero: skipped
                               [0.0, 0.0, 0.0, 1.0, 1.0]]).T.double()  # residual along axis 4
    extended = extend_basis(basis, directions)
    assert extended.shape == (5, 4)
    assert torch.equal(extended[:, :2], basis)  # the given columns first, untouched
    torch.testing.assert_close(extended.T @ extended, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(extended[:, 2:].abs(), torch.eye(5, dtype=torch.float64)[:, 3:])
    inside = extended @ (extended.T @ directions)
    torch.testing.assert_close(inside[:, [0, 1, 4]], directions[:, [0, 1, 4]])  # every kept direction is spanned
    assert torch.equal(extend_basis(basis, directions), extended)  # deterministic
    with pytest.raises(ValueError, match="min_residual"):
        extend_basis(basis, directions, min_residual=0.0)
    # a direction no larger than min_norm is rounding, whatever its orientation
    assert extend_basis(basis, directions * 1e-13, min_norm=1e-9).shape == (5, 2)
    assert extend_basis(basis, directions * 1e-13).shape == (5, 4)
    with pytest.raises(ValueError, match="NaN"):
        extend_basis(basis, torch.full((5, 1), float("nan"), dtype=torch.float64))


def test_soft_subspace_holds_given_directions_exactly_and_damps_the_rest_of_the_tail():
    from rg_lightning.guard import basis_weights, soft_subspace

    values = [50.0, 30.0, 15.0, 4.0, 0.9, 0.1]
    gram, q = _rotated_diag(values, seed=4)
    ridge = 0.01
    plain = soft_subspace(gram, energy=0.8, ridge=ridge)
    n = 2  # 50 + 30 of 100.0 covers 0.8
    # a direction already inside the hard span changes nothing
    assert torch.equal(soft_subspace(gram, energy=0.8, ridge=ridge, held=q[:, :1] + q[:, 1:2]), plain)
    held = (q[:, 3] + q[:, 4])[:, None]  # mixes two tail eigenvectors
    soft = soft_subspace(gram, energy=0.8, ridge=ridge, held=held)
    weights = basis_weights(soft)
    assert torch.equal(soft[:, :n], plain[:, :n])
    torch.testing.assert_close(weights[: n + 1], torch.ones(n + 1, dtype=torch.float64))  # hard + held
    torch.testing.assert_close(soft[:, n], (held / held.norm())[:, 0])  # orthogonal to the hard span already
    gram_of_columns = soft.T @ soft
    torch.testing.assert_close(gram_of_columns, torch.diag(torch.diagonal(gram_of_columns)))  # orthogonal
    # the tail is the Gram restricted to the complement of the enlarged hard span; shares of the whole trace
    hard = soft[:, : n + 1]
    rest = torch.eye(6, dtype=torch.float64) - hard @ hard.T
    restricted = rest @ gram @ rest
    tail = soft[:, n + 1:]
    share = torch.linalg.eigvalsh(restricted).flip(0)[: tail.shape[1]] / sum(values)
    torch.testing.assert_close(weights[n + 1:], share / (share + ridge))
    torch.testing.assert_close(restricted @ (tail / tail.norm(dim=0)),
                               (tail / tail.norm(dim=0)) * (share * sum(values)))  # eigenvectors of it
    # ridge 0: the hard span plus the held direction
    torch.testing.assert_close(soft_subspace(gram, energy=0.8, held=held), hard)


def test_centered_subspace_of_centred_data_is_the_plain_one():
    from rg_lightning.guard.subspace import centered_subspace

    x = torch.randn(40, 6, dtype=torch.float64) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.1],
                                                                          dtype=torch.float64))
    x = x - x.mean(0)  # the mean left is rounding (~1e-16), not a direction to hold
    gram = x.T @ x
    assert 0 < float(x.sum(0).norm()) < 1e-12
    torch.testing.assert_close(centered_subspace(gram, x.sum(0), 40, energy=0.9), top_subspace(gram, energy=0.9))


def test_centered_subspace_never_takes_the_mean_twice():
    """When the variance along the mean is the largest, the covariance's top direction is the mean itself: it
    must be projected out before the variance directions are chosen, or k=2 gives one column."""
    from rg_lightning.guard import centered_subspace

    x = torch.tensor([[2.0, 0.1, 0.0], [2.0, -0.1, 0.0], [8.0, 0.1, 0.0], [8.0, -0.1, 0.0]], dtype=torch.float64)
    for kwargs in ({"k": 2}, {"energy": 0.99}):
        basis = centered_subspace(x.T @ x, x.sum(0), 4, **kwargs)
        assert basis.shape == (3, 2), kwargs
        torch.testing.assert_close(basis[:, 1].abs(), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_row_weights_hold_the_most_frequent_rows_exactly_and_damp_the_rest_by_their_share():
    from rg_lightning.guard.subspace import row_weights

    counts = torch.tensor([1, 50, 20, 20, 9], dtype=torch.float64)  # 100 occurrences
    weights = row_weights(counts, energy=0.6, ridge=0.3)
    # 50 + 20 (the first of the tied 20s, by position) cover 70% >= 60%: those two rows are exact
    assert weights[[1, 2]].tolist() == [1.0, 1.0]
    torch.testing.assert_close(weights[[0, 3, 4]], torch.tensor([0.01 / 0.31, 0.2 / 0.5, 0.09 / 0.39],
                                                                dtype=torch.float64))
    assert row_weights(counts, energy=0.5, ridge=0.3)[1] == 1 and row_weights(counts, 0.5, 0.3)[2] < 1
    assert torch.equal(row_weights(counts, energy=1.0, ridge=0.3), torch.ones(5, dtype=torch.float64))
    assert row_weights(counts, energy=0.6, ridge=0.0)[[0, 3, 4]].tolist() == [0.0, 0.0, 0.0]  # left free
    looser = row_weights(counts, energy=0.6, ridge=1.0)
    assert bool((looser <= weights).all()) and bool((looser[[0, 3, 4]] < weights[[0, 3, 4]]).all())
    for bad in (torch.tensor([1.0, 0.0]), torch.tensor([]), torch.tensor([[1.0]]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="counts must be"):
            row_weights(bad, 0.5, 0.3)
    with pytest.raises(ValueError, match="energy must be in"):
        row_weights(counts, 0.0, 0.3)
