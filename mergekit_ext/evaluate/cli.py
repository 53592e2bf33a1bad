"""``mergekit-ext eval``: validate models with the real lm-eval harness."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import click

from mergekit_ext.output import quiet_option


def _parse_labelled(texts: Sequence[str]) -> Dict:
    """``LABEL=PATH`` / ``PATH`` / ``BASE+ADAPTER`` texts as labelled model specs."""
    from mergekit_ext.evaluate.harness import EvaluationError, ModelSpec

    specs: Dict = {}
    for text in texts:
        label, _, target = text.rpartition("=")
        spec = ModelSpec.parse(target)
        spec.check()  # every path is checked before the first model runs
        label = label or spec.path.name + (f"+{spec.adapter.name}" if spec.adapter else "")
        if label in specs:
            raise EvaluationError(f"two models are labelled {label!r}; write LABEL=PATH to tell them apart")
        specs[label] = spec
    return specs


@click.command("eval")
@click.argument("models", nargs=-1)
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, exists=True), help="compare against this zoo's base and experts")
@click.option("--tasks", help="comma-separated lm-eval task names (without --zoo)")
@click.option("--include-path", type=click.Path(file_okay=False, exists=True), help="folder of lm-eval task YAMLs (without --zoo)")
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--experts", "expert_kind", type=click.Choice(["full", "lora"]), default="full", show_default=True, help="zoo experts: full fine-tunes or base+LoRA adapters")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="write report.json, report.md and report.png into this new folder")
@click.option("--overwrite", is_flag=True, help="replace --out if it is an earlier report of mergekit-ext")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--limit", type=int, help="at most this many documents per task, without --zoo only (not cached; a quick check of a new task YAML)")
@click.option("--threads", type=int, help="torch CPU threads (1 is fastest for the zoo's tiny models)")
@quiet_option
def eval_command(models, zoo_dir, tasks, include_path, split, expert_kind, out_dir, overwrite, batch_size, device, limit, threads, quiet):
    """Validate MODELS with the real lm-eval harness.

    Each MODEL is PATH, BASE+ADAPTER (a peft adapter on a base) or
    LABEL=PATH. With --zoo, the report gives per task the zoo's base, the
    expert on its own task, each model, and normalized accuracy
    (model / expert). Otherwise pass --tasks and --include-path.
    """
    from mergekit_ext.evaluate.harness import (
        EvaluationError,
        compare_on_zoo,
        report_on_models,
    )
    from mergekit_ext import io
    from mergekit_ext.evaluate.report import format_table, write_report

    try:
        specs = _parse_labelled(models)
        inputs = [zoo_dir, include_path, *(path for spec in specs.values() for path in (spec.path, spec.adapter))]
        if out_dir:  # the OUT rule, checked before the (long) evaluation
            io.check_output_not_input(out_dir, inputs)
            io.check_replaceable(out_dir, overwrite=overwrite)
        if zoo_dir:
            if limit is not None:
                raise EvaluationError("--limit is for ad-hoc runs; a zoo comparison uses the whole split")
            report = compare_on_zoo(zoo_dir, specs, split=split, experts=expert_kind, batch_size=batch_size, device=device, threads=threads, progress=not quiet)
        else:
            if not (tasks and include_path and specs):
                raise click.UsageError("without --zoo, give MODELS, --tasks and --include-path")
            report = report_on_models(specs, [t.strip() for t in tasks.split(",") if t.strip()], include_path, batch_size=batch_size, device=device, limit=limit, threads=threads, progress=not quiet)
    except (EvaluationError, io.OutputError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_table(report))
    if out_dir:
        with io.atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs, kind="eval-report") as staging:
            written = write_report(report, staging)
        paths = {key: Path(out_dir) / path.name for key, path in written.items()}
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


COMMANDS = (eval_command,)
