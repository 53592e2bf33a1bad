"""The search: run (or resume) trials until the study holds the trials it needs.

Grid points (GridSampler) for a finite space, seeded TPE otherwise. A run that
is stopped resumes where it stopped: finished trials are kept and interrupted
ones are queued again (``workers.recover_interrupted``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import Optional, Tuple, Union

import optuna
from optuna.trial import TrialState

from mergekit_ext import io
from mergekit_ext.tune import TuneError
from mergekit_ext.tune.options import RunOptions
from mergekit_ext.tune.space import TuneSpace, setting_label
from mergekit_ext.tune.storage import default_storage, open_study
from mergekit_ext.tune.trial import clean_working_dirs, make_objective
from mergekit_ext.tune.workers import finished_count, recover_interrupted, run_trials


class _Progress:
    """A tqdm bar over the trial budget showing the best validation score so far; thread safe."""

    def __init__(self, total: int, done: int, enabled: bool, best: Optional[Tuple[float, str]]):
        from tqdm.auto import tqdm

        self._lock = threading.Lock()
        self._bar = tqdm(total=total, initial=min(done, total), desc="tune", unit="trial", disable=not enabled, dynamic_ncols=True)
        self._best = best
        self._show()

    def _show(self) -> None:
        if self._best is not None:
            self._bar.set_postfix_str(f"best {self._best[0]:.4f} {self._best[1]}", refresh=True)

    def update(self, finished: int, best: Optional[Tuple[float, str]]) -> None:
        with self._lock:
            self._bar.n = min(finished, self._bar.total)
            self._best = best or self._best
            self._show()
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _best_so_far(trials) -> Optional[Tuple[float, str]]:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    return best.value, f"#{best.number} {setting_label(best.user_attrs.get('method', '?'), best.user_attrs.get('params', {}))}"


def run_search(space: TuneSpace, out_dir: Union[str, os.PathLike], options: Optional[RunOptions] = None):
    """Run (or resume) the search until the study holds ``space.target_trials`` finished trials; the study."""
    options = options or RunOptions()
    out_dir = Path(out_dir).absolute()
    io.check_sqlite_url(options.storage, space.local_inputs())  # no database inside an input
    study = _open_for(space, out_dir, options)
    requeued = recover_interrupted(study)
    if requeued and options.progress:
        options.echo(f"re-queued trial(s) {', '.join(map(str, requeued))} left unfinished by a stopped run")
    clean_working_dirs(study, out_dir, options.keep)
    target = space.target_trials
    trials = study.get_trials(deepcopy=False)
    if finished_count(trials) >= target:
        return study
    progress = _Progress(target, finished_count(trials), options.progress, _best_so_far(trials))

    def after_trial(study, frozen) -> None:
        trials = study.get_trials(deepcopy=False)
        progress.update(finished_count(trials), _best_so_far(trials))
        if finished_count(trials) >= target:
            study.stop()

    objective = make_objective(space, out_dir, options)
    try:
        with quiet_libraries(options.progress):
            run_trials(study, space, objective, options, after_trial)
    finally:
        progress.close()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        errors = [t.user_attrs["error"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error")]
        raise TuneError("no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
    return study


def _open_for(space: TuneSpace, out_dir: Path, options: RunOptions):
    """Open the study before OUT_DIR is made (a bad --storage leaves nothing); the default lives in OUT_DIR."""
    storage = options.storage
    inputs = space.local_inputs()
    if storage:
        study = open_study(space, storage, options.study_name, shared=True, heartbeat=options.heartbeat)
        io.claim_output_dir(out_dir, kind="tune", inputs=inputs, resume=True)  # new, or a study of ours to resume
        return study
    created = not out_dir.exists()
    io.claim_output_dir(out_dir, kind="tune", inputs=inputs, resume=True)
    try:
        return open_study(space, default_storage(out_dir), options.study_name, heartbeat=options.heartbeat)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)  # only what this call made
        raise



@contextlib.contextmanager
def quiet_libraries(progress: bool):
    """Keep transformers'/datasets' per-load chatter out of the way of the progress bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
