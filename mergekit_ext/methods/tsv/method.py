"""``merge_method: tsv_m``: the mergekit declaration."""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, TensorGroup

from mergekit_ext.methods.declaration import PER_MODEL, SHARED, declare, real, register
from mergekit_ext.methods.tsv import DEFAULT_LAMBDA, PAPER_URL
from mergekit_ext.methods.tsv.kernel import tsv_merge
from mergekit_ext.tensors import is_block_matrix


def _merge_group(group: TensorGroup, **parameters) -> torch.Tensor:
    base = group.base.tensor
    models = group.non_base  # config order; the result does not depend on it
    return tsv_merge(
        base,
        [entry.tensor for entry in models],
        lam=parameters["lambda"],
        weights=[parameters["weight"][entry.id] for entry in models],
        is_matrix=is_block_matrix(group.metadata.name, base.shape, group.metadata.vocabulary_axis),
    )


tsv_m = declare(
    _merge_group,
    name="tsv_m",
    pretty_name="TSV-M: Task Singular Vectors merging",
    reference_url=PAPER_URL,
    base=BasePolicy.REQUIRED,
    parameters=[
        (
            "weight",
            real(gt=0, allow_inf_nan=False),
            PER_MODEL,
            1.0,
            "multiplies this model's task vector before anything else: scales its singular values in Δ "
            "and its share of the mean on non-matrix tensors (finite, > 0)",
        ),
        (
            "lambda",
            real(ge=0, allow_inf_nan=False),
            SHARED,
            DEFAULT_LAMBDA,
            "final scale α: θ0 + α·Δ on block matrices, θ0 + α·mean_t τt elsewhere (papers tune it on "
            "validation; the default is the hard zoo's validation winner, see the family's __init__)",
        ),
    ],
)

METHODS = (tsv_m,)
register(METHODS)
