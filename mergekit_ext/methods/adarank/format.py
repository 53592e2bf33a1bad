"""The learned AdaRank file: safetensors with one bool mask [T, band] per matrix and one
float32 coefficient row [T] per tensor; JSON metadata under ``adarank``."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from mergekit_ext import io
from mergekit_ext.methods.adarank import DEFAULT_SVD, FILE_FORMAT

_MASK_PREFIX = "mask/"
_COEFFICIENT_PREFIX = "coefficient/"


class AdaRankFileError(ValueError):
    """A learned AdaRank file that is unreadable or does not fit the models being merged."""


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
