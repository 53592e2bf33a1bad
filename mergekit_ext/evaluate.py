"""Validation with the real lm-eval harness, and the base / expert / merged report.

``lm_eval_results`` runs ``lm_eval.simple_evaluate`` (model "hf", local task
YAMLs, offline) on a model folder or on a base plus a peft adapter, and keeps
lm-eval's per-task result dicts as they come. ``compare_on_zoo`` evaluates
merged models against a zoo's base and experts (each expert on its own task)
and adds the normalized accuracy (merged / expert) beside lm-eval's numbers.
``write_report`` writes that report as JSON, Markdown and a PNG bar chart.

Results are cached per (model weights, adapter weights, task YAML) in the
zoo's ``evals/`` folder, so the base and the experts are evaluated once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_ext.io import content_hash, write_json

METRIC = "acc,none"


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
        if not (self.path / "config.json").is_file():
            raise EvaluationError(f"not a model folder (no config.json): {self.path}")
        if self.adapter is not None and not (self.adapter / "adapter_config.json").is_file():
            raise EvaluationError(f"not a peft adapter folder (no adapter_config.json): {self.adapter}")

    def fingerprint(self) -> str:
        digest = hashlib.sha256(content_hash(self.path).encode())
        if self.adapter is not None:
            digest.update(_folder_hash(self.adapter).encode())
        return digest.hexdigest()

    def __str__(self) -> str:
        return str(self.path) if self.adapter is None else f"{self.path}+{self.adapter}"


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _task_yaml_hashes(include_path: Path) -> Dict[str, str]:
    """Task name -> hash of its YAML and data files (a changed task invalidates the cache)."""
    import yaml

    hashes: Dict[str, str] = {}
    for file in sorted(include_path.glob("*.yaml")):
        text = file.read_text(encoding="utf-8")
        config = yaml.safe_load(text) or {}
        name = config.get("task")
        if not name:
            continue
        digest = hashlib.sha256(text.encode())
        data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        for split_path in data_files.values():
            if Path(split_path).is_file():
                digest.update(Path(split_path).read_bytes())
        hashes[name] = digest.hexdigest()
    return hashes


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
) -> Dict[str, Dict]:
    """lm-eval's result dict per task (``{"alias", "acc,none", "acc_stderr,none"}``), cached.

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
        import torch

        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            fresh = _simple_evaluate(spec, todo, include_path, batch_size=batch_size, device=device, limit=limit)
        finally:
            torch.set_num_threads(previous_threads)
        for task in todo:
            results[task] = fresh[task]
            if task in cache_files:
                cache_files[task].parent.mkdir(parents=True, exist_ok=True)
                write_json(cache_files[task], {"model": str(spec), "task": task, "lm_eval": fresh[task]})
    return {task: results[task] for task in tasks}


def _simple_evaluate(spec: ModelSpec, tasks: Sequence[str], include_path: Path, *, batch_size: int, device: str, limit: Optional[int]) -> Dict[str, Dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import datasets

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # datasets' per-split bars for a few hundred local JSON lines are only noise.
    dataset_bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    model_args = f"pretrained={spec.path},dtype=float32"
    if spec.adapter is not None:
        model_args += f",peft={spec.adapter}"
    try:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
            device=device,
            batch_size=batch_size,
            limit=limit,
            log_samples=False,
        )
    finally:
        if dataset_bars_were_on:
            datasets.utils.enable_progress_bars()
    results = output["results"]
    for task in tasks:
        if task not in results:
            raise EvaluationError(f"lm-eval returned no result for task {task} on {spec}")
        results[task] = dict(results[task])
        samples = (output.get("n-samples") or {}).get(task)
        if samples:
            results[task]["n-samples"] = samples
    return {task: results[task] for task in tasks}


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
    task_of = {zoo.lm_eval_task(task, split): task for task in zoo.tasks}
    lm_tasks = list(task_of)
    common = dict(include_path=zoo.task_dir, batch_size=batch_size, device=device, cache_dir=zoo.eval_cache, threads=threads)
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
    expert_acc = {task_of[t]: float(expert_raw[t][METRIC]) for t in lm_tasks}

    def entry(path, lm: Dict[str, Dict]) -> Dict:
        accuracy = {task_of[t]: float(lm[t][METRIC]) for t in lm_tasks}
        normalized = {task: (accuracy[task] / expert_acc[task] if expert_acc[task] > 0 else None) for task in accuracy}
        return {
            "model": path,
            "lm_eval": lm,
            "accuracy": accuracy,
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
        "metric": METRIC,
        "note": "lm_eval holds lm-eval's numbers as they come; accuracy/normalized_accuracy (merged / expert on its own task) are ours",
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
) -> Dict:
    """lm-eval on arbitrary models and tasks (no base/expert normalization); the report dict."""
    entries = {}
    for label, spec in models.items():
        lm = lm_eval_results(spec, tasks, include_path, batch_size=batch_size, device=device, limit=limit, cache_dir=cache_dir, threads=threads)
        accuracy = {task: float(lm[task][METRIC]) for task in tasks if METRIC in lm[task]}
        entries[label] = {"model": str(spec), "lm_eval": lm, "accuracy": accuracy, "mean_accuracy": _mean(accuracy.values())}
    return {"metric": METRIC, "tasks": list(tasks), "lm_eval_tasks": {t: t for t in tasks}, "models": entries}


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------
# Renderings: terminal table, Markdown, PNG.


def _columns(report: Dict) -> List[str]:
    return list(report["models"])


def table_rows(report: Dict) -> Tuple[List[str], List[List[str]]]:
    """Header and rows: one row per task plus the mean; merged columns show ``acc (norm)``."""
    labels = _columns(report)
    normalized = "expert" in report["models"]
    header = ["task"] + labels
    rows = []
    for task in report["tasks"] + ["mean"]:
        row = [task]
        for label in labels:
            model = report["models"][label]
            acc = model["mean_accuracy"] if task == "mean" else model["accuracy"].get(task)
            cell = "-" if acc is None else f"{acc:.3f}"
            if normalized and label not in ("base", "expert") and acc is not None:
                norm = model["mean_normalized_accuracy"] if task == "mean" else model["normalized_accuracy"].get(task)
                if norm is not None:
                    cell += f" ({norm:.2f})"
            row.append(cell)
        rows.append(row)
    return header, rows


def format_table(report: Dict) -> str:
    header, rows = table_rows(report)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    caption = _caption(report)
    return caption + "\n" + "\n".join(lines)


def _caption(report: Dict) -> str:
    if "expert" in report["models"]:
        return (
            f"lm-eval {report['metric']} on the {report['split']} split; merged columns: accuracy "
            f"(normalized = merged / expert on its own task)"
        )
    return f"lm-eval {report['metric']}"


def format_markdown(report: Dict) -> str:
    header, rows = table_rows(report)
    lines = [f"*{_caption(report)}*", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_chart(report: Dict, path: Union[str, os.PathLike]) -> Path:
    """A grouped bar chart: accuracy per task (and mean) for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _columns(report)
    groups = report["tasks"] + ["mean"]
    width = 0.8 / max(1, len(labels))
    figure, axis = plt.subplots(figsize=(min(16.0, 3.0 + 0.22 * len(groups) * len(labels)), 4.5), dpi=110)
    for index, label in enumerate(labels):
        model = report["models"][label]
        values = [model["mean_accuracy"] if g == "mean" else model["accuracy"].get(g) for g in groups]
        positions = [g + (index - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        # tab20: distinct colours for up to 20 models (the default cycle repeats after 10).
        colour = plt.get_cmap("tab20")(index % 20)
        axis.bar(positions, [v if v is not None else 0.0 for v in values], width, label=label, color=colour)
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(groups)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel(report["metric"])
    axis.set_title(_caption(report).split(";")[0])
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=min(5, len(labels)), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, path)
    return path


def write_report(report: Dict, out_dir: Union[str, os.PathLike], name: str = "report") -> Dict[str, Path]:
    """``report.json``, ``report.md`` and ``report.png`` in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md", "chart": out_dir / f"{name}.png"}
    write_json(paths["json"], report)
    temporary = paths["markdown"].with_name(f".{name}.md.tmp-{os.getpid()}")
    temporary.write_text(format_markdown(report), encoding="utf-8")
    os.replace(temporary, paths["markdown"])
    write_chart(report, paths["chart"])
    return paths


# --------------------------------------------------------------------------
# CLI.


def _parse_labelled(texts: Sequence[str]) -> Dict[str, ModelSpec]:
    specs: Dict[str, ModelSpec] = {}
    for text in texts:
        label, _, target = text.rpartition("=")
        spec = ModelSpec.parse(target)
        label = label or spec.path.name + (f"+{spec.adapter.name}" if spec.adapter else "")
        if label in specs:
            raise EvaluationError(f"two models are labelled {label!r}; write LABEL=PATH to tell them apart")
        specs[label] = spec
    return specs


def _command():
    import click

    @click.command("eval")
    @click.argument("models", nargs=-1)
    @click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, exists=True), help="compare against this zoo's base and experts")
    @click.option("--tasks", help="comma-separated lm-eval task names (without --zoo)")
    @click.option("--include-path", type=click.Path(file_okay=False, exists=True), help="folder of lm-eval task YAMLs (without --zoo)")
    @click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
    @click.option("--experts", "expert_kind", type=click.Choice(["full", "lora"]), default="full", show_default=True, help="zoo experts: full fine-tunes or base+LoRA adapters")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False), help="write report.json, report.md and report.png here")
    @click.option("--batch-size", type=int, default=64, show_default=True)
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--limit", type=int, help="at most this many documents per task (no cache; for smoke tests)")
    @click.option("--threads", type=int, help="torch CPU threads (1 is fastest for the zoo's tiny models)")
    def eval_command(models, zoo_dir, tasks, include_path, split, expert_kind, out_dir, batch_size, device, limit, threads):
        """Validate MODELS with the real lm-eval harness.

        Each MODEL is PATH, BASE+ADAPTER (a peft adapter on a base) or
        LABEL=PATH. With --zoo, the report gives per task the zoo's base, the
        expert on its own task, each model, and normalized accuracy
        (model / expert). Otherwise pass --tasks and --include-path.
        """
        try:
            specs = _parse_labelled(models)
            if zoo_dir:
                if limit is not None:
                    raise EvaluationError("--limit is for ad-hoc runs; a zoo comparison uses the whole split")
                report = compare_on_zoo(zoo_dir, specs, split=split, experts=expert_kind, batch_size=batch_size, device=device, threads=threads)
            else:
                if not (tasks and include_path and specs):
                    raise click.UsageError("without --zoo, give MODELS, --tasks and --include-path")
                report = report_on_models(specs, [t.strip() for t in tasks.split(",") if t.strip()], include_path, batch_size=batch_size, device=device, limit=limit, threads=threads)
        except EvaluationError as error:
            raise click.ClickException(str(error)) from None
        click.echo(format_table(report))
        if out_dir:
            paths = write_report(report, out_dir)
            click.echo("wrote " + ", ".join(str(p) for p in paths.values()))

    return eval_command


eval_command = _command()
