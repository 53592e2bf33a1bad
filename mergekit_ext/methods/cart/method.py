"""``merge_method: cart``: the mergekit declaration."""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, TensorGroup
from typing_extensions import Literal

from mergekit_ext.methods.cart import (
    DEFAULT_LAMBDA,
    DEFAULT_RANK_RATIO,
    DEFAULT_SVD,
    PAPER_URL,
)
from mergekit_ext.methods.cart.kernel import cart_merge
from mergekit_ext.methods.declaration import PER_MODEL, SHARED, declare, real, register
from mergekit_ext.tensors import SVD_METHODS, is_block_matrix


def _merge_group(group: TensorGroup, **parameters) -> torch.Tensor:
    # The base (if configured) is deliberately ignored: CART averages the models only.
    models = group.non_base
    first = models[0].tensor
    return cart_merge(
        [entry.tensor for entry in models],
        rank_ratio=parameters["rank_ratio"],
        scale=parameters["lambda"],
        weights=[parameters["weight"][entry.id] for entry in models],
        low_rank=is_block_matrix(group.metadata.name, first.shape, group.metadata.vocabulary_axis),
        svd=parameters["svd"],
    )


cart = declare(
    _merge_group,
    name="cart",
    pretty_name="CART: centered low-rank merging",
    reference_url=PAPER_URL,
    base=BasePolicy.OPTIONAL,
    parameters=[
        (
            "weight",
            real(gt=0),
            PER_MODEL,
            1.0,
            "relative weight of this model in θavg and of its low-rank centred vector (only ratios matter)",
        ),
        (
            "rank_ratio",
            real(gt=0, le=1),
            SHARED,
            DEFAULT_RANK_RATIO,
            "kept rank k = max(1, int(rank_ratio · min(m, n))) of each centred vector; 1 gives the average",
        ),
        ("lambda", real(ge=0), SHARED, DEFAULT_LAMBDA, "scale of the summed low-rank centred vectors"),
        (
            "svd",
            Literal[SVD_METHODS],  # type: ignore[valid-type]
            SHARED,
            DEFAULT_SVD,
            "truncated SVD: gram (top eigenvectors of the Gram matrix, ~1e-5 from exact), full (LAPACK, "
            "exact), randomized (fastest for small k, near-optimal but not the exact truncation), auto "
            "(gram for small k, else full)",
        ),
    ],
)

METHODS = (cart,)
register(METHODS)
