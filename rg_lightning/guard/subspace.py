"""Protected subspaces: orthonormal bases from second moments or from explicit directions.

Everything is float64 and sign-normalised (largest-magnitude entry of each basis vector positive), so
processes that start from the same all-reduced statistics get bit-identical bases.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fix_signs(basis: Tensor) -> Tensor:
    """Flip each column so that its largest-|.| entry is positive (eigen/singular vectors have no sign)."""
    idx = basis.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(basis.gather(0, idx))
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def _spectrum(gram: Tensor, energy: float | None, k: int | None) -> tuple[Tensor, Tensor, int]:
    """Eigenvalues (descending, ≥ 0), eigenvectors and the number ``k`` of top ones that ``energy``/``k`` keeps."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise ValueError("gram contains NaN or Inf (overflow in the activations or a bad mask?)")
    d = gram.shape[0]
    if k is not None and not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if k is None and (energy is None or not 0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1] (or pass k), got {energy}")
    g = gram.detach().double()
    values, vectors = torch.linalg.eigh((g + g.T) / 2)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    if values.sum() <= 0:
        raise ValueError("gram has zero trace: no activations were accumulated")
    return values, vectors, energy_rank(values, energy, rounding_slack(gram.dtype, d)) if k is None else k


def rounding_slack(dtype: torch.dtype, d: int) -> float:
    """Relative energy below which a ``d × d`` Gram matrix held in ``dtype`` is rounding: 1e-12 for float64 sums
    (the statistics' own), ``eps·d`` for coarser ones (a float32 Gram's zero eigenvalues come out ~1e-7·trace)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-12, eps * d)


def energy_rank(values: Tensor, energy: float, slack: float = 1e-12) -> int:
    """The fewest of ``values`` (descending, ≥ 0, positive sum) whose sum covers ``energy`` of the total; a relative
    ``slack`` absorbs rounding, so ``energy=1.0`` gives the numerical rank (see :func:`rounding_slack`)."""
    values = values.double()
    return min(int((values.cumsum(0) / values.sum() < energy * (1 - slack)).sum().item()) + 1, len(values))


def top_subspace(gram: Tensor, energy: float | None = 0.99, k: int | None = None) -> Tensor:
    """Top eigenvectors ``[d, r]`` of a second-moment matrix.

    With ``k`` exactly ``k`` vectors; otherwise the smallest ``r`` whose eigenvalues cover ``energy``
    of the trace (a relative slack absorbs rounding, so ``energy=1.0`` gives the numerical rank; see
    :func:`rounding_slack`). Inputs whose energy lies in the span are then mapped identically by any constrained update.
    """
    _, vectors, k = _spectrum(gram, energy, k)
    return _fix_signs(vectors[:, :k])


def soft_subspace(gram: Tensor, energy: float | None = 0.99, k: int | None = None, ridge: float = 0.0,
                  min_weight: float = 1e-3, held: Tensor | None = None, min_norm: float = 0.0) -> Tensor:
    """Weighted basis ``[d, r]``: the hard subspace of :func:`top_subspace` plus a damped tail.

    Columns are orthogonal eigenvectors of ``gram`` scaled by ``sqrt(c_i)``: ``c_i = 1`` for the top
    directions that ``energy``/``k`` selects, and ``c_i = p_i / (p_i + ridge)`` beyond them, where ``p_i`` is
    the direction's share of the trace (tail columns with ``c_i < min_weight`` are dropped). Used as the
    basis ``U`` of :class:`~rg_lightning.guard.projection.LinearConstraint`, ``W ← W − (W U − W0 U) Uᵀ``
    removes the drift along direction ``i`` with weight ``c_i`` at every step, so directions below the
    energy cutoff are no longer left entirely free: each is pulled back in proportion to the energy the
    protected inputs have there (a ridge-regularised projection ``G (G + ridge·tr G · I)⁻¹`` on the tail).
    ``ridge = 0`` returns :func:`top_subspace` itself (orthonormal columns).

    ``held`` (``[d, m]``): directions held exactly on top of the energy cutoff, appended as unit columns
    after the top eigenvectors (:func:`extend_basis`, with ``min_norm``). The tail is then the eigenvectors
    of the Gram matrix restricted to the complement of that enlarged hard subspace (no longer eigenvectors
    of ``gram`` itself), with shares still taken of the whole trace; with ``ridge = 0`` the result is the
    hard subspace plus the held columns.
    """
    if ridge < 0 or not 0.0 < min_weight < 1.0:
        raise ValueError(f"ridge must be >= 0 and min_weight in (0, 1), got {ridge} and {min_weight}")
    values, vectors, n = _spectrum(gram, energy, k)
    hard = _fix_signs(vectors[:, :n])
    tail_values, tail_vectors = values[n:], vectors[:, n:]
    if held is not None:
        extended = extend_basis(hard, held, min_norm=min_norm)
        if extended.shape[1] > n:
            hard = extended
            if ridge == 0:
                return hard
            # The new columns lie in the tail's span (they are orthogonal to the top eigenvectors), so the
            # restricted Gram is diag(tail values) with their coordinates a projected out: an eigh of the
            # tail's size in the eigenbasis already computed, no d x d completion of the basis.
            a = tail_vectors.T @ extended[:, n:]
            outside = torch.eye(a.shape[0], dtype=a.dtype, device=a.device) - a @ a.T
            restricted = outside @ torch.diag(tail_values) @ outside
            tail_values, mixing = torch.linalg.eigh((restricted + restricted.T) / 2)
            tail_values, tail_vectors = tail_values.flip(0).clamp_min(0.0), tail_vectors @ mixing.flip(1)
    if ridge == 0:
        return hard
    share = tail_values / values.sum()
    weights = share / (share + ridge)
    keep = weights >= min_weight
    tail = _fix_signs(tail_vectors[:, keep]) * weights[keep].sqrt()
    return torch.cat([hard, tail], dim=1)


def extend_basis(basis: Tensor, directions: Tensor, min_residual: float = 1e-2, min_norm: float = 0.0) -> Tensor:
    """``basis[d, r]`` (orthonormal) plus the unit residual of each column of ``directions[d, m]``, in order.

    A direction whose part outside the (growing) span is below ``min_residual`` of its norm adds nothing
    (so up to that share of it is left to the rest of the basis): normalising such a sliver would hold a
    direction fixed by rounding, not by the inputs. Directions of norm ``<= min_norm`` (e.g. a rounding-size
    difference of two means) are skipped too. Float64, deterministic (identical inputs, identical basis).
    """
    if not 0.0 < min_residual < 1.0 or not min_norm >= 0:
        raise ValueError(f"min_residual must be in (0, 1) and min_norm >= 0, got {min_residual} and {min_norm}")
    if not torch.isfinite(directions).all():
        raise ValueError("directions hold NaN or Inf (overflow in the activations?)")
    columns = [basis.double()]
    span = columns[0]
    for v in directions.double().T:
        norm = torch.linalg.vector_norm(v)
        if norm <= min_norm:
            continue
        r = v - span @ (span.T @ v)
        r = r - span @ (span.T @ r)  # twice: the residual of a nearly-spanned direction is mostly rounding
        if torch.linalg.vector_norm(r) < min_residual * norm:
            continue
        columns.append(_fix_signs((r / torch.linalg.vector_norm(r))[:, None]))
        span = torch.cat(columns, dim=1)
    return span


def row_weights(counts: Tensor, energy: float = 1.0, ridge: float = 0.0) -> Tensor:
    """Pull-back weights ``c_r`` of protected embedding rows from how often each token occurs in the protected
    prompts (with their protected answer tokens): the rows of the most frequent tokens that together cover
    ``energy`` of all occurrences weigh 1 (held exactly), every other row ``p_r / (p_r + ridge)`` with ``p_r`` its
    token's share of the occurrences (0 with ``ridge = 0``: left free). The rows' counterpart of
    :func:`soft_subspace`'s damped tail; ``energy = 1`` holds every row exactly. Ties in count at the cutoff are
    broken by position (the callers pass ids in ascending order), so the same counts give the same weights on every
    rank.
    """
    if counts.ndim != 1 or counts.is_complex() or counts.dtype == torch.bool or not len(counts):
        raise ValueError(f"counts must be a non-empty 1-D tensor of occurrence counts, got {counts.dtype} of shape "
                         f"{tuple(counts.shape)}")
    c = counts.detach().double()
    if not torch.isfinite(c).all() or bool((c <= 0).any()):
        raise ValueError("counts must be positive and finite (a protected token occurs at least once)")
    if not 0.0 < energy <= 1.0 or not ridge >= 0:
        raise ValueError(f"energy must be in (0, 1] and ridge >= 0, got {energy} and {ridge}")
    order = torch.sort(c, descending=True, stable=True).indices
    n_exact = energy_rank(c[order], energy)
    share = c / c.sum()
    weights = share / (share + ridge) if ridge > 0 else torch.zeros_like(share)
    weights[order[:n_exact]] = 1.0
    return weights


UNIT_WEIGHT = 1 - 1e-4  # columns of a weighted basis above this weight are held exactly


def tail_gain(weights: Tensor, scale: float) -> Tensor:
    """Per-column factor that turns a weighted basis's pull-back shares ``c_i`` into those of ``scale`` times
    the rate: ``c_i' = s c_i / (1 + (s − 1) c_i)`` (the share with ``ridge / s``), returned as ``c_i' / c_i``.

    Unit columns (``c_i = 1``) keep factor 1 for every ``s``; ``s = 1`` changes nothing; ``s = 0`` (a zero
    learning rate) pulls nothing back. With ``s`` = lr / reference lr, a steady push of ``lr·g`` per step
    along a tail direction settles at ``d = lr·g·(1 − c_i')/c_i' = lr_ref·g·(1 − c_i)/c_i``: the drift the tail
    allows is the same whatever the learning rate (a fixed share ``c_i`` lets it grow ∝ lr).
    """
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    unit = weights > UNIT_WEIGHT
    return torch.where(unit, 1.0, scale / (1.0 + (scale - 1.0) * weights.masked_fill(unit, 0.0)))


def basis_weights(basis: Tensor) -> Tensor:
    """The weights ``c_i`` of a (possibly weighted) basis from :func:`soft_subspace`: its squared column norms."""
    return basis.double().square().sum(0)


def centered_subspace(gram: Tensor, first: Tensor, count: int, energy: float | None = 0.99,
                      k: int | None = None) -> Tensor:
    """The mean direction plus the top eigenvectors of the covariance around it, ``[d, r]``, orthonormal.

    ``gram`` = Σ x xᵀ, ``first`` = Σ x over ``count`` rows. The uncentred energy criterion of
    :func:`top_subspace` is dominated by a large common offset: where the mean carries ~98% of a module's
    input energy (measured: Gemma-2 ``o_proj``), energy 0.99 keeps 1-3 directions, i.e. the mean only, and
    leaves every difference *between* protected inputs free. Here ``energy`` is the share of the variance
    (orthogonal to the mean) that is kept, so it means the same whatever the offset; ``k`` counts the
    mean direction as one of the ``k`` vectors.
    """
    if count < 1:
        raise ValueError("no rows were accumulated")
    d = gram.shape[0]
    if k is not None and not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    mean = first.detach().double() / count
    norm = torch.linalg.vector_norm(mean)
    g = gram.detach().double() / count
    if not torch.isfinite(g).all() or not torch.isfinite(norm):
        raise ValueError("gram contains NaN or Inf (overflow in the activations or a bad mask?)")
    if norm <= 1e-12 * float(torch.diagonal(g).clamp_min(0).sum()) ** 0.5:  # centred data: the mean is rounding
        return top_subspace(gram, energy=energy, k=k)
    u = (mean / norm)[:, None]
    covariance = g - mean[:, None] * mean[None, :]
    projector = torch.eye(d, dtype=g.dtype, device=g.device) - u @ u.T
    rest = projector @ covariance @ projector
    if k == 1 or float(torch.diagonal(rest).clamp_min(0).sum()) <= 1e-12 * float(torch.diagonal(g).sum()):
        return _fix_signs(u)
    others = top_subspace(rest, energy=energy, k=None if k is None else min(k - 1, d - 1))
    return orthonormalize(torch.cat([u, others], dim=1))  # the columns are orthogonal already; QR keeps u first


def orthonormalize(vectors: Tensor) -> Tensor:
    """Orthonormal basis ``[d, r]`` of the span of the columns of ``vectors[d, m]``, in float64.

    Full column rank: QR with diag(R) > 0, so the first column is ``unit(vectors[:, 0])`` (Gram–Schmidt
    order and signs kept). Rank-deficient: plain QR is not rank-revealing, so the left singular vectors
    above ``eps(dtype)·max(d, m)·σ_max`` are used, sign-normalised.
    """
    if vectors.ndim == 1:
        vectors = vectors[:, None]
    if vectors.ndim != 2 or not torch.isfinite(vectors).all():
        raise ValueError(f"vectors must be a finite [d, m] matrix, got shape {tuple(vectors.shape)}")
    eps = torch.finfo(vectors.dtype).eps if vectors.is_floating_point() else torch.finfo(torch.float64).eps
    v = vectors.detach().double()
    left, sigma, _ = torch.linalg.svd(v, full_matrices=False)
    if sigma.numel() == 0 or sigma[0] == 0:
        raise ValueError("vectors span only the zero vector")
    rank = int((sigma > eps * max(v.shape) * sigma[0]).sum().item())
    if rank == v.shape[1]:
        q, r = torch.linalg.qr(v)
        return q * torch.sign(torch.diagonal(r))
    return _fix_signs(left[:, :rank])


def difference_in_means(mean_harmful: Tensor, mean_harmless: Tensor) -> Tensor:
    """Unnormalised refusal direction candidate (Arditi et al. 2024), float64."""
    if mean_harmful.shape != mean_harmless.shape:
        raise ValueError(f"shape mismatch: {tuple(mean_harmful.shape)} vs {tuple(mean_harmless.shape)}")
    return mean_harmful.double() - mean_harmless.double()


def unit(v: Tensor) -> Tensor:
    """``v / ‖v‖`` in float64; a zero or non-finite vector has no direction."""
    v = v.double()
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("cannot normalise a zero or non-finite vector")
    return v / norm
