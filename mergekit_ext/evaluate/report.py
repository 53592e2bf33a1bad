"""Renderings of an evaluation report: terminal table, Markdown and a PNG chart.

The metric is the report's own (``acc`` on the multiple-choice zoos,
``exact_match`` on the generation zoo; the chart draws a chance line only
where the report has a chance level). Every score is shown with lm-eval's standard error (``0.829±0.027``): on the
zoo's 100–200 items per task most gaps between merges are within it. With a
zoo's base in the report, a model that scores below the base on a task is
marked in the table (``BELOW_BASE``) and listed in a line at the end.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from mergekit_ext import io

BELOW_BASE = "!"
_METRIC_NAMES = {"acc,none": "accuracy", "acc_norm,none": "normalized-length accuracy", "exact_match,none": "exact match"}


def metric_name(report: Dict) -> str:
    """A plain name for lm-eval's metric key (``acc,none`` → ``accuracy``)."""
    metric = report.get("metric", "acc,none")
    return _METRIC_NAMES.get(metric, metric.split(",")[0])


def _columns(report: Dict) -> List[str]:
    return list(report["models"])


def _value(model: Dict, task: str) -> Tuple[Optional[float], Optional[float]]:
    if task == "mean":
        return model.get("mean_accuracy"), model.get("mean_stderr")
    return model["accuracy"].get(task), (model.get("stderr") or {}).get(task)


def below_base(report: Dict) -> List[Tuple[str, str, float, float, Optional[float]]]:
    """(model, task, accuracy, base accuracy, combined stderr) wherever a model scores below the base.

    Only for reports with a ``base`` (``compare_on_zoo``); the expert column is
    not checked (each expert is scored on its own task only).
    """
    models = report["models"]
    if "base" not in models:
        return []
    found = []
    base = models["base"]
    for label, model in models.items():
        if label in ("base", "expert"):
            continue
        for task in report["tasks"]:
            acc, se = _value(model, task)
            base_acc, base_se = _value(base, task)
            if acc is None or base_acc is None or not acc < base_acc:
                continue
            combined = math.sqrt(se * se + base_se * base_se) if se is not None and base_se is not None else None
            found.append((label, task, acc, base_acc, combined))
    return found


def table_rows(report: Dict) -> Tuple[List[str], List[List[str]]]:
    """Header and rows: one row per task plus the mean.

    Cells are ``acc±stderr``; merged columns add ``(normalized)`` and end in
    ``BELOW_BASE`` where the model scores below the zoo's base on that task.
    """
    labels = _columns(report)
    normalized = "expert" in report["models"]
    flagged = {(label, task) for label, task, *_ in below_base(report)}
    mean_flagged = _mean_below_base(report)
    header = ["task"] + labels
    rows = []
    for task in report["tasks"] + ["mean"]:
        row = [task]
        for label in labels:
            model = report["models"][label]
            acc, se = _value(model, task)
            cell = "-" if acc is None else f"{acc:.3f}"
            if acc is not None and se is not None:
                cell += f"±{se:.3f}"
            if normalized and label not in ("base", "expert") and acc is not None:
                norm = model["mean_normalized_accuracy"] if task == "mean" else model["normalized_accuracy"].get(task)
                if norm is not None:
                    cell += f" ({norm:.2f})"
            if (label, task) in flagged or (task == "mean" and label in mean_flagged):
                cell += f" {BELOW_BASE}"
            row.append(cell)
        rows.append(row)
    return header, rows


def _mean_below_base(report: Dict) -> set:
    models = report["models"]
    if "base" not in models or models["base"].get("mean_accuracy") is None:
        return set()
    base_mean = models["base"]["mean_accuracy"]
    return {
        label
        for label, model in models.items()
        if label not in ("base", "expert") and model.get("mean_accuracy") is not None and model["mean_accuracy"] < base_mean
    }


def below_base_lines(report: Dict) -> List[str]:
    """One line per model that scores below the base somewhere (empty when none does)."""
    by_model: Dict[str, List[str]] = {}
    for label, task, acc, base_acc, combined in below_base(report):
        gap = base_acc - acc
        size = f", {gap / combined:.1f} stderr" if combined else ""
        by_model.setdefault(label, []).append(f"{task} {acc:.3f} < {base_acc:.3f}{size}")
    lines = []
    mean_flagged = _mean_below_base(report)
    for label, parts in by_model.items():
        mean = " (and on the mean)" if label in mean_flagged else ""
        lines.append(f"{BELOW_BASE} {label} scores below the base{mean} on: " + "; ".join(parts))
    return lines


def format_table(report: Dict) -> str:
    header, rows = table_rows(report)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    footer = below_base_lines(report)
    if footer:
        footer = ["", *footer, f"({BELOW_BASE} = below the zoo's base model on that task: the merge made it worse than no fine-tuning)"]
    return _caption(report) + "\n" + "\n".join(lines + footer)


def _caption(report: Dict) -> str:
    name = metric_name(report)
    if "expert" in report["models"]:
        return (
            f"lm-eval {name} ± standard error on the {report['split']} split; merged columns: {name} "
            f"(normalized = merged / expert on its own task)"
        )
    return f"lm-eval {name} ± standard error"


SUMMARY_HEADER = ["method", "mean ± stderr", "normalized", "tasks below the base"]


def summary_rows(report: Dict, *, names_up_to: int = 4) -> List[List[str]]:
    """One row per model (base, expert, then each merge): mean ± stderr, normalized, tasks below the base.

    The per-task matrix (``table_rows``) does not fit a terminal with a dozen
    merges; this does. Up to ``names_up_to`` tasks below the base are named,
    more are counted.
    """
    flagged: Dict[str, List[str]] = {}
    for label, task, *_ in below_base(report):
        flagged.setdefault(label, []).append(task)
    mean_flagged = _mean_below_base(report)
    task_count = len(report["tasks"])
    rows = []
    for label, model in report["models"].items():
        mean, stderr = model.get("mean_accuracy"), model.get("mean_stderr")
        cell = "-" if mean is None else f"{mean:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
        if label in mean_flagged:
            cell += f" {BELOW_BASE}"
        merged = label not in ("base", "expert")
        normalized = model.get("mean_normalized_accuracy") if merged else None
        tasks = flagged.get(label, [])
        if not merged:
            below = ""
        elif not tasks:
            below = "none"
        elif len(tasks) <= names_up_to:
            below = f"{len(tasks)} of {task_count}: " + ", ".join(tasks)
        else:
            below = f"{len(tasks)} of {task_count}"
        rows.append([label, cell, "" if normalized is None else f"{normalized:.2f}", below])
    return rows


def format_summary(report: Dict) -> str:
    """The summary as a terminal table (a dozen merges of 8 tasks fit 100 columns)."""
    rows = [SUMMARY_HEADER] + summary_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_HEADER))]
    lines = ["  ".join(cell.rjust(width) if i == 2 else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    name = metric_name(report)
    caption = f"lm-eval {name} on the {report.get('split', 'test')} split, mean over {len(report['tasks'])} tasks; normalized = merged / expert"
    return caption + "\n" + "\n".join(lines)


def format_summary_markdown(report: Dict) -> str:
    """The same summary as a Markdown table (the README's demo table)."""
    lines = ["| " + " | ".join(SUMMARY_HEADER) + " |", "|---|---:|---:|---|"]
    lines += ["| " + " | ".join(cell or "–" for cell in row) + " |" for row in summary_rows(report)]
    return "\n".join(lines) + "\n"


def format_markdown(report: Dict) -> str:
    header, rows = table_rows(report)
    lines = [f"*{_caption(report)}*", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    footer = below_base_lines(report)
    if footer:
        lines += ["", *(f"{line}  " for line in footer), f"({BELOW_BASE} = below the zoo's base model on that task)"]
    return "\n".join(lines) + "\n"


def palette(count: int) -> List:
    """Colours that tell unrelated models apart: tab10's ten, then Dark2 and Set1 (no light/dark pairs)."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["Dark2"].colors) + list(matplotlib.colormaps["Set1"].colors)
    return [colours[index % len(colours)] for index in range(count)]


def chart_limits(report: Dict) -> Tuple[float, float]:
    """A zoomed y-range: from just under the lowest bar (minus its error) to 1, in steps of 0.05."""
    lows = []
    for model in report["models"].values():
        for task in report["tasks"] + ["mean"]:
            acc, se = _value(model, task)
            if acc is not None:
                lows.append(acc - (se or 0.0))
    low = min(lows) if lows else 0.0
    bottom = max(0.0, math.floor((low - 0.03) / 0.05) * 0.05)
    return bottom, 1.0


def write_chart(report: Dict, path: Union[str, os.PathLike]) -> Path:
    """A grouped bar chart: accuracy ± stderr per task (and mean) for every model, chance line, zoomed axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _columns(report)
    groups = report["tasks"] + ["mean"]
    width = 0.8 / max(1, len(labels))
    colours = palette(len(labels))
    flagged = {(label, task) for label, task, *_ in below_base(report)}
    bottom, top = chart_limits(report)
    figure, axis = plt.subplots(figsize=(min(16.0, 3.0 + 0.22 * len(groups) * len(labels)), 4.5), dpi=110)
    for index, label in enumerate(labels):
        model = report["models"][label]
        values = [_value(model, g) for g in groups]
        positions = [g + (index - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        heights = [(v if v is not None else bottom) - bottom for v, _ in values]
        errors = [se if se is not None else 0.0 for _, se in values]
        axis.bar(positions, heights, width, bottom=bottom, label=label, color=colours[index], yerr=errors, capsize=2, error_kw={"elinewidth": 0.8, "alpha": 0.7})
        for position, group, (value, _) in zip(positions, groups, values):
            if (label, group) in flagged and value is not None:
                axis.annotate(BELOW_BASE, (position, value), ha="center", va="bottom", fontsize=8, color="crimson")
    chance = report.get("chance")
    if chance is not None:
        if chance >= bottom:
            axis.axhline(chance, color="grey", linestyle=":", linewidth=1.0, label=f"chance ({chance:g})")
        else:
            axis.text(0.995, 0.01, f"chance = {chance:g} (below the axis)", transform=axis.transAxes, ha="right", va="bottom", fontsize=7, color="grey")
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(groups)
    axis.set_ylim(bottom, top)
    axis.set_ylabel(f"{metric_name(report)} (± stderr)" + (" — axis zoomed" if bottom > 0 else ""))
    axis.set_title(_caption(report).split(";")[0])
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=min(5, len(labels) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    figure.tight_layout()
    path = Path(path)
    with io.atomic_file(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return path


def write_report(report: Dict, out_dir: Union[str, os.PathLike], name: str = "report") -> Dict[str, Path]:
    """``report.json``, ``report.md`` and ``report.png`` in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md", "chart": out_dir / f"{name}.png"}
    io.write_json(paths["json"], report)
    io.write_text(paths["markdown"], format_markdown(report))
    write_chart(report, paths["chart"])
    return paths
