"""Writing the merged model a learned file gives, through mergekit's engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def merge_config(file: str | os.PathLike, models: Sequence[str | os.PathLike], base: Optional[str | os.PathLike], dtype: Optional[str] = None) -> dict:
    """A mergekit config that applies a learned file (absolute paths)."""
    config = {
        "merge_method": "adarank",
        "models": [{"model": str(Path(model).absolute())} for model in models],
        "parameters": {"file": str(Path(file).absolute())},
    }
    if base is not None:
        config["base_model"] = str(Path(base).absolute())
    if dtype is not None:
        config["dtype"] = dtype
    return config


def write_merged_model(
    file: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    base: Optional[str | os.PathLike] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Run ``merge_method: adarank`` with ``file`` through mergekit's engine, atomically into ``out``."""
    from mergekit_ext.engine import run_merge_atomic

    return run_merge_atomic(merge_config(file, models, base, dtype), out, overwrite=overwrite)

