"""Several workers on one study: who is alive, which trials are still needed, who runs a setting or a score.

A trial left RUNNING by a dead process is failed and re-queued with Optuna's
``RetryHeartbeatStaleTrialCallback`` (by the heartbeat for workers elsewhere,
at once for a dead process on this machine). A worker never starts a trial the
study does not need; two workers that draw the same setting settle who runs
it; the final phase's test scores are claimed, computed once, and shared
through the study.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Dict, List, Mapping

import optuna
from optuna.trial import TrialState

from mergekit_ext import io
from mergekit_ext.tune import TuneError
from mergekit_ext.tune.options import RunOptions
from mergekit_ext.tune.scoring import TaskScore
from mergekit_ext.tune.space import TuneSpace
from mergekit_ext.tune.storage import MAX_RETRY


def this_worker() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _retried_numbers(trials) -> set:
    retried = set()
    for trial in trials:
        retried.update(trial.system_attrs.get("retry_history", []))
    return retried


def recover_interrupted(study) -> List[int]:
    """Fail trials left RUNNING by a dead process of this machine, and re-queue every interrupted trial.

    Optuna's heartbeat catches dead workers anywhere, but only after its grace
    period; a worker of this machine whose process is gone is known dead now.
    Trials stopped by Ctrl-C (failed, no error recorded) are re-queued too. The
    re-queueing is Optuna's ``RetryHeartbeatStaleTrialCallback`` (same
    parameters, same grid point). Returns the numbers of the re-queued trials.
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage = study._storage
    retry = None
    if hasattr(storage, "get_heartbeat_stale_trial_callback"):
        retry = storage.get_heartbeat_stale_trial_callback()
    retry = retry or RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    host = socket.gethostname()
    requeued = []
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        worker = trial.user_attrs.get("worker") or {}
        if trial.state != TrialState.RUNNING or worker.get("host") != host or not isinstance(worker.get("pid"), int):
            continue
        if worker["pid"] == os.getpid() or io.pid_alive(worker["pid"]):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "stopped", "its worker process is gone")
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
                requeued.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in retried:
            retry(study, trial)
            requeued.append(trial.number)
    return requeued


def finished_count(trials) -> int:
    """Trials that count against the budget: complete, pruned, or failed with an error of their own.

    A trial stopped because another worker was already running its setting
    (``duplicate_of``) failed without an error of its own, so it does not count.
    """
    return sum(
        1
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.user_attrs.get("error"))
    )



# Longer than one storage round trip between a worker's check of the others' settings and
# its own claim: a trial that checks later then sees an earlier trial's claim.
CLAIM_SETTLE_SECONDS = 1.0


class Running(Exception):
    """Another worker is running this setting already (a race between workers); this trial stands down."""


def find_twin(study, number: int, method: str, params: Mapping[str, Any]):
    """An earlier trial of the same setting that ran or is running (a retried trial's failed original excluded)."""
    for other in study.get_trials(deepcopy=False):
        if other.number == number or other.user_attrs.get("method") != method or other.user_attrs.get("params") != params:
            continue
        if other.user_attrs.get("repeat_of") is not None or other.user_attrs.get("duplicate_of") is not None:
            continue
        finished = other.state in (TrialState.COMPLETE, TrialState.PRUNED) or (other.state == TrialState.FAIL and other.user_attrs.get("error"))
        if finished or (other.state == TrialState.RUNNING and (other.user_attrs.get("claimed") or other.number < number)):
            return other
    return None


def copy_twin(trial, twin) -> float:
    """A setting the study has already scored is not run again: its result is copied (TPE may suggest it twice).

    A setting another worker is running now makes this trial stand down
    (failed, ``duplicate_of``, not counted against the budget).
    """
    if twin.state == TrialState.RUNNING:
        trial.set_user_attr("duplicate_of", twin.number)
        raise Running(f"trial {twin.number} runs this setting")
    trial.set_user_attr("repeat_of", twin.number)
    for key in ("validation", "subset", "pruned_after", "error"):
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    if twin.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"as trial {twin.number}")
    if twin.state == TrialState.FAIL:
        raise TuneError(f"as trial {twin.number}: {twin.user_attrs['error']}")
    return twin.value


def open_slots(study, space: TuneSpace, trials) -> int:
    """Trials that may still be started: queued retries, plus grid points (or TPE budget) no trial holds yet."""
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    if space.finite:
        # GridSampler gives trial number i grid point i, and a retry keeps its point.
        points = min(len(space.settings()), space.target_trials)
        held = {t.system_attrs.get("grid_id") for t in trials}
        return waiting + sum(1 for point in range(points) if point not in held)
    active = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return waiting + max(0, space.target_trials - finished_count(trials) - active - waiting)


def run_trials(study, space: TuneSpace, objective, options: RunOptions, after_trial) -> None:
    """Run trials until the budget is met, then wait for other workers' running trials.

    A worker never starts a trial the study does not need (a grid point held by
    another worker, a TPE trial beyond the budget); while others still run, it
    polls, and Optuna's ``fail_stale_trials`` fails a trial whose worker stopped
    heart-beating and queues it again (``RetryHeartbeatStaleTrialCallback``),
    so a live worker finishes a dead worker's trial.
    """
    from optuna.storages import fail_stale_trials

    poll = max(0.5, options.heartbeat / 2)
    starts = 0  # bounded (a guard, never reached in practice); waiting for others' trials is not
    while True:
        trials = study.get_trials(deepcopy=False)
        if finished_count(trials) >= space.target_trials:
            return
        slots = open_slots(study, space, trials)
        if slots > 0 and starts < 100 * max(1, space.target_trials):
            starts += 1
            study.optimize(
                objective,
                n_trials=min(slots, options.n_jobs),
                n_jobs=options.n_jobs,
                catch=(Exception,),
                callbacks=[after_trial],
                gc_after_trial=True,
                show_progress_bar=False,
            )
            continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            return  # nothing left to run (retries exhausted)
        fail_stale_trials(study)
        time.sleep(poll)



def _claim_alive(claim: Mapping[str, Any], stale_after: float) -> bool:
    """A claim on a final-phase score is held while its worker lives (same machine) or for ``stale_after`` seconds."""
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        return claim["pid"] == os.getpid() or io.pid_alive(claim["pid"])
    return time.time() - float(claim.get("time", 0)) < stale_after


def shared_scores(study, jobs, trials, options: RunOptions, advance: Callable[[int], Any]) -> Dict[str, Dict[str, TaskScore]]:
    """Test scores of the final phase, shared by the workers that reach it together.

    Each score is stored in the study under its key. A worker claims a key
    (``claim:KEY``) before computing it; the others compute other keys, then
    wait for the claimed ones instead of scoring the same model again. A claim
    dies with its worker's process (same machine), else after twice the
    longest trial plus a minute.
    """
    longest = max([t.user_attrs.get("seconds") or 0 for t in trials] + [0])
    stale_after = 2 * longest + 60
    results: Dict[str, Dict[str, TaskScore]] = {}
    pending = list(jobs)
    while pending:
        progressed = False
        attrs = study.user_attrs
        for job in list(pending):
            key, label, compute = job
            stored = attrs.get(key)
            if stored is None:
                claim = attrs.get(f"claim:{key}")
                if claim is not None and _claim_alive(claim, stale_after):
                    continue
                study.set_user_attr(f"claim:{key}", {**this_worker(), "time": time.time()})
                scores = compute()
                study.set_user_attr(key, {task: score.to_dict() for task, score in scores.items()})
                attrs = study.user_attrs
            else:
                scores = {task: TaskScore.from_dict(score) for task, score in stored.items()}
            results[label] = scores
            pending.remove(job)
            advance(1)
            progressed = True
        if pending and not progressed:
            time.sleep(max(0.5, options.heartbeat / 2))
    return results
