"""``mergekit-ext tall compress / recover``: TALL-mask bundles from the command line."""

from __future__ import annotations

import click

from mergekit_ext.methods.consensus import DEFAULT_TALL_LAMBDA
from mergekit_ext.output import quiet_option


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
@click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(file_okay=False, exists=True),
    help="A zoo (`mergekit-ext zoo`) whose experts are MODELS: also score each recovered model against its expert on its own task, with the zoo's scorer.",
)
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True, help="The zoo split scored with --zoo.")
@quiet_option
def compress_command(base, models, out, tall_lambda, names, overwrite, zoo_dir, split, quiet) -> None:
    """Compress MODELS (fine-tunes of --base) into the bundle folder OUT.

    Prints, per model, the share of its task vector the mask keeps (weights and
    energy), the error on those weights and overall, and with --zoo the
    recovered model's score against the model itself: the number to judge a
    bundle by (good: at least 95 % of the expert).
    """
    from pathlib import Path

    from mergekit_ext.methods.consensus.format import compress
    from mergekit_ext.methods.consensus.recovery import score_recovered, zoo_tasks_of

    task_names = names.split(",") if names else None
    model_names = task_names or [Path(m).name for m in models]  # compress names them the same way
    if zoo_dir:  # a zoo that cannot be read, or a model it has no task for, fails before the bundle is written
        from mergekit_ext.zoo import load_zoo

        zoo_tasks_of(load_zoo(zoo_dir), models, model_names)
    report = compress(
        base,
        models,
        out,
        names=task_names,
        tall_lambdas=list(tall_lambda) or None,
        overwrite=overwrite,
        progress=not quiet,
    )
    click.echo(f"wrote {out}")
    if zoo_dir:
        report.scores, report.metric = score_recovered(out, models, model_names, zoo_dir, split=split)
    for line in report.lines():
        click.echo(line)


@tall_group.command("recover")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--base", default=None, type=click.Path(), help="The base model, if it moved since compression (checked by content hash).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option
def recover_command(bundle, model, out, base, overwrite, quiet) -> None:
    """Write task MODEL of BUNDLE as a Hugging Face model folder OUT."""
    from mergekit_ext.methods.consensus.format import recover

    recover(bundle, model, out, base=base, overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {out}")


COMMANDS = (tall_group,)
