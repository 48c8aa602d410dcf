"""RefusalGuard core: activation statistics, protected subspaces, post-step constraints, drift metrics.

Pure torch (no Lightning): the callbacks build on these functions.
"""

from .basis import SafetyBasis
from .geometry import (
    cosine,
    fisher_ratio,
    kl_divergence,
    kl_rows,
    linear_cka,
    pca_2d,
    principal_angles,
    projection_gap,
    spread_subspace,
    state_subspace,
)
from .projection import (
    ConstraintSet,
    LinearConstraint,
    LoraConstraint,
    ParamFreeze,
    RowFreeze,
    build_constraints,
    interference,
    project_out,
    project_out_left,
)
from .statistics import GramAccumulator, MeanAccumulator, capture_linear_inputs
from .subspace import (
    basis_weights,
    centered_subspace,
    difference_in_means,
    orthonormalize,
    soft_subspace,
    top_subspace,
    unit,
)

__all__ = [
    "ConstraintSet",
    "GramAccumulator",
    "LinearConstraint",
    "LoraConstraint",
    "MeanAccumulator",
    "ParamFreeze",
    "RowFreeze",
    "SafetyBasis",
    "build_constraints",
    "capture_linear_inputs",
    "cosine",
    "difference_in_means",
    "fisher_ratio",
    "interference",
    "kl_divergence",
    "kl_rows",
    "linear_cka",
    "orthonormalize",
    "pca_2d",
    "principal_angles",
    "project_out",
    "project_out_left",
    "projection_gap",
    "spread_subspace",
    "state_subspace",
    "top_subspace",
    "soft_subspace",
    "basis_weights",
    "centered_subspace",
    "unit",
]
