"""``mergekit-ext demo``: zoo + every method + lm-eval, one table and chart."""

from __future__ import annotations

import click

from mergekit_ext.output import quiet_option
from mergekit_ext.zoo.presets import PRESETS

DEFAULT_PRESET = "demo-hard"  # demo.run.DEMO_PRESET, without importing the demo's heavy parts


@click.command("demo")
@click.option("--zoo", "zoo_dir", default="demo-zoo", show_default=True, type=click.Path(file_okay=False), help="zoo folder (built if missing)")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="merged models and the report")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=DEFAULT_PRESET,
    show_default=True,
    help="zoo preset: demo-hard (8 generation tasks, exact match: methods differ) or demo (4 multiple-choice tasks, the recipes' zoo)",
)
@click.option("--tune", "tune_only", is_flag=True, help="instead of the demo: search the demo's grids on the validation split with the zoo's own scorer and print the best settings")
@click.option("--overwrite", is_flag=True, help="replace --out if it holds an earlier demo's output")
@quiet_option
def demo_command(zoo_dir: str, out_dir: str, preset: str, tune_only: bool, overwrite: bool, quiet: bool) -> None:
    """Build the demo zoo, merge it with every method, evaluate each merge with lm-eval.

    Runs mergekit's task_arithmetic and ties for reference and every method
    of this package listed in mergekit_ext.demo.run.DEMO_MERGES, through
    mergekit's engine, then prints base / expert / merged scores per task
    (exact match of greedy generation on the default demo-hard zoo) and
    writes report.json, report.md and report.png to --out.
    """
    from mergekit_ext.demo.run import run_demo, tune
    from mergekit_ext.zoo import ZooError, build_zoo

    try:
        if tune_only:
            build_zoo(zoo_dir, preset=preset, progress=not quiet)
            for label, result in tune(zoo_dir, progress=not quiet).items():
                click.echo(f"{label}: {result['parameters']}  validation {result['metric']} {result['validation_score']:.3f}")
            return
        run_demo(zoo_dir, out_dir, preset=preset, progress=not quiet, overwrite=overwrite, echo=click.echo)
    except ZooError as error:
        raise click.ClickException(str(error)) from None


COMMANDS = (demo_command,)
