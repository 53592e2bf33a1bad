"""``mergekit-ext tall compress / recover``: TALL-mask bundles from the command line."""

from __future__ import annotations

import click

from mergekit_ext.methods.consensus import DEFAULT_TALL_LAMBDA


@click.group("tall")
def tall_group() -> None:
    """TALL-mask compression: many fine-tunes as one task vector plus bit masks."""


@tall_group.command("compress")
@click.option("--base", "base", required=True, type=click.Path(), help="The pretrained model the fine-tunes started from.")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--tall-lambda", "tall_lambda", multiple=True, type=float, help=f"λt of each task's mask (one value for all, or one per model; default {DEFAULT_TALL_LAMBDA}).")
@click.option("--names", default=None, help="Comma-separated task names (default: model folder names).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def compress_command(base, models, out, tall_lambda, names, overwrite) -> None:
    """Compress MODELS (fine-tunes of --base) into the bundle folder OUT."""
    from mergekit_ext.methods.consensus.format import compress

    report = compress(
        base,
        models,
        out,
        names=names.split(",") if names else None,
        tall_lambdas=list(tall_lambda) or None,
        overwrite=overwrite,
    )
    click.echo(f"wrote {out}")
    for line in report.lines():
        click.echo(line)


@tall_group.command("recover")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--base", default=None, type=click.Path(), help="The base model, if it moved since compression (checked by content hash).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def recover_command(bundle, model, out, base, overwrite) -> None:
    """Write task MODEL of BUNDLE as a Hugging Face model folder OUT."""
    from mergekit_ext.methods.consensus.format import recover

    recover(bundle, model, out, base=base, overwrite=overwrite)
    click.echo(f"wrote {out}")


COMMANDS = (tall_group,)
