"""Safetensors headers: each tensor's shape and stored dtype, without reading any weight."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from mergekit_ext.io.models import ModelFolderError, open_model


def header_shapes(path: str | os.PathLike, names: Optional[Iterable[str]] = None) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes of a model folder (or one safetensors file) from the headers, no weights read.

    ``names`` limits the result to those tensors. ``.bin`` checkpoints have no
    header, so their tensors are loaded to read the shapes.
    """
    from safetensors import safe_open

    path = Path(path)
    wanted = None if names is None else set(names)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if wanted is None or key in wanted:
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as error:
            raise ModelFolderError(f"cannot read safetensors file {file}: {error}") from None
    if not files and path.is_dir():
        loader = open_model(path)
        for key in loader.index.tensor_paths:
            if wanted is None or key in wanted:
                shapes[key] = tuple(loader.get_tensor(key).shape)
    return shapes


def header_dtypes(path: str | os.PathLike) -> Dict[str, str]:
    """Each tensor's stored dtype (safetensors codes: F32, BF16, F16, …) from a model folder's
    headers, no weights read (``.bin`` checkpoints: none)."""
    from safetensors import safe_open

    dtypes: Dict[str, str] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    dtypes[key] = handle.get_slice(key).get_dtype()
        except Exception as error:
            raise ModelFolderError(f"cannot read safetensors file {file}: {error}") from None
    return dtypes
