"""Successive halving on items: score a trial on a seeded subset of each validation task first.

A trial is scored on the subset of every validation task (one lm-eval run),
its mean over tasks is reported to the study's pruner as one intermediate
value (step 0), and only a trial the pruner lets through is scored on the
remaining items (a second lm-eval run). The two parts are combined item by
item with the task's own aggregation, so a trial that passes costs the same
items as a full scoring and gets the same score and standard error.

The subset of a task depends only on the space's seed, the task name, the
task's size and the fraction, so every trial of a study is compared on the
same items.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_ext.tune import TuneError

# lm-eval's default number of bootstrap draws for metrics without a closed-form standard error.
BOOTSTRAP_ITERS = 100000

# Loaded lm-eval task objects by (include folder, task): their size and aggregation functions.
_TASKS: Dict[Tuple[str, str], Any] = {}


def _task_object(include_path: Path, task: str):
    key = (str(Path(include_path).absolute()), task)
    if key not in _TASKS:
        from lm_eval.tasks import TaskManager

        loaded = TaskManager(include_path=key[0], include_defaults=False).load([task])
        found = loaded["tasks"].get(task)
        if found is None or task in loaded["groups"]:
            raise TuneError(f"halving scores items of plain lm-eval tasks; {task} is a group (set tune.halving: false)")
        _TASKS[key] = found
    return _TASKS[key]


def task_size(include_path: Path, task: str, limit: Optional[int] = None) -> int:
    """Documents lm-eval scores in ``task`` (the first ``limit`` with a limit)."""
    size = len(_task_object(include_path, task).eval_docs)
    return min(size, limit) if limit is not None else size


def split_items(task: str, size: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(subset, rest): a seeded random ``fraction`` of the document indices 0..size-1 (at least one), both sorted."""
    count = min(size, max(1, math.ceil(fraction * size)))
    subset = sorted(random.Random(f"halving|{seed}|{task}|{size}").sample(range(size), count))
    chosen = set(subset)
    return subset, [index for index in range(size) if index not in chosen]


@dataclass(frozen=True)
class Halving:
    """The rung's items per task: ``subsets`` first, ``rests`` only for a trial that passes."""

    fraction: float
    subsets: Dict[str, List[int]]
    rests: Dict[str, List[int]]

    @classmethod
    def for_tasks(cls, include_path: Path, tasks: Sequence[str], fraction: float, seed: int, limit: Optional[int] = None) -> "Halving":
        subsets, rests = {}, {}
        for task in tasks:
            subsets[task], rests[task] = split_items(task, task_size(include_path, task, limit), fraction, seed)
        return cls(fraction, subsets, rests)


def combine(include_path: Path, task: str, metric_key: str, parts: Sequence[Mapping[int, Any]]) -> Tuple[float, Optional[float], int]:
    """(value, standard error, documents) of ``metric_key`` over the union of disjoint parts' per-document values.

    The task's own aggregation and lm-eval's standard error rule, over the
    values in document order: what lm-eval reports for a scoring of all of them.
    """
    from lm_eval.api.metrics import mean as lm_mean
    from lm_eval.api.metrics import stderr_for_metric

    values: Dict[int, Any] = {}
    for part in parts:
        overlap = set(values) & set(part)
        if overlap:
            raise ValueError(f"{task}: document(s) {sorted(overlap)[:5]} scored twice")
        values.update(part)
    items = [values[doc] for doc in sorted(values)]
    metric = metric_key.split(",", 1)[0]
    aggregate = _task_object(include_path, task).aggregation().get(metric, lm_mean)
    iters = min(BOOTSTRAP_ITERS, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else BOOTSTRAP_ITERS
    stderr_fn = stderr_for_metric(metric=aggregate, bootstrap_iters=iters)
    stderr = float(stderr_fn(items)) if stderr_fn is not None and len(items) > 1 else None
    return float(aggregate(items)), stderr, len(items)
