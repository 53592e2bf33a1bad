"""The part TSV-M, Iso-C and Iso-CTS share: merge in the subspace of the stacked task vectors.

``subspace_merge`` applies a family's update to the weighted task vectors of a
matrix (their mean elsewhere); ``orthogonalized_stack_kept`` and
``polar_factor`` orthogonalize stacked singular vectors. The factorizations
themselves live in ``mergekit_ext.tensors``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from mergekit_ext import tensors
from mergekit_ext.tensors import compute_dtype, singular_value_tolerance, task_vectors


def polar_factor(matrix: torch.Tensor, *, method: str = "eigh") -> torch.Tensor:
    """``P Qᵀ`` from the thin SVD ``matrix = P S Qᵀ`` (orthogonal Procrustes, not QR), compute dtype.

    For a matrix of full rank this is its unique polar factor. Directions whose
    singular value is numerically zero (``singular_value_tolerance``) are left
    out, because their singular vectors are arbitrary: a rank-deficient matrix
    gives the partial isometry on its range, and a zero matrix gives zeros.
    ``method``: ``eigh`` (``all_singular_triplets``, the default) or ``full``
    (LAPACK's SVD, the reference).
    """
    dtype = compute_dtype(matrix)
    matrix = matrix.to(dtype)
    if method == "eigh":
        u, s, vh = tensors.all_singular_triplets(matrix)  # looked up on the module: tests swap in LAPACK
        kept = int((s > 0).sum())  # all_singular_triplets zeroes σ at or below the tolerance
        return (u[:, :kept] @ vh[:kept]) if kept else torch.zeros_like(matrix)
    if method != "full":
        raise ValueError(f"polar_factor: unknown method {method!r}; expected 'eigh' or 'full'")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    largest = float(s[0]) if s.numel() else 0.0
    kept = int((s > singular_value_tolerance(matrix.shape, largest, dtype)).sum())  # s is sorted descending
    return u[:, :kept] @ vh[:kept]


def weighted_task_vectors(
    base: torch.Tensor, models: Sequence[torch.Tensor], weights: Optional[Sequence[float]], method: str
) -> torch.Tensor:
    """``wt·(θt − θ0)`` stacked [T, *base.shape] in the compute dtype; weights finite and > 0."""
    if not models:
        raise ValueError(f"{method} needs at least one model")
    if weights is None:
        weights = [1.0] * len(models)
    weights = [float(weight) for weight in weights]
    if len(weights) != len(models) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"{method}: need one finite weight > 0 per model, got {weights}")
    vectors = task_vectors(base, models)
    if any(weight != 1.0 for weight in weights):
        scale = torch.tensor(weights, dtype=vectors.dtype, device=vectors.device)
        vectors.mul_(scale.reshape(-1, *([1] * base.dim())))
    return vectors


def check_scale(lam: float, method: str) -> None:
    if not math.isfinite(lam):
        raise ValueError(f"{method}: lambda must be finite, got {lam!r}")


def check_matrix(base: torch.Tensor, is_matrix: Optional[bool], method: str) -> bool:
    """Resolve ``is_matrix`` (default: any 2-D tensor) and refuse a non-2-D 'matrix'."""
    if is_matrix is None:
        return base.dim() == 2
    if is_matrix and base.dim() != 2:
        raise ValueError(f"{method}: is_matrix=True needs a 2-D tensor, got shape {tuple(base.shape)}")
    return bool(is_matrix)


def orthogonalized_stack_kept(
    left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``polar(Û), ŝ, polar(V̂ᵀ)`` of stacked triplets ([m, K], [K], [K, n]), numerically zero σ
    dropped, and the bool [K] of which stacked triplets were kept (AdaRank needs to know which
    task each orthogonalized column came from).

    TSV-M and Iso-CTS stack this way. Returns K = 0 factors when every σ is zero.
    """
    largest = float(sigma.max()) if sigma.numel() else 0.0
    kept = sigma > singular_value_tolerance((left.shape[0], right.shape[1]), largest, sigma.dtype)
    left, sigma, right = left[:, kept], sigma[kept], right[kept]
    if sigma.numel() == 0:
        return left, sigma, right, kept
    return polar_factor(left), sigma, polar_factor(right), kept


def subspace_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    update,
    *,
    lam: float,
    weights: Optional[Sequence[float]],
    is_matrix: Optional[bool],
    method: str,
) -> torch.Tensor:
    """``θ0 + λ·update(wt·τt stacked)`` on a matrix, ``θ0 + λ·mean_t wt τt`` elsewhere (TSV-M, Iso-C, Iso-CTS).

    ``is_matrix`` defaults to "any 2-D tensor"; the result has the dtype of ``base``.
    """
    check_scale(lam, method)
    matrix = check_matrix(base, is_matrix, method)
    vectors = weighted_task_vectors(base, models, weights, method)
    delta = update(vectors) if matrix else vectors.mean(dim=0)
    del vectors
    return delta.mul_(lam).add_(base.to(compute_dtype(base))).to(base.dtype)
