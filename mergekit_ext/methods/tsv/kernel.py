"""TSV-M over tensors (METHODS.md §6). Official code: github.com/AntoAndGar/task_singular_vectors.

Per matrix [m, n], r = min(m, n), T tasks, τt = wt·(θt − θ0):

    k        = int(r / T)                      top-k singular triplets of each τt
    Û, ŝ, V̂ᵀ = [U1k | … | UTk], [σ1k, …, σTk], [V1kᵀ; …; VTkᵀ]
    Δ        = polar(Û) diag(ŝ) polar(V̂ᵀ)     (singular values stay ŝ)
    θ        = θ0 + λ·Δ
    θ        = θ0 + λ·mean_t τt                on every non-matrix tensor

``wt`` (default 1) multiplies τt before anything else: it scales task t's
singular values (and its share of the mean on non-matrices), so weights all
equal to c are the same as λ·c. Weights must be finite and > 0.

Conventions where the paper is silent:
- T > r (k would be 0, e.g. 2×n matrices with 3 tasks): each task offers its top
  triplet and the r with the largest σ are stacked, so the width never exceeds r.
- Triplets with a numerically zero σ (``singular_value_tolerance`` of the largest
  stacked σ: zero or low-rank task vectors) are dropped before the polar
  factors. Their singular vectors are arbitrary; keeping them would rotate the
  other tasks' vectors at random. All-zero task vectors give Δ = 0.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from mergekit_ext.methods.tsv import DEFAULT_LAMBDA, SVD_METHOD
from mergekit_ext.tensors import (
    compute_dtype,
    polar_factor,
    singular_value_tolerance,
    task_vectors,
    truncated_svd,
)


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


def orthogonalized_stack(
    left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``polar(Û), ŝ, polar(V̂ᵀ)`` of stacked triplets ([m, K], [K], [K, n]), numerically zero σ dropped.

    Shared with Iso-CTS, which stacks the same way. Returns K = 0 factors when
    every σ is zero.
    """
    largest = float(sigma.max()) if sigma.numel() else 0.0
    kept = sigma > singular_value_tolerance((left.shape[0], right.shape[1]), largest, sigma.dtype)
    left, sigma, right = left[:, kept], sigma[kept], right[kept]
    if sigma.numel() == 0:
        return left, sigma, right
    return polar_factor(left), sigma, polar_factor(right)


def tsv_update(vectors: torch.Tensor) -> torch.Tensor:
    """Δ of TSV-M for task vectors stacked [T, m, n] (compute dtype)."""
    count, rows, cols = vectors.shape
    rank = min(rows, cols)
    per_task = max(1, rank // count)
    lefts, sigmas, rights = [], [], []
    for vector in vectors:
        u, s, vh = truncated_svd(vector, per_task, method=SVD_METHOD)
        lefts.append(u)
        sigmas.append(s)
        rights.append(vh)
    left, sigma, right = torch.cat(lefts, dim=1), torch.cat(sigmas), torch.cat(rights, dim=0)
    if sigma.numel() > rank:  # only when T > r: keep the r largest (stable sort: task order breaks ties)
        chosen = torch.argsort(sigma, descending=True, stable=True)[:rank]
        left, sigma, right = left[:, chosen], sigma[chosen], right[chosen]
    left, sigma, right = orthogonalized_stack(left, sigma, right)
    if sigma.numel() == 0:
        return torch.zeros_like(vectors[0])
    return (left * sigma) @ right


def tsv_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    lam: float = DEFAULT_LAMBDA,
    weights: Optional[Sequence[float]] = None,
    is_matrix: Optional[bool] = None,
) -> torch.Tensor:
    """TSV-M for one tensor; returns the dtype of ``base``.

    ``is_matrix`` says whether to merge by task singular vectors (default: any
    2-D tensor); otherwise the result is ``θ0 + λ·mean_t wt τt``.
    """
    check_scale(lam, "tsv_m")
    matrix = check_matrix(base, is_matrix, "tsv_m")
    vectors = weighted_task_vectors(base, models, weights, "tsv_m")
    update = tsv_update(vectors) if matrix else vectors.mean(dim=0)
    del vectors
    return update.mul_(lam).add_(base.to(compute_dtype(base))).to(base.dtype)
