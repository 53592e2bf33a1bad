"""The search: an Optuna study whose trials merge with mergekit's engine and score with lm-eval.

``score_config`` is the trial runner on its own (merge a config into a
temporary folder, score it with lm-eval, remove the folder); benchmarks can
call it directly. ``run_tune`` runs the whole protocol:

1. search on the validation tasks only (GridSampler for a finite space, seeded
   TPE otherwise), the running mean reported as an intermediate value after
   each validation task so that ``HopelessPruner`` can stop a hopeless trial
   early;
2. per method, the validation-best setting is scored once on the test tasks,
   beside the base, the reference experts and plain task arithmetic;
3. ``best.yml`` (the overall validation-best setting as a runnable mergekit
   YAML) and the reports (``report.json``, ``report.md``, PNGs).

The study lives in an Optuna storage (by default ``OUT_DIR/study.db``, SQLite),
so a run that is stopped resumes where it stopped: finished trials are kept,
and a trial left RUNNING by a dead process is failed and re-queued with
Optuna's ``RetryHeartbeatStaleTrialCallback`` (by the heartbeat for workers
elsewhere, at once for a dead process on this machine). Test scores of the
final phase are cached in the study as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import optuna
from optuna.trial import TrialState

from mergekit_ext import io
from mergekit_ext.evaluate.protocol.selection import select
from mergekit_ext.tune import GRACE_FACTOR, HEARTBEAT_INTERVAL
from mergekit_ext.tune.space import TuneSpace, setting_label

STUDY_NAME = "tune"
MAX_RETRY = 2  # times a trial whose worker died is re-queued
WORKING_DIR = "trials"  # trial merges live here (removed after scoring unless keep)


class TuneError(ValueError):
    """A tuning run that cannot go on (every trial failed, a study of another space...)."""


# --------------------------------------------------------------------------
# Scoring: one model, one config.


@dataclass
class TaskScore:
    """One task's score as lm-eval reports it: the metric, its value and standard error."""

    task: str
    metric: str
    value: float
    stderr: Optional[float] = None
    samples: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskScore":
        return cls(**{k: data.get(k) for k in ("task", "metric", "value", "stderr", "samples")})


def read_metric(task: str, result: Mapping[str, Any], metric: Optional[str] = None) -> TaskScore:
    """The score in one lm-eval task result: ``metric`` (a name, or ``name,filter``), else the first metric.

    lm-eval keys its numbers ``<metric>,<filter>`` (``acc,none``,
    ``exact_match,strict-match``) with standard errors beside them
    (``acc_stderr,none``).
    """
    keys = [k for k in result if "," in k and "_stderr," not in k and isinstance(result[k], (int, float)) and not isinstance(result[k], bool)]
    if metric is not None:
        wanted = [k for k in keys if k == metric or k.split(",", 1)[0] == metric]
        if not wanted:
            raise TuneError(f"task {task} reports no metric {metric!r} (it reports: {', '.join(keys) or 'nothing'})")
        keys = wanted
    if not keys:
        raise TuneError(f"task {task}: lm-eval reported no numeric metric ({sorted(result)})")
    key = keys[0]
    name, _, filter_name = key.partition(",")
    stderr = result.get(f"{name}_stderr,{filter_name}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr) else None
    samples = result.get("n-samples")
    if isinstance(samples, dict):
        samples = samples.get("effective")
    return TaskScore(task=task, metric=key, value=float(result[key]), stderr=stderr, samples=samples if isinstance(samples, int) else None)


@dataclass
class EvalSettings:
    """How lm-eval runs: the task folder, ``limit``, the metric, and where."""

    include_path: Path
    limit: Optional[int] = None
    metric: Optional[str] = None
    batch_size: int = 64
    device: str = "cpu"
    threads: Optional[int] = None
    cache_dir: Optional[Path] = None

    def key(self) -> Dict[str, Any]:
        return {"include_path": str(self.include_path), "limit": self.limit, "metric": self.metric}


# lm-eval builds its model through accelerate's process-wide state, which is not
# thread safe: with --n-jobs > 1, trials merge in parallel but score one at a time.
_LM_EVAL_LOCK = threading.Lock()


def score_model(
    model: Union[str, os.PathLike],
    tasks: Sequence[str],
    evaluation: EvalSettings,
    *,
    on_task: Optional[Callable[[int, TaskScore], None]] = None,
) -> Dict[str, TaskScore]:
    """lm-eval scores of a model folder; with ``on_task``, one task at a time (each reported as it ends)."""
    from mergekit_ext.evaluate import lm_eval_results

    common = dict(
        batch_size=evaluation.batch_size,
        device=evaluation.device,
        limit=evaluation.limit,
        cache_dir=evaluation.cache_dir,
        threads=evaluation.threads,
    )
    scores: Dict[str, TaskScore] = {}
    if on_task is None:
        with _LM_EVAL_LOCK:
            results = lm_eval_results(model, list(tasks), evaluation.include_path, **common)
        return {task: read_metric(task, results[task], evaluation.metric) for task in tasks}
    for index, task in enumerate(tasks):
        with _LM_EVAL_LOCK:
            result = lm_eval_results(model, [task], evaluation.include_path, **common)[task]
        scores[task] = read_metric(task, result, evaluation.metric)
        on_task(index, scores[task])
    return scores


def score_config(
    config: Mapping[str, Any],
    tasks: Sequence[str],
    include_path: Union[str, os.PathLike],
    *,
    limit: Optional[int] = None,
    metric: Optional[str] = None,
    batch_size: int = 64,
    device: str = "cpu",
    threads: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    out: Optional[Union[str, os.PathLike]] = None,
    keep: bool = False,
    merge_options=None,
    on_task: Optional[Callable[[int, TaskScore], None]] = None,
) -> Dict[str, TaskScore]:
    """Merge ``config`` with mergekit's engine, score it with lm-eval on ``tasks``; per task a ``TaskScore``.

    The merge goes to ``out`` (default: a temporary folder), removed after
    scoring (also on error or when ``on_task`` raises, e.g. to prune) unless
    ``keep`` (with ``out``). ``on_task(index, score)`` is called after each
    task (then lm-eval runs one task at a time). ``metric``: see
    ``read_metric``; ``cache_dir``: lm-eval results cached by model content
    (not with ``limit``).
    """
    from mergekit_ext.engine import quiet_options, run_merge_atomic

    evaluation = EvalSettings(
        Path(include_path).absolute(),
        limit=limit,
        metric=metric,
        batch_size=batch_size,
        device=device,
        threads=threads,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
    )
    temporary = None
    if out is None:
        temporary = tempfile.mkdtemp(prefix="mergekit-ext-tune-")
        out = Path(temporary) / "model"
    out = Path(out)
    try:
        options = merge_options if merge_options is not None else quiet_options(device=device if device != "cpu" else None)
        run_merge_atomic(dict(config), out, options=options, overwrite=True)
        return score_model(out, tasks, evaluation, on_task=on_task)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)


def mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_stderr(scores: Sequence[TaskScore]) -> Optional[float]:
    """Standard error of the mean over tasks (tasks independent): sqrt(sum se^2) / n."""
    if not scores or any(s.stderr is None for s in scores):
        return None
    return math.sqrt(sum(s.stderr**2 for s in scores)) / len(scores)


# --------------------------------------------------------------------------
# The study.


def default_storage(out_dir: Union[str, os.PathLike]) -> str:
    return f"sqlite:///{Path(out_dir).absolute() / 'study.db'}"


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_storage(url: str, heartbeat: int = HEARTBEAT_INTERVAL):
    """An Optuna RDB storage with heartbeats: a trial whose worker dies is failed and re-queued.

    Each worker judges staleness with its own storage object: a trial whose
    last heartbeat is older than ``GRACE_FACTOR * heartbeat`` seconds is
    failed, and Optuna's retry callback queues the same setting again.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    _quiet_optuna()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_FACTOR * heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
            except (IntegrityError, ProgrammingError, OperationalError) as error:
                # Workers started together on an empty database race to create Optuna's
                # tables (PostgreSQL: "duplicate key ... pg_type_typname_nsp_index",
                # SQLite: "table ... already exists"); the loser finds them made on its
                # next try.
                schema_race = not isinstance(error, OperationalError) or "already exists" in str(error)
                if attempt == 4 or not schema_race:
                    raise
                time.sleep(0.5 + attempt)
    except ImportError as error:  # the URL names a database whose driver is not installed
        raise TuneError(f"--storage {_storage_label(url)}: {' '.join(str(error).split())[:300]}") from None
    except Exception as error:  # SQLAlchemy's errors: bad URL, server unreachable, bad credentials
        reason = " ".join(str(error).split("\n")[0].split())[:300]
        raise TuneError(f"--storage {_storage_label(url)}: cannot open the study storage: {reason}") from None


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


def _partial_stderr(trial, tasks: int) -> Optional[float]:
    """Standard error of a trial's mean over its first ``tasks`` validation tasks (None if one is missing)."""
    scores = list((trial.user_attrs.get("validation") or {}).values())[:tasks]
    if len(scores) < tasks or any(s.get("stderr") is None for s in scores):
        return None
    return math.sqrt(sum(s["stderr"] ** 2 for s in scores)) / tasks


class HopelessPruner(optuna.pruners.BasePruner):
    """Stop a trial whose running validation mean is significantly below its own method's best finished trial.

    After each validation task the objective reports the running mean; trials
    are compared at the same step (the same tasks, in order). A trial is
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
        own_stderr = _partial_stderr(trial, step + 1)
        if own_stderr is None:
            return False
        method = trial.user_attrs.get("method")
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        rivals = [t for t in complete if t.user_attrs.get("method") == method and step in t.intermediate_values]
        if not rivals:
            return False
        best = max(rivals, key=lambda t: t.intermediate_values[step])
        best_stderr = _partial_stderr(best, step + 1)
        if best_stderr is None:
            return False
        gap = best.intermediate_values[step] - value
        return gap > self.z * math.sqrt(own_stderr**2 + best_stderr**2)


def make_pruner(space: TuneSpace):
    """``HopelessPruner`` (an Optuna pruner) unless pruning is off or there is a single validation task."""
    if not space.prune or len(space.validation_tasks) < 2:
        return optuna.pruners.NopPruner()
    return HopelessPruner()


def open_study(space: TuneSpace, storage: Union[str, Any], study_name: str = STUDY_NAME, *, shared: bool = False, heartbeat: int = HEARTBEAT_INTERVAL):
    """Create or load the study; refuse one that was made for another space.

    The study keeps what ``tune report`` and optuna-dashboard need without the
    SPACE file: the validated space itself (``space`` user attr), and per trial
    its setting, validation scores and worker.
    """
    _quiet_optuna()
    if isinstance(storage, str):
        storage = make_storage(storage, heartbeat)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=make_sampler(space, shared=shared),
        pruner=make_pruner(space),
        load_if_exists=True,
    )
    fingerprint = space.fingerprint()
    existing = study.user_attrs.get("space_fingerprint")
    if existing is None:
        study.set_user_attr("space_fingerprint", fingerprint)
        study.set_user_attr("space_source", str(space.source))
        study.set_user_attr("validation_tasks", space.validation_tasks)
        study.set_user_attr("test_tasks", space.test_tasks)
        study.set_user_attr("space", space.to_document())
        with contextlib.suppress(Exception):  # optional display name (experimental in Optuna)
            study.set_metric_names(["validation mean"])
    elif existing != fingerprint:
        raise TuneError(
            f"study {study_name!r} in {_storage_label(storage)} was made for another space "
            f"({study.user_attrs.get('space_source')}: its methods, models, tasks or --limit differ); "
            "use another OUT_DIR or --study-name"
        )
    return study


def _storage_label(storage) -> str:
    url = storage if isinstance(storage, str) else getattr(storage, "url", None) or getattr(getattr(storage, "_backend", None), "url", None) or type(storage).__name__
    if "@" in url:  # hide credentials of a database URL
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://…@{rest.split('@', 1)[1]}"
    return url


def _worker() -> Dict[str, Any]:
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


def _trial_dir(out_dir: Path, number: int) -> Path:
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


@dataclass
class RunOptions:
    """How a tuning run works beside the space: storage, workers, output, evaluation."""

    storage: Optional[str] = None
    study_name: str = STUDY_NAME
    n_jobs: int = 1
    keep: bool = False
    progress: bool = True
    batch_size: int = 64
    device: str = "cpu"
    threads: Optional[int] = None
    heartbeat: int = HEARTBEAT_INTERVAL
    echo: Callable[[str], None] = field(default=print, repr=False)


def _evaluation(space: TuneSpace, options: RunOptions, out_dir: Path) -> EvalSettings:
    return EvalSettings(
        include_path=space.include_path,
        limit=space.limit,
        metric=space.metric,
        batch_size=options.batch_size,
        device=options.device,
        threads=options.threads,
        cache_dir=out_dir / "evals",
    )


def _merge_options(options: RunOptions):
    from mergekit_ext.engine import quiet_options

    return quiet_options(device=options.device) if options.device != "cpu" else quiet_options()


def make_objective(space: TuneSpace, out_dir: Path, options: RunOptions) -> Callable:
    """The Optuna objective: merge the trial's setting, score it task by task on validation, report."""
    evaluation = _evaluation(space, options, out_dir)
    tasks = space.validation_tasks

    def objective(trial) -> float:
        trial.set_user_attr("worker", _worker())  # first: a dead worker's trial is re-queued at once
        # A retried trial starts with its failed original's attributes (Optuna copies them): reset its outcome.
        for key, empty in (("validation", {}), ("stopped", None), ("interrupted", None), ("pruned_after", None), ("error", None), ("claimed", None)):
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
        twin = _twin(trial.study, trial.number, method, params)
        if twin is not None:
            return _repeat(trial, twin)
        trial.set_user_attr("claimed", True)
        model_dir = _trial_dir(out_dir, trial.number)
        scores: List[TaskScore] = []

        def on_task(index: int, score: TaskScore) -> None:
            scores.append(score)
            trial.set_user_attr("validation", {s.task: s.to_dict() for s in scores})
            partial = mean([s.value for s in scores])
            trial.report(partial, step=index)
            if index < len(tasks) - 1 and trial.should_prune():
                trial.set_user_attr("pruned_after", index + 1)
                raise optuna.TrialPruned(f"mean {partial:.4f} after {index + 1} task(s)")

        started = time.perf_counter()
        complete = False
        try:
            score_config(
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
                merge_options=_merge_options(options),
                on_task=on_task,
            )
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
            if not (options.keep and complete):
                shutil.rmtree(model_dir, ignore_errors=True)
        return mean([s.value for s in scores])

    return objective


# Longer than one storage round trip between a worker's check of the others' settings and
# its own claim: a trial that checks later then sees an earlier trial's claim.
CLAIM_SETTLE_SECONDS = 1.0


class _Running(Exception):
    """Another worker is running this setting already (a race between workers); this trial stands down."""


def _twin(study, number: int, method: str, params: Mapping[str, Any]):
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


def _repeat(trial, twin) -> float:
    """A setting the study has already scored is not run again: its result is copied (TPE may suggest it twice).

    A setting another worker is running now makes this trial stand down
    (failed, ``duplicate_of``, not counted against the budget).
    """
    if twin.state == TrialState.RUNNING:
        trial.set_user_attr("duplicate_of", twin.number)
        raise _Running(f"trial {twin.number} runs this setting")
    trial.set_user_attr("repeat_of", twin.number)
    for key in ("validation", "pruned_after", "error"):
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    if twin.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"as trial {twin.number}")
    if twin.state == TrialState.FAIL:
        raise TuneError(f"as trial {twin.number}: {twin.user_attrs['error']}")
    return twin.value


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
        with _quiet_libraries(options.progress):
            _work(study, space, objective, options, after_trial)
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


def _open_slots(study, space: TuneSpace, trials) -> int:
    """Trials that may still be started: queued retries, plus grid points (or TPE budget) no trial holds yet."""
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    if space.finite:
        # GridSampler gives trial number i grid point i, and a retry keeps its point.
        points = min(len(space.settings()), space.target_trials)
        held = {t.system_attrs.get("grid_id") for t in trials}
        return waiting + sum(1 for point in range(points) if point not in held)
    active = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return waiting + max(0, space.target_trials - finished_count(trials) - active - waiting)


def _work(study, space: TuneSpace, objective, options: RunOptions, after_trial) -> None:
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
        slots = _open_slots(study, space, trials)
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


@contextlib.contextmanager
def _quiet_libraries(progress: bool):
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


# --------------------------------------------------------------------------
# After the search: test scores of each method's choice, baselines, best.yml.


def _cache_key(kind: str, what: Any, tasks: Sequence[str], evaluation: EvalSettings) -> str:
    text = json.dumps({"kind": kind, "what": what, "tasks": list(tasks), **evaluation.key()}, sort_keys=True, default=str)
    return "eval:" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _claim_alive(claim: Mapping[str, Any], stale_after: float) -> bool:
    """A claim on a final-phase score is held while its worker lives (same machine) or for ``stale_after`` seconds."""
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        return claim["pid"] == os.getpid() or io.pid_alive(claim["pid"])
    return time.time() - float(claim.get("time", 0)) < stale_after


def _shared_scores(study, jobs, trials, options: RunOptions, advance: Callable[[int], Any]) -> Dict[str, Dict[str, TaskScore]]:
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
                study.set_user_attr(f"claim:{key}", {**_worker(), "time": time.time()})
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


def plain_task_arithmetic(space: TuneSpace, lam: float = 1.0) -> Optional[Dict[str, Any]]:
    """Plain task arithmetic (weight 1, scale ``lam``) on the SPACE's models; None without a base."""
    if not space.base_config.get("base_model"):
        return None
    config = {k: v for k, v in space.base_config.items() if k not in ("parameters", "models")}
    config["models"] = [{"model": entry["model"]} for entry in space.base_config["models"]]
    config["parameters"] = {"weight": 1.0, "lambda": lam}
    return {"merge_method": "task_arithmetic", **config}


def _difference(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> Dict[str, Any]:
    """ours - theirs and that gap in standard errors of the difference (scored independently: se = sqrt(se1^2 + se2^2))."""
    diff = ours["value"] - theirs["value"]
    se = None
    if ours.get("stderr") is not None and theirs.get("stderr") is not None:
        se = math.sqrt(ours["stderr"] ** 2 + theirs["stderr"] ** 2)
    return {"diff": diff, "z": (diff / se if se else None)}


def verdicts(methods: Mapping[str, Any], baselines: Mapping[str, Any], experts: Mapping[str, Any], tests: Sequence[str]) -> Dict[str, Any]:
    """Per method: does its chosen merge beat the base on every test task, and the best single expert on the mean?

    Margins are differences of scores and the same in standard errors of the
    difference (lm-eval's, taken as independent). Returns {"methods": {...},
    "best_expert": model, "summary": one sentence}.
    """
    base = (baselines.get("base") or {}).get("test")
    scored = {m: e["test"] for m, e in methods.items() if e.get("chosen") and e.get("test")}
    best_expert = None
    ranked = [(entry["test"]["mean"], model) for model, entry in experts.items() if entry["test"].get("mean") is not None]
    if ranked:
        best_expert = max(ranked)[1]
    out: Dict[str, Any] = {}
    for method, test in scored.items():
        verdict: Dict[str, Any] = {}
        if base:
            per_task = {t: _difference(test["scores"][t], base["scores"][t]) for t in tests if t in test["scores"] and t in base["scores"]}
            verdict["vs_base"] = per_task
            verdict["beats_base_every_task"] = bool(per_task) and all(d["diff"] > 0 for d in per_task.values())
            verdict["below_base"] = test["mean"] < base["mean"]
        if best_expert is not None:
            expert = experts[best_expert]["test"]
            gap = _difference({"value": test["mean"], "stderr": test.get("mean_stderr")}, {"value": expert["mean"], "stderr": expert.get("mean_stderr")})
            verdict["vs_best_expert"] = {"expert": best_expert, **gap, "beats": gap["diff"] > 0}
        out[method] = verdict
    winners = [m for m, v in out.items() if (v.get("vs_best_expert") or {}).get("beats")]
    if best_expert is None:
        summary = "no expert was scored"
    elif winners:
        summary = f"{len(winners)} method(s) beat your best expert on the mean: {', '.join(winners)}"
    else:
        summary = "no method beats your best expert"
    return {"methods": out, "best_expert": best_expert, "summary": summary}


def _plain_at_best_lambda(study, space: TuneSpace, chosen, trials, options: RunOptions, evaluation: EvalSettings, config_scorer) -> Optional[Dict[str, Any]]:
    """Plain task arithmetic (weight 1) at its validation-best λ: {config, lambda, chosen_by, source}; None without a base.

    When the space searched task_arithmetic over λ alone, its chosen trial is
    that setting (``source`` "study"); otherwise λ in DEFAULT_SPACES'
    task_arithmetic grid is scored on the validation tasks here (shared and
    stored like the test scores) and the best is scored on test (``source`` "search").
    """
    from mergekit_ext.tune.space import DEFAULT_SPACES

    if not space.base_config.get("base_model"):
        return None
    trial = chosen.get("task_arithmetic")
    if trial is not None and set(trial.user_attrs["params"]) <= {"lambda"}:
        lam = trial.user_attrs["params"].get("lambda", 1.0)
        config = space.config("task_arithmetic", trial.user_attrs["params"])
        return {"config": config, "lambda": lam, "chosen_by": "the study's task_arithmetic trials (validation mean)", "source": "study"}
    grid = list(DEFAULT_SPACES["task_arithmetic"]["lambda"])
    configs = {lam: plain_task_arithmetic(space, lam) for lam in grid}
    tasks = space.validation_tasks
    jobs = [(_cache_key("config", configs[lam], tasks, evaluation), f"lambda:{lam}", config_scorer(configs[lam], None, tasks)) for lam in grid]
    scores = _shared_scores(study, jobs, trials, options, lambda _: None)
    means = {lam: mean([s.value for s in scores[f"lambda:{lam}"].values()]) for lam in grid}
    lam = select(grid, [means[value] for value in grid]).setting  # ties: the first λ
    return {"config": configs[lam], "lambda": lam, "chosen_by": f"validation mean over lambda in {grid}", "source": "search"}


def trial_record(trial) -> Dict[str, Any]:
    """One trial as the report keeps it."""
    validation = trial.user_attrs.get("validation", {})
    return {
        "number": trial.number,
        "state": trial.state.name,
        "method": trial.user_attrs.get("method"),
        "params": trial.user_attrs.get("params"),
        "value": trial.value,
        "partial_mean": mean([s["value"] for s in validation.values()]) if validation else None,
        "validation": validation,
        "pruned_after_tasks": trial.user_attrs.get("pruned_after"),
        "error": trial.user_attrs.get("error"),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "repeat_of": trial.user_attrs.get("repeat_of"),
        "duplicate_of": trial.user_attrs.get("duplicate_of"),
        "worker": trial.user_attrs.get("worker"),
        "seconds": trial.user_attrs.get("seconds"),
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "finished": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
    }


def _scores_entry(scores: Dict[str, TaskScore], tasks: Sequence[str], reference: Optional[Dict[str, TaskScore]]) -> Dict[str, Any]:
    ordered = [scores[t] for t in tasks if t in scores]
    entry: Dict[str, Any] = {
        "scores": {t: scores[t].to_dict() for t in tasks if t in scores},
        "mean": mean([s.value for s in ordered]),
        "mean_stderr": mean_stderr(ordered),
    }
    if reference:
        normalized = {t: (scores[t].value / reference[t].value if t in reference and reference[t].value > 0 else None) for t in tasks if t in scores}
        entry["normalized"] = normalized
        entry["mean_normalized"] = mean(list(normalized.values()))
    return entry


def finalize(study, space: TuneSpace, out_dir: Union[str, os.PathLike], options: Optional[RunOptions] = None) -> Dict[str, Any]:
    """Score each method's validation-best setting on test (once), the baselines; write best.yml and reports."""

    from mergekit_ext.tune.report import write_best_yaml, write_reports

    options = options or RunOptions()
    out_dir = Path(out_dir).absolute()
    evaluation = _evaluation(space, options, out_dir)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        raise TuneError("the study has no finished trial to choose from")
    tests = space.test_tasks
    jobs: List[Tuple[str, Callable[[], Dict[str, TaskScore]]]] = []

    # Per method: its validation-best trial (the protocol's selection; ties: the earlier trial).
    chosen: Dict[str, Any] = {}
    for method in space.methods:
        candidates = sorted((t for t in complete if t.user_attrs.get("method") == method), key=lambda t: t.number)
        if candidates:
            chosen[method] = select(candidates, [t.value for t in candidates]).setting
    finalists = sorted(chosen.values(), key=lambda t: t.number)
    best = select(finalists, [t.value for t in finalists]).setting

    def config_scorer(config: Dict[str, Any], kept: Optional[Path], tasks: Sequence[str] = tests) -> Callable[[], Dict[str, TaskScore]]:
        def compute() -> Dict[str, TaskScore]:
            if kept is not None and kept.is_dir():
                return score_model(kept, tasks, evaluation)
            digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
            target = out_dir / WORKING_DIR / f"final-{os.getpid()}-{digest}"
            return score_config(
                config,
                tasks,
                evaluation.include_path,
                limit=evaluation.limit,
                metric=evaluation.metric,
                batch_size=evaluation.batch_size,
                device=evaluation.device,
                threads=evaluation.threads,
                out=target,
                merge_options=_merge_options(options),
            )

        return compute

    def model_scorer(model: str, tasks: Sequence[str]) -> Callable[[], Dict[str, TaskScore]]:
        return lambda: score_model(model, tasks, evaluation)

    keys: Dict[str, str] = {}
    for method, trial in chosen.items():
        config = space.config(method, trial.user_attrs["params"])
        keys[f"method:{method}"] = _cache_key("config", config, tests, evaluation)
        kept = _trial_dir(out_dir, trial.number) if options.keep else None
        jobs.append((f"method:{method}", config_scorer(config, kept)))
    base = space.base_config.get("base_model")
    if base:
        keys["base"] = _cache_key("model", base, tests, evaluation)
        jobs.append(("base", model_scorer(base, tests)))
    # Every expert on every test task (a model with a LoRA adapter, PATH+LORA, is not scored alone).
    experts = [entry["model"] for entry in space.base_config["models"] if "+" not in entry["model"]]
    for model in experts:
        keys[f"expert:{model}"] = _cache_key("model", model, tests, evaluation)
        jobs.append((f"expert:{model}", model_scorer(model, tests)))
    references: Dict[str, List[str]] = {}
    for task in tests:
        model = space.reference_for(task)
        if model is not None:
            references.setdefault(model, []).append(task)
    for model, tasks in references.items():
        if model not in experts:
            keys[f"reference:{model}"] = _cache_key("model", model, tasks, evaluation)
            jobs.append((f"reference:{model}", model_scorer(model, tasks)))

    from tqdm.auto import tqdm

    results: Dict[str, Dict[str, TaskScore]] = {}
    with _quiet_libraries(options.progress):
        plain = _plain_at_best_lambda(study, space, chosen, trials, options, evaluation, config_scorer)
        if plain is not None and plain["source"] == "search":
            keys["task_arithmetic_plain"] = _cache_key("config", plain["config"], tests, evaluation)
            jobs.append(("task_arithmetic_plain", config_scorer(plain["config"], None)))
        with tqdm(total=len(jobs), desc="test split", unit="model", disable=not options.progress, dynamic_ncols=True) as bar:
            results = _shared_scores(study, [(keys[label], label, compute) for label, compute in jobs], trials, options, bar.update)
    if plain is not None and plain["source"] == "study":
        results["task_arithmetic_plain"] = results["method:task_arithmetic"]

    reference_scores: Optional[Dict[str, TaskScore]] = None
    if references:
        reference_scores = {}
        for model, tasks in references.items():
            scored = results[f"expert:{model}"] if model in experts else results[f"reference:{model}"]
            for task in tasks:
                reference_scores[task] = scored[task]

    methods_report: Dict[str, Any] = {}
    for method in space.methods:
        trial = chosen.get(method)
        counts = {
            state: sum(1 for t in trials if t.user_attrs.get("method") == method and t.state.name == state)
            for state in ("COMPLETE", "PRUNED", "FAIL")
        }
        if trial is None:
            methods_report[method] = {"trials": counts, "chosen": None}
            continue
        validation = {t: TaskScore.from_dict(s) for t, s in trial.user_attrs.get("validation", {}).items()}
        methods_report[method] = {
            "trials": counts,
            "chosen": {"trial": trial.number, "params": trial.user_attrs["params"], "label": setting_label(method, trial.user_attrs["params"])},
            "validation": _scores_entry(validation, space.validation_tasks, None),
            "test": _scores_entry(results[f"method:{method}"], tests, reference_scores),
        }
    baselines: Dict[str, Any] = {}
    if base:
        baselines["base"] = {"model": base, "test": _scores_entry(results["base"], tests, reference_scores)}
    if reference_scores:
        baselines["reference"] = {
            "model": {task: space.reference_for(task) for task in tests if space.reference_for(task)},
            "test": _scores_entry(reference_scores, tests, reference_scores),
        }
    if plain is not None:
        baselines["task_arithmetic_plain"] = {
            "config": plain["config"],
            "lambda": plain["lambda"],
            "chosen_by": plain["chosen_by"],
            "test": _scores_entry(results["task_arithmetic_plain"], tests, reference_scores),
        }
    experts_report = {model: {"test": _scores_entry(results[f"expert:{model}"], tests, reference_scores)} for model in experts}

    metrics_seen = sorted({s["metric"] for t in complete for s in t.user_attrs.get("validation", {}).values()})
    best_config = space.config(best.user_attrs["method"], best.user_attrs["params"])
    report = {
        "space": str(space.source),
        "study": {"name": study.study_name, "storage": _storage_label(study._storage), "fingerprint": space.fingerprint()},
        "protocol": (
            "settings chosen on the validation tasks only (mean score); each method's chosen setting scored once on the "
            "test tasks; ± are lm-eval standard errors (of the mean: sqrt(sum se^2)/n)"
        ),
        "sampler": "grid" if space.finite else "tpe",
        "seed": space.seed,
        "limit": space.limit,
        "metric": ", ".join(metrics_seen) or space.metric or "first metric lm-eval reports per task",
        "tasks": {"validation": space.validation_tasks, "test": tests},
        "include_path": str(space.include_path),
        "normalized_by": "reference (expert per task)" if reference_scores else None,
        "target_trials": space.target_trials,
        "best": {
            "trial": best.number,
            "method": best.user_attrs["method"],
            "params": best.user_attrs["params"],
            "label": setting_label(best.user_attrs["method"], best.user_attrs["params"]),
            "validation_mean": best.value,
            "test": methods_report[best.user_attrs["method"]]["test"],
            "config": best_config,
        },
        "methods": methods_report,
        "baselines": baselines,
        "experts": experts_report,
        "verdicts": verdicts(methods_report, baselines, experts_report, tests),
        "trials": [trial_record(t) for t in trials],
    }
    report["files"] = {"best": str(write_best_yaml(best_config, out_dir / "best.yml", report))}
    report["files"].update({k: str(v) for k, v in write_reports(report, out_dir).items()})
    return report


def load_stored_study(storage: str, study_name: str = STUDY_NAME, *, heartbeat: int = HEARTBEAT_INTERVAL):
    """(study, space) of a study some worker made, read from its storage alone (no SPACE file, no worker)."""
    from mergekit_ext.tune.space import SpaceError, parse_space

    _quiet_optuna()
    backend = make_storage(storage, heartbeat)
    names = [summary.study_name for summary in optuna.get_all_study_summaries(backend, include_best_trial=False)]
    if study_name not in names:
        raise TuneError(f"{_storage_label(storage)} holds no study {study_name!r} (it holds: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=backend)
    document = study.user_attrs.get("space")
    if not isinstance(document, dict):
        raise TuneError(f"study {study_name!r} in {_storage_label(storage)} was not made by mergekit-ext tune (it stores no space)")
    try:
        space = parse_space(document, study.user_attrs.get("space_source") or "<stored space>")
    except SpaceError as error:
        raise TuneError(f"study {study_name!r}: its space cannot be used on this machine: {error}") from None
    if space.fingerprint() != study.user_attrs.get("space_fingerprint"):
        raise TuneError(f"study {study_name!r}: its stored space does not match its fingerprint; was it made by another version?")
    return study, space


def report_only(storage: str, out_dir: Union[str, os.PathLike], options: Optional[RunOptions] = None) -> Dict[str, Any]:
    """``tune report``: best.yml and the reports from a stored study, running no trial.

    Test scores already in the study (written by any worker) are reused; the
    missing ones are computed here and stored for the next reader.
    """
    options = options or RunOptions()
    study, space = load_stored_study(storage, options.study_name, heartbeat=options.heartbeat)
    out_dir = Path(out_dir).absolute()
    io.check_output_not_input(out_dir, space.local_inputs(), may_contain=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return finalize(study, space, out_dir, options)


def run_tune(space: TuneSpace, out_dir: Union[str, os.PathLike], options: Optional[RunOptions] = None) -> Dict[str, Any]:
    """Search (or resume), then score each method's choice on test and write best.yml and the reports."""
    options = options or RunOptions()
    study = run_search(space, out_dir, options)
    return finalize(study, space, out_dir, options)


__all__ = [
    "TaskScore",
    "EvalSettings",
    "RunOptions",
    "TuneError",
    "HopelessPruner",
    "read_metric",
    "score_model",
    "score_config",
    "open_study",
    "make_storage",
    "make_sampler",
    "make_pruner",
    "make_objective",
    "recover_interrupted",
    "run_search",
    "finalize",
    "run_tune",
    "load_stored_study",
    "report_only",
]
