"""How the study draws settings and stops hopeless trials: the sampler and ``HopelessPruner``."""

from __future__ import annotations

import math
import os
from typing import Optional

import optuna
from optuna.trial import TrialState

from mergekit_ext.tune.space import TuneSpace, setting_label


def make_sampler(space: TuneSpace, *, shared: bool = False):
    """GridSampler over the settings of a finite space, else seeded TPE.

    ``shared``: workers share the study, so each TPE worker offsets the seed by
    its process id (the same seed everywhere would draw the same points); grid
    points are handed out by trial number, so the grid needs no offset.
    """

    if space.finite:
        labels = [setting_label(method, params) for method, params in space.settings()]
        return optuna.samplers.GridSampler({"setting": labels}, seed=space.seed)
    return optuna.samplers.TPESampler(seed=space.seed + (os.getpid() if shared else 0))


# With successive halving a trial reports one intermediate value: its mean over every task's subset.
RUNG_STEP = 0


def _partial_stderr(trial, tasks: int) -> Optional[float]:
    """Standard error of a trial's mean over its first ``tasks`` validation tasks (None if one is missing)."""
    scores = list((trial.user_attrs.get("validation") or {}).values())[:tasks]
    return _mean_stderr(scores, tasks)


def step_stderr(trial, step: int) -> Optional[float]:
    """Standard error of the intermediate value at ``step``: over the rung's subsets with halving, else over the first step + 1 tasks."""
    if trial.user_attrs.get("subset") and step == RUNG_STEP:
        scores = list(trial.user_attrs["subset"].values())
        return _mean_stderr(scores, len(scores))
    return _partial_stderr(trial, step + 1)



def _mean_stderr(scores, tasks: int) -> Optional[float]:
    if len(scores) < tasks or any(s.get("stderr") is None for s in scores):
        return None
    return math.sqrt(sum(s["stderr"] ** 2 for s in scores)) / tasks


class HopelessPruner(optuna.pruners.BasePruner):
    """Stop a trial whose running validation mean is significantly below its own method's best finished trial.

    After each validation task the objective reports the running mean; trials
    are compared at the same step (the same tasks, in order). With successive
    halving (``halving.py``) the one step is the mean over every task's subset,
    the same items for every trial. A trial is
    hopeless when the best finished trial OF THE SAME METHOD has a running mean
    at that step above its own by more than ``z`` standard errors of the
    difference (from lm-eval's per-task standard errors). So a method's first
    trial is never pruned, and each method's chosen setting is the best of its
    own settings, which keeps the per-method report (the ordering users read)
    honest. Comparing with the best trial of any method pruned more, but then a
    weaker method's best setting could be stopped once a stronger method had
    finished: on hard zoo seed 0 (the first run of benchmarks/tune_bench.py, since
    replaced) task arithmetic was reported at λ 0.7 (test 0.547) because λ 0.5
    (test 0.609 in the hand grid) was pruned.
    Optuna's median/percentile pruners compare with finished trials only, so
    on coarse scores the bar ratchets up as survivors accumulate: on the
    default space they pruned most trials, whole methods included.
    """

    def __init__(self, z: float = 2.0):
        self.z = z

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        own_stderr = step_stderr(trial, step)
        if own_stderr is None:
            return False
        method = trial.user_attrs.get("method")
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        rivals = [t for t in complete if t.user_attrs.get("method") == method and step in t.intermediate_values]
        if not rivals:
            return False
        best = max(rivals, key=lambda t: t.intermediate_values[step])
        best_stderr = step_stderr(best, step)
        if best_stderr is None:
            return False
        gap = best.intermediate_values[step] - value
        return gap > self.z * math.sqrt(own_stderr**2 + best_stderr**2)


def make_pruner(space: TuneSpace):
    """``HopelessPruner`` (an Optuna pruner) unless pruning is off, or there is a single validation task and no halving."""
    if not space.prune or (len(space.validation_tasks) < 2 and not space.halves):
        return optuna.pruners.NopPruner()
    return HopelessPruner()

