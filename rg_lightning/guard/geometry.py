"""Drift metrics between representations before and after fine-tuning (float64 inside).

They measure whether the geometry that mediates refusal survived: direction cosines, how far harmful and
harmless prompts stay apart along the direction, subspace angles, CKA, and the next-token KL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .subspace import _fix_signs, energy_rank, orthonormalize, unit


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between two vectors (e.g. refusal direction after vs before)."""
    return float(unit(a.flatten()) @ unit(b.flatten()))


def _projections(h_harmful: Tensor, h_harmless: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    r = unit(direction).to(h_harmful.device)
    return h_harmful.double() @ r, h_harmless.double() @ r


def projection_gap(h_harmful: Tensor, h_harmless: Tensor, direction: Tensor) -> float:
    """Mean projection of harmful minus harmless activations onto the unit direction."""
    p, q = _projections(h_harmful, h_harmless, direction)
    return float(p.mean() - q.mean())


def fisher_ratio(h_harmful: Tensor, h_harmless: Tensor, direction: Tensor) -> float:
    """``(μ₁ − μ₂)² / (σ₁² + σ₂²)`` of the projections (population variances): separation in units of
    spread, which a raw gap hides when fine-tuning inflates the activations. inf/nan if both spreads are 0."""
    p, q = _projections(h_harmful, h_harmless, direction)
    spread = p.var(correction=0) + q.var(correction=0)
    return float((p.mean() - q.mean()) ** 2 / spread)


def principal_angles(u1: Tensor, u2: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between span(u1) and span(u2); columns orthonormalised first."""
    q1 = orthonormalize(u1)
    q2 = orthonormalize(u2).to(q1.device)
    sigma = torch.linalg.svdvals(q1.T @ q2)
    return torch.arccos(sigma.clamp(-1.0, 1.0))


def state_subspace(states: Tensor, energy: float | None = 0.9, k: int | None = None) -> Tensor:
    """``top_subspace(statesᵀ states, energy, k)`` from the SVD of ``states[n, d]``: the span has rank <= n, so
    the d x d Gram matrix and its eigendecomposition (seconds per layer at d = 4096) are not needed. Non-finite or
    all-zero states (a diverged run) have no subspace: ValueError, as for ``top_subspace``.

    Right singular vectors ``[d, r]`` (signs fixed): exactly ``k``, else the fewest whose squared singular
    values cover ``energy`` of the total (the slack ``top_subspace`` gives float64 sums, ``rounding_slack``)."""
    states = states.detach().double()
    if not torch.isfinite(states).all() or not states.any():
        raise ValueError("states hold NaN/Inf or only zeros: they span no subspace")
    _, sigma, vh = torch.linalg.svd(states, full_matrices=False)
    values = sigma.square()
    if k is None:
        if energy is None or not 0.0 < energy <= 1.0 or not values.sum() > 0:
            raise ValueError(f"need energy in (0, 1] and non-zero states, got energy={energy}")
        k = energy_rank(values, energy)
    if not 1 <= k <= len(values):
        raise ValueError(f"k must be in [1, {len(values)}] (the rank bound min(n, d)), got {k}")
    return _fix_signs(vh[:k].T)


def spread_subspace(states: Tensor, energy: float | None = None, k: int | None = None) -> Tensor | None:
    """The span of the states' variation around their mean (:func:`state_subspace` of the centred states), or None
    where they do not vary. Uncentred, the mean can carry nearly all the energy (98.6-100% of the last prompt
    position's in the miniature models), so a 90% subspace would be the mean direction alone, blind to how the
    prompts spread."""
    centred = states.double() - states.double().mean(0)
    return state_subspace(centred, energy=energy, k=k) if centred.any() else None


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same n inputs (Kornblith et al. 2019): 1 for identical
    ones, invariant to orthogonal transforms and isotropic scaling."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same rows: {x.shape[0]} vs {y.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    # ||yᵀx||² = <x xᵀ, y yᵀ>: the n x n forms, not d x d (134 MB each and ~100x slower at d = 4096)
    kx, ky = x @ x.T, y @ y.T
    return float((kx * ky).sum() / (torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)))


def kl_rows(log_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row, ``p`` given as float64 log-probabilities and ``q`` as logits over the last dim."""
    log_q = logits_q.double().log_softmax(-1)
    p = log_p.exp()  # a token both give probability 0 (-inf logits) adds 0, not 0 * (-inf - -inf)
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> float:
    """Mean over rows of KL(p ‖ q) between next-token distributions ``softmax(logits[..., V])``."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    vocab = logits_p.shape[-1]
    log_p = torch.log_softmax(logits_p.double().reshape(-1, vocab), dim=-1)
    return float(kl_rows(log_p, logits_q.reshape(-1, vocab)).mean())


def pca_2d(x: Tensor) -> Tensor:
    """Coordinates ``[n, 2]`` on the top two principal components, signs fixed for reproducible figures."""
    if x.ndim != 2 or min(x.shape) < 2:
        raise ValueError(f"pca_2d needs an [n, d] matrix with n, d >= 2, got {tuple(x.shape)}")
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ _fix_signs(vh[:2].T)

