"""``merge_method: rmm``: the dense (product-space) form of RMM for mergekit."""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_ext.methods.declaration import PER_MODEL, SHARED, declare, integer, real, register
from mergekit_ext.methods.rmm import DEFAULT_WEIGHT, PAPER_URL
from mergekit_ext.methods.rmm.kernel import product_space_merge


def _merge_group(group: TensorGroup, **parameters) -> torch.Tensor:
    models = group.non_base
    return product_space_merge(
        group.base.tensor,
        [entry.tensor for entry in models],
        k=parameters["k"],
        weights=[parameters["weight"][entry.id] for entry in models],
    )


RMM = declare(
    _merge_group,
    name="rmm",
    pretty_name="Reversible Model Merging (product space)",
    reference_url=PAPER_URL,
    parameters=(
        ("k", integer(ge=1), SHARED, 1, "basis size K: tasks' deltas are replaced by their rank-K fit along the task axis"),
        ("weight", real(), PER_MODEL, DEFAULT_WEIGHT, "weight of this model's reconstructed delta (one-hot: recover that task)"),
    ),
)

METHODS = (RMM,)
register(METHODS)
