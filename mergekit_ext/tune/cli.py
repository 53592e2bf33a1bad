"""``mergekit-ext tune``: the click command (thin; the work is in ``space``, ``study`` and ``report``)."""

from __future__ import annotations

import os
from typing import Optional

import click

from mergekit_ext.output import quiet_option
from mergekit_ext.tune import GRACE_FACTOR, HEARTBEAT_INTERVAL

HEARTBEAT_HELP = (
    f"seconds between a running trial's heartbeats; a trial silent for {GRACE_FACTOR} heartbeats is taken as dead "
    "(its worker killed or its machine gone) and queued again for another worker"
)


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("space_file", metavar="SPACE.yml", type=click.Path(dir_okay=False))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--trials", type=click.IntRange(min=1), help="finished trials wanted in the study (default: tune.trials, else the whole grid, else 30)")
@click.option("--include-path", type=click.Path(file_okay=False), help="folder of lm-eval task YAMLs (overrides tune.include_path)")
@click.option("--limit", type=click.IntRange(min=1), help="at most this many documents per task (smoke runs)")
@click.option("--metric", help="lm-eval metric to read (e.g. acc, exact_match; default: each task's first metric)")
@click.option("--storage", help="Optuna storage URL shared by several workers, e.g. postgresql://user@host/db (default: sqlite:///OUT_DIR/study.db)")
@click.option("--study-name", default="tune", show_default=True, help="study name inside the storage")
@click.option("--n-jobs", type=click.IntRange(min=1), default=1, show_default=True, help="trials run in parallel threads by this worker (merges overlap; lm-eval runs one at a time per process)")
@click.option("--keep", is_flag=True, help="keep each finished trial's merged model in OUT_DIR/trials/ (pruned or failed ones are removed)")
@click.option("--seed", type=int, help="sampler seed (default: tune.seed, else 0)")
@click.option("--prune/--no-prune", default=None, help="stop hopeless trials after their first validation tasks (default: tune.prune, else on)")
@click.option(
    "--halving/--no-halving",
    default=None,
    help="score each trial on a seeded subset of every validation task first, and on the rest only if it can still win (default: tune.halving, else on; needs pruning)",
)
@click.option("--halving-fraction", type=float, help="share of each validation task in the subset (default: tune.halving_fraction, else 0.25)")
@click.option("--batch-size", type=int, default=64, show_default=True, help="lm-eval batch size")
@click.option("--device", default="cpu", show_default=True, help="device for merging and lm-eval (e.g. cuda)")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (1 suits tiny models)")
@click.option("--heartbeat", type=click.IntRange(min=1), default=HEARTBEAT_INTERVAL, show_default=True, help=HEARTBEAT_HELP)
@quiet_option
def tune_command(
    space_file: str,
    out_dir: str,
    trials: Optional[int],
    include_path: Optional[str],
    limit: Optional[int],
    metric: Optional[str],
    storage: Optional[str],
    study_name: str,
    n_jobs: int,
    keep: bool,
    seed: Optional[int],
    prune: Optional[bool],
    halving: Optional[bool],
    halving_fraction: Optional[float],
    batch_size: int,
    device: str,
    threads: Optional[int],
    heartbeat: int,
    quiet: bool,
) -> None:
    """Search merge methods and their parameters on validation tasks; report on test.

    SPACE.yml is an ordinary mergekit YAML (models, base_model, dtype,
    optional parameters) plus a `tune:` block:

    \b
      base_model: /models/base
      models: [{model: /models/a}, {model: /models/b}]
      dtype: float32
      tune:
        methods:                    # default: every method of mergekit-ext + task_arithmetic, ties
          task_arithmetic: {lambda: [0.3, 0.5, 1.0]}        # a list: values to try
          cart: {rank_ratio: [0.05, 0.15], lambda: {low: 0.5, high: 2.0}}  # a range (log/step optional)
          ties: {density: 0.5, lambda: [0.6, 1.0]}          # a scalar: fixed
          opcm: {}                                          # the method's defaults
        tasks:
          validation: [zoo_a_val, zoo_b_val]   # the setting is chosen on these
          test: [zoo_a, zoo_b]                 # scored once per method (pairs with validation, in order)
        include_path: ./tasks                  # lm-eval task YAMLs
        reference: {zoo_a: /models/a, zoo_b: /models/b}  # optional: normalized = score / reference
        trials: 8                              # optional; also limit, metric, seed, prune,
        halving: true                          # halving_fraction (0.25)

    A space with only lists is searched as a grid (Optuna's GridSampler,
    seeded order); one with a range uses seeded TPE. Each trial merges with
    mergekit's engine into OUT_DIR/trials/ (removed unless --keep) and is
    scored with lm-eval first on a seeded quarter of each validation task's
    items, and on the rest only if its mean there is within 2 standard errors
    of its own method's best finished trial on the same items (a method's
    first trial is never stopped). With --no-halving the validation tasks are
    scored one at a time and a trial is stopped after a task when its running
    mean is that far behind. The study is kept in OUT_DIR/study.db:
    run the same command again to resume (finished trials are kept, a trial
    left running by a killed run is re-queued); workers sharing --storage
    share the study.

    Writes OUT_DIR/best.yml (runnable by mergekit-yaml), report.md,
    report.json, trials.png and methods.png: each method's validation-best
    setting scored once on the test tasks beside the base model, the
    reference experts and plain task arithmetic, with lm-eval's standard
    errors. Relative paths are taken from the working directory, else from
    the SPACE file's folder.
    """
    from mergekit_ext.tune.space import SpaceError, load_space
    from mergekit_ext.tune.study import RunOptions, run_tune

    if threads:
        import torch

        torch.set_num_threads(threads)
    echo = click.echo
    try:
        space = load_space(
            space_file, trials=trials, include_path=include_path, limit=limit, seed=seed, metric=metric, prune=prune,
            halving=halving, halving_fraction=halving_fraction,
        )
        if not quiet:
            echo(space.summary())
            echo(f"{space.target_trials} trial(s), {'grid' if space.finite else 'TPE'} sampler; study in {storage or os.path.join(out_dir, 'study.db')}")
        options = RunOptions(
            storage=storage,
            study_name=study_name,
            n_jobs=n_jobs,
            keep=keep,
            progress=not quiet,
            batch_size=batch_size,
            device=device,
            threads=threads,
            heartbeat=heartbeat,
            echo=echo,
        )
        report = run_tune(space, out_dir, options)
    except SpaceError as error:
        raise click.ClickException(str(error)) from None
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("MERGEKIT_EXT_DEBUG"):
            raise
        raise click.ClickException(" ".join(str(error).split())) from None
    _print_report(report, quiet)


def _print_report(report, quiet: bool) -> None:
    from mergekit_ext.tune.report import format_summary

    if not quiet:
        click.echo(format_summary(report))
    click.echo(f"wrote {report['files']['best']}, {report['files']['markdown']}")


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--storage", required=True, help="the Optuna storage URL the workers share (e.g. postgresql://user@host/db)")
@click.option("--study-name", default="tune", show_default=True, help="study name inside the storage")
@click.option("--batch-size", type=int, default=64, show_default=True, help="lm-eval batch size (test scores not yet in the study)")
@click.option("--device", default="cpu", show_default=True, help="device for the test-split merges and lm-eval")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads")
@quiet_option
def report_command(out_dir: str, storage: str, study_name: str, batch_size: int, device: str, threads: Optional[int], quiet: bool) -> None:
    """Write best.yml and the reports of a shared study into OUT_DIR, running no trial.

    Needs only the storage URL: the study keeps its space (models, tasks,
    parameters), so this runs on any machine that sees the models and task
    YAMLs at the same paths. Each method's chosen setting is scored on the
    test tasks unless a worker already stored those scores in the study. The
    same study can be watched live with optuna-dashboard (`optuna-dashboard URL`).
    """
    from mergekit_ext.tune.study import RunOptions, report_only

    if threads:
        import torch

        torch.set_num_threads(threads)
    options = RunOptions(storage=storage, study_name=study_name, progress=not quiet, batch_size=batch_size, device=device, threads=threads, echo=click.echo)
    try:
        report = report_only(storage, out_dir, options)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("MERGEKIT_EXT_DEBUG"):
            raise
        raise click.ClickException(" ".join(str(error).split())) from None
    _print_report(report, quiet)


class _TuneGroup(click.Group):
    """``tune SPACE.yml OUT_DIR`` runs the search (the ``run`` subcommand); ``tune report`` only reports."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("tune", cls=_TuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
def tune_group() -> None:
    """Choose a merge method and its parameters on validation tasks; report on test.

    \b
      mergekit-ext tune SPACE.yml OUT_DIR [OPTIONS]          search (same as `tune run`)
      mergekit-ext tune report --storage URL OUT_DIR         report a shared study, no search

    Several workers, on one machine or many, share one study through
    --storage (a PostgreSQL URL); each writes its own OUT_DIR. See
    `mergekit-ext tune run --help`.
    """


tune_command.name = "run"
tune_group.add_command(tune_command)
tune_group.add_command(report_command)

COMMANDS = (tune_group,)
