"""Scoring one model or one mergekit config with lm-eval: per task a ``TaskScore``.

``score_config`` is the trial runner on its own (merge a config into a
temporary folder, score it with lm-eval, remove the folder); benchmarks can
call it directly.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from mergekit_ext.tune import TuneError


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
    halving=None,
    on_rung: Optional[Callable[[Dict[str, TaskScore]], None]] = None,
) -> Dict[str, TaskScore]:
    """lm-eval scores of a model folder; with ``on_task``, one task at a time (each reported as it ends).

    With ``halving`` (a ``halving.Halving``): every task's subset first, then
    ``on_rung(subset scores)`` (it raises to stop the trial), then the rest of
    the items, combined into full scores (``on_task`` is not called).
    """
    from mergekit_ext.evaluate import lm_eval_results

    if halving is not None:
        return score_halving(model, tasks, evaluation, halving, on_rung or (lambda scores: None))

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


def score_halving(
    model: Union[str, os.PathLike],
    tasks: Sequence[str],
    evaluation: EvalSettings,
    halving,
    on_rung: Callable[[Dict[str, TaskScore]], None],
) -> Dict[str, TaskScore]:
    """Score ``model`` on the subsets, call ``on_rung(scores)`` (it raises to stop), then on the rest; TaskScores per task."""
    from mergekit_ext.evaluate.harness import lm_eval_items
    from mergekit_ext.tune.halving import combine

    common = dict(batch_size=evaluation.batch_size, device=evaluation.device, threads=evaluation.threads)
    with _LM_EVAL_LOCK:
        first = lm_eval_items(model, {task: halving.subsets[task] for task in tasks}, evaluation.include_path, **common)
    rung = {task: read_metric(task, first[task][0], evaluation.metric) for task in tasks}
    on_rung(rung)
    rests = {task: halving.rests[task] for task in tasks if halving.rests[task]}
    second = {}
    if rests:
        with _LM_EVAL_LOCK:
            second = lm_eval_items(model, rests, evaluation.include_path, **common)
    scores = {}
    for task in tasks:
        key = rung[task].metric
        parts = [first[task][1].get(key, {})]
        if task in second:
            parts.append(second[task][1].get(key, {}))
        value, stderr, count = combine(evaluation.include_path, task, key, parts)
        scores[task] = TaskScore(task=task, metric=key, value=value, stderr=stderr, samples=count)
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
    halving=None,
    on_rung: Optional[Callable[[Dict[str, TaskScore]], None]] = None,
) -> Dict[str, TaskScore]:
    """Merge ``config`` with mergekit's engine, score it with lm-eval on ``tasks``; per task a ``TaskScore``.

    The merge goes to ``out`` (default: a temporary folder), removed after
    scoring (also on error or when ``on_task`` raises, e.g. to prune) unless
    ``keep`` (with ``out``). ``on_task(index, score)`` is called after each
    task (then lm-eval runs one task at a time). ``metric``: see
    ``read_metric``; ``cache_dir``: lm-eval results cached by model content
    (not with ``limit``). ``halving``, ``on_rung``: see ``score_model``.
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
        return score_model(out, tasks, evaluation, on_task=on_task, halving=halving, on_rung=on_rung)
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
