"""Consensus masks: TALL masks and Consensus Merging (Wang et al., ICML 2024).

arXiv 2405.07813; official code github.com/nik-dim/tall_masks.
Kernels take tensors and return tensors; the mergekit declarations follow.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.sparsify import magnitude

from mergekit_ext.registry import PER_MODEL, SHARED, declare, integer, real
from mergekit_ext.tensors import task_vectors

PAPER_URL = "https://arxiv.org/abs/2405.07813"
DEFAULT_TALL_LAMBDA = 0.4
DEFAULT_K = 2
DEFAULT_TIES_DENSITY = 0.2


def ties_multitask_vector(vectors: torch.Tensor, densities: Sequence[float]) -> torch.Tensor:
    """TIES flavour of τMTL: trim each row to its top ``density``, elect signs, disjoint SUM.

    Trimming is mergekit's own ``magnitude`` and the election is that of its
    ``get_mask(method="sum")``, so ``k = 0`` is exactly mergekit ``ties`` with
    ``normalize: false``. Only a boolean keep-mask per task is stored beside
    the task vectors (which the TALL masks still need untrimmed), and sums run
    one task at a time.
    """
    keep = torch.empty(vectors.shape, dtype=torch.bool, device=vectors.device)
    for keep_row, row, density in zip(keep, vectors, densities):
        torch.ne(magnitude(row, density), 0, out=keep_row)
    elected = torch.zeros_like(vectors[0])
    for row, keep_row in zip(vectors, keep):
        elected += row * keep_row
    majority = torch.where(elected >= 0, 1.0, -1.0).to(vectors.dtype)
    multitask = elected.zero_()
    for row, keep_row in zip(vectors, keep):
        multitask += torch.where(keep_row & (row.sign() == majority), row, 0.0)
    return multitask


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


def _merge_group(group: TensorGroup, **parameters) -> torch.Tensor:
    densities = parameters.get("density")  # only consensus_ties has it
    models = group.non_base
    ids = [entry.id for entry in models]
    return consensus_merge(
        group.base.tensor,
        [entry.tensor for entry in models],
        weights=[parameters["weight"][i] for i in ids],
        tall_lambdas=[parameters["tall_lambda"][i] for i in ids],
        k=parameters["k"],
        scale=parameters["lambda"],
        densities=None if densities is None else [densities[i] for i in ids],
    )


_COMMON_PARAMETERS = [
    ("weight", real(), PER_MODEL, 1.0, "coefficient of this model's task vector in τMTL and in its mask"),
    (
        "tall_lambda",
        real(ge=0),
        PER_MODEL,
        DEFAULT_TALL_LAMBDA,
        "λt of the TALL mask |τt| > λt·|τMTL − τt| (paper tunes 0.2–0.6 per task)",
    ),
    ("k", integer(ge=0), SHARED, DEFAULT_K, "keep weights that at least k task masks select (0 = plain TA/TIES)"),
    ("lambda", real(), SHARED, 1.0, "final scale of the masked multi-task vector"),
]

consensus_ta = declare(
    _merge_group,
    name="consensus_ta",
    pretty_name="Consensus Task Arithmetic (TALL masks)",
    reference_url=PAPER_URL,
    parameters=_COMMON_PARAMETERS,
)

consensus_ties = declare(
    _merge_group,
    name="consensus_ties",
    pretty_name="Consensus TIES (TALL masks)",
    reference_url=PAPER_URL,
    parameters=_COMMON_PARAMETERS
    + [
        (
            "density",
            real(gt=0, le=1),
            PER_MODEL,
            DEFAULT_TIES_DENSITY,
            "fraction of each task vector kept by magnitude before sign election",
        )
    ],
)

METHODS = (consensus_ta, consensus_ties)
