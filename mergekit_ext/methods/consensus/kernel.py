"""Consensus masks: TALL masks and Consensus Merging (Wang et al., ICML 2024).

arXiv 2405.07813; official code github.com/nik-dim/tall_masks.
Kernels: plain functions over tensors (the mergekit declarations are in ``method.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergekit_ext.methods.consensus import DEFAULT_K
from mergekit_ext.tensors import task_vectors, ties_multitask_vector


def tall_masks(vectors: torch.Tensor, multitask: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """Boolean TALL mask per task: ``|τt| > λt · |τMTL − τt|`` (strict, as in the official code)."""
    scale = torch.tensor(list(lambdas), dtype=vectors.dtype, device=vectors.device)
    scale = scale.reshape(-1, *([1] * (vectors.dim() - 1)))
    return vectors.abs() > scale * (multitask.unsqueeze(0) - vectors).abs()


def consensus_votes(vectors: torch.Tensor, multitask: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """Σt mt: how many TALL masks select each weight.

    Same masks as ``tall_masks``, one task at a time, so the extra memory is a
    few tensors the size of one model's tensor rather than of all T.
    """
    votes = torch.zeros(multitask.shape, dtype=torch.int16, device=multitask.device)
    for vector, scale in zip(vectors, lambdas):
        votes += vector.abs() > scale * (multitask - vector).abs()
    return votes


def consensus_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    tall_lambdas: Sequence[float],
    k: int = DEFAULT_K,
    scale: float = 1.0,
    densities: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """``θ0 + scale · (τMTL ⊙ [Σt mt >= k])``; TIES flavour when ``densities`` is given.

    Task vectors are weighted (``wt·τt``) before both the sum and the masks, so
    the default weights of 1 give the paper's formulas. ``k = 0`` keeps every
    entry (plain TA/TIES); ``k > T`` keeps none (the base).
    """
    vectors = task_vectors(base, models)
    weight = torch.tensor(list(weights), dtype=vectors.dtype, device=vectors.device).reshape(-1, *([1] * base.dim()))
    vectors.mul_(weight)
    if densities is None:
        multitask = vectors.sum(dim=0)
    else:
        multitask = ties_multitask_vector(vectors, densities)
    if k > 0:
        multitask.mul_(consensus_votes(vectors, multitask, tall_lambdas) >= k)
    del vectors
    return multitask.mul_(scale).add_(base).to(base.dtype)
