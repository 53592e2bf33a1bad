"""``mergekit-ext tune``: choose a merge method and its parameters on validation tasks, report on test.

Parts: ``space.py`` (the SPACE file: parsing, validation, ``DEFAULT_SPACES``),
``scoring.py`` (lm-eval scores of a model or a config; ``score_config``, the
trial runner a benchmark can call on its own), ``storage.py`` (the Optuna
storage and study), ``sampling.py`` (sampler and ``HopelessPruner``),
``halving.py`` (successive halving: each task's seeded subset, combining parts),
``options.py`` (``RunOptions``), ``workers.py`` (liveness, re-queueing and
claims between workers), ``trial.py`` (the objective: one trial),
``search.py`` (the search loop), ``study.py`` (after the search: each method's
choice scored on test, baselines, verdicts; ``run_tune``, ``report_only``),
``report.py`` (``best.yml``, Markdown, JSON, PNGs), ``cli.py``
(``tune_command``, the click command named ``tune``).

The SPACE file
--------------

An ordinary mergekit YAML plus a ``tune:`` block::

    base_model: /models/base          # mergekit's fields as usual (relative paths: from the
    models:                           # working directory, else from this file's folder)
      - model: /models/a
      - model: /models/b
    dtype: float32
    parameters: {normalize: true}     # optional; fixed for every method, tuned values win
    tune:
      methods:                        # method -> {parameter: domain}
        task_arithmetic: {lambda: [0.3, 0.5, 1.0]}             # list: the values to try
        cart: {rank_ratio: [0.05, 0.15], lambda: {low: 0.5, high: 2.0}}   # range (log: true, step: S)
        ties: {density: 0.5, lambda: [0.6, 1.0]}               # scalar: fixed, not searched
        opcm: {}                                               # the method's own defaults
      tasks:
        validation: [zoo_a_val, zoo_b_val]   # settings are chosen on these only
        test: [zoo_a, zoo_b]                 # reported; pairs with validation in order
      include_path: ./tasks                  # folder of lm-eval task YAMLs
      reference: {zoo_a: /models/a, zoo_b: /models/b}   # optional; or one model for every task
      metric: acc                            # optional; default: each task's first lm-eval metric
      limit: 100                             # optional: documents per task
      trials: 8                              # optional: default the whole grid, or 30 with ranges
      seed: 0
      prune: true
      halving: true                          # optional: successive halving on items (needs prune)
      halving_fraction: 0.25                 # optional: share of each validation task scored first

``tune.methods`` may also be a list of names (each with its default space) or
be left out: then every method of this package (but those needing a learned
file) plus mergekit's ``task_arithmetic`` and ``ties`` are tried, with the
small spaces of ``space.DEFAULT_SPACES``; a top-level ``merge_method:`` alone
tunes that method. Parameters are checked before anything is merged: unknown
methods or parameters, values the method's ``ParameterSpec`` refuses, empty
task lists or no models fail with one line naming the file and the culprit.
Per-model parameters (``weight``, ``density``) go in the top-level
``parameters:`` block, which mergekit reads as every model's default;
mergekit's required ``weight`` is 1.0 unless given. Higher scores are better.

Protocol: a grid (GridSampler) when every domain is a list, else seeded TPE.
With halving (``halving.py``) a trial is scored first on a seeded subset of
every validation task (the same items for every trial) and reports that mean
as its one intermediate value; without it the tasks are scored one at a time
and the running mean is reported after each. ``sampling.HopelessPruner`` stops
a trial whose intermediate value falls more than 2 standard errors (lm-eval's)
below the best finished trial of the same method at the same step (so a
method's first trial is never pruned, and each method's choice is the best of
its own settings); a trial halving lets through is scored on the remaining
items only, and its parts are combined into the full-task scores. Each method's
validation-best setting is scored once on the test tasks, beside the base,
every expert, the reference and plain task arithmetic (weight 1) at its
validation-best λ, with lm-eval's standard errors; per method the report says
whether it beats the base on every task and the best expert on the mean
(``study.verdicts``). The study (``OUT_DIR/study.db`` or ``--storage``) makes
runs resumable and shareable between workers: each worker takes only trials
the study still needs, waits for the others', and re-queues a dead worker's
trial through Optuna's heartbeat; ``tune report --storage URL OUT`` writes the
reports from the study alone.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Worker liveness, shared by the command line and the study: a running trial
# beats every HEARTBEAT_INTERVAL seconds (--heartbeat); one silent for
# GRACE_FACTOR heartbeats is taken as dead and queued again.
HEARTBEAT_INTERVAL = 10
GRACE_FACTOR = 6


class TuneError(ValueError):
    """A tuning run that cannot go on (every trial failed, a study of another space...)."""


# Public names, loaded on first use so that importing the command stays cheap.
_EXPORTS = {
    "DEFAULT_SPACES": "space",
    "SpaceError": "space",
    "TuneSpace": "space",
    "MethodSpace": "space",
    "Choice": "space",
    "Range": "space",
    "Fixed": "space",
    "load_space": "space",
    "parse_space": "space",
    "default_method_names": "space",
    "TaskScore": "scoring",
    "EvalSettings": "scoring",
    "RunOptions": "options",
    "HopelessPruner": "sampling",
    "read_metric": "scoring",
    "score_model": "scoring",
    "score_config": "scoring",
    "open_study": "storage",
    "run_search": "search",
    "finalize": "study",
    "run_tune": "study",
    "write_best_yaml": "report",
    "write_reports": "report",
    "format_markdown": "report",
    "format_summary": "report",
    "tune_command": "cli",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted([*_EXPORTS, "TuneError"])
