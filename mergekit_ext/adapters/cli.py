"""``mergekit-ext lora merge``: LoRA adapters in, one LoRA adapter out, with any mergekit method."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_ext.adapters import ADAPTER_DTYPES
from mergekit_ext.output import quiet_option


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
@click.option("--dtype", type=click.Choice(sorted(ADAPTER_DTYPES)), default="float32", show_default=True, help="dtype of the written factors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option
def merge_command(base, method, adapters, rank, out, params, dtype, overwrite, quiet) -> None:
    """Merge ADAPTER folders with METHOD in dense space and write one rank-RANK adapter to OUT.

    Usage: mergekit-ext lora merge --base BASE --method NAME ADAPTER... -r RANK OUT
    """
    from mergekit_ext import io
    from mergekit_ext.adapters import peft_io
    from mergekit_ext.adapters.merge import merge_adapters

    # Refused before any work: an OUT that overlaps an input, or that is not ours to replace.
    io.check_output_not_input(out, [base, *adapters])
    io.check_replaceable(out, overwrite=overwrite)
    loaded = peft_io.load_adapters(adapters, base)
    for adapter in loaded:
        for module, pair in adapter.modules.items():
            for label, factor in (("lora_A", pair.a), ("lora_B", pair.b)):
                io.check_finite_tensor(factor, tensor_name=f"{module}.{label}", source=f"adapter {adapter.path or adapter.name}")
    parameters = dict(_parse_param(text) for text in params)
    loader = io.open_model(base)
    factors = merge_adapters(loaded, loader.get_tensor, method, rank, parameters=parameters, progress=not quiet)
    for module, pair in factors.items():  # never write a non-finite adapter
        for label, factor in (("lora_A", pair.a), ("lora_B", pair.b)):
            io.check_finite_tensor(factor, tensor_name=f"{module}.{label}", source="the merged adapter")
    with io.atomic_output_dir(out, overwrite=overwrite, inputs=[base, *adapters], kind="lora-adapter") as staging:
        peft_io.write_adapter(staging, factors, base_model=str(Path(base).absolute()), dtype=peft_io.torch_dtype(dtype), template=loaded[0].config)
    click.echo(f"merged {len(loaded)} adapters with {method} into a rank-{rank} adapter: {out}")


COMMANDS = (lora_group,)
