"""Renderings of an evaluation report: terminal table, Markdown and a PNG chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple, Union

from mergekit_ext import io


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
