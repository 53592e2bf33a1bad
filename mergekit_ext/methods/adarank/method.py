"""``merge_method: adarank``: applies a learned mask/coefficient file in the stock ``mergekit-yaml``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from mergekit.merge_methods.base import MISSING, BasePolicy, TensorGroup
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_ext.methods.adarank import (
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_SVD,
    PAPER_URL,
    SUBSPACE_VARIANTS,
)
from mergekit_ext.methods.adarank.format import (
    AdaRankFileError,
    LearnedFile,
    content_hash_once,
    open_learned_file,
    verify_models,
)
from mergekit_ext.methods.adarank.kernel import (
    apply_masks,
    band_rank,
    mask_rows,
)
from mergekit_ext.methods.declaration import SHARED, declare, register
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
    # A 'ta' file's coefficients belong to its base: another base_model is refused by content hash.
    verify_models(learned, [], _entry_path(group.base.id) if group.base is not None else None)
    if not check_models or None in paths or len(recorded) != count:
        if learned.variant == "cart" and count == 2:
            return _order_by_content(learned, paths)
        return list(range(count))
    # Same paths are not enough: the weights there must be the ones the file was learned on.
    verify_models(learned, paths, None)
    order = []
    for path in paths:
        if path not in recorded:
            raise AdaRankFileError(
                f"adarank: model {path} is not one of the models {learned.path} was learned for "
                f"({', '.join(map(str, recorded))}); if they moved, set check_models: false to use the config order"
            )
        order.append(recorded.index(path))
    return order


def _order_by_content(learned: LearnedFile, paths: list) -> list:
    """The file's task indices for two CART models matched by their weights' content hashes.

    With two models CART's centred task vectors are (θ1 − θ2)/2 and its negative: the
    same singular values, so no fingerprint can tell the models apart, and the config
    order alone could swap their masks and coefficients without a word."""
    recorded = [entry.get("content_hash") for entry in learned.info.get("models", []) if isinstance(entry, dict)]
    if None in paths or len(recorded) != 2 or None in recorded:
        raise AdaRankFileError(
            f"adarank: {learned.path} (variant cart, two models) cannot tell which model is which by their weights "
            "(their centred task vectors mirror each other); give the models as local folders so they can be matched"
        )
    digests = [content_hash_once(path) for path in paths]
    if sorted(digests) != sorted(recorded) or digests[0] == digests[1]:
        raise AdaRankFileError(
            f"adarank: {learned.path} (variant cart, two models): these models' weights are not the two it was learned on, "
            "and with two models their order cannot be checked by fingerprint; learn the file again for these weights"
        )
    return [recorded.index(digest) for digest in digests]


def _check_file(value: str) -> str:
    """Open the learned file when mergekit plans the merge: a missing, truncated or corrupt
    file is refused before anything is written (its fit to the models is checked on the
    first tensor, which mergekit computes before writing any shard)."""
    open_learned_file(value)
    return value


def _merge_group(group: TensorGroup, *, file: str, check_models: bool) -> torch.Tensor:
    learned = open_learned_file(file)
    name = group.metadata.name
    models = group.non_base
    first = models[0].tensor
    if not first.is_floating_point():
        return (group.base or models[0]).tensor
    if learned.variant in ("ta", *SUBSPACE_VARIANTS) and group.base is None:
        raise AdaRankFileError(f"adarank: {learned.path} was learned with variant '{learned.variant}', which needs base_model")
    rows = mask_rows(learned.variant, learned.task_count)
    # The tasks' rows follow the group's model order; iso_cts' common row stays last.
    order = _task_order(learned, group, check_models) + list(range(learned.task_count, rows))
    coefficients = learned.coefficients(name)
    if coefficients.shape != (rows,):
        raise AdaRankFileError(
            f"adarank: {learned.path}: coefficients of tensor {name} have shape {list(coefficients.shape)}, "
            f"expected [{rows}]"
        )
    mask = learned.mask(name)
    is_matrix = is_block_matrix(name, first.shape, group.metadata.vocabulary_axis)
    band = None
    check = None
    if is_matrix:
        if mask is None:
            raise AdaRankFileError(f"adarank: {learned.path} has no mask for matrix {name}: it was learned for other models")
        band = band_rank(first.shape, float(learned.info["max_rank_ratio"]))
        expected = mask_grid(learned.variant, first.shape, learned.task_count, band, _fraction(learned))
        if tuple(mask.shape) != expected:
            raise AdaRankFileError(
                f"adarank: {learned.path}: mask of {name} has shape {list(mask.shape)}, but a tensor of shape "
                f"{list(first.shape)} needs {list(expected)}: it was learned for other models"
            )
        mask = mask[order]
        fingerprint = learned.fingerprint(name)
        if fingerprint is not None:
            expected = fingerprint[order]

            def check(parts) -> None:
                check_fingerprint(name, expected, parts.fingerprint, learned.fingerprint_rtol, learned.path)

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
        common_space_fraction=_fraction(learned),
        check=check,
    )


def _fraction(learned: LearnedFile) -> float:
    return float(learned.info.get("common_space_fraction", DEFAULT_COMMON_SPACE_FRACTION))


def mask_grid(variant: str, shape, count: int, band: int, common_space_fraction: float) -> tuple:
    """The mask shape a matrix of ``shape`` needs: [T, band] (ta, cart), [T, max(1, r // T)]
    (tsv_m), [T + 1, max(common, per task)] (iso_cts)."""
    rank = min(shape[-2], shape[-1])
    if variant == "tsv_m":
        return (count, max(1, rank // count))
    if variant == "iso_cts":
        from mergekit_ext.methods.iso.kernel import iso_cts_split

        return (count + 1, max(iso_cts_split(rank, count, common_space_fraction)))
    return (count, band)


def check_fingerprint(name: str, recorded: torch.Tensor, singular_values: torch.Tensor, rtol: float, path) -> None:
    """Refuse a tensor whose task vectors' top singular values differ from the recorded ones by
    more than ``rtol`` of each task's largest: the masks would select other components."""
    count = min(recorded.shape[-1], singular_values.shape[-1])
    recorded = recorded[:, :count].to(torch.float32)
    now = singular_values[:, :count].detach().to("cpu", torch.float32)
    scale = recorded[:, :1].abs().clamp_min(torch.finfo(torch.float32).tiny)
    difference = ((now - recorded).abs() / scale).amax(dim=1)
    worst = int(difference.argmax())
    if not bool(difference[worst] <= rtol):  # also refuses NaN
        raise AdaRankFileError(
            f"adarank: tensor {name}: the factorisation of these weights does not match {path} "
            f"(task {worst}: top singular values {[round(v, 6) for v in now[worst].tolist()]} here, "
            f"{[round(v, 6) for v in recorded[worst].tolist()]} recorded; relative difference "
            f"{float(difference[worst]):.2e} > {rtol:.0e}): the file was learned on other weights "
            "(another model, base, dtype or quantisation); learn it again for these"
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
            Annotated[str, AfterValidator(_check_file)],
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
register(METHODS)
