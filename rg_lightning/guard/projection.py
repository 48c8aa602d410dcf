"""Parameter constraints applied *after* each optimizer step.

AdamW rescales gradients per coordinate, so a projected gradient does not give a projected update; the
constraint therefore acts on the parameters. For a linear ``W`` (out×in) with orthonormal protected
input basis ``U`` (in×k) we store the anchor ``A0 = W0·U`` and apply ``W ← W − s·(W·U − A0)·Uᵀ``:
with ``s = 1`` the layer's outputs on inputs in span(U) equal the initial ones exactly, the correction
never drifts (it is measured against the fixed anchor), and it costs out×k extra memory, not a copy of W.
Composed over all modules — linears, embedding rows of the protected tokens, norm weights — the whole
forward pass on protected prompts is unchanged, while everything orthogonal to U keeps learning.

A *weighted* basis (``subspace.soft_subspace``: orthogonal columns of norm ``sqrt(c_i)`` ≤ 1) makes the same
update a per-direction damping: the drift ``(W − W0)·u_i`` loses the share ``c_i`` at every step (``c_i = 1``:
held exactly). It is the proximal step of an activation-space penalty ``Σ_i c_i/(1−c_i)·‖(W − W0) u_i‖²``
and lets the directions below an energy cutoff be pulled back in proportion to their energy rather than
left free; the unit columns keep the exact guarantee.

``project_grads_`` removes the same parts from the *gradients* before the step. Exactness does not need
it (the post-step restore gives that), but the optimizer does: AdamW divides every coordinate by its own
running scale, so the gradient's part inside span(U) — large whenever the task's inputs resemble the
protected ones — is smeared by that division into the free directions (an update that serves no loss
term and changes the protected outputs through their energy outside U), and it inflates the scale that
divides the useful free-direction gradient. Measured on the miniature alt world (energy 0.99, seed 0):
post-step only 100% refusal kept but 21% task metric; with the gradients projected too 99% and 65.5%
(plain fine-tuning: 64.5%).
"""

from __future__ import annotations

import contextlib
import re
import sys

import torch
from torch import Tensor, nn

from .shards import local_rows, whole
from .statistics import _unknown_names_error
from .subspace import UNIT_WEIGHT, basis_weights, tail_gain

_PEFT_WRAPPERS = re.compile(
    r"^base_model\.model\.|\.base_layer\b|\.original_module\b|\.modules_to_save\.[^.]+"
)


def canonical_name(name: str) -> str:
    """Module name without PEFT wrapper parts, so bases captured on the plain model match a PEFT model."""
    return _PEFT_WRAPPERS.sub("", name)


def project_out(matrix: Tensor, basis: Tensor) -> Tensor:
    """``M − (M U) Uᵀ``: remove the part of ``M``'s rows inside span(U) (right projection)."""
    return matrix - (matrix @ basis) @ basis.T


def project_out_left(matrix: Tensor, basis: Tensor) -> Tensor:
    """``M − U (Uᵀ M)``: remove the part of ``M``'s columns inside span(U) (output side)."""
    return matrix - basis @ (basis.T @ matrix)


def subspace_energy(grad: Tensor, basis: Tensor) -> Tensor:
    """``[‖G U‖², ‖G‖²]`` in float64: a gradient's squared Frobenius norm inside the protected subspace, and
    in all. Both are sums over rows, so a rank holding some rows of ``G`` adds its part and a sum-reduce
    completes it."""
    g = grad.detach().double()
    inside = (g @ basis.detach().to(g.device, torch.float64)).square().sum()
    return torch.stack([inside, g.square().sum()])


def interference(grad: Tensor, basis: Tensor) -> float:
    """Share ``‖G U‖² / ‖G‖²`` of a gradient's squared Frobenius norm inside the protected subspace."""
    inside, total = subspace_energy(grad, basis)
    return float(inside / total) if total > 0 else 0.0


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


class _Constraint:
    """Common bookkeeping: the parameter is looked up on its module at every use (robust to re-wrapping);
    the stored tensors named in ``_state`` are what a checkpoint must restore exactly."""

    kind = ""
    _state: tuple[str, ...] = ()

    def __init__(self, name: str, module: nn.Module, attr: str = "weight") -> None:
        self.name, self.module, self.attr = name, module, attr

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self._state if getattr(self, k) is not None}

    # A damped part (pull-back shares c < 1: a weighted basis's tail, weighted rows) pulls back at ``scale`` times
    # its built rate through a per-entry gain (``tail_gain``), recomputed only when the scale changes.
    _tail_gain: Tensor | None = None
    _tail_scale = 1.0

    @property
    def has_tail(self) -> bool:
        return False

    def _tail_weights(self) -> Tensor:
        """The pull-back shares ``c`` the gain rescales (only called when ``has_tail``)."""
        raise NotImplementedError

    def scale_tail(self, scale: float) -> None:
        """Pull the damped part back at ``scale`` times the rate it was built with (1: as built). Called every
        step; the gain is recomputed only when the scale changes (a schedule moved the lr)."""
        if scale == self._tail_scale:
            return
        self._tail_scale = scale
        self._tail_gain = None if scale == 1.0 or not self.has_tail else tail_gain(self._tail_weights(), scale)

    def _rescale_tail(self) -> None:
        """The current scale's gain for new shares (a restored state)."""
        scale, self._tail_scale, self._tail_gain = self._tail_scale, 1.0, None
        self.scale_tail(scale)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        mine = self.state_dict()
        if set(state) != set(mine):
            raise ValueError(f"{self.key}: expected tensors {sorted(mine)}, got {sorted(state)}")
        for k, current in mine.items():
            if state[k].shape != current.shape:
                raise ValueError(f"{self.key}.{k}: shape {tuple(state[k].shape)} != {tuple(current.shape)}")
            setattr(self, k, state[k].to(current.device, current.dtype))


def _checked_basis(name: str, basis: Tensor, dim: int, what: str, device) -> Tensor:
    if basis.ndim != 2 or basis.shape[0] != dim:
        raise ValueError(f"{name}: basis has shape {tuple(basis.shape)} but the module has {dim} {what}")
    b = basis.detach().double()
    if not torch.isfinite(b).all():
        raise ValueError(f"{name}: basis contains NaN or Inf")
    gram = b.T @ b
    norms = torch.diagonal(gram)
    if (_max_abs(gram - torch.diag(norms)) > 1e-4 or _max_abs(norms.clamp_max(1.0) - norms) > 1e-4
            or bool((norms <= 0).any())):
        raise ValueError(f"{name}: basis columns are not orthonormal (or orthogonal with norms in (0, 1], a "
                         "weighted basis); use orthonormalize(), top_subspace() or soft_subspace()")
    return basis.detach().to(device=device, dtype=torch.float32)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Half-precision tensors are corrected in their own dtype (tensor cores), float64 ones in float64 (a float32
    round trip would round every entry, free directions included), everything else in float32."""
    return t.dtype if t.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


def _in_compute_dtype(t: Tensor) -> Tensor:
    """``t`` itself when it is already in its compute dtype (corrected in place), else a float32 copy."""
    return t if t.dtype == _compute_dtype(t) else t.float()


class LinearConstraint(_Constraint):
    """Keep ``W·U`` (side='right', U spans inputs) or ``Uᵀ·W`` (side='left', U spans outputs) at its
    initial value; the bias is restored (policy: a bias shifts every output, protected ones included).

    For an ``nn.Embedding`` weight (num×dim) side='right' protects what it writes into the residual.
    float16/bfloat16 weights (``precision: bf16-true``) are corrected with products in their own dtype and
    the error against the float32 anchor taken in float32: they hold the anchor up to their own rounding,
    and the correction runs on tensor cores instead of as float32 products on a float32 copy of ``W``.
    float64 weights are corrected in float64, all others in float32.
    """

    _state = ("basis", "anchor", "bias")

    def __init__(
        self, name: str, module: nn.Module, basis: Tensor, *, side: str = "right", keep_bias: bool = True
    ) -> None:
        super().__init__(name, module)
        if side not in ("right", "left"):
            raise ValueError(f"{name}: side must be 'right' or 'left', got {side!r}")
        self.side = side
        self.kind = f"linear.{side}"
        w = self.param
        dim, what = (w.shape[1], "input features") if side == "right" else (w.shape[0], "output features")
        self.basis = _checked_basis(name, basis, dim, what, w.device)
        self.anchor = self._product(whole(w.detach()))
        bias = getattr(module, "bias", None) if keep_bias else None
        self.bias = whole(bias.detach()).clone() if isinstance(bias, Tensor) and bias.requires_grad else None

    def _of_basis(self) -> tuple[Tensor, Tensor]:
        """The basis's column weights ``c_i`` and its unit columns (weight 1; the basis itself when all are),
        cached while the basis is the same tensor."""
        cached = getattr(self, "_basis_cache", None)
        if cached is None or cached[0] is not self.basis:
            weights = basis_weights(self.basis).clamp_max(1.0).float()
            unit = weights > UNIT_WEIGHT
            exact = self.basis if bool(unit.all()) else self.basis[:, unit]
            self._basis_cache = cached = (self.basis, weights, exact)
        return cached[1], cached[2]

    @property
    def _exact(self) -> Tensor:
        """The unit columns of the basis (all of them unless it is weighted, see ``soft_subspace``)."""
        return self._of_basis()[1]

    @property
    def has_tail(self) -> bool:
        return self._exact.shape[1] < self.basis.shape[1]

    def _tail_weights(self) -> Tensor:
        return self._of_basis()[0]

    def _damped(self, err: Tensor, columns_last: bool = True) -> Tensor:
        """``err`` (one entry per basis column, along its last or first dim) times the tail gain, if any."""
        if self._tail_gain is None:
            return err
        return err.mul_((self._tail_gain if columns_last else self._tail_gain[:, None]).to(err.dtype))

    def describe(self) -> str:
        kept = ", bias kept" if self.bias is not None else ""
        soft = self.basis.shape[1] - self._exact.shape[1]
        damped = f" (+{soft} damped)" if soft else ""
        return f"k={self._exact.shape[1]}{damped} of {self.basis.shape[0]}{kept}"

    def _product(self, w: Tensor) -> Tensor:
        """``W·U`` (resp. ``Uᵀ·W``) in float32 (float64 for float64 weights), from products in ``W``'s compute
        dtype."""
        wc, basis = _in_compute_dtype(w), self.basis.to(_compute_dtype(w))
        product = wc @ basis if self.side == "right" else basis.T @ wc
        return product if product.dtype == torch.float64 else product.float()

    @property
    def anchor_dtype(self) -> torch.dtype:
        return torch.float64 if self.param.dtype == torch.float64 else torch.float32

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore; the basis is checked like a new one, and a damped tail's gain follows the restored weights."""
        super().load_state_dict(state)
        self.basis = _checked_basis(self.name, self.basis, self.basis.shape[0], "rows", self.basis.device)
        self._rescale_tail()

    def anchor_error(self) -> float:
        """Largest |W·U − A0| entry: 0 when the protected response is exactly the initial one."""
        err = self._product(whole(self.param.detach()))
        if self.anchor is not None:
            err -= self.anchor
        return _max_abs(err)

    @torch.no_grad()
    def apply_(self, strength: float = 1.0, weight: bool = True, bias: bool = True) -> None:
        """Correct the weight and restore the bias (``weight``/``bias``: only those parts, when two optimizers step
        them)."""
        if weight:
            self._apply_weight(strength)
        if bias and self.bias is not None:
            local, start = local_rows(self.module.bias.data)
            local.lerp_(self.bias[start:start + local.shape[0]], strength)

    def _apply_weight(self, strength: float) -> None:
        w, start = local_rows(self.param.data)
        basis = self.basis.to(_compute_dtype(w))
        if self.side == "right":  # row by row: a rank holding some rows of W corrects just those
            wc = _in_compute_dtype(w)  # the parameter itself unless it needs a float32 copy
            err = (wc @ basis).to(self.anchor_dtype)
            if self.anchor is not None:
                err -= self.anchor[start:start + w.shape[0]]
            wc.addmm_(self._damped(err).to(wc.dtype), basis.T, alpha=-strength)
        else:  # Uᵀ·W mixes rows: work on the whole matrix, keep this rank's rows
            full = _in_compute_dtype(whole(self.param.data))
            err = (basis.T @ full).to(self.anchor_dtype)
            if self.anchor is not None:
                err -= self.anchor
            wc = full.addmm(basis, self._damped(err, columns_last=False).to(full.dtype),
                            alpha=-strength)[start:start + w.shape[0]]
        if wc is not w:
            w.copy_(wc)

    @torch.no_grad()
    def project_grad_(self, strength: float = 1.0, weight: bool = True, bias: bool = True) -> None:
        """Remove the gradient's part that the constraint would undo (``G U Uᵀ``, resp. ``U Uᵀ G``)."""
        grad = self.param.grad
        if grad is not None and weight:
            g, start = local_rows(grad)
            rows = None
            if self.side == "left" and g is not grad:  # Uᵀ·G mixes rows: project the whole gradient
                rows, g = slice(start, start + g.shape[0]), whole(grad)
            gc = _in_compute_dtype(g)
            # Twice ("twice is enough" re-orthogonalisation): one float32 pass leaves a rounding residue of
            # ~1e-7·|G| inside span(U) and the second removes most of what the first left, but the stored float32
            # gradient keeps a residue of that order either way (measured: 7e-7 against 1e-6 of |G|, and
            # the same free-direction drift under AdamW with one or two passes). Kept because the committed
            # results were measured with both passes.
            # A weighted basis (soft_subspace) damps its tail columns by c_i < 1 once; only its unit columns
            # get the second, clean-up pass (a second pass would damp the tail by 1 - (1 - c_i)^2).
            # A half-precision gradient gets one pass: storing it rounds it to ~4e-3·|G| anyway.
            clean_up = strength == 1.0 and self._exact.shape[1] and gc.dtype == torch.float32
            for i, basis in enumerate([self.basis] + ([self._exact] if clean_up else [])):
                basis = basis.to(gc.dtype)
                if self.side == "right":
                    inside = gc @ basis
                    gc.addmm_(self._damped(inside) if i == 0 else inside, basis.T, alpha=-strength)
                else:
                    inside = basis.T @ gc
                    gc.addmm_(basis, self._damped(inside, columns_last=False) if i == 0 else inside,
                              alpha=-strength)
            if rows is not None:
                local_rows(grad)[0].copy_(gc[rows])
            elif gc is not g:
                g.copy_(gc)
        if bias and self.bias is not None and self.module.bias.grad is not None:
            local_rows(self.module.bias.grad)[0].mul_(1.0 - strength)


class LoraConstraint(LinearConstraint):
    """LoRA ``W_eff = W + scale·B·A``: keep ``A·U = 0`` (side='right') or ``Uᵀ·B = 0`` (side='left').

    Then ``ΔW_eff·U = scale·B·A·U = 0`` for any B (resp. Uᵀ·ΔW_eff = 0 for any A). The target is zero,
    so no anchor is stored; the matrix is projected once at construction (with ``strength``) so the
    property holds from step 0: for an adapter whose B does not start at zero it hides ``B0·A0`` on the protected
    inputs, which restores the model the bases were measured on only if they were measured without the adapter
    (``build_constraints(measured_with_adapters=True)`` refuses such adapters).
    """

    _state = ("basis",)

    def __init__(
        self, name: str, module: nn.Linear, basis: Tensor, *, side: str = "right", strength: float = 1.0,
        project_now: bool = True,
    ) -> None:
        super().__init__(name, module, basis, side=side, keep_bias=False)
        self.kind = f"lora.{side}"
        self.anchor = None
        if project_now:  # not when resuming: the restored adapters already are what the guarded steps left
            self.apply_(strength)

    @property
    def _spans_everything(self) -> bool:
        """Unit columns spanning the whole space: ``A·U = 0`` (resp. ``Uᵀ·B = 0``) then means the matrix is 0."""
        return self._exact.shape[1] == self.basis.shape[0]

    @torch.no_grad()
    def apply_(self, strength: float = 1.0) -> None:
        # Exactly zero rather than projected: the projection leaves a ~1e-17 residue, which makes the other
        # factor's gradient pure rounding noise that AdamW scales up to full-size steps.
        if strength == 1.0 and self._spans_everything:
            local_rows(self.param.data)[0].zero_()
        else:
            super().apply_(strength)

    @torch.no_grad()
    def project_grad_(self, strength: float = 1.0) -> None:
        if strength == 1.0 and self._spans_everything:
            if self.param.grad is not None:
                local_rows(self.param.grad)[0].zero_()
        else:
            super().project_grad_(strength)


class RowFreeze(_Constraint):
    """Restore the embedding rows of protected token ids (the only rows protected prompts read).

    ``weights`` (one per id, in [0, 1]; see :func:`~rg_lightning.guard.subspace.row_weights`): each row's drift
    loses the share ``c_r`` at every step, as a weighted basis's tail columns do in :class:`LinearConstraint`
    (1: held exactly, the default; rows of weight 0 are left free). Rarely read rows then follow the task
    within a drift bounded by how often protected prompts read them.
    """

    kind = "rows"
    _state = ("ids", "rows", "weights")

    def __init__(self, name: str, module: nn.Module, ids: Tensor, weights: Tensor | None = None):
        super().__init__(name, module)
        w = self.param
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim != 1:
            raise ValueError(f"{name}: protected token ids must be a 1-D integer tensor, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)} (a [vocab] bool mask? pass mask.nonzero().flatten())")
        ids = ids.detach().to(device=w.device, dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= w.shape[0]):
            raise ValueError(
                f"{name}: protected token ids must be in [0, {w.shape[0]}), got {int(ids.min())}..{int(ids.max())}"
            )
        if weights is not None:
            weights = _checked_row_weights(name, weights, ids)
            ids, order = torch.sort(ids)
            weights = weights.to(w.device)[order]
            held = weights > 0  # weight 0: left free
            ids, weights = ids[held], weights[held].masked_fill(weights[held] > UNIT_WEIGHT, 1.0)
            weights = None if bool((weights == 1.0).all()) else weights
        else:
            ids = torch.unique(ids)
        self.ids, self.weights = ids, weights
        self.rows = whole(w.detach())[ids].clone()

    def describe(self) -> str:
        if self.weights is None:
            return f"{self.ids.numel()} rows"
        exact = int((self.weights > UNIT_WEIGHT).sum())
        return f"{exact} rows (+{self.ids.numel() - exact} damped)"

    @property
    def has_tail(self) -> bool:
        return self.weights is not None

    def _tail_weights(self) -> Tensor:
        return self.weights

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._rescale_tail()

    def _shares(self, strength: float, mine: Tensor) -> Tensor | float:
        """Each held row's pull-back share this step: ``strength`` times its weight (and tail gain)."""
        if self.weights is None:
            return float(strength)
        weights = self.weights[mine] if self._tail_gain is None else (self.weights * self._tail_gain)[mine]
        return (strength * weights)[:, None]

    def _held(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's rows of ``t``, the protected ids among them (local indices) and their positions in ``ids``."""
        local, start = local_rows(t)
        mine = (self.ids >= start) & (self.ids < start + local.shape[0])
        return local, self.ids[mine] - start, mine

    @torch.no_grad()
    def apply_(self, strength: float = 1.0) -> None:
        w, ids, mine = self._held(self.param.data)
        shares = self._shares(strength, mine)
        if isinstance(shares, Tensor):
            shares = shares.to(w.dtype)
        w.index_copy_(0, ids, torch.lerp(w[ids], self.rows[mine], shares))

    @torch.no_grad()
    def project_grad_(self, strength: float = 1.0) -> None:
        if self.param.grad is not None:
            g, ids, mine = self._held(self.param.grad)
            shares = self._shares(strength, mine)
            g.index_copy_(0, ids, g[ids] * (1.0 - (shares.to(g.dtype) if isinstance(shares, Tensor) else shares)))


def _checked_row_weights(name: str, weights: Tensor, ids: Tensor) -> Tensor:
    """Row weights as float32 in [0, 1], one per id; ids must then be distinct (a weight belongs to one row)."""
    if weights.ndim != 1 or not weights.is_floating_point() or weights.shape != ids.shape:
        raise ValueError(f"{name}: row weights must be a 1-D float tensor with one weight per protected token id "
                         f"({tuple(ids.shape)}), got {weights.dtype} of shape {tuple(weights.shape)}")
    weights = weights.detach().float()
    if not torch.isfinite(weights).all() or bool(((weights < 0) | (weights > 1)).any()):
        raise ValueError(f"{name}: row weights must be in [0, 1]")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{name}: protected token ids must be distinct when they carry row weights")
    return weights


class ParamFreeze(_Constraint):
    """Restore a whole parameter (norm weights, stray biases): these scale every protected activation."""

    kind = "param"
    _state = ("value",)

    def __init__(self, name: str, module: nn.Module, attr: str):
        super().__init__(name, module, attr)
        self.value = whole(self.param.detach()).clone()

    def describe(self) -> str:
        return f"{self.value.numel()} values"

    @torch.no_grad()
    def apply_(self, strength: float = 1.0) -> None:
        local, start = local_rows(self.param.data)
        local.lerp_(self.value[start:start + local.shape[0]], strength)

    @torch.no_grad()
    def project_grad_(self, strength: float = 1.0) -> None:
        if self.param.grad is not None:
            local_rows(self.param.grad)[0].mul_(1.0 - strength)


def batch_token_mask(input_ids: Tensor, vocab_size: int, mask: Tensor | None = None) -> Tensor:
    """Boolean ``[vocab_size]`` mask of the token ids in ``input_ids``, OR-ed into ``mask`` when given
    (micro-batches accumulated into one optimizer step)."""
    ids = input_ids.detach().reshape(-1).long()
    if ids.numel():
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync, not two
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got {low}..{high}")
    if mask is None:
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
    mask[ids.to(mask.device)] = True
    return mask


@torch.no_grad()
def hold_absent_rows_(embedding: nn.Parameter, present: Tensor) -> None:
    """Zero the gradient rows of the tokens not in ``present`` (a ``[vocab]`` bool mask), so the step moves
    only the rows of tokens its batch contains. Why: with a tied head the output softmax sends a gradient to
    every row, AdamW normalises it to a full-size step, and words the task never uses drift in meaning
    (see the held-out Gemma-3 world in experiments/results/README.md). A rank holding some rows zeroes
    those."""
    if embedding.grad is None:
        return
    grad, start = local_rows(embedding.grad)
    absent = ~present[start:start + grad.shape[0]].to(grad.device)
    grad[absent] = 0


@contextlib.contextmanager
def _without_autocast():
    """The corrections choose their own dtypes: an optimizer stepped inside ``training_step`` (manual optimization
    under ``bf16-mixed``) runs in autocast, which would make their products bfloat16 (inexact, or a dtype clash)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


class ConstraintSet:
    """All constraints of a model, applied in a safe order: matrix constraints, then embedding rows
    (so a tied lm_head/embedding satisfies both), then whole-parameter freezes."""

    def __init__(
        self, constraints: list, skipped: list[tuple[str, str]], uncovered: list[str], strength: float
    ) -> None:
        order = {RowFreeze: 1, ParamFreeze: 2}
        self.constraints = sorted(constraints, key=lambda c: order.get(type(c), 0))  # stable: model order
        self.skipped, self.uncovered, self.strength = skipped, uncovered, strength
        self._selections: dict[int, tuple[list, list]] = {}
        keys = [c.key for c in self.constraints]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate constraints: {sorted({k for k in keys if keys.count(k) > 1})}")
        # two matrix constraints of one side on one weight (a tied head and embedding) would undo each other:
        # their bases must be merged into one constraint first
        sides: dict[tuple[int, str], str] = {}
        for c in self.constraints:
            if isinstance(c, LinearConstraint):
                other = sides.setdefault((id(c.param), c.side), c.name)
                if other != c.name:
                    raise ValueError(f"{other} and {c.name} share one weight and both constrain its {c.side} side; "
                                     "merge their bases into one (the second would undo the first)")

    def _selected(self, params) -> list[tuple]:
        """``(constraint, weight, bias)`` for the constraints on ``params`` (a list of parameters, e.g. one
        optimizer's), in order, with which of their parts it holds (a linear's kept bias may be another optimizer's);
        every constraint whole when None. Worked out once per list object (called every step with the same one)."""
        cached = self._selections.get(id(params))
        if cached is None or cached[0] is not params:
            ids = None if params is None else {id(p) for p in params}
            chosen = []
            for c in self.constraints:
                kept_bias = isinstance(c, LinearConstraint) and c.bias is not None
                weight = ids is None or id(c.param) in ids
                bias = ids is None or not kept_bias or id(c.module.bias) in ids
                if weight or (kept_bias and bias):
                    chosen.append((c, weight, bias))
            cached = self._selections[id(params)] = (params, chosen)
        return cached[1]

    @torch.no_grad()
    def apply_(self, strength: float | None = None, params=None) -> None:
        """Put the protected responses back (all constraints, or those on ``params``: the parameters one optimizer
        just stepped, so a second optimizer's step does not pull a damped tail or ``strength`` < 1 back twice)."""
        s = self.strength if strength is None else strength
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {s}")
        with _without_autocast():
            for c, weight, bias in self._selected(params):
                if weight and bias:
                    c.apply_(s)
                else:  # a linear whose weight and bias two optimizers step
                    c.apply_(s, weight=weight, bias=bias)

    @torch.no_grad()
    def project_grads_(self, strength: float | None = None, params=None) -> None:
        """Before the optimizer step: drop the gradient parts the constraints would undo (see the module
        docstring); same order as :meth:`apply_`, so a tied lm_head/embedding gradient satisfies both."""
        s = self.strength if strength is None else strength
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {s}")
        with _without_autocast():
            for c, weight, bias in self._selected(params):
                if weight and bias:
                    c.project_grad_(s)
                else:
                    c.project_grad_(s, weight=weight, bias=bias)

    def _tails(self) -> list[_Constraint]:
        """Constraints with a damped part: weighted linear bases and weighted embedding rows."""
        return [c for c in self.constraints if c.has_tail]

    @property
    def has_tail(self) -> bool:
        """Whether any constraint carries a damped tail (a basis built with ``ridge`` > 0, or damped rows)."""
        return bool(self._tails())

    def scale_tails(self, scale_of) -> None:
        """Give every damped tail the pull-back rate ``scale_of(parameter)`` times the one it was built with
        (see :func:`~rg_lightning.guard.subspace.tail_gain`); constraints without a tail are untouched."""
        for c in self._tails():
            c.scale_tail(scale_of(c.param))

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {c.key: c.state_dict() for c in self.constraints}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        mine = {c.key: c for c in self.constraints}
        if set(state) != set(mine):
            missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise ValueError(f"constraint set mismatch: missing {missing}, unexpected {extra}")
        for key, c in mine.items():
            c.load_state_dict(state[key])

    def held_whole(self) -> list[str]:
        """Modules whose every input direction is held exactly: they cannot learn at all."""
        return [c.name for c in self.constraints if isinstance(c, LinearConstraint) and c.side == "right"
                and c._exact.shape[1] == c.basis.shape[0]]

    def extra_memory_bytes(self) -> int:
        """Bytes held by the stored tensors, counting a basis shared by several modules once."""
        storages = {}
        for c in self.constraints:
            for t in c.state_dict().values():
                storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def report(self) -> str:
        lines = [f"{c.kind:<12} {c.name}: {c.describe()}" for c in self.constraints]
        lines += [f"skipped      {name}: {reason}" for name, reason in self.skipped]
        lines += [f"UNCOVERED    {name}: trainable, no constraint" for name in self.uncovered]
        lines.append(
            f"{len(self.constraints)} constraints, {self.extra_memory_bytes()} extra bytes, s={self.strength}"
        )
        return "\n".join(lines)


def lora_layer_types() -> tuple[type, ...]:
    """peft's LoraLayer while peft is loaded, else no type (for ``isinstance``): only peft builds LoRA layers, and
    importing it to find none would load bitsandbytes, which prints a notice about its CPU kernels on every run."""
    if "peft" not in sys.modules:
        return ()
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # PEFT init_lora_weights values (prefixes)


def _check_lora_init(name: str, adapter: str, init) -> None:
    """PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA start the base at ``W0 − B0·A0``: ``A·U = 0`` would then hold
    ``W_res·U``, not the aligned ``W0·U``. Inits that leave the base as it is are fine when ``B0·A0`` = 0
    (:func:`_check_adapter_hidden`)."""
    if not (isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)):
        return
    raise ValueError(f"{name} (adapter {adapter!r}): LoRA init {init!r} rewrites the base weight, so RefusalGuard "
                     "cannot hold the aligned outputs; use init_lora_weights=True (the default) or 'gaussian'.")


def _check_adapter_hidden(name: str, adapter: str, a: Tensor, b: Tensor, basis: Tensor, side: str) -> None:
    """The basis is measured on the model as it is, adapter included; ``A·U = 0`` (resp. ``Uᵀ·B = 0``) would remove
    a non-zero ``B0·A0·U`` from the protected outputs instead of holding them. A guarded adapter's rounding residue
    (~1e-7 of the product's scale) is not refused."""
    a, b = whole(a.detach()).double(), whole(b.detach()).double()
    basis = basis.double().to(a.device)
    seen = b @ (a @ basis) if side == "right" else (basis.T @ b) @ a
    scale = float(torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(basis))
    if float(torch.linalg.matrix_norm(seen)) > 1e-4 * scale:
        raise ValueError(
            f"{name} (adapter {adapter!r}): the adapter already changes this layer's output on the protected prompts "
            "(B·A ≠ 0 on their inputs), and the guard holds them through A·U = 0 (resp. Uᵀ·B = 0), which would "
            "remove that change instead of keeping it. Merge it into the base first (peft's merge_and_unload(), then "
            "a fresh adapter), or start from an adapter with B = 0 (PEFT's default init); to go on with a guarded "
            "fit, resume from its checkpoint.")


FROZEN_ADAPTER = "frozen adapter"  # the reason a LoRA adapter that does not train is skipped


def frozen_adapter_keys(constraints: ConstraintSet, keys) -> list[str]:
    """Those of ``keys`` (constraint state keys) that are of an adapter ``constraints`` skipped as frozen: earlier
    versions constrained inactive adapters too, so their checkpoints hold such states."""
    frozen = [name.rsplit(".", 1) for name, reason in constraints.skipped if reason == FROZEN_ADAPTER]
    names = {f"{module}.{part}.{adapter}" for module, adapter in frozen for part in ("lora_A", "lora_B")}
    return [key for key in keys if key.partition(":")[2] in names]  # a key is "<kind>:<constraint name>"


def build_constraints(
    model: nn.Module,
    bases: dict[str, Tensor],
    *,
    output_bases: dict[str, Tensor] | None = None,
    protected_token_ids: Tensor | None = None,
    protected_token_weights: Tensor | None = None,
    strength: float = 1.0,
    freeze_norms: bool = True,
    project_lora: bool = True,
    measured_with_adapters: bool = False,
) -> ConstraintSet:
    """Constrain every trainable parameter that protected prompts read.

    ``bases``: module name -> orthonormal basis of its protected *inputs* (nn.Linear or PEFT LoRA layer;
    PEFT prefixes ``base_model.model.`` / ``.base_layer`` are ignored when matching).
    ``output_bases``: module name -> basis in the space the module *writes* (directions mode; linears,
    LoRA layers and embeddings). ``protected_token_ids``: rows of the input token embedding to keep; any other
    trainable nn.Embedding (positions, a vision tower's) is held whole. ``protected_token_weights``: the rows'
    pull-back weights (one per id, :class:`RowFreeze`; None: every row exact). ``freeze_norms``: restore every other
    trainable 1-D parameter (norm weights, biases). ``project_lora``: project LoRA matrices onto their constraint now
    (a new fit; not when the constraints' state is about to be restored). ``measured_with_adapters``: the bases were
    measured on this model with its LoRA adapters in place (as RefusalDirections does at fit start), so an
    adapter that already changes the protected outputs is refused: projecting it would remove that change, not
    hold it (measured without the adapters, the projection restores what was measured). Frozen weights,
    frozen or inactive adapters and bitsandbytes-quantized weights are skipped and reported; trainable
    parameters left without any constraint are listed in ``.uncovered``.
    """
    output_bases = output_bases or {}
    lora_type = lora_layer_types()
    named = list(model.named_modules())
    readers = {canonical_name(n) for n, m in named if isinstance(m, (nn.Linear, lora_type))}
    writers = readers | {canonical_name(n) for n, m in named if isinstance(m, nn.Embedding)}
    for given, known, what in ((bases, readers, "linear/LoRA"), (output_bases, writers, "output")):
        unknown = [n for n in given if canonical_name(n) not in known]
        if unknown:
            raise _unknown_names_error(unknown, sorted(known), what)
    bases = {canonical_name(n): b for n, b in bases.items()}
    output_bases = {canonical_name(n): b for n, b in output_bases.items()}

    constraints, skipped, covered, lora_parts = [], [], set(), set()
    converted: dict[tuple, Tensor] = {}

    def basis_for(table: dict[str, Tensor], key: str, param: Tensor) -> Tensor | None:
        """One float32 copy per basis and device, shared by modules reading the same input (q/k/v)."""
        if key not in table:
            return None
        cache_key = (id(table[key]), str(param.device))
        if cache_key not in converted:
            converted[cache_key] = table[key].detach().to(device=param.device, dtype=torch.float32)
        return converted[cache_key]

    peft_configs = getattr(model, "peft_config", None) or {}
    try:
        token_embedding = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):  # a bare module: every embedding is taken as token-indexed
        token_embedding = None
    for name, m in named:
        key = canonical_name(name)
        wants = key in bases or key in output_bases
        if isinstance(m, lora_type):
            for adapter, a in m.lora_A.items():
                _check_lora_init(name, adapter, getattr(peft_configs.get(adapter), "init_lora_weights", True))
                b = m.lora_B[adapter]
                lora_parts.update((id(a), id(b)))
                if not (a.weight.requires_grad or b.weight.requires_grad):
                    # an inactive or frozen adapter (a reference, an earlier task's) does not change in this fit:
                    # nothing to hold, and rewriting it would change the model instead of keeping it
                    if wants:
                        skipped.append((f"{name}.{adapter}", FROZEN_ADAPTER))
                    continue
                if not wants:
                    if a.weight.requires_grad:
                        skipped.append((f"{name}.lora_A.{adapter}", "no basis given"))
                elif getattr(m, "lora_variant", {}).get(adapter) is not None or m.use_dora.get(adapter):
                    skipped.append((name, "LoRA variant (e.g. DoRA) rescales the weight: not exact"))
                elif not isinstance(a, nn.Linear):
                    skipped.append((name, f"LoRA on {type(a).__name__} is not supported"))
                else:
                    for part, side, basis in (("lora_A", "right", basis_for(bases, key, a.weight)),
                                              ("lora_B", "left", basis_for(output_bases, key, b.weight))):
                        if basis is not None:
                            if project_lora and measured_with_adapters:
                                _check_adapter_hidden(name, adapter, a.weight, b.weight, basis, side)
                            module = a if part == "lora_A" else b
                            constraints.append(LoraConstraint(
                                f"{name}.{part}.{adapter}", module, basis, side=side, strength=strength,
                                project_now=project_lora))
                    covered.update((id(a.weight), id(b.weight)))
        elif isinstance(m, nn.Linear) and id(m) not in lora_parts:
            quantized = type(m).__module__.startswith("bitsandbytes")
            if quantized or not m.weight.requires_grad:
                if wants:
                    skipped.append((name, "quantized (bitsandbytes)" if quantized else "frozen weight"))
                continue
            if not wants:
                skipped.append((name, "no basis given"))
                continue
            reads, writes = basis_for(bases, key, m.weight), basis_for(output_bases, key, m.weight)
            if reads is not None:
                constraints.append(LinearConstraint(name, m, reads, side="right"))
            if writes is not None:
                constraints.append(LinearConstraint(name, m, writes, side="left", keep_bias=reads is None))
            covered.update(id(p) for p in (m.weight, m.bias) if p is not None)
        elif isinstance(m, nn.Embedding) and m.weight.requires_grad:
            if token_embedding is not None and m.weight is not token_embedding:
                # indexed by something other than token ids (a vision tower's patch positions, learned positions):
                # protected token ids say nothing about which rows protected prompts read, so it is held whole
                constraints.append(ParamFreeze(name, m, "weight"))
                covered.add(id(m.weight))
                continue
            writes = basis_for(output_bases, key, m.weight)
            if writes is not None:
                constraints.append(LinearConstraint(name, m, writes, side="right", keep_bias=False))
            if protected_token_ids is not None:
                constraints.append(RowFreeze(name, m, protected_token_ids, protected_token_weights))
            if writes is not None or protected_token_ids is not None:
                covered.add(id(m.weight))

    uncovered = []
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in covered:
            continue
        if freeze_norms and p.ndim == 1:
            module_name, _, attr = pname.rpartition(".")
            constraints.append(ParamFreeze(pname, model.get_submodule(module_name), attr))
        else:
            uncovered.append(pname)
    return ConstraintSet(constraints, skipped, uncovered, strength)
