"""``merge_method: adarank``: applies a learned mask/coefficient file in the stock ``mergekit-yaml``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from mergekit.merge_methods.base import MISSING, BasePolicy, TensorGroup

from mergekit_ext.methods.adarank import DEFAULT_SVD, PAPER_URL
from mergekit_ext.methods.adarank.format import (
    AdaRankFileError,
    LearnedFile,
    open_learned_file,
)
from mergekit_ext.methods.adarank.kernel import apply_masks, band_rank
from mergekit_ext.methods.declaration import SHARED, declare
from mergekit_ext.tensors import SVD_METHODS, is_block_matrix


def _entry_path(entry_id: Any) -> Optional[str]:
    """The local folder of a mergekit input (a ModelReference), or None (in-memory ids)."""
    model = getattr(entry_id, "model", None)
    path = getattr(model, "path", None)
    if path is None or getattr(entry_id, "lora", None) is not None:
        return None
    return str(Path(path).expanduser().absolute()) if os.path.exists(os.path.expanduser(path)) else None


def _task_order(learned: LearnedFile, group: TensorGroup, check_models: bool) -> list:
    """Indices into the file's task axis for the group's models, in the group's order."""
    count = len(group.non_base)
    if count != learned.task_count:
        raise AdaRankFileError(
            f"adarank: {learned.path} was learned for {learned.task_count} models, but this merge has {count}"
        )
    recorded = [entry.get("path") for entry in learned.info.get("models", [])]
    paths = [_entry_path(entry.id) for entry in group.non_base]
    if not check_models or None in paths or len(recorded) != count:
        return list(range(count))
    order = []
    for path in paths:
        if path not in recorded:
            raise AdaRankFileError(
                f"adarank: model {path} is not one of the models {learned.path} was learned for "
                f"({', '.join(map(str, recorded))}); if they moved, set check_models: false to use the config order"
            )
        order.append(recorded.index(path))
    return order


def _merge_group(group: TensorGroup, *, file: str, check_models: bool) -> torch.Tensor:
    learned = open_learned_file(file)
    name = group.metadata.name
    models = group.non_base
    first = models[0].tensor
    if not first.is_floating_point():
        return (group.base or models[0]).tensor
    if learned.variant == "ta" and group.base is None:
        raise AdaRankFileError(f"adarank: {learned.path} was learned with variant 'ta', which needs base_model")
    order = _task_order(learned, group, check_models)
    coefficients = learned.coefficients(name)
    if coefficients.shape != (learned.task_count,):
        raise AdaRankFileError(
            f"adarank: {learned.path}: coefficients of tensor {name} have shape {list(coefficients.shape)}, "
            f"expected [{learned.task_count}]"
        )
    mask = learned.mask(name)
    is_matrix = is_block_matrix(name, first.shape, group.metadata.vocabulary_axis)
    band = None
    if is_matrix:
        if mask is None:
            raise AdaRankFileError(f"adarank: {learned.path} has no mask for matrix {name}: it was learned for other models")
        band = band_rank(first.shape, float(learned.info["max_rank_ratio"]))
        if tuple(mask.shape) != (learned.task_count, band):
            raise AdaRankFileError(
                f"adarank: {learned.path}: mask of {name} has shape {list(mask.shape)}, but a tensor of shape "
                f"{list(first.shape)} needs [{learned.task_count}, {band}]: it was learned for other models"
            )
        mask = mask[order]
    elif mask is not None:
        raise AdaRankFileError(
            f"adarank: {learned.path} has a mask for {name}, which is not a matrix here (shape {list(first.shape)})"
        )
    return apply_masks(
        group.base.tensor if group.base is not None else None,
        [entry.tensor for entry in models],
        variant=learned.variant,
        coefficients=coefficients[order],
        mask=mask,
        band=band,
        svd=learned.svd if learned.svd in SVD_METHODS else DEFAULT_SVD,
    )


adarank = declare(
    _merge_group,
    name="adarank",
    pretty_name="AdaRank: adaptive rank pruning (applies a learned mask file)",
    reference_url=PAPER_URL,
    base=BasePolicy.OPTIONAL,
    parameters=[
        (
            "file",
            str,
            SHARED,
            MISSING,
            "learned masks and coefficients (safetensors) from `mergekit-ext adarank learn`; "
            "relative paths are relative to where mergekit runs",
        ),
        (
            "check_models",
            bool,
            SHARED,
            True,
            "match the config's models to the file's by path (any order); false: use the config order",
        ),
    ],
)

METHODS = (adarank,)
