"""``mergekit-ext rmm build / revert``: reversible bases of LoRA adapters from the command line."""

from __future__ import annotations

import click

from mergekit_ext.adapters import ADAPTER_DTYPES
from mergekit_ext.methods.rmm import VARIANTS
from mergekit_ext.output import quiet_option


@click.group("rmm")
def rmm_group() -> None:
    """Reversible merging of LoRA adapters (RMM): a K-adapter basis + coefficients."""


@rmm_group.command("build")
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False), help="Base model folder the adapters were trained on.")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-k", "k", required=True, type=click.IntRange(min=1), help="Basis size K (1 … number of adapters; K = n is lossless).")
@click.argument("out", nargs=1, type=click.Path())
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="factor", show_default=True, help="What is stacked: whole factors, each row/column, or the dense products.")
@click.option("--names", default=None, help="Comma-separated task names (default: the adapter folder names).")
@click.option("--basis-rank", type=click.IntRange(min=1), default=None, help="product variant: rank of each basis adapter (default: the adapters' rank).")
@click.option("--all-variants", is_flag=True, help="Also print the reconstruction error of the other variants at this K.")
@click.option("--dtype", type=click.Choice(sorted(ADAPTER_DTYPES)), default="float32", show_default=True, help="dtype of the stored basis factors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option
def build_command(base, adapters, k, out, variant, names, basis_rank, all_variants, dtype, overwrite, quiet) -> None:
    """Build an RMM bundle from ADAPTER folders (peft LoRA) into OUT.

    Usage: mergekit-ext rmm build --base BASE ADAPTER... -k K OUT
    """
    from mergekit_ext.adapters.peft_io import load_adapters
    from mergekit_ext.methods.rmm.format import write_bundle
    from mergekit_ext.methods.rmm.kernel import build_basis, reconstruction_errors

    from mergekit_ext import io

    name_list = None if names is None else [name.strip() for name in names.split(",")]
    # Refused before any work: an OUT that overlaps an input, or that is not ours to replace.
    io.check_output_not_input(out, [base, *adapters])
    io.check_replaceable(out, overwrite=overwrite)
    loaded = load_adapters(adapters, base, names=name_list)
    for adapter in loaded:
        for module, pair in adapter.modules.items():
            for label, factor in (("lora_A", pair.a), ("lora_B", pair.b)):
                io.check_finite_tensor(factor, tensor_name=f"{module}.{label}", source=f"adapter {adapter.path or adapter.name}")
    task_names = [adapter.name for adapter in loaded]
    duplicates = sorted({name for name in task_names if task_names.count(name) > 1})
    if duplicates:
        raise click.BadParameter(f"task names {duplicates} repeat (adapter folders with the same name); give unique ones with --names a,b,c", param_hint="--names")
    if k > len(loaded):
        raise click.BadParameter(f"K = {k} exceeds the number of adapters ({len(loaded)})", param_hint="-k")
    basis = build_basis(loaded, k, variant, basis_rank=basis_rank, progress=not quiet)
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
    from mergekit_ext.methods.rmm.format import revert

    revert(bundle, task, out, merged=merged, base=base, rank=rank, overwrite=overwrite)
    click.echo(f"wrote task '{task}' as {'a model' if merged else 'a peft adapter'}: {out}")


COMMANDS = (rmm_group,)
