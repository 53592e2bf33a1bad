"""Iso-C and Iso-CTS over tensors (docs/methods.md#iso-c-and-iso-cts). Official code: github.com/danielm1405/iso-merging.

Per matrix [m, n], r = min(m, n), T tasks, τt = wt·(θt − θ0), Δ_TA = Σt τt:

    Iso-C:   Δ_TA = U diag(σ) Vᵀ,  σ̄ = mean(σ),  Δ = σ̄ · U Vᵀ
    Iso-CTS: c0 = int(r·f), s = round((r − c0)/T), k = r − T·s
             common part: top-k triplets of Δ_TA; task part: top-s triplets of
             τ̃t = τt − Uk Ukᵀ τt; stack tasks 1…T then common into Û, ŝ, V̂ᵀ;
             Δ = mean(ŝ) · polar(Û) polar(V̂ᵀ)
    θ = θ0 + λ·Δ on matrices;  θ = θ0 + λ·mean_t τt on every non-matrix tensor

``wt`` (default 1) multiplies τt before anything else: it is task t's
coefficient in Δ_TA (and its share of the mean on non-matrices), so weights all
equal to c are the same as λ·c (Iso-C is positively homogeneous). Weights must
be finite and > 0. ``round`` is Python's (half to even), as in the official code.

Conventions where the paper is silent:
- Singular directions with a numerically zero σ (``singular_value_tolerance``)
  are arbitrary, so they are left out everywhere: σ̄ is the mean over the
  numerical rank of Δ_TA (= ‖Δ_TA‖* / r when Δ_TA has full rank, the paper's
  case; the nuclear norm is preserved in every case), and Iso-CTS neither
  projects out nor stacks such directions. All-zero task vectors give Δ = 0.
- Iso-CTS keeps at least one common direction: s = min(s, (r − 1) // T). When
  that leaves s = 0 (f = 1, or r ≤ T: 1×n matrices, 2×n with two or more
  tasks) there is no task-specific room and the result is Iso-C.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from mergekit_ext.methods.iso import (
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_LAMBDA,
    SVD_METHOD,
)
from mergekit_ext.methods.subspace import polar_factor, subspace_merge
from mergekit_ext.tensors import (
    singular_value_tolerance,
    top_triplets_with_complement,
    truncated_svd,
)

# "auto" in __init__ means the exact truncation; the kernels take the fast exact
# one (tensors.truncated_svd "fast": all_singular_triplets for wide cuts).
_SVD = "fast" if SVD_METHOD == "auto" else SVD_METHOD


def iso_c_update(vectors: torch.Tensor) -> torch.Tensor:
    """Δ of Iso-C for task vectors stacked [T, m, n] (compute dtype)."""
    total = vectors.sum(dim=0)
    polar = polar_factor(total)
    # polar = U₊V₊ᵀ: ‖polar‖F² is the numerical rank and ⟨polar, Δ_TA⟩ = Σσ,
    # so σ̄ needs no second SVD.
    rank = round(float(polar.square().sum()))
    if rank == 0:
        return polar  # zeros: Δ_TA is numerically zero
    mean_sigma = (polar * total).sum() / rank
    return polar.mul_(mean_sigma)


def iso_cts_split(rank: int, count: int, common_space_fraction: float) -> tuple[int, int]:
    """(k common directions, s directions per task); s = 0 means "no task-specific room: Iso-C"."""
    common = int(rank * common_space_fraction)
    specific = round((rank - common) / count)
    specific = max(0, min(specific, (rank - 1) // count))  # T·s ≤ r − 1: k ≥ 1
    return rank - count * specific, specific


def iso_cts_components(
    vectors: torch.Tensor, common_space_fraction: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iso-CTS's orthogonalized stack for task vectors [T, m, n]: ``U⊥`` [m, K], ``ŝ`` [K]
    (before flattening: Δ = mean(ŝ) · U⊥ V⊥ᵀ), ``V⊥ᵀ`` [K, n], and for each column its
    block (task t < T, or T for the common subspace) and its rank within that block
    (long [K] each). AdaRank's ``iso_cts`` variant masks these columns block by block.

    With no task-specific room (``iso_cts_split`` gives s = 0) this is Iso-C's
    factorisation: the numerically nonzero triplets of Δ_TA, all in the common block
    (U diag(σ̄) Vᵀ is ``iso_c_update``, which gets the same product from one polar factor).

    Every task-specific left vector lies in the complement of the common Uk, so
    polar([U_tasks | Uk]) = [polar(U_tasks) | Uk]: the left polar factor is that of the
    T·s task columns only (a (T·s)² eigensolver, not r²). For m ≤ n the task triplets
    themselves come from the complement basis (``_task_triplets_in_complement``).
    """
    count, rows, cols = vectors.shape
    keep_common, specific = iso_cts_split(min(rows, cols), count, common_space_fraction)
    parts = _task_triplets_in_complement(vectors, keep_common, specific) if specific > 0 and _SVD == "fast" else None
    if parts is None:
        u, s, vh = truncated_svd(vectors.sum(dim=0), keep_common, method=_SVD)
        significant = int((s > singular_value_tolerance((rows, cols), float(s[0]), s.dtype)).sum())
        u, s, vh = u[:, :significant], s[:significant], vh[:significant]
        if specific == 0:
            owner = torch.full((significant,), count, dtype=torch.long)
            return u, s, vh, owner, torch.arange(significant, dtype=torch.long)
        tasks = []
        for vector in vectors:
            residual = vector - u @ (u.mT @ vector)  # left projection only, as in the paper
            tasks.append(truncated_svd(residual, specific, method=_SVD))
        parts = (u, s, vh), tasks, None
    (u, s, vh), tasks, complement = parts
    sizes = [part[1].numel() for part in tasks] + [s.numel()]
    owner = torch.cat([torch.full((size,), block, dtype=torch.long) for block, size in enumerate(sizes)])
    position = torch.cat([torch.arange(size, dtype=torch.long) for size in sizes])
    sigma = torch.cat([*(part[1] for part in tasks), s])
    # Numerically zero σ are dropped, as in subspace.orthogonalized_stack_kept.
    kept = sigma > singular_value_tolerance((rows, cols), float(sigma.max()), sigma.dtype)
    task_kept, common_kept = kept[: -s.numel() or None], kept[sigma.numel() - s.numel() :]
    task_left = polar_factor(torch.cat([part[0] for part in tasks], dim=1)[:, task_kept])
    if complement is not None:
        task_left = complement @ task_left
    left = torch.cat([task_left, u[:, common_kept]], dim=1)
    right = polar_factor(torch.cat([*(part[2] for part in tasks), vh], dim=0)[kept])
    kept = kept.cpu()
    return left, sigma[kept], right, owner[kept], position[kept]


def _task_triplets_in_complement(vectors: torch.Tensor, keep_common: int, specific: int):
    """For m ≤ n: Δ_TA's top-k triplets, each task's top-s triplets of τ̃t in the basis of
    the complement, and that basis U⊥ [m, m − k] (exact; see tests/test_subspace.py).

    The rest of Δ_TA's left singular basis is an orthonormal basis U⊥ of the complement of
    Uk, so τ̃t = U⊥ U⊥ᵀ τt and task t's top-s triplets are U⊥ × those of the (m − k)×n
    matrix U⊥ᵀ τt: one small Gram eigensolver per task instead of an m×m one. None for a
    tall matrix (its complement is not small) and when Δ_TA's rank is below k (the general
    path drops those directions).
    """
    count, rows, cols = vectors.shape
    if rows > cols:
        return None
    u, s, vh, complement = top_triplets_with_complement(vectors.sum(dim=0), keep_common)
    if not bool((s > 0).all()):  # zeroed past the numerical rank
        return None
    tasks = [truncated_svd(complement.mT @ vector, specific, method=_SVD) for vector in vectors]
    return (u, s, vh), tasks, complement


def iso_cts_update(vectors: torch.Tensor, common_space_fraction: float) -> torch.Tensor:
    """Δ of Iso-CTS for task vectors stacked [T, m, n] (compute dtype)."""
    count, rows, cols = vectors.shape
    _, specific = iso_cts_split(min(rows, cols), count, common_space_fraction)
    if specific == 0:
        return iso_c_update(vectors)
    left, sigma, right, _, _ = iso_cts_components(vectors, common_space_fraction)
    if sigma.numel() == 0:
        return torch.zeros_like(vectors[0])
    return (left * sigma.mean()) @ right


def iso_c_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    lam: float = DEFAULT_LAMBDA,
    weights: Optional[Sequence[float]] = None,
    is_matrix: Optional[bool] = None,
) -> torch.Tensor:
    """Iso-C for one tensor; returns the dtype of ``base``. ``is_matrix`` defaults to "2-D"."""
    return subspace_merge(base, models, iso_c_update, lam=lam, weights=weights, is_matrix=is_matrix, method="iso_c")


def iso_cts_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    lam: float = DEFAULT_LAMBDA,
    common_space_fraction: float = DEFAULT_COMMON_SPACE_FRACTION,
    weights: Optional[Sequence[float]] = None,
    is_matrix: Optional[bool] = None,
) -> torch.Tensor:
    """Iso-CTS for one tensor; returns the dtype of ``base``. ``is_matrix`` defaults to "2-D"."""
    if not 0 < common_space_fraction <= 1:
        raise ValueError(f"iso_cts: common_space_fraction must be in (0, 1], got {common_space_fraction!r}")
    return subspace_merge(
        base,
        models,
        lambda vectors: iso_cts_update(vectors, common_space_fraction),
        lam=lam,
        weights=weights,
        is_matrix=is_matrix,
        method="iso_cts",
    )
