"""AdaRank: adaptive rank pruning (Lee, Choi, Lee, Kim, Hong, arXiv 2503.22178).

Official code: github.com/david3684/AdaRank. METHODS.md §3. Per tensor, with
origin ``o`` = θ0 (variant ``ta``, on top of Task Arithmetic) or θavg (variant
``cart``, on top of CART) and task vectors ``vt = θt − o``:

    matrices:     vt ≈ Ut diag(st) Vtᵀ  (top ``band`` singular triplets)
                  W = o + Σt coef[t] · Ut diag(mask[t] ⊙ st) Vtᵀ
    other tensors W = o + Σt coef[t] · vt                 (never masked)

``mask`` [T, band] is binary and ``coef`` [T] is one scalar per task per
tensor; both are learned at test time (``mergekit_ext.adarank``) by
minimising prediction entropy on unlabeled prompts, with a straight-through
estimator on ``p = sigmoid(logit / 10)``.

The band: only the top ``band = max(1, int(max_rank_ratio · min(m, n)))``
singular triplets of each task vector are kept as candidates; everything below
is pruned for good. ``max_rank_ratio = 1`` is the paper's method (full SVD,
so all-ones masks give back ``vt`` exactly); a smaller band bounds the memory
of the learner (full U, V per task is about twice the model per task) and the
paper's ablation says pruning only within the top 16 % costs 0.4 points.

This module holds the pure kernels (tensors in, tensors out), the learned
file's format (safetensors: hard masks and coefficients, JSON metadata) and
``merge_method: adarank``, which applies a learned file in the stock
``mergekit-yaml``: per tensor it recomputes the same deterministic float32
factorisation and applies the stored masks and coefficients, so the merge
streams one tensor at a time like any other method.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import MISSING, BasePolicy, TensorGroup

from mergekit_ext.registry import SHARED, declare
from mergekit_ext.tensors import SVD_METHODS, compute_dtype, is_block_matrix, rank_from_ratio, task_vectors, truncated_svd

PAPER_URL = "https://arxiv.org/abs/2503.22178"
VARIANTS = ("ta", "cart")
# p = sigmoid(logit / MASK_TEMPERATURE); logits start at ±INITIAL_LOGIT (official code).
MASK_TEMPERATURE = 10.0
INITIAL_LOGIT = 0.1
# The same exact-truncation SVD as CART (tensors.truncated_svd "auto": a full
# LAPACK SVD for large bands, the Gram path for small ones). The learner and the
# mergekit method both factorise through ``factorize``, so they agree.
DEFAULT_SVD = "auto"
FILE_FORMAT = "mergekit-ext/adarank/1"
_MASK_PREFIX = "mask/"
_COEFFICIENT_PREFIX = "coefficient/"


class AdaRankFileError(ValueError):
    """A learned AdaRank file that is unreadable or does not fit the models being merged."""


# ---------------------------------------------------------------------------
# kernels


def origin_and_vectors(
    base: Optional[torch.Tensor], models: Sequence[torch.Tensor], variant: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The origin ``o`` and stacked task vectors ``vt = θt − o`` [T, *shape], compute dtype.

    ``ta``: o = θ0 (``base`` required); ``cart``: o = θavg, the plain mean of ``models``.
    """
    if not models:
        raise ValueError("adarank needs at least one model")
    if variant == "ta":
        if base is None:
            raise ValueError("adarank variant 'ta' needs the base model θ0")
        origin = base.to(compute_dtype(base))
    elif variant == "cart":
        dtype = compute_dtype(models[0])
        origin = torch.zeros(models[0].shape, dtype=dtype, device=models[0].device)
        for model in models:
            origin.add_(model.to(dtype))
        origin.div_(len(models))
    else:
        raise ValueError(f"unknown adarank variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return origin, task_vectors(origin, models)


def band_rank(shape: Sequence[int], max_rank_ratio: float) -> int:
    """How many singular triplets per task vector are candidates: max(1, int(ratio · min(m, n)))."""
    if not 0 < max_rank_ratio <= 1:
        raise ValueError(f"adarank: max_rank_ratio must be in (0, 1], got {max_rank_ratio!r}")
    return rank_from_ratio(shape, max_rank_ratio)


def factorize(vectors: torch.Tensor, band: int, *, svd: str = DEFAULT_SVD) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``band`` SVD of each task vector in ``vectors`` [T, m, n]: U [T, m, b], s [T, b], Vh [T, b, n].

    Deterministic for the same input (LAPACK / eigh); signs of a triplet do not
    matter because only ``U diag(s) Vᵀ`` products are used.
    """
    factors = [truncated_svd(vector, band, method=svd) for vector in vectors]
    return tuple(torch.stack(part) for part in zip(*factors))  # type: ignore[return-value]


def initial_logits(count: int, shape: Sequence[int], band: int, init_rank_ratio: float) -> torch.Tensor:
    """Logits [count, band]: +0.1 for the top ``max(1, int(init_rank_ratio · min(m, n)))``, −0.1 below.

    So step 0 is the base method: every component for TA (ratio 1), CART's
    rank-k truncation for CART. (The official code uses int(), without the
    max(1, ·) that this project's CART uses; they differ only when ratio·min < 1.)
    """
    if not 0 < init_rank_ratio <= 1:
        raise ValueError(f"adarank: init_rank_ratio must be in (0, 1], got {init_rank_ratio!r}")
    kept = min(band, rank_from_ratio(shape, init_rank_ratio))
    logits = torch.full((count, band), -INITIAL_LOGIT, dtype=torch.float32)
    logits[:, :kept] = INITIAL_LOGIT
    return logits


def straight_through_mask(logits: torch.Tensor, temperature: float = MASK_TEMPERATURE) -> torch.Tensor:
    """Binary mask ``(p > 0.5)`` in the forward pass, gradient of ``p = sigmoid(logit / temperature)``.

    The paper's ``p·s + ((hard − p)·s).detach()`` has the same gradient with
    respect to ``p`` (``s``); written as ``hard + (p − p.detach())`` the forward
    value is exactly the hard mask (no ``p + (1 − p)`` rounding).
    """
    p = torch.sigmoid(logits / temperature)
    hard = (p > 0.5).to(p.dtype)
    return hard + (p - p.detach())


def merge_matrix(
    origin: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    mask: torch.Tensor,
    coefficients: torch.Tensor,
) -> torch.Tensor:
    """``o + Σt coef[t] · Ut diag(mask[t] ⊙ st) Vtᵀ`` as one [m, T·b] @ [T·b, n] product.

    Differentiable in ``mask`` (a float or straight-through mask [T, b]) and
    ``coefficients`` [T].
    """
    count, rows, band = u.shape
    scaled = u * (s * mask.to(s.dtype) * coefficients.to(s.dtype)[:, None])[:, None, :]
    left = scaled.permute(1, 0, 2).reshape(rows, count * band)
    right = vh.reshape(count * band, vh.shape[-1])
    return origin + left @ right


def merge_other(origin: torch.Tensor, vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``o + Σt coef[t] · vt`` for a tensor that is not a matrix (never masked)."""
    return origin + torch.tensordot(coefficients.to(vectors.dtype), vectors, dims=1)


def apply_masks(
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    *,
    variant: str,
    coefficients: torch.Tensor,
    mask: Optional[torch.Tensor],
    band: Optional[int] = None,
    svd: str = DEFAULT_SVD,
) -> torch.Tensor:
    """One tensor of the final merge from hard ``mask`` [T, band] (None: not a matrix) and ``coefficients`` [T].

    Returns a tensor in the dtype of ``models[0]``.
    """
    out_dtype = models[0].dtype
    origin, vectors = origin_and_vectors(base, models, variant)
    coefficients = coefficients.to(origin.dtype)
    if mask is None:
        return merge_other(origin, vectors, coefficients).to(out_dtype)
    if band is None:
        band = mask.shape[-1]
    u, s, vh = factorize(vectors, band, svd=svd)
    return merge_matrix(origin, u, s, vh, mask.to(origin.dtype), coefficients).to(out_dtype)


# ---------------------------------------------------------------------------
# the learned file: safetensors with one bool mask [T, band] per matrix and one
# float32 coefficient row [T] per tensor; JSON metadata under "adarank".


def mask_key(name: str) -> str:
    return _MASK_PREFIX + name


def coefficient_key(name: str) -> str:
    return _COEFFICIENT_PREFIX + name


def write_learned_file(
    path: str | os.PathLike,
    masks: Dict[str, torch.Tensor],
    coefficients: Dict[str, torch.Tensor],
    info: Dict[str, Any],
) -> Path:
    """Write masks, coefficients and ``info`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        tensors[mask_key(name)] = mask.to("cpu", torch.bool).contiguous()
    for name, row in coefficients.items():
        tensors[coefficient_key(name)] = row.detach().to("cpu", torch.float32).contiguous()
    metadata = {"format": FILE_FORMAT, "adarank": json.dumps({"format": FILE_FORMAT, **info})}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


@dataclass
class LearnedFile:
    """An opened learned file: its metadata and lazy access to one tensor's mask and coefficients."""

    path: Path
    info: Dict[str, Any]
    _handle: Any

    def __post_init__(self) -> None:
        self._keys = set(self._handle.keys())

    @property
    def variant(self) -> str:
        return self.info["variant"]

    @property
    def task_count(self) -> int:
        return int(self.info["tasks"])

    @property
    def svd(self) -> str:
        return self.info.get("svd", DEFAULT_SVD)

    def coefficients(self, name: str) -> torch.Tensor:
        key = coefficient_key(name)
        if key not in self._keys:
            raise AdaRankFileError(
                f"adarank: {self.path} has no coefficients for tensor {name}: it was learned for other models"
            )
        return self._handle.get_tensor(key)

    def mask(self, name: str) -> Optional[torch.Tensor]:
        key = mask_key(name)
        return self._handle.get_tensor(key) if key in self._keys else None


_OPEN_FILES: Dict[Tuple[str, int, int], LearnedFile] = {}
_OPEN_LOCK = threading.Lock()


def open_learned_file(path: str | os.PathLike) -> LearnedFile:
    """Open (and cache, keyed by path, size and mtime) a learned file, with clear errors."""
    from safetensors import safe_open

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise AdaRankFileError(f"adarank: learned file not found: {path} (make one with `mergekit-ext adarank learn`)")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _OPEN_LOCK:
        cached = _OPEN_FILES.get(key)
        if cached is not None:
            return cached
        try:
            handle = safe_open(str(path), framework="pt")
            metadata = handle.metadata() or {}
        except Exception as error:
            raise AdaRankFileError(f"adarank: {path} is not a safetensors file: {error}") from None
        if metadata.get("format") != FILE_FORMAT or "adarank" not in metadata:
            raise AdaRankFileError(f"adarank: {path} is not an AdaRank file (expected format {FILE_FORMAT})")
        info = json.loads(metadata["adarank"])
        learned = LearnedFile(path=path, info=info, _handle=handle)
        _OPEN_FILES[key] = learned
        return learned


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
