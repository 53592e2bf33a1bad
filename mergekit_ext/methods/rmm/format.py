"""The RMM bundle format: K basis adapters plus coefficients, written and read atomically.

An RMM bundle is a folder:
    manifest.json              format, tasks (name, source, content hash), variant, K, base, storage, errors
    basis_00/ … basis_{K-1}/   the K basis adapters, ordinary peft adapters (scale 1)
    coefficients.safetensors   per module: ``<module>.a_coef``/``.b_coef`` ([n, K] or [n, K, r]) or ``.coef``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from mergekit_ext import io
from mergekit_ext.adapters import peft_io

BUNDLE_FORMAT = "mergekit-ext/rmm-bundle/1"
MANIFEST = "manifest.json"
COEFFICIENTS = "coefficients.safetensors"


class BundleError(ValueError):
    """An RMM bundle folder that is incomplete or inconsistent."""


# ---------------------------------------------------------------------------
# bundle I/O


def write_bundle(out: str | os.PathLike, basis, adapters, *, base: str, dtype: str = "float32", overwrite: bool = False, extra: Optional[Dict] = None) -> Dict:
    """Write an RMM basis (``methods.rmm.RmmBasis``) as a bundle folder, atomically.

    Returns the manifest, whose ``storage`` compares the bundle with keeping every adapter.
    """
    from safetensors.torch import save_file

    from mergekit_ext.methods.rmm.kernel import adapter_parameter_count

    torch_dtype = peft_io.torch_dtype(dtype)
    basis_names = [f"basis_{index:02d}" for index in range(basis.k)]
    inputs = [base, *(adapter.path for adapter in adapters if adapter.path)]
    with io.atomic_output_dir(out, overwrite=overwrite, inputs=inputs, kind="rmm-bundle") as staging:
        template = adapters[0].config if adapters else None
        for folder_name, modules in zip(basis_names, basis.basis_adapters()):
            peft_io.write_adapter(staging / folder_name, modules, base_model=str(Path(base).absolute()), dtype=torch_dtype, template=template)
        # coefficients stay float32: they are few and carry the reconstruction
        for key, value in basis.coefficients().items():
            io.check_finite_tensor(value, tensor_name=key, source="the RMM coefficients")
        save_file({key: value.contiguous() for key, value in basis.coefficients().items()}, str(staging / COEFFICIENTS), metadata={"format": "pt"})
        kept = adapter_parameter_count(adapters)
        storage = {
            "bundle_parameters": basis.parameter_count(),
            "adapters_parameters": kept,
            "ratio": basis.parameter_count() / kept,
            "bundle_bytes": io.folder_bytes(staging),
            "adapters_bytes": sum(peft_io.adapter_bytes(adapter.path) for adapter in adapters if adapter.path),
        }
        manifest = {
            "format": BUNDLE_FORMAT,
            "variant": basis.variant,
            "k": basis.k,
            "base": {"path": str(Path(base).absolute()), "content_hash": io.content_hash(base)},
            "dtype": dtype,
            "basis": basis_names,
            "tasks": [
                {
                    "name": adapter.name,
                    "source": str(Path(adapter.path).absolute()) if adapter.path else None,
                    "content_hash": peft_io.adapter_hash(adapter.path) if adapter.path else None,
                    "max_rank": max(f.rank for f in adapter.modules.values()),
                    "modules": len(adapter.modules),
                    "task_type": adapter.config.get("task_type"),
                }
                for adapter in adapters
            ],
            "storage": storage,
            **(extra or {}),
        }
        io.write_json(staging / MANIFEST, manifest)
    return manifest


def read_bundle(path: str | os.PathLike):
    """Manifest and ``RmmBasis`` of a bundle folder, with clear errors for missing parts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mergekit_ext.methods.rmm.kernel import RmmBasis

    folder = Path(path)
    manifest_path = folder / MANIFEST
    manifest = io.read_json_object(manifest_path, error=BundleError, missing=f"not an RMM bundle (no {MANIFEST}): {folder}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    missing = [key for key in ("basis", "k", "tasks", "variant", "base") if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: missing key(s) {', '.join(missing)} (corrupt bundle?)")
    if not isinstance(manifest["base"], dict) or not {"path", "content_hash"} <= set(manifest["base"]):
        raise BundleError(f"{manifest_path}: the base entry needs a path and a content_hash (corrupt bundle?)")
    for name in manifest["basis"]:
        io.check_name(str(name), what=f"basis folder name in {manifest_path}")
    basis_adapters = []
    for name in manifest["basis"]:
        adapter = peft_io.read_adapter(folder / name)
        basis_adapters.append(adapter.modules)
    if isinstance(manifest["k"], bool) or not isinstance(manifest["k"], int) or manifest["k"] < 1:
        raise BundleError(f"{manifest_path}: k must be a whole number >= 1, got {manifest['k']!r} (corrupt bundle?)")
    if len(basis_adapters) != manifest["k"]:
        raise BundleError(f"{manifest_path}: k is {manifest['k']} but {len(basis_adapters)} basis adapters are listed")
    try:
        coefficients = load_file(str(folder / COEFFICIENTS))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise BundleError(f"cannot read {folder / COEFFICIENTS} (missing, truncated or corrupt?): {error}") from None
    for key, value in coefficients.items():  # an edited file would silently change every reverted task
        if not value.is_floating_point():
            raise BundleError(f"{folder / COEFFICIENTS}: tensor '{key}' is {value.dtype}, expected floating point (edited or corrupt?)")
        io.check_finite_tensor(value, tensor_name=key, source=str(folder / COEFFICIENTS))
    if not isinstance(manifest["tasks"], list) or not all(isinstance(task, dict) and isinstance(task.get("name"), str) for task in manifest["tasks"]):
        raise BundleError(f"{manifest_path}: tasks must be a list of objects with a name (corrupt bundle?)")
    tasks = [task["name"] for task in manifest["tasks"]]
    try:
        basis = RmmBasis.from_parts(manifest["variant"], tasks, basis_adapters, coefficients)
    except ValueError as error:
        raise BundleError(f"{folder}: {error}") from None
    for key, value in coefficients.items():
        if value.dim() < 2 or value.shape[0] != len(tasks) or value.shape[1] != basis.k:
            raise BundleError(f"{folder / COEFFICIENTS}: '{key}' has shape {tuple(value.shape)}, expected [{len(tasks)}, {basis.k}, …]")
    return manifest, basis


def reverted_factors(basis, task: str, *, rank: Optional[int] = None):
    """Task ``task``'s factors from a basis, re-truncated to ``rank`` (or to what the weight allows)."""
    factors = basis.reconstruct(task)
    result = {}
    for module, pair in factors.items():
        limit = min(pair.a.shape[1], pair.b.shape[0])
        target = limit if rank is None else min(rank, limit)
        result[module] = peft_io.refactorize(pair, target)
    return result


def revert(bundle: str | os.PathLike, task: str, out: str | os.PathLike, *, merged: bool = False, base: Optional[str] = None, rank: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write task ``task`` of a bundle as a peft adapter (or, ``merged``, a full model folder) at ``out``."""
    io.check_output_not_input(out, [bundle, base])
    io.check_replaceable(out, overwrite=overwrite)
    manifest, basis = read_bundle(bundle)
    basis.task_index(task)  # a clear error naming the tasks the bundle has
    base = base or manifest["base"]["path"]
    if not Path(base).is_dir():
        raise BundleError(f"the bundle's base model {base} does not exist; pass --base")
    # the base must be the one the adapters were made for: same weights, so same shapes
    if io.content_hash(base) != manifest["base"]["content_hash"]:
        raise BundleError(f"base model {base} is not the one this bundle was built on ({manifest['base']['path']}): its weights differ")
    factors = reverted_factors(basis, task, rank=rank)
    peft_io.check_adapters_against_base([peft_io.LoraAdapter(name=f"{bundle} (task {task})", modules=factors)], base)
    template = next((t for t in manifest["tasks"] if t["name"] == task), {})
    with io.atomic_output_dir(out, overwrite=overwrite, inputs=[bundle, base], kind="merged-model" if merged else "lora-adapter") as staging:
        if merged:
            by_weight = {peft_io.weight_name(module): pair for module, pair in factors.items()}
            peft_io.merged_model(base, by_weight, lambda name: by_weight[name].delta(), staging)
        else:
            dtype = peft_io.torch_dtype(manifest.get("dtype", "float32"))
            peft_io.write_adapter(staging, factors, base_model=str(Path(base).absolute()), dtype=dtype, template={"task_type": template.get("task_type")})
    return Path(out)
