"""The learned AdaRank file: safetensors with one bool mask [rows, band] per matrix, one
float32 coefficient row [rows] per tensor and one float32 fingerprint [rows, k] per matrix
(the top k singular values of each row's components, so a merge can check it factorises
the same weights); JSON metadata under ``adarank``. rows = T, or T + 1 for ``iso_cts``
(the last row is the common subspace); band is the variant's (``method.mask_grid``).
Files without fingerprints or with only the variants ``ta`` / ``cart`` (earlier
releases) are still read."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from mergekit_ext import io
from mergekit_ext.methods.adarank import (
    DEFAULT_SVD,
    FILE_FORMAT,
    FINGERPRINT_RTOL,
    VARIANTS,
)

_MASK_PREFIX = "mask/"
_COEFFICIENT_PREFIX = "coefficient/"
_FINGERPRINT_PREFIX = "fingerprint/"
# Not written: a file must be byte-identical for the same inputs and seed.
_VOLATILE_INFO = ("created_at", "seconds")


class AdaRankFileError(ValueError):
    """A learned AdaRank file that is unreadable or does not fit the models being merged."""


def mask_key(name: str) -> str:
    return _MASK_PREFIX + name


def coefficient_key(name: str) -> str:
    return _COEFFICIENT_PREFIX + name


def fingerprint_key(name: str) -> str:
    return _FINGERPRINT_PREFIX + name


def write_learned_file(
    path: str | os.PathLike,
    masks: Dict[str, torch.Tensor],
    coefficients: Dict[str, torch.Tensor],
    info: Dict[str, Any],
    fingerprints: Optional[Dict[str, torch.Tensor]] = None,
) -> Path:
    """Write masks, coefficients, fingerprints and ``info`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    # Reproducible bytes: the same inputs and seed give the same file, so no timestamp.
    info = {key: value for key, value in info.items() if key not in _VOLATILE_INFO}
    tensors: Dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        tensors[mask_key(name)] = mask.to("cpu", torch.bool).contiguous()
    for name, row in coefficients.items():
        tensors[coefficient_key(name)] = row.detach().to("cpu", torch.float32).contiguous()
        io.check_finite_tensor(tensors[coefficient_key(name)], tensor_name=name, source="the learned coefficients")
    for name, values in (fingerprints or {}).items():
        tensors[fingerprint_key(name)] = values.detach().to("cpu", torch.float32).contiguous()
    # One metadata key: safetensors writes the header's metadata map in no fixed
    # order, so a second key would make the bytes differ between runs.
    metadata = {"adarank": json.dumps({"format": FILE_FORMAT, **info})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
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
        return self._checked(key, torch.float32, 1)

    def mask(self, name: str) -> Optional[torch.Tensor]:
        key = mask_key(name)
        return self._checked(key, torch.bool, 2) if key in self._keys else None

    def fingerprint(self, name: str) -> Optional[torch.Tensor]:
        """The recorded top singular values [T, k] of a matrix's task vectors (None: not recorded)."""
        key = fingerprint_key(name)
        if key not in self._keys:
            return None
        values = self._checked(key, torch.float32, 2)
        if bool((values < 0).any()):
            raise AdaRankFileError(f"adarank: {self.path}: tensor {key} holds negative singular values (edited or corrupt file)")
        return values

    def _checked(self, key: str, dtype: torch.dtype, dims: int) -> torch.Tensor:
        """A stored tensor of the dtype and rank this format writes, finite (an edited file is refused)."""
        tensor = self._handle.get_tensor(key)
        if tensor.dtype != dtype or tensor.dim() != dims:
            raise AdaRankFileError(
                f"adarank: {self.path}: tensor {key} is {str(tensor.dtype).replace('torch.', '')} with {tensor.dim()} dimension(s), "
                f"expected {str(dtype).replace('torch.', '')} with {dims} (edited or corrupt file)"
            )
        if dtype != torch.bool:
            io.check_finite_tensor(tensor, tensor_name=key, source=str(self.path))
        return tensor

    @property
    def fingerprint_rtol(self) -> float:
        return float((self.info.get("fingerprint") or {}).get("rtol", FINGERPRINT_RTOL))


REQUIRED_KEYS = ("variant", "tasks", "max_rank_ratio")


def _header_format(metadata: Dict[str, str]) -> Optional[str]:
    """The file's format string, inside the ``adarank`` JSON."""
    try:
        return json.loads(metadata.get("adarank", "")).get("format")
    except (ValueError, AttributeError):
        return None


def is_learned_file(path: str | os.PathLike) -> bool:
    """True for a file whose header says it is an AdaRank file (``--overwrite`` may replace it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return _header_format(handle.metadata() or {}) == FILE_FORMAT
    except Exception:
        return False


_VERIFIED: Dict[Tuple[str, str], bool] = {}
_DIGESTS: Dict[str, str] = {}


def content_hash_once(path: str) -> str:
    """A model folder's content hash, computed once per process and path."""
    if path not in _DIGESTS:
        _DIGESTS[path] = io.content_hash(path)
    return _DIGESTS[path]


def verify_models(learned: "LearnedFile", model_paths, base_path: Optional[str]) -> None:
    """Refuse models (and a ``ta`` file's base) whose weights differ from those the file was learned on.

    Compares the content hashes recorded at learning time with the files now at
    those paths: one sequential read of every model's weights (about as long as
    copying them once: ~1 s per GB), done once per process and path.
    """
    recorded = {entry.get("path"): entry.get("content_hash") for entry in learned.info.get("models", []) if isinstance(entry, dict)}
    checks = [(path, recorded.get(path), "model") for path in model_paths if path is not None]
    base_info = learned.info.get("base") or {}
    if learned.variant == "ta" and base_path is not None and base_info.get("content_hash"):
        checks.append((base_path, base_info["content_hash"], "base_model"))
    for path, digest, role in checks:
        if not digest:
            continue
        key = (path, digest)
        if key not in _VERIFIED:
            _VERIFIED[key] = io.content_hash(path) == digest
        if not _VERIFIED[key]:
            raise AdaRankFileError(
                f"adarank: {role} {path} is not the one {learned.path} was learned on (its weights' content hash "
                f"differs from the recorded {digest[:12]}…); learn the file again for these weights"
            )


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
        if _header_format(metadata) != FILE_FORMAT or "adarank" not in metadata:
            raise AdaRankFileError(f"adarank: {path} is not an AdaRank file (expected format {FILE_FORMAT})")
        try:
            info = json.loads(metadata["adarank"])
        except json.JSONDecodeError as error:
            raise AdaRankFileError(f"adarank: {path}: its metadata is not valid JSON: {error}") from None
        missing = [key for key in REQUIRED_KEYS if not isinstance(info, dict) or key not in info]
        if missing:
            raise AdaRankFileError(f"adarank: {path}: metadata lacks {', '.join(missing)} (corrupt or not written by adarank learn)")
        if info["variant"] not in VARIANTS or not isinstance(info["tasks"], int) or info["tasks"] < 1:
            raise AdaRankFileError(f"adarank: {path}: bad variant {info['variant']!r} or task count {info['tasks']!r}")
        _check_info(path, info)
        learned = LearnedFile(path=path, info=info, _handle=handle)
        _OPEN_FILES[key] = learned
        return learned


def _check_info(path: Path, info: Dict[str, Any]) -> None:
    """Refuse metadata values out of their range (an edited file would silently change the merge)."""
    import math

    def number(key: str, low: float, high: float, default=None) -> None:
        value = info.get(key, default)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low < value <= high:
            raise AdaRankFileError(f"adarank: {path}: metadata {key} = {value!r} is out of range ({low}, {high}] (edited or corrupt file)")

    number("max_rank_ratio", 0.0, 1.0)
    number("common_space_fraction", 0.0, 1.0)
    rtol = (info.get("fingerprint") or {}).get("rtol") if isinstance(info.get("fingerprint"), dict) else None
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or not 0 <= rtol < 1):
        raise AdaRankFileError(f"adarank: {path}: metadata fingerprint.rtol = {rtol!r} is out of range [0, 1) (edited or corrupt file)")
    models = info.get("models", [])
    if not isinstance(models, list) or not all(isinstance(entry, dict) for entry in models):
        raise AdaRankFileError(f"adarank: {path}: metadata models must be a list of objects (edited or corrupt file)")
