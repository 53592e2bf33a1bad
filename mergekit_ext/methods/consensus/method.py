"""``merge_method: consensus_ta`` and ``consensus_ties``: the mergekit declarations."""

from __future__ import annotations

import logging

import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_ext.methods.consensus import (
    DEFAULT_K,
    DEFAULT_TALL_LAMBDA,
    DEFAULT_TIES_DENSITY,
    PAPER_URL,
)
from mergekit_ext.methods.consensus.kernel import consensus_merge
from mergekit_ext.methods.declaration import PER_MODEL, SHARED, declare, integer, real, register


_WARNED_K = set()


def _merge_group(group: TensorGroup, **parameters) -> torch.Tensor:
    densities = parameters.get("density")  # only consensus_ties has it
    models = group.non_base
    if parameters["k"] > len(models) and parameters["k"] not in _WARNED_K:
        # Meaningful (docs/methods.md#consensus-masks: k > T gives θ0) but almost always a mistake.
        _WARNED_K.add(parameters["k"])
        logging.getLogger(__name__).warning(
            "consensus: k=%d exceeds the number of models (%d): no weight can be selected, the result is the base model",
            parameters["k"],
            len(models),
        )
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
register(METHODS)
