"""``merge_method: iso_c`` and ``iso_cts``: the mergekit declarations."""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, TensorGroup

from mergekit_ext.methods.declaration import PER_MODEL, SHARED, declare, real, register
from mergekit_ext.methods.iso import (
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_LAMBDA,
    PAPER_URL,
)
from mergekit_ext.methods.iso.kernel import iso_c_merge, iso_cts_merge
from mergekit_ext.tensors import is_block_matrix


def _arguments(group: TensorGroup, parameters) -> dict:
    base = group.base.tensor
    models = group.non_base  # config order; the result does not depend on it
    return dict(
        base=base,
        models=[entry.tensor for entry in models],
        lam=parameters["lambda"],
        weights=[parameters["weight"][entry.id] for entry in models],
        is_matrix=is_block_matrix(group.metadata.name, base.shape, group.metadata.vocabulary_axis),
    )


def _merge_iso_c(group: TensorGroup, **parameters) -> torch.Tensor:
    return iso_c_merge(**_arguments(group, parameters))


def _merge_iso_cts(group: TensorGroup, **parameters) -> torch.Tensor:
    return iso_cts_merge(**_arguments(group, parameters), common_space_fraction=parameters["common_space_fraction"])


_COMMON_PARAMETERS = [
    (
        "weight",
        real(gt=0, allow_inf_nan=False),
        PER_MODEL,
        1.0,
        "multiplies this model's task vector before anything else: its coefficient in Δ_TA = Σt τt "
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
]

iso_c = declare(
    _merge_iso_c,
    name="iso_c",
    pretty_name="Iso-C: isotropic merging in the common subspace",
    reference_url=PAPER_URL,
    base=BasePolicy.REQUIRED,
    parameters=_COMMON_PARAMETERS,
)

iso_cts = declare(
    _merge_iso_cts,
    name="iso_cts",
    pretty_name="Iso-CTS: isotropic merging in common and task-specific subspaces",
    reference_url=PAPER_URL,
    base=BasePolicy.REQUIRED,
    parameters=_COMMON_PARAMETERS
    + [
        (
            "common_space_fraction",
            real(gt=0, le=1, allow_inf_nan=False),
            SHARED,
            DEFAULT_COMMON_SPACE_FRACTION,
            "f in (0, 1]: about f·r of each matrix's rank r goes to the common subspace of Δ_TA, the rest is "
            "shared equally by the tasks; 1 (or no room left for T tasks) gives Iso-C",
        ),
    ],
)

METHODS = (iso_c, iso_cts)
register(METHODS)
