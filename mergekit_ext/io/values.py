"""Values and names that come from users: finite numbers and tensors, file-safe names, dtypes."""

from __future__ import annotations

from typing import Optional


class NonFiniteError(ValueError):
    """A NaN or infinite number where a finite one is required."""


def check_finite_tensor(tensor, *, tensor_name: str, source: str) -> None:
    """Refuse a floating-point tensor holding NaN or ±Inf, naming the tensor and where it came from."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    raise NonFiniteError(f"tensor {tensor_name} in {source} holds {bad} non-finite value(s) ({kind}); refusing to use it")


def check_finite_number(value: float, *, label: str) -> float:
    """Refuse a NaN or infinite option value, naming the option."""
    import math

    if value is not None and not math.isfinite(float(value)):
        raise NonFiniteError(f"{label} must be a finite number, got {value}")
    return value


_FORBIDDEN_NAME_CHARS = set('/\\\0:*?"<>|')


def check_name(name: str, *, what: str = "name") -> str:
    """A name that becomes a file or folder name: no separators, no ``..``, not hidden, not empty."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must not be empty")
    bad = sorted(_FORBIDDEN_NAME_CHARS & set(name))
    if bad or name in (".", "..") or name.startswith(".") or len(name.encode()) > 200 or any(ord(c) < 32 for c in name):
        raise ValueError(
            f"{what} {name!r} cannot be used as a file name (no path separators, '..', leading '.', "
            "control or reserved characters, at most 200 bytes)"
        )
    return name


def check_dtype_name(name: Optional[str], *, label: str = "--dtype") -> Optional[str]:
    """Refuse a dtype mergekit cannot write, before any work."""
    allowed = ("float32", "float16", "bfloat16", "float64")
    if name is None:
        return None
    stripped = name[len("torch."):] if name.startswith("torch.") else name
    if stripped not in allowed:
        raise ValueError(f"{label}: unknown dtype {name!r}; choose one of {', '.join(allowed)}")
    return name
