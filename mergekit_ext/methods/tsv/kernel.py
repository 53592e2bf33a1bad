"""TSV-M over tensors (docs/methods.md#tsv-m). Official code: github.com/AntoAndGar/task_singular_vectors.

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

from typing import Optional, Sequence, Tuple

import torch

from mergekit_ext.methods.subspace import orthogonalized_stack_kept, subspace_merge
from mergekit_ext.methods.tsv import DEFAULT_LAMBDA, SVD_METHOD
from mergekit_ext.tensors import all_singular_triplets, truncated_svd


def tsv_components(vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-M's orthogonalized stack for task vectors [T, m, n]: ``U⊥`` [m, K], ``ŝ`` [K],
    ``V⊥ᵀ`` [K, n], and for each column the task it came from and its rank within that
    task's top-k (long [K] each); Δ = U⊥ diag(ŝ) V⊥ᵀ. AdaRank's ``tsv_m`` variant masks
    these columns task by task."""
    count, rows, cols = vectors.shape
    rank = min(rows, cols)
    per_task = max(1, rank // count)
    if SVD_METHOD == "auto" and per_task + 10 >= 0.25 * rank:
        # A wide cut (T ≤ 3): every task's triplets at once (batched Gram
        # eigensolver), as truncated_svd's "auto" would pick task by task.
        u, s, vh = all_singular_triplets(vectors, needed=per_task)
        left = u[..., :per_task].permute(1, 0, 2).reshape(rows, count * per_task)
        sigma = s[..., :per_task].reshape(-1)
        right = vh[..., :per_task, :].reshape(count * per_task, cols)
        sizes = [per_task] * count
        del u, s, vh
    else:
        lefts, sigmas, rights = [], [], []
        for vector in vectors:
            u, s, vh = truncated_svd(vector, per_task, method="fast" if SVD_METHOD == "auto" else SVD_METHOD)
            lefts.append(u)
            sigmas.append(s)
            rights.append(vh)
        left, sigma, right = torch.cat(lefts, dim=1), torch.cat(sigmas), torch.cat(rights, dim=0)
        sizes = [part.numel() for part in sigmas]
    owner = torch.cat([torch.full((size,), task, dtype=torch.long) for task, size in enumerate(sizes)])
    position = torch.cat([torch.arange(size, dtype=torch.long) for size in sizes])
    if sigma.numel() > rank:  # only when T > r: keep the r largest (stable sort: task order breaks ties)
        chosen = torch.argsort(sigma, descending=True, stable=True)[:rank]
        left, sigma, right = left[:, chosen], sigma[chosen], right[chosen]
        owner, position = owner[chosen.cpu()], position[chosen.cpu()]
    left, sigma, right, kept = orthogonalized_stack_kept(left, sigma, right)
    kept = kept.cpu()
    return left, sigma, right, owner[kept], position[kept]


def tsv_update(vectors: torch.Tensor) -> torch.Tensor:
    """Δ of TSV-M for task vectors stacked [T, m, n] (compute dtype)."""
    left, sigma, right, _, _ = tsv_components(vectors)
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
    return subspace_merge(base, models, tsv_update, lam=lam, weights=weights, is_matrix=is_matrix, method="tsv_m")
