"""``mergekit-ext demo``: zoo + every method + lm-eval, one table and chart."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--zoo", "zoo_dir", default="zoo", show_default=True, type=click.Path(file_okay=False), help="zoo folder (built if missing)")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="merged models and the report")
@click.option("--tune", "tune_only", is_flag=True, help="instead of the demo: search DEMO_GRIDS on validation and print the best parameters")
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo_command(zoo_dir: str, out_dir: str, tune_only: bool, quiet: bool) -> None:
    """Build the demo zoo, merge it with every method, evaluate each merge with lm-eval.

    Runs mergekit's task_arithmetic and ties for reference and every method
    of this package listed in mergekit_ext.demo.run.DEMO_MERGES, through
    mergekit's engine, then prints base / expert / merged accuracy per task
    and writes report.json, report.md and report.png to --out.
    """
    from mergekit_ext.demo.run import run_demo, tune
    from mergekit_ext.zoo import ZooError, build_zoo

    try:
        if tune_only:
            build_zoo(zoo_dir, progress=not quiet)
            for label, result in tune(zoo_dir, progress=not quiet).items():
                click.echo(f"{label}: {result['parameters']}  validation acc {result['validation_accuracy']:.3f}")
            return
        run_demo(zoo_dir, out_dir, progress=not quiet, echo=click.echo)
    except ZooError as error:
        raise click.ClickException(str(error)) from None


COMMANDS = (demo_command,)
