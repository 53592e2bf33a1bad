"""``merge_method: opcm``: the mergekit declaration (models merged in config order)."""

from __future__ import annotations

from typing import Literal

import torch
from mergekit.merge_methods.base import TensorGroup

from mergekit_ext.methods.declaration import SHARED, declare, real, register
from mergekit_ext.methods.opcm import DEFAULT_ALPHA, PAPER_URL
from mergekit_ext.methods.opcm.kernel import opcm_merge
from mergekit_ext.tensors import is_block_matrix


def _merge_group(group: TensorGroup, *, alpha: float, zero_diagonal: bool, scaling: str) -> torch.Tensor:
    base = group.base.tensor
    metadata = group.metadata
    return opcm_merge(
        base,
        [entry.tensor for entry in group.non_base],  # mergekit keeps the config's order
        project=is_block_matrix(metadata.name, base.shape, metadata.vocabulary_axis),
        alpha=alpha,
        zero_diagonal=zero_diagonal,
        scaling=scaling,
    )


opcm = declare(
    _merge_group,
    name="opcm",
    pretty_name="Orthogonal-Projection Continual Merging (OPCM)",
    reference_url=PAPER_URL,
    parameters=[
        (
            "alpha",
            real(gt=0, lt=1),
            SHARED,
            DEFAULT_ALPHA,
            "split rank: first r with cumsum(s)/sum(s) > alpha; the r×r top block is projected out",
        ),
        (
            "zero_diagonal",
            bool,
            SHARED,
            True,
            "also zero the rotated diagonal, making each update orthogonal to the merged one",
        ),
        (
            "scaling",
            Literal["tensor", "none"],
            SHARED,
            "tensor",
            "tensor: rescale to the mean task-vector norm per tensor (the paper: globally); none: raw sum",
        ),
    ],
)

METHODS = (opcm,)
register(METHODS)
