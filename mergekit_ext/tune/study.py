"""After the search: each method's validation-best setting scored on test, the baselines, the verdicts.

``run_tune`` runs the whole protocol:

1. search on the validation tasks only (``search.run_search``: GridSampler for
   a finite space, seeded TPE otherwise), the running mean reported as an
   intermediate value after each validation task so that ``HopelessPruner``
   can stop a hopeless trial early;
2. per method, the validation-best setting is scored once on the test tasks,
   beside the base, the reference experts and plain task arithmetic;
3. ``best.yml`` (the overall validation-best setting as a runnable mergekit
   YAML) and the reports (``report.json``, ``report.md``, PNGs).

The study lives in an Optuna storage (``storage.py``), so a run that is
stopped resumes where it stopped (``workers.py``). Test scores of the final
phase are cached in the study as well, and shared by the workers that reach
it together.

The names other code imports from here (``score_config``, ``open_study``,
``RunOptions``, ...) are re-exported from the modules that hold them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from optuna.trial import TrialState

from mergekit_ext import io
from mergekit_ext.evaluate.protocol.selection import select
from mergekit_ext.tune import TuneError
from mergekit_ext.tune.options import RunOptions, engine_options, evaluation_settings
from mergekit_ext.tune.sampling import HopelessPruner, make_pruner, make_sampler
from mergekit_ext.tune.scoring import (
    EvalSettings,
    TaskScore,
    mean,
    mean_stderr,
    read_metric,
    score_config,
    score_model,
)
from mergekit_ext.tune.search import quiet_libraries, run_search
from mergekit_ext.tune.space import TuneSpace, setting_label
from mergekit_ext.tune.storage import (
    default_storage,
    load_stored_study,
    make_storage,
    open_study,
    storage_label,
)
from mergekit_ext.tune.trial import WORKING_DIR, make_objective, trial_dir
from mergekit_ext.tune.workers import recover_interrupted, shared_scores

# --------------------------------------------------------------------------
# After the search: test scores of each method's choice, baselines, best.yml.


def _cache_key(kind: str, what: Any, tasks: Sequence[str], evaluation: EvalSettings) -> str:
    text = json.dumps({"kind": kind, "what": what, "tasks": list(tasks), **evaluation.key()}, sort_keys=True, default=str)
    return "eval:" + hashlib.sha256(text.encode()).hexdigest()[:20]



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
    scores = shared_scores(study, jobs, trials, options, lambda _: None)
    means = {lam: mean([s.value for s in scores[f"lambda:{lam}"].values()]) for lam in grid}
    lam = select(grid, [means[value] for value in grid]).setting  # ties: the first λ
    return {"config": configs[lam], "lambda": lam, "chosen_by": f"validation mean over lambda in {grid}", "source": "search"}


def trial_record(trial) -> Dict[str, Any]:
    """One trial as the report keeps it."""
    validation = trial.user_attrs.get("validation", {})
    subset = trial.user_attrs.get("subset") or {}
    return {
        "number": trial.number,
        "state": trial.state.name,
        "method": trial.user_attrs.get("method"),
        "params": trial.user_attrs.get("params"),
        "value": trial.value,
        # A trial stopped by halving has only its subset scores.
        "partial_mean": mean([s["value"] for s in validation.values()]) if validation else mean([s["value"] for s in subset.values()]),
        "validation": validation,
        "subset": subset or None,
        "subset_mean": mean([s["value"] for s in subset.values()]),
        "pruned_after_tasks": trial.user_attrs.get("pruned_after"),
        "error": trial.user_attrs.get("error"),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "repeat_of": trial.user_attrs.get("repeat_of"),
        "duplicate_of": trial.user_attrs.get("duplicate_of"),
        "worker": trial.user_attrs.get("worker"),
        "seconds": trial.user_attrs.get("seconds"),
        "cpu_seconds": trial.user_attrs.get("cpu_seconds"),
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


def _choose_per_method(complete, space: TuneSpace) -> Dict[str, Any]:
    """Per method: its validation-best trial (the protocol's selection; ties: the earlier trial)."""
    chosen: Dict[str, Any] = {}
    for method in space.methods:
        candidates = sorted((t for t in complete if t.user_attrs.get("method") == method), key=lambda t: t.number)
        if candidates:
            chosen[method] = select(candidates, [t.value for t in candidates]).setting
    return chosen


@dataclass
class _FinalScorer:
    """How the final phase scores a config or a model: each call gives a job that computes its scores."""

    evaluation: EvalSettings
    out_dir: Path
    options: RunOptions
    tests: Sequence[str]

    def config(self, config: Dict[str, Any], kept: Optional[Path], tasks: Optional[Sequence[str]] = None) -> Callable[[], Dict[str, TaskScore]]:
        """A merge of ``config`` on ``tasks`` (default: the test tasks); the trial's kept merge when there is one."""
        tasks = self.tests if tasks is None else tasks

        def compute() -> Dict[str, TaskScore]:
            if kept is not None and kept.is_dir():
                return score_model(kept, tasks, self.evaluation)
            digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
            target = self.out_dir / WORKING_DIR / f"final-{os.getpid()}-{digest}"
            return score_config(
                config,
                tasks,
                self.evaluation.include_path,
                limit=self.evaluation.limit,
                metric=self.evaluation.metric,
                batch_size=self.evaluation.batch_size,
                device=self.evaluation.device,
                threads=self.evaluation.threads,
                out=target,
                merge_options=engine_options(self.options),
            )

        return compute

    def model(self, model: str, tasks: Sequence[str]) -> Callable[[], Dict[str, TaskScore]]:
        return lambda: score_model(model, tasks, self.evaluation)


def _experts(space: TuneSpace) -> List[str]:
    """Every expert scored on every test task (a model with a LoRA adapter, PATH+LORA, is not scored alone)."""
    return [entry["model"] for entry in space.base_config["models"] if "+" not in entry["model"]]


def _references(space: TuneSpace) -> Dict[str, List[str]]:
    """{reference model: the test tasks it is the reference of}."""
    references: Dict[str, List[str]] = {}
    for task in space.test_tasks:
        model = space.reference_for(task)
        if model is not None:
            references.setdefault(model, []).append(task)
    return references


def _test_jobs(space: TuneSpace, chosen: Mapping[str, Any], scorer: _FinalScorer) -> List[Tuple[str, str, Callable[[], Dict[str, TaskScore]]]]:
    """(cache key, label, compute) of every test score: each method's choice, the base, experts, references."""
    tests, evaluation = space.test_tasks, scorer.evaluation
    jobs = []
    for method, trial in chosen.items():
        config = space.config(method, trial.user_attrs["params"])
        kept = trial_dir(scorer.out_dir, trial.number) if scorer.options.keep else None
        jobs.append((_cache_key("config", config, tests, evaluation), f"method:{method}", scorer.config(config, kept)))
    base = space.base_config.get("base_model")
    if base:
        jobs.append((_cache_key("model", base, tests, evaluation), "base", scorer.model(base, tests)))
    experts = _experts(space)
    for model in experts:
        jobs.append((_cache_key("model", model, tests, evaluation), f"expert:{model}", scorer.model(model, tests)))
    for model, tasks in _references(space).items():
        if model not in experts:
            jobs.append((_cache_key("model", model, tasks, evaluation), f"reference:{model}", scorer.model(model, tasks)))
    return jobs


def _score_tests(study, space: TuneSpace, chosen, trials, scorer: _FinalScorer):
    """The test scores of every job, shared with other workers through the study; (results by label, plain)."""
    from tqdm.auto import tqdm

    tests, options = space.test_tasks, scorer.options
    jobs = _test_jobs(space, chosen, scorer)
    with quiet_libraries(options.progress):
        plain = _plain_at_best_lambda(study, space, chosen, trials, options, scorer.evaluation, scorer.config)
        if plain is not None and plain["source"] == "search":
            jobs.append((_cache_key("config", plain["config"], tests, scorer.evaluation), "task_arithmetic_plain", scorer.config(plain["config"], None)))
        with tqdm(total=len(jobs), desc="test split", unit="model", disable=not options.progress, dynamic_ncols=True) as bar:
            results = shared_scores(study, jobs, trials, options, bar.update)
    if plain is not None and plain["source"] == "study":
        results["task_arithmetic_plain"] = results["method:task_arithmetic"]
    return results, plain


def _reference_scores(space: TuneSpace, results: Mapping[str, Dict[str, TaskScore]]) -> Optional[Dict[str, TaskScore]]:
    """Per test task, its reference model's score (None without references)."""
    references = _references(space)
    if not references:
        return None
    experts = _experts(space)
    reference_scores: Dict[str, TaskScore] = {}
    for model, tasks in references.items():
        scored = results[f"expert:{model}"] if model in experts else results[f"reference:{model}"]
        for task in tasks:
            reference_scores[task] = scored[task]
    return reference_scores


def _methods_report(space: TuneSpace, chosen, trials, results, reference_scores) -> Dict[str, Any]:
    """Per method: its trial counts, its choice, and the choice's validation and test scores."""
    tests = space.test_tasks
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
    return methods_report


def _baselines(space: TuneSpace, results, reference_scores, plain) -> Dict[str, Any]:
    """The base, the reference per task and plain task arithmetic, on test."""
    tests = space.test_tasks
    base = space.base_config.get("base_model")
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
    return baselines


def _report(study, space: TuneSpace, best, complete, trials, methods_report, baselines, experts_report, reference_scores) -> Dict[str, Any]:
    """The report dict that ``report.py`` renders (``best.yml``, Markdown, JSON, PNGs)."""
    tests = space.test_tasks
    metrics_seen = sorted({s["metric"] for t in complete for s in t.user_attrs.get("validation", {}).values()})
    return {
        "space": str(space.source),
        "study": {"name": study.study_name, "storage": storage_label(study._storage), "fingerprint": space.fingerprint()},
        "protocol": (
            "settings chosen on the validation tasks only (mean score); each method's chosen setting scored once on the "
            "test tasks; ± are lm-eval standard errors (of the mean: sqrt(sum se^2)/n)"
        ),
        "sampler": "grid" if space.finite else "tpe",
        "seed": space.seed,
        "limit": space.limit,
        "halving": {"fraction": space.halving_fraction} if space.halves else None,
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
            "config": space.config(best.user_attrs["method"], best.user_attrs["params"]),
        },
        "methods": methods_report,
        "baselines": baselines,
        "experts": experts_report,
        "verdicts": verdicts(methods_report, baselines, experts_report, tests),
        "trials": [trial_record(t) for t in trials],
    }


def finalize(study, space: TuneSpace, out_dir: Union[str, os.PathLike], options: Optional[RunOptions] = None) -> Dict[str, Any]:
    """Score each method's validation-best setting on test (once), the baselines; write best.yml and reports."""
    from mergekit_ext.tune.report import write_best_yaml, write_reports

    options = options or RunOptions()
    out_dir = Path(out_dir).absolute()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        raise TuneError("the study has no finished trial to choose from")
    chosen = _choose_per_method(complete, space)
    finalists = sorted(chosen.values(), key=lambda t: t.number)
    best = select(finalists, [t.value for t in finalists]).setting
    scorer = _FinalScorer(evaluation_settings(space, options, out_dir), out_dir, options, space.test_tasks)
    results, plain = _score_tests(study, space, chosen, trials, scorer)
    reference_scores = _reference_scores(space, results)
    methods_report = _methods_report(space, chosen, trials, results, reference_scores)
    baselines = _baselines(space, results, reference_scores, plain)
    experts_report = {model: {"test": _scores_entry(results[f"expert:{model}"], space.test_tasks, reference_scores)} for model in _experts(space)}
    report = _report(study, space, best, complete, trials, methods_report, baselines, experts_report, reference_scores)
    report["files"] = {"best": str(write_best_yaml(report["best"]["config"], out_dir / "best.yml", report))}
    report["files"].update({k: str(v) for k, v in write_reports(report, out_dir).items()})
    return report


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
    "default_storage",
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
