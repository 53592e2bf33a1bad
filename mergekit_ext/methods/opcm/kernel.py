"""Orthogonal-projection continual merging (OPCM) and the continual baselines.

Tang et al., "Merging Models on the Fly Without Retraining: A Sequential
Approach to Scalable Continual Model Merging", arXiv 2501.09522 (NeurIPS 2025);
reference code FusionBench ``fusion_bench/method/opcm/``. docs/methods.md#opcm.

Models arrive one at a time. Each new task vector ``D = θt − θ0`` is projected
away from the dominant singular directions of the current merged task vector
``D̄`` and added to a running, unscaled accumulator ``acc``; the merged model is
``θ0 + acc · scale``. The projection depends only on the direction of ``D̄``, so
``acc`` is all a tensor needs to remember.

Kernels take tensors and return tensors (no file I/O; the declaration is ``method.py``). The same step functions
drive ``merge_method: opcm`` in mergekit-yaml (one tensor, all models, in
config order) and ``mergekit-ext continual`` (one model, all tensors, streamed),
so both compute the same accumulator.

Deviations from the reference code, on purpose:
* Only 2-D weights inside the repeated transformer blocks are projected
  (``tensors.is_block_matrix``); the reference projects every ``nn.Linear``,
  which in a causal LM also catches the LM head. Embeddings, heads, norms and
  biases are added unprojected (``D' = D``), as the reference does for
  non-Linear parameters.
* SVD runs in float32 (the reference uses the model dtype).
* The diagonal is zeroed only up to the numerical rank of ``D̄``. Past it the
  singular vectors are an arbitrary completion of the basis, so the reference
  removes components of ``D`` along directions that depend on the LAPACK
  driver, dtype and device (for a low-rank ``D̄``, e.g. merged LoRA fine-tunes,
  float32 and float64 SVDs then disagree by O(|D|)); those entries do not
  affect ``⟨D', D̄⟩``, which stays 0. Identical to the reference for a
  full-rank ``D̄``. A tensor whose merged task vector is exactly zero keeps its
  update whole.
* In mergekit-yaml the adaptive scale is per tensor (see ``opcm_merge``); the
  paper's single global scale is in ``mergekit-ext continual``.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import torch

from mergekit_ext.methods.opcm import (
    CONTINUAL_METHODS,
    DEFAULT_ALPHA,
    DEFAULT_COEFFICIENT,
    DEFAULT_DENSITY,
)
from mergekit_ext.tensors import all_singular_triplets, compute_dtype, ties_multitask_vector, truncated_svd

# --------------------------------------------------------------------------
# The projection step


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """First index where ``cumsum(s) / sum(s) > alpha`` (singular values, not squared).

    The top-left ``r × r`` block of the rotated task vector is removed; ``r`` is
    0 when the largest singular value alone carries more than ``alpha``.
    """
    total = singular_values.sum()
    if not total > 0:
        return 0
    exceeds = torch.cumsum(singular_values, dim=0) / total > alpha
    hits = torch.nonzero(exceeds)
    return int(hits[0]) if len(hits) else len(singular_values)


def project_task_vector(
    merged_delta: torch.Tensor,
    task_delta: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    zero_diagonal: bool = True,
    svd: str = "eigh",
) -> torch.Tensor:
    """``D'``: the part of ``D`` kept after projecting out ``D̄``'s dominant directions.

    With ``D̄ = U diag(s) Vᵀ`` (full SVD) and ``P = Uᵀ D V``, the paper zeroes the
    top-left ``r × r`` block of ``P`` (and, with ``zero_diagonal``, its whole
    diagonal) and rotates back. Only the first ``k = min(m, n)`` singular
    vectors ever touch the zeroed entries, so this subtracts the zeroed part
    with the thin SVD instead of building the full ``m × m`` and ``n × n``
    bases: ``D' = D − U_k (P_k ⊙ mask) V_kᵀ``, the same matrix. ``P`` itself is
    never formed: with ``E = D V`` (one GEMM), the block is ``U_rᵀ E_r`` and the
    diagonal ``Pii = uiᵀ ei``. ``svd``: ``eigh`` (``tensors.all_singular_triplets``,
    the default; agrees with LAPACK to the tolerance of tests/test_factorizations.py)
    or ``full`` (LAPACK, the reference). Returns the compute dtype (float32, or
    float64 for float64 inputs).
    """
    dtype = compute_dtype(task_delta)
    direction = merged_delta.to(dtype)
    update = task_delta.to(dtype)
    if direction.dim() != 2 or direction.shape != update.shape:
        raise ValueError(
            f"opcm: projection needs two matrices of one shape, got {tuple(direction.shape)} "
            f"and {tuple(update.shape)}"
        )
    k = min(direction.shape)
    if svd == "eigh":
        u, s, vh = all_singular_triplets(direction)
    elif svd == "full":
        u, s, vh = truncated_svd(direction, k, method="full")
    else:
        raise ValueError(f"opcm: unknown svd {svd!r}; expected 'eigh' or 'full'")
    if not s.sum() > 0:
        return update.clone()
    rank = split_rank(s, alpha)
    defined = 0
    if zero_diagonal:
        # Only where D̄ has a direction: past its numerical rank the singular
        # vectors are an arbitrary completion (LAPACK-, dtype- and device-
        # dependent), and those diagonal entries never touch ⟨D', D̄⟩. The
        # rank uses float32's epsilon: checkpoints carry no more precision.
        defined = int((s > s[0] * max(direction.shape) * torch.finfo(torch.float32).eps).sum())
    width = max(rank, defined)
    if width == 0:
        return update.clone()
    u, vh = u[:, :width], vh[:width]
    rotated_columns = update @ vh.mT  # E = D V: P = Uᵀ E
    # Diagonal entries Pii = ui · ei for rank ≤ i < defined; the r × r block below.
    scale = (u * rotated_columns).sum(dim=0)
    scale[:rank] = 0
    scale[defined:] = 0
    left = u * scale
    if rank:
        left[:, :rank] = u[:, :rank] @ (u[:, :rank].mT @ rotated_columns[:, :rank])
    del rotated_columns
    return update.sub_(left @ vh) if update is not task_delta else update - left @ vh


def opcm_step(
    accumulator: Optional[torch.Tensor],
    task_delta: torch.Tensor,
    *,
    project: bool,
    alpha: float = DEFAULT_ALPHA,
    zero_diagonal: bool = True,
) -> torch.Tensor:
    """``acc_t = acc_{t−1} + D'`` (``acc_1 = τ1``); ``project`` says whether this tensor is a matrix."""
    update = task_delta.to(compute_dtype(task_delta))
    if accumulator is None:
        return update.clone()
    if project:
        update = project_task_vector(accumulator, update, alpha=alpha, zero_diagonal=zero_diagonal)
    return accumulator.to(update.dtype) + update


# --------------------------------------------------------------------------
# mergekit-yaml: all models of one tensor, in config order


def opcm_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    project: bool,
    alpha: float = DEFAULT_ALPHA,
    zero_diagonal: bool = True,
    scaling: Literal["tensor", "none"] = "tensor",
) -> torch.Tensor:
    """OPCM of one tensor over ``models`` in the given order, in the base's dtype.

    ``scaling="tensor"`` rescales this tensor's merged task vector to the mean
    norm of the individual task vectors of this tensor (the paper does this
    once over the whole model, which a per-tensor kernel cannot see);
    ``scaling="none"`` returns ``θ0 + acc_T`` unscaled.
    One model gives that model exactly.
    """
    if not models:
        raise ValueError("opcm: needs at least one model besides the base")
    if len(models) == 1:
        return models[0].to(base.dtype).clone()
    dtype = compute_dtype(base)
    base_compute = base.to(dtype)
    accumulator = None
    norm_sum = 0.0
    for model in models:
        task_delta = model.to(dtype) - base_compute
        norm_sum += float(torch.linalg.vector_norm(task_delta))
        accumulator = opcm_step(
            accumulator, task_delta, project=project, alpha=alpha, zero_diagonal=zero_diagonal
        )
    if scaling == "tensor":
        accumulator_norm = float(torch.linalg.vector_norm(accumulator))
        if accumulator_norm > 0:
            accumulator = accumulator * (norm_sum / len(models) / accumulator_norm)
    return (base_compute + accumulator).to(base.dtype)


# --------------------------------------------------------------------------
# Continual merging: one model at a time over a whole checkpoint


@dataclass(frozen=True)
class ContinualOptions:
    """How a continual state merges; fixed when the state is created."""

    method: str = "opcm"
    alpha: float = DEFAULT_ALPHA
    zero_diagonal: bool = True
    coefficient: float = DEFAULT_COEFFICIENT
    density: float = DEFAULT_DENSITY

    def __post_init__(self):
        if self.method not in CONTINUAL_METHODS:
            raise ValueError(f"continual: unknown method {self.method!r}; choose from {', '.join(CONTINUAL_METHODS)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"continual: alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.density <= 1:
            raise ValueError(f"continual: density must be in (0, 1], got {self.density}")
        if not math.isfinite(self.coefficient):  # nan/inf would poison the state for every later add
            raise ValueError(f"continual: coefficient must be a finite number, got {self.coefficient}")

    def as_dict(self) -> dict:
        return asdict(self)


def continual_step(
    options: ContinualOptions,
    accumulator: Optional[torch.Tensor],
    task_delta: torch.Tensor,
    *,
    project: bool,
) -> torch.Tensor:
    """The next accumulator of one tensor (``accumulator`` is None for the first model).

    opcm:    acc_t = acc_{t−1} + D'                       (merged = θ0 + acc·mean‖τ‖/‖acc‖)
    ta:      acc_t = acc_{t−1} + τt                       (merged = θ0 + c·acc)
    average: acc_t = acc_{t−1} + τt                       (merged = θ0 + acc/t, the mean model)
    ties:    acc_t = acc_{t−1} + c·TIES(acc_{t−1}, τt),  acc_1 = c·τ1   (merged = θ0 + acc)
    The TIES recurrence is FusionBench's continual TIES; the top-``density``
    trim is per tensor (mergekit's convention), where FusionBench ranks over
    the whole flattened model.
    """
    method = options.method
    if method == "opcm":
        return opcm_step(
            accumulator, task_delta, project=project, alpha=options.alpha, zero_diagonal=options.zero_diagonal
        )
    update = task_delta.to(compute_dtype(task_delta))
    if method in ("ta", "average"):
        return update.clone() if accumulator is None else accumulator.to(update.dtype) + update
    # ties
    if accumulator is None:
        return options.coefficient * update
    accumulator = accumulator.to(update.dtype)
    elected = ties_multitask_vector(torch.stack([accumulator, update]), [options.density, options.density])
    return accumulator + options.coefficient * elected


def continual_scale(options: ContinualOptions, *, norms: Sequence[float], accumulator_norm: float) -> float:
    """The one global factor: merged = θ0 + scale · acc (``norms`` = ‖τi‖ of every model so far)."""
    method = options.method
    if method == "opcm":
        if not accumulator_norm > 0:
            return 1.0
        return (sum(norms) / len(norms)) / accumulator_norm
    if method == "ta":
        return options.coefficient
    if method == "average":
        return 1.0 / len(norms)
    return 1.0
