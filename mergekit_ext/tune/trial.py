"""Running one trial: the Optuna objective merges the trial's setting and scores it task by task on validation.

After each validation task the running mean is reported as an intermediate
value, so that the study's pruner can stop a hopeless trial early; with
successive halving (``halving.py``) the one intermediate value is the mean over
every task's subset, and only a trial the pruner lets through is scored on the
remaining items. A trial's
merge lives in ``OUT_DIR/trials`` and is removed after scoring unless kept.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import optuna
from optuna.trial import TrialState

from mergekit_ext import io
from mergekit_ext.tune.options import RunOptions, engine_options, evaluation_settings
from mergekit_ext.tune.sampling import RUNG_STEP
from mergekit_ext.tune.scoring import TaskScore, mean, score_config
from mergekit_ext.tune.space import TuneSpace, setting_label
from mergekit_ext.tune.workers import (
    CLAIM_SETTLE_SECONDS,
    copy_twin,
    find_twin,
    this_worker,
)

WORKING_DIR = "trials"  # trial merges live here (removed after scoring unless keep)


def trial_dir(out_dir: Path, number: int) -> Path:
    return out_dir / WORKING_DIR / f"trial-{number:04d}"


def clean_working_dirs(study, out_dir: Path, keep: bool) -> None:
    """Remove merges left by dead or finished trials (kept ones stay with ``keep``); live trials' stay."""
    folder = out_dir / WORKING_DIR
    if not folder.is_dir():
        return
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for entry in folder.iterdir():
        name = entry.name.lstrip(".")
        if name.startswith("final-"):  # a test-split merge of the final phase: final-<pid>-<hash>
            pid = name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and not io.pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if not name.startswith("trial-"):
            continue
        try:
            number = int(name[len("trial-") :].split(".", 1)[0])
        except ValueError:
            continue
        state = states.get(number)
        if state == TrialState.RUNNING:
            continue
        partial = entry.name.startswith(".")
        if partial or state != TrialState.COMPLETE or not keep:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _choose(trial, space: TuneSpace) -> Tuple[str, Dict[str, Any]]:
    """The trial's method and parameters (a grid point, or TPE's suggestion)."""
    from mergekit_ext.tune.space import Choice, Fixed, Range

    if space.finite:
        settings = space.settings()
        labels = [setting_label(method, params) for method, params in settings]
        label = trial.suggest_categorical("setting", labels)
        return settings[labels.index(label)]
    method = trial.suggest_categorical("method", list(space.methods))
    params: Dict[str, Any] = {}
    for name, domain in space.methods[method].parameters.items():
        key = f"{method}.{name}"
        if isinstance(domain, Fixed):
            params[name] = domain.value
        elif isinstance(domain, Choice):
            params[name] = trial.suggest_categorical(key, list(domain.values))
        elif isinstance(domain, Range) and domain.integer:
            params[name] = trial.suggest_int(key, int(domain.low), int(domain.high), step=int(domain.step or 1), log=domain.log)
        else:
            params[name] = trial.suggest_float(key, float(domain.low), float(domain.high), step=domain.step, log=domain.log)
    return method, params



def make_objective(space: TuneSpace, out_dir: Path, options: RunOptions) -> Callable:
    """The Optuna objective: merge the trial's setting, score it task by task on validation, report."""
    evaluation = evaluation_settings(space, options, out_dir)
    tasks = space.validation_tasks
    halving = None
    if space.halves:
        from mergekit_ext.tune.halving import Halving

        halving = Halving.for_tasks(space.include_path, tasks, space.halving_fraction, space.seed, space.limit)

    def objective(trial) -> float:
        trial.set_user_attr("worker", this_worker())  # first: a dead worker's trial is re-queued at once
        # A retried trial starts with its failed original's attributes (Optuna copies them): reset its outcome.
        for key, empty in (("validation", {}), ("subset", None), ("stopped", None), ("interrupted", None), ("pruned_after", None), ("error", None), ("claimed", None)):
            if key in trial.user_attrs:
                trial.set_user_attr(key, empty)
        method, params = _choose(trial, space)
        trial.set_user_attr("method", method)
        trial.set_user_attr("params", params)
        trial.set_user_attr("setting", setting_label(method, params))
        if options.storage:
            # Two workers can draw the same grid point at once. Wait until both have written
            # their setting, then the one that claimed first, else the lower trial number, runs it.
            time.sleep(CLAIM_SETTLE_SECONDS)
        twin = find_twin(trial.study, trial.number, method, params)
        if twin is not None:
            return copy_twin(trial, twin)
        trial.set_user_attr("claimed", True)
        model_dir = trial_dir(out_dir, trial.number)
        scores: List[TaskScore] = []

        def on_task(index: int, score: TaskScore) -> None:
            scores.append(score)
            trial.set_user_attr("validation", {s.task: s.to_dict() for s in scores})
            partial = mean([s.value for s in scores])
            trial.report(partial, step=index)
            if index < len(tasks) - 1 and trial.should_prune():
                trial.set_user_attr("pruned_after", index + 1)
                raise optuna.TrialPruned(f"mean {partial:.4f} after {index + 1} task(s)")

        def on_rung(rung: Dict[str, TaskScore]) -> None:
            trial.set_user_attr("subset", {task: rung[task].to_dict() for task in tasks})
            partial = mean([rung[task].value for task in tasks])
            trial.report(partial, step=RUNG_STEP)
            if trial.should_prune():
                trial.set_user_attr("pruned_after", "subset")
                raise optuna.TrialPruned(f"mean {partial:.4f} on the subset ({space.halving_fraction:g} of each task)")

        started, cpu_started = time.perf_counter(), time.process_time()
        complete = False
        try:
            outcome = score_config(
                space.config(method, params),
                tasks,
                evaluation.include_path,
                limit=evaluation.limit,
                metric=evaluation.metric,
                batch_size=evaluation.batch_size,
                device=evaluation.device,
                threads=evaluation.threads,
                cache_dir=evaluation.cache_dir,
                out=model_dir,
                keep=True,  # removed below unless --keep and the trial completes
                merge_options=engine_options(options),
                on_task=None if halving is not None else on_task,
                halving=halving,
                on_rung=on_rung,
            )
            if halving is not None:
                scores = list(outcome.values())
                trial.set_user_attr("validation", {s.task: s.to_dict() for s in scores})
            complete = True
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {' '.join(str(error).split())}"[:2000])
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            # The process's CPU seconds meanwhile (every thread: with --n-jobs > 1, other trials' too).
            trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu_started, 2))
            if not (options.keep and complete):
                shutil.rmtree(model_dir, ignore_errors=True)
        return mean([s.value for s in scores])

    return objective
