"""``mergekit-ext rmm build|revert`` and ``mergekit-ext lora merge``, plus the RMM bundle format.

An RMM bundle is a folder:
    manifest.json              tasks (name, source, adapter hash), variant, K, base, storage, errors
    basis_00/ … basis_{K-1}/   the K basis adapters, ordinary peft adapters (scale 1)
    coefficients.safetensors   per module: ``<module>.a_coef``/``.b_coef`` ([n, K] or [n, K, r]) or ``.coef``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import click

BUNDLE_FORMAT = "mergekit-ext/rmm-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
COEFFICIENTS = "coefficients.safetensors"
DTYPES = ("bfloat16", "float16", "float32")


class BundleError(ValueError):
    """An RMM bundle folder that is incomplete or inconsistent."""


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def _adapter_bytes(folder: Path) -> int:
    """Bytes of an adapter's config and weights (not the README peft writes beside them)."""
    from mergekit_ext import lora

    return sum((folder / name).stat().st_size for name in (lora.CONFIG_FILE, lora.SAFETENSORS_FILE, lora.BIN_FILE) if (folder / name).is_file())


def load_adapters(paths: Sequence[str], names: Optional[Sequence[str]], base: str):
    """Read adapters and check them against the base model and each other."""
    from mergekit_ext import lora

    if names is not None and len(names) != len(paths):
        raise click.BadParameter(f"{len(names)} names for {len(paths)} adapters", param_hint="--names")
    adapters = [lora.read_adapter(path, name=None if names is None else names[index]) for index, path in enumerate(paths)]
    modules = lora.module_union(adapters)
    shapes = lora.base_weight_shapes(base, [lora.weight_name(module) for module in modules])
    lora.check_against_base(adapters, shapes, base_label=f"base model {base}")
    return adapters


# ---------------------------------------------------------------------------
# bundle I/O


def write_bundle(out: str | os.PathLike, basis, adapters, *, base: str, dtype: str = "float32", overwrite: bool = False, extra: Optional[Dict] = None) -> Dict:
    """Write an RMM basis (``methods.rmm.RmmBasis``) as a bundle folder, atomically.

    Returns the manifest, whose ``storage`` compares the bundle with keeping every adapter.
    """
    from mergekit_ext.methods.rmm import adapter_parameter_count
    from safetensors.torch import save_file

    from mergekit_ext import lora
    from mergekit_ext.io import atomic_output_dir, content_hash, write_json

    torch_dtype = _torch_dtype(dtype)
    basis_names = [f"basis_{index:02d}" for index in range(basis.k)]
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        template = adapters[0].config if adapters else None
        for folder_name, modules in zip(basis_names, basis.basis_adapters()):
            lora.write_adapter(staging / folder_name, modules, base_model=str(Path(base).absolute()), dtype=torch_dtype, template=template)
        # coefficients stay float32: they are few and carry the reconstruction
        save_file({key: value.contiguous() for key, value in basis.coefficients().items()}, str(staging / COEFFICIENTS), metadata={"format": "pt"})
        kept = adapter_parameter_count(adapters)
        storage = {
            "bundle_parameters": basis.parameter_count(),
            "adapters_parameters": kept,
            "ratio": basis.parameter_count() / kept,
            "bundle_bytes": _folder_bytes(staging),
            "adapters_bytes": sum(_adapter_bytes(Path(adapter.path)) for adapter in adapters if adapter.path),
        }
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "variant": basis.variant,
            "k": basis.k,
            "base_model": str(Path(base).absolute()),
            "base_hash": content_hash(base),
            "dtype": dtype,
            "basis": basis_names,
            "tasks": [
                {
                    "name": adapter.name,
                    "source": str(Path(adapter.path).absolute()) if adapter.path else None,
                    "adapter_hash": lora.adapter_hash(adapter.path) if adapter.path else None,
                    "max_rank": max(f.rank for f in adapter.modules.values()),
                    "modules": len(adapter.modules),
                    "task_type": adapter.config.get("task_type"),
                }
                for adapter in adapters
            ],
            "storage": storage,
            **(extra or {}),
        }
        write_json(staging / MANIFEST, manifest)
    return manifest


def read_bundle(path: str | os.PathLike):
    """Manifest and ``RmmBasis`` of a bundle folder, with clear errors for missing parts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mergekit_ext import lora
    from mergekit_ext.io import read_json_object
    from mergekit_ext.methods.rmm import RmmBasis

    folder = Path(path)
    manifest_path = folder / MANIFEST
    manifest = read_json_object(manifest_path, error=BundleError, missing=f"not an RMM bundle (no {MANIFEST}): {folder}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{manifest_path}: bundle version {manifest.get('version')} is not supported (this is {BUNDLE_VERSION})")
    basis_adapters = []
    for name in manifest["basis"]:
        adapter = lora.read_adapter(folder / name)
        basis_adapters.append(adapter.modules)
    if len(basis_adapters) != manifest["k"]:
        raise BundleError(f"{manifest_path}: k is {manifest['k']} but {len(basis_adapters)} basis adapters are listed")
    try:
        coefficients = load_file(str(folder / COEFFICIENTS))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise BundleError(f"cannot read {folder / COEFFICIENTS} (missing, truncated or corrupt?): {error}") from None
    tasks = [task["name"] for task in manifest["tasks"]]
    try:
        basis = RmmBasis.from_parts(manifest["variant"], tasks, basis_adapters, coefficients)
    except ValueError as error:
        raise BundleError(f"{folder}: {error}") from None
    for key, value in coefficients.items():
        if value.shape[0] != len(tasks) or value.shape[1] != basis.k:
            raise BundleError(f"{folder / COEFFICIENTS}: '{key}' has shape {tuple(value.shape)}, expected [{len(tasks)}, {basis.k}, …]")
    return manifest, basis


def reverted_factors(basis, task: str, *, rank: Optional[int] = None):
    """Task ``task``'s factors from a basis, re-truncated to ``rank`` (or to what the weight allows)."""
    from mergekit_ext import lora

    factors = basis.reconstruct(task)
    result = {}
    for module, pair in factors.items():
        limit = min(pair.a.shape[1], pair.b.shape[0])
        target = limit if rank is None else min(rank, limit)
        result[module] = lora.refactorize(pair, target)
    return result


# ---------------------------------------------------------------------------
# commands


@click.group("rmm")
def rmm_group() -> None:
    """Reversible merging of LoRA adapters (RMM): a K-adapter basis + coefficients."""


@rmm_group.command("build")
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False), help="Base model folder the adapters were trained on.")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-k", "k", required=True, type=click.IntRange(min=1), help="Basis size K (1 … number of adapters; K = n is lossless).")
@click.argument("out", nargs=1, type=click.Path())
@click.option("--variant", type=click.Choice(["factor", "position", "product"]), default="factor", show_default=True, help="What is stacked: whole factors, each row/column, or the dense products.")
@click.option("--names", default=None, help="Comma-separated task names (default: the adapter folder names).")
@click.option("--basis-rank", type=click.IntRange(min=1), default=None, help="product variant: rank of each basis adapter (default: the adapters' rank).")
@click.option("--all-variants", is_flag=True, help="Also print the reconstruction error of the other variants at this K.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True, help="dtype of the stored basis factors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def build_command(base, adapters, k, out, variant, names, basis_rank, all_variants, dtype, overwrite) -> None:
    """Build an RMM bundle from ADAPTER folders (peft LoRA) into OUT.

    Usage: mergekit-ext rmm build --base BASE ADAPTER... -k K OUT
    """
    from mergekit_ext.methods.rmm import build_basis, reconstruction_errors

    name_list = None if names is None else [name.strip() for name in names.split(",")]
    loaded = load_adapters(adapters, name_list, base)
    task_names = [adapter.name for adapter in loaded]
    duplicates = sorted({name for name in task_names if task_names.count(name) > 1})
    if duplicates:
        raise click.BadParameter(f"task names {duplicates} repeat (adapter folders with the same name); give unique ones with --names a,b,c", param_hint="--names")
    if k > len(loaded):
        raise click.BadParameter(f"K = {k} exceeds the number of adapters ({len(loaded)})", param_hint="-k")
    basis = build_basis(loaded, k, variant, basis_rank=basis_rank, progress=True)
    errors = {variant: reconstruction_errors(basis, loaded)}
    if all_variants:
        for other in ("factor", "position", "product"):
            if other != variant:
                errors[other] = reconstruction_errors(build_basis(loaded, k, other, basis_rank=basis_rank), loaded)
    manifest = write_bundle(out, basis, loaded, base=base, dtype=dtype, overwrite=overwrite, extra={"reconstruction_error": errors[variant], "basis_rank": basis_rank})
    storage = manifest["storage"]
    click.echo(
        f"storage: {storage['bundle_parameters']:,} numbers in the bundle vs {storage['adapters_parameters']:,} "
        f"for all {len(loaded)} adapters ({storage['ratio']:.3f}x); on disk {storage['bundle_bytes']:,} vs "
        f"{storage['adapters_bytes']:,} bytes"
    )
    click.echo(f"relative reconstruction error ‖ΔŴ−ΔW‖/‖ΔW‖ per task (K={k}):")
    width = max(len("task"), *(len(adapter.name) for adapter in loaded))
    click.echo(f"  {'task':<{width}}" + "".join(f"  {name:>10}" for name in errors))
    for adapter in loaded:
        click.echo(f"  {adapter.name:<{width}}" + "".join(f"  {errors[name][adapter.name]:10.3e}" for name in errors))
    click.echo(f"wrote {out}")


@rmm_group.command("revert")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("task")
@click.argument("out", type=click.Path())
@click.option("--merged", is_flag=True, help="Write a full model folder (base + update) instead of an adapter.")
@click.option("--base", "base", default=None, type=click.Path(exists=True, file_okay=False), help="Base model folder (default: the one recorded in the bundle).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Re-truncate each module to this rank by SVD.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def revert_command(bundle, task, out, merged, base, rank, overwrite) -> None:
    """Write task TASK of an RMM BUNDLE back as a peft adapter (or, with --merged, a model) in OUT."""
    from mergekit_ext import lora
    from mergekit_ext.io import atomic_output_dir

    manifest, basis = read_bundle(bundle)
    if task not in basis.tasks:
        raise click.BadParameter(f"task '{task}' is not in {bundle}; it has {', '.join(basis.tasks)}", param_hint="TASK")
    base = base or manifest["base_model"]
    if not Path(base).is_dir():
        raise click.BadParameter(f"the bundle's base model {base} does not exist; pass --base", param_hint="--base")
    factors = reverted_factors(basis, task, rank=rank)
    # the base must be the one the adapters were made for: same weights, so same shapes
    from mergekit_ext.io import content_hash

    if manifest.get("base_hash") and content_hash(base) != manifest["base_hash"]:
        raise BundleError(f"base model {base} is not the one this bundle was built on ({manifest['base_model']}): its weights differ")
    shapes = lora.base_weight_shapes(base, [lora.weight_name(module) for module in factors])
    lora.check_against_base([lora.LoraAdapter(name=f"{bundle} (task {task})", modules=factors)], shapes, base_label=f"base model {base}")
    template = next((t for t in manifest["tasks"] if t["name"] == task), {})
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        if merged:
            by_weight = {lora.weight_name(module): pair for module, pair in factors.items()}
            lora.merged_model(base, by_weight, lambda name: by_weight[name].delta(), staging)
        else:
            dtype = _torch_dtype(manifest.get("dtype", "float32"))
            lora.write_adapter(staging, factors, base_model=str(Path(base).absolute()), dtype=dtype, template={"task_type": template.get("task_type")})
    click.echo(f"wrote task '{task}' as {'a model' if merged else 'a peft adapter'}: {out}")


@click.group("lora")
def lora_group() -> None:
    """LoRA adapters in, LoRA adapter out."""


def _parse_param(text: str):
    import yaml

    if "=" not in text:
        raise click.BadParameter(f"expected key=value, got '{text}'", param_hint="--param")
    key, raw = text.split("=", 1)
    if "," in raw and not raw.strip().startswith("["):
        return key.strip(), [yaml.safe_load(part) for part in raw.split(",")]
    return key.strip(), yaml.safe_load(raw)


@lora_group.command("merge")
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False), help="Base model folder the adapters were trained on.")
@click.option("--method", required=True, help="Any merge method registered in mergekit (ours or mergekit's).")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-r", "--rank", required=True, type=click.IntRange(min=1), help="Rank of the merged adapter (truncated SVD per module).")
@click.argument("out", nargs=1, type=click.Path())
@click.option("--param", "params", multiple=True, help="Method parameter key=value; a,b,c gives one value per adapter.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True, help="dtype of the written factors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def merge_command(base, method, adapters, rank, out, params, dtype, overwrite) -> None:
    """Merge ADAPTER folders with METHOD in dense space and write one rank-RANK adapter to OUT.

    Usage: mergekit-ext lora merge --base BASE --method NAME ADAPTER... -r RANK OUT
    """
    from mergekit_ext import lora
    from mergekit_ext.io import atomic_output_dir, open_model

    loaded = load_adapters(adapters, None, base)
    parameters = dict(_parse_param(text) for text in params)
    loader = open_model(base)
    factors, _ = lora.merge_adapters(loaded, loader.get_tensor, method, rank, parameters=parameters, progress=True)
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        lora.write_adapter(staging, factors, base_model=str(Path(base).absolute()), dtype=_torch_dtype(dtype), template=loaded[0].config)
    click.echo(f"merged {len(loaded)} adapters with {method} into a rank-{rank} adapter: {out}")


COMMANDS = (rmm_group, lora_group)
