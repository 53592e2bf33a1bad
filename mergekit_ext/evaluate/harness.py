"""Validation with the real lm-eval harness, and the base / expert / merged report.

``lm_eval_results`` runs ``lm_eval.simple_evaluate`` (model "hf", local task
YAMLs, offline) on a model folder or on a base plus a peft adapter, and keeps
lm-eval's per-task result dicts as they come. ``compare_on_zoo`` evaluates
merged models against a zoo's base and experts (each expert on its own task)
and adds the normalized score (merged / expert) beside lm-eval's numbers.

The metric comes from the task: ``acc`` for the multiple-choice zoos (chance
0.25), ``exact_match`` for the generation zoo (``hard``; no chance level). The
report's ``accuracy`` fields hold that metric's value whichever it is.
``report.write_report`` writes that report as JSON, Markdown and a PNG bar chart.

Results are cached per (model weights, adapter weights, task YAML) in the
zoo's ``evals/`` folder, so the base and the experts are evaluated once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_ext.adapters.peft_io import adapter_hash
from mergekit_ext.io import content_hash, write_json

# The metric of the multiple-choice zoos (4-way, chance 0.25); a zoo's own metric
# is ``Zoo.metric`` (``exact_match,none`` for the generation preset ``hard``),
# and tasks outside a zoo are read with ``metric_of``.
METRIC = "acc,none"
# lm-eval result keys tried, in order, for a task without a known metric.
KNOWN_METRICS = ("acc,none", "exact_match,none", "acc_norm,none")


def metric_of(result: Mapping) -> Optional[str]:
    """The metric key of one lm-eval task result: the first of KNOWN_METRICS it has, else its one numeric metric."""
    for key in KNOWN_METRICS:
        if key in result:
            return key
    candidates = [
        key
        for key, value in result.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return candidates[0] if len(candidates) == 1 else None


class EvaluationError(ValueError):
    """A model, adapter or task that cannot be evaluated."""


@dataclass(frozen=True)
class ModelSpec:
    """What lm-eval loads: a model folder, optionally with a peft adapter on top."""

    path: Path
    adapter: Optional[Path] = None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``PATH`` or ``BASE+ADAPTER`` (mergekit's spelling for a model plus a LoRA)."""
        if "+" in text and not Path(text).exists():
            base, adapter = text.rsplit("+", 1)
            return cls(Path(base).absolute(), Path(adapter).absolute())
        return cls(Path(text).absolute())

    def check(self) -> None:
        if not self.path.exists():
            raise EvaluationError(f"not a model folder: {self.path} does not exist")
        if self.adapter is not None and not self.adapter.exists():
            raise EvaluationError(f"not a peft adapter folder: {self.adapter} does not exist")
        if not (self.path / "config.json").is_file():
            raise EvaluationError(f"not a model folder (no config.json): {self.path}")
        if self.adapter is not None and not (self.adapter / "adapter_config.json").is_file():
            raise EvaluationError(f"not a peft adapter folder (no adapter_config.json): {self.adapter}")

    def check_finite(self) -> None:
        """Refuse weights holding NaN or Inf (lm-eval would score them at chance without a word)."""
        import torch
        from safetensors import safe_open

        folders = [self.path] + ([self.adapter] if self.adapter is not None else [])
        for folder in folders:
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        tensor = handle.get_tensor(name)
                        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                            raise EvaluationError(f"{folder}: tensor {name} holds NaN or Inf; refusing to evaluate a broken model")

    def fingerprint(self) -> str:
        digest = hashlib.sha256(content_hash(self.path).encode())
        if self.adapter is not None:
            digest.update(adapter_hash(self.adapter).encode())
        return digest.hexdigest()

    def __str__(self) -> str:
        return str(self.path) if self.adapter is None else f"{self.path}+{self.adapter}"


# _task_yaml_hashes by folder: (size and mtime of the YAMLs and data files read, hashes, data files).
_TASK_HASHES: Dict[str, Tuple[Tuple, Dict[str, str], List[Path]]] = {}


def _stamp(files: Sequence[Path]) -> Tuple:
    stamps = []
    for file in files:
        try:
            stat = os.stat(file)
            stamps.append((str(file), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append((str(file), None, None))
    return tuple(stamps)


def _task_yaml_hashes(include_path: Path) -> Dict[str, str]:
    """Task name -> hash of its YAML and data files (a changed task invalidates the cache).

    Reused within a process while no YAML is added or removed and no file read
    changes size or modification time (a tune trial asks once per task).
    """
    yamls = sorted(include_path.glob("*.yaml"))
    cached = _TASK_HASHES.get(str(include_path))
    if cached is not None and cached[0] == _stamp(yamls + cached[2]):
        return dict(cached[1])
    hashes, data_files = _hash_task_yamls(yamls)
    _TASK_HASHES[str(include_path)] = (_stamp(yamls + data_files), hashes, data_files)
    return dict(hashes)


def _hash_task_yamls(yamls: Sequence[Path]) -> Tuple[Dict[str, str], List[Path]]:
    """(task name -> hash of its YAML and data files, the data files read)."""
    import yaml

    hashes: Dict[str, str] = {}
    files: List[Path] = []
    for file in yamls:
        text = file.read_text(encoding="utf-8")
        config = yaml.safe_load(text) or {}
        name = config.get("task")
        if not name:
            continue
        digest = hashlib.sha256(text.encode())
        data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        for split_path in data_files.values():
            if Path(split_path).is_file():
                files.append(Path(split_path))
                digest.update(content_hash(split_path).encode())
        hashes[name] = digest.hexdigest()
    return hashes, files


def lm_eval_results(
    model: Union[ModelSpec, str, os.PathLike],
    tasks: Sequence[str],
    include_path: Union[str, os.PathLike],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    limit: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    threads: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Dict]:
    """lm-eval's result dict per task (``{"alias", "acc,none", "acc_stderr,none"}``, or ``exact_match,none``…), cached.

    ``threads`` sets torch's CPU threads for the run (1 suits the zoo's tiny
    models: more threads only spin, worst on a busy machine).
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(str(model))
    spec.check()
    include_path = Path(include_path).absolute()
    known = _task_yaml_hashes(include_path)
    missing = [task for task in tasks if task not in known]
    if missing:
        raise EvaluationError(f"task(s) {missing} not found in {include_path} (found {sorted(known)})")

    results: Dict[str, Dict] = {}
    cache_files: Dict[str, Path] = {}
    if cache_dir is not None and limit is None:
        import lm_eval

        fingerprint = spec.fingerprint()
        for task in tasks:
            key = hashlib.sha256(f"{fingerprint}|{known[task]}|{lm_eval.__version__}".encode()).hexdigest()[:24]
            cache_files[task] = Path(cache_dir) / f"{task}-{key}.json"
            if cache_files[task].is_file():
                results[task] = json.loads(cache_files[task].read_text(encoding="utf-8"))["lm_eval"]
    todo = [task for task in tasks if task not in results]
    if todo:
        spec.check_finite()
        import torch

        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            fresh = _simple_evaluate(spec, todo, include_path, batch_size=batch_size, device=device, limit=limit, progress=progress)
        finally:
            torch.set_num_threads(previous_threads)
        for task in todo:
            results[task] = fresh[task]
            if task in cache_files:
                try:
                    cache_files[task].parent.mkdir(parents=True, exist_ok=True)
                    write_json(cache_files[task], {"model": str(spec), "task": task, "lm_eval": fresh[task]})
                except OSError:  # a read-only zoo: the cache is an optimisation, the scores stand
                    pass
    return {task: results[task] for task in tasks}


def lm_eval_items(
    model: Union[ModelSpec, str, os.PathLike],
    samples: Mapping[str, Sequence[int]],
    include_path: Union[str, os.PathLike],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Tuple[Dict, Dict[str, Dict[int, object]]]]:
    """lm-eval on chosen documents of each task (``samples``: task -> document indices); never cached.

    Per task: (lm-eval's result dict over those documents, the per-document
    metric values ``{"metric,filter": {doc_id: value}}`` from lm-eval's logged
    samples), so that scores over disjoint parts of a task can be combined.
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(str(model))
    spec.check()
    include_path = Path(include_path).absolute()
    tasks = [task for task in samples if samples[task]]
    spec.check_finite()
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        logged: Dict[str, List[Dict]] = {}
        fresh = _simple_evaluate(
            spec, tasks, include_path, batch_size=batch_size, device=device, limit=None, progress=progress,
            samples={task: list(samples[task]) for task in tasks}, logged=logged,
        )
    finally:
        torch.set_num_threads(previous_threads)
    out: Dict[str, Tuple[Dict, Dict[str, Dict[int, object]]]] = {}
    for task in tasks:
        items: Dict[str, Dict[int, object]] = {}
        for sample in logged.get(task, []):
            for metric in sample["metrics"]:
                items.setdefault(f"{metric},{sample['filter']}", {})[int(sample["doc_id"])] = sample[metric]
        out[task] = (fresh[task], items)
    return out


def _simple_evaluate(
    spec: ModelSpec,
    tasks: Sequence[str],
    include_path: Path,
    *,
    batch_size: int,
    device: str,
    limit: Optional[int],
    progress: bool = True,
    samples: Optional[Dict[str, List[int]]] = None,
    logged: Optional[Dict[str, List[Dict]]] = None,
) -> Dict[str, Dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # datasets' per-split bars for a few hundred local JSON lines are only noise.
    dataset_bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    # so are transformers' "Loading weights" bars, one per model and task
    from transformers.utils import logging as hf_logging

    hf_bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    model_args = f"pretrained={spec.path},dtype=float32"
    if spec.adapter is not None:
        model_args += f",peft={spec.adapter}"
    import lm_eval.evaluator

    # lm-eval records the current directory's git commit with `git describe --always`,
    # its stderr inherited: outside a git checkout every run prints "fatal: not a git
    # repository". The same call with git's stderr discarded (same hash, same fallback).
    recorded_git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_commit_hash
    # lm-eval describes the environment in every result (torch's collect_env runs pip and
    # other subprocesses): 1.8 s per call on a 2-core machine, a quarter of a tune trial's
    # time on the hard zoo when it scored task by task. Described once per process instead.
    recorded_env_info = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = _env_info_once
    # lm-eval draws its bars with an explicit `disable=`, which TQDM_DISABLE cannot override:
    # without progress they go to a buffer instead (errors still raise).
    bars = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with bars:
            output = lm_eval.simple_evaluate(
                model="hf",
                model_args=model_args,
                tasks=list(tasks),
                task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
                device=device,
                batch_size=batch_size,
                limit=limit,
                samples=samples,
                log_samples=logged is not None,
            )
    finally:
        lm_eval.evaluator.get_git_commit_hash = recorded_git_hash
        lm_eval.evaluator.add_env_info = recorded_env_info
        if dataset_bars_were_on:
            datasets.utils.enable_progress_bars()
        if hf_bars_were_on:
            hf_logging.enable_progress_bar()
    results = output["results"]
    if logged is not None:
        logged.update({task: list(output.get("samples", {}).get(task, [])) for task in tasks})
    for task in tasks:
        if task not in results:
            raise EvaluationError(f"lm-eval returned no result for task {task} on {spec}")
        results[task] = dict(results[task])
        samples = (output.get("n-samples") or {}).get(task)
        if samples:
            results[task]["n-samples"] = samples
    return {task: results[task] for task in tasks}


# What lm-eval records about the environment, per working directory (its git commits depend on it).
_GIT_HASHES: Dict[str, Optional[str]] = {}
_ENV_INFO: Dict[str, Dict] = {}


def _git_commit_hash():
    """lm-eval's ``loggers.utils.get_git_commit_hash`` with git's stderr discarded (no ``fatal:`` line outside a repository); once per directory."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    cwd = os.getcwd()
    if cwd not in _GIT_HASHES:
        try:
            _GIT_HASHES[cwd] = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()  # noqa: S607
        except (subprocess.CalledProcessError, FileNotFoundError):
            _GIT_HASHES[cwd] = get_commit_from_path(cwd)
    return _GIT_HASHES[cwd]


def _env_info_once(storage: Dict) -> None:
    """lm-eval's ``add_env_info``, computed on the first call in a working directory and reused after."""
    from lm_eval.loggers.utils import add_env_info

    cwd = os.getcwd()
    if cwd not in _ENV_INFO:
        described: Dict = {}
        add_env_info(described)
        _ENV_INFO[cwd] = described
    storage.update(_ENV_INFO[cwd])


# --------------------------------------------------------------------------
# The base / expert / merged comparison on a zoo.


def compare_on_zoo(
    zoo_dir: Union[str, os.PathLike],
    merged: Mapping[str, Union[ModelSpec, str, os.PathLike]],
    *,
    split: str = "test",
    experts: str = "full",
    batch_size: int = 64,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: bool = True,
) -> Dict:
    """Evaluate merged models against the zoo's base and experts; the report dict.

    ``experts`` is ``full`` (the fine-tuned folders) or ``lora`` (base + adapter).
    """
    from tqdm.auto import tqdm

    from mergekit_ext.zoo import load_zoo

    if split not in ("test", "validation"):
        raise EvaluationError(f"split must be 'test' or 'validation', not {split!r}")
    if experts not in ("full", "lora"):
        raise EvaluationError(f"experts must be 'full' or 'lora', not {experts!r}")
    zoo = load_zoo(zoo_dir)
    metric = zoo.metric
    task_of = {zoo.lm_eval_task(task, split): task for task in zoo.tasks}
    lm_tasks = list(task_of)
    common = dict(include_path=zoo.task_dir, batch_size=batch_size, device=device, cache_dir=zoo.eval_cache, threads=threads, progress=progress)
    specs = {label: spec if isinstance(spec, ModelSpec) else ModelSpec.parse(str(spec)) for label, spec in merged.items()}
    for label in specs:
        if label in ("base", "expert"):
            raise EvaluationError(f"'{label}' is reserved for the zoo's own models; name the merged model differently")

    jobs: List[Tuple[str, ModelSpec, List[str]]] = [("base", ModelSpec(zoo.base), lm_tasks)]
    for task in zoo.tasks:
        expert = ModelSpec(zoo.expert(task)) if experts == "full" else ModelSpec(zoo.base, zoo.adapter(task))
        jobs.append((f"expert:{task}", expert, [zoo.lm_eval_task(task, split)]))
    jobs += [(label, spec, lm_tasks) for label, spec in specs.items()]

    raw: Dict[str, Dict[str, Dict]] = {}
    for label, spec, tasks in tqdm(jobs, desc="lm-eval", disable=not progress):
        raw[label] = lm_eval_results(spec, tasks, **common)

    expert_raw = {lm_task: raw[f"expert:{task_of[lm_task]}"][lm_task] for lm_task in lm_tasks}
    expert_acc = {task_of[t]: float(expert_raw[t][metric]) for t in lm_tasks}

    def entry(path, lm: Dict[str, Dict]) -> Dict:
        accuracy = {task_of[t]: float(lm[t][metric]) for t in lm_tasks}
        normalized = {task: (accuracy[task] / expert_acc[task] if expert_acc[task] > 0 else None) for task in accuracy}
        stderr = _stderrs(lm, {t: task_of[t] for t in lm_tasks}, metric)
        return {
            "model": path,
            "lm_eval": lm,
            "accuracy": accuracy,
            "stderr": stderr,
            "mean_stderr": _mean_stderr(stderr.values(), len(accuracy)),
            "normalized_accuracy": normalized,
            "mean_accuracy": _mean(accuracy.values()),
            "mean_normalized_accuracy": _mean(v for v in normalized.values() if v is not None),
        }

    expert_paths = {label.split(":", 1)[1]: str(spec) for label, spec, _ in jobs if label.startswith("expert:")}
    models = {"base": entry(str(zoo.base), raw["base"]), "expert": entry(expert_paths, expert_raw)}
    for label, spec in specs.items():
        models[label] = entry(str(spec), raw[label])
    return {
        "zoo": str(zoo.root),
        "split": split,
        "experts": experts,
        "metric": metric,
        "chance": zoo.chance,
        "note": (
            "lm_eval holds lm-eval's numbers as they come; accuracy (the value of `metric`) and "
            "normalized_accuracy (merged / expert on its own task) are ours"
        ),
        "tasks": zoo.tasks,
        "lm_eval_tasks": {task_of[t]: t for t in lm_tasks},
        "models": models,
    }


def report_on_models(
    models: Mapping[str, Union[ModelSpec, str, os.PathLike]],
    tasks: Sequence[str],
    include_path: Union[str, os.PathLike],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    limit: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    threads: Optional[int] = None,
    progress: bool = True,
) -> Dict:
    """lm-eval on arbitrary models and tasks (no base/expert normalization); the report dict."""
    entries = {}
    used: set = set()
    for label, spec in models.items():
        lm = lm_eval_results(spec, tasks, include_path, batch_size=batch_size, device=device, limit=limit, cache_dir=cache_dir, threads=threads, progress=progress)
        metrics = {task: metric_of(lm[task]) for task in tasks}
        accuracy = {task: float(lm[task][key]) for task, key in metrics.items() if key is not None}
        stderr = {task: value for task in accuracy for value in _stderrs(lm, {task: task}, metrics[task]).values()}
        entries[label] = {
            "model": str(spec),
            "lm_eval": lm,
            "accuracy": accuracy,
            "stderr": stderr,
            "mean_accuracy": _mean(accuracy.values()),
            "mean_stderr": _mean_stderr(stderr.values(), len(accuracy)),
        }
        used.update(key for key in metrics.values() if key is not None)
    metric = next(iter(used)) if len(used) == 1 else (" / ".join(sorted(used)) if used else METRIC)
    # No "chance": for arbitrary tasks it is not known here.
    return {"metric": metric, "tasks": list(tasks), "lm_eval_tasks": {t: t for t in tasks}, "models": entries}


def _stderrs(lm: Mapping[str, Dict], names: Mapping[str, str], metric: str = METRIC) -> Dict[str, float]:
    """lm-eval's standard error of the metric per task (``acc_stderr,none``, ``exact_match_stderr,none``), where it gave one."""
    key = metric.replace(",", "_stderr,", 1)
    out = {}
    for lm_task, task in names.items():
        value = lm.get(lm_task, {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[task] = float(value)
    return out


def _mean_stderr(values, count: int) -> Optional[float]:
    """Standard error of a mean of ``count`` independent task accuracies: sqrt(Σ se²) / count."""
    values = list(values)
    if not values or len(values) != count:
        return None
    return math.sqrt(sum(v * v for v in values)) / count


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None
