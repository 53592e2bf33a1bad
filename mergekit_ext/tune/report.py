"""What ``tune`` writes: ``best.yml``, ``report.json``, ``report.md``, ``trials.png``, ``methods.png``.

Everything is rendered from the report dict built by ``study.finalize`` (the
same dict is ``report.json``), so the files can be re-rendered from JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def write_best_yaml(config: Mapping[str, Any], path: PathLike, report: Optional[Mapping[str, Any]] = None) -> Path:
    """The chosen setting as a runnable mergekit YAML (absolute paths), with a comment saying where it comes from."""
    import yaml

    path = Path(path)
    lines = ["# Chosen by `mergekit-ext tune` on the validation tasks; run it with:", f"#   mergekit-yaml {path} OUT"]
    if report:
        best = report["best"]
        lines.append(f"# trial {best['trial']} of {report['space']}: validation mean {_fmt(best['validation_mean'])}")
        test = best.get("test") or {}
        if test.get("mean") is not None:
            extra = f", normalized {_fmt(test['mean_normalized'])}" if test.get("mean_normalized") is not None else ""
            lines.append(f"# test mean {_fmt(test['mean'])} ± {_fmt(test.get('mean_stderr'))}{extra} (see report.md)")
    body = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    return _write_atomic(path, "\n".join(lines) + "\n" + body)


def write_reports(report: Mapping[str, Any], out_dir: PathLike) -> Dict[str, Path]:
    """``report.json``, ``report.md``, ``trials.png`` and ``methods.png`` in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "trials_chart": out_dir / "trials.png",
        "methods_chart": out_dir / "methods.png",
    }
    listed = {k: str(v) for k, v in paths.items()}
    _write_atomic(paths["json"], json.dumps({**report, "files": {**report.get("files", {}), **listed}}, indent=2, default=str) + "\n")
    _write_atomic(paths["markdown"], format_markdown(report))
    write_trials_chart(report, paths["trials_chart"])
    write_methods_chart(report, paths["methods_chart"])
    return paths


# --------------------------------------------------------------------------
# Text.


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(entry: Optional[Mapping[str, Any]], task: Optional[str] = None) -> str:
    """``0.650 ± 0.062 (0.93)``: score, lm-eval standard error, normalized score."""
    if not entry:
        return "-"
    if task is None:
        value, stderr = entry.get("mean"), entry.get("mean_stderr")
        normalized = entry.get("mean_normalized")
    else:
        score = (entry.get("scores") or {}).get(task)
        if score is None:
            return "-"
        value, stderr = score["value"], score.get("stderr")
        normalized = (entry.get("normalized") or {}).get(task)
    text = _fmt(value)
    if stderr is not None:
        text += f" ± {_fmt(stderr)}"
    if normalized is not None:
        text += f" ({normalized:.2f})"
    return text


def _table(header: List[str], rows: List[List[str]], align_right_from: int = 1) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < align_right_from else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def method_rows(report: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Tried methods ordered by validation mean (best first), each with its test entry."""
    rows = []
    for method, entry in report["methods"].items():
        if not entry.get("chosen"):
            continue
        rows.append({"method": method, **entry})
    rows.sort(key=lambda r: -(r["validation"]["mean"] or 0.0))
    return rows


def baseline_rows(report: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The reference rows: base, the reference, plain task arithmetic at its best λ, then every expert."""
    names = {"base": "base model", "reference": "reference (expert on its own task)", "task_arithmetic_plain": "task arithmetic"}
    rows = [{"label": names[key], "key": key, **report["baselines"][key]} for key in names if key in report["baselines"]]
    for row in rows:
        if row["key"] == "task_arithmetic_plain" and row.get("lambda") is not None:
            row["label"] = f"task arithmetic (weight 1, best λ {row['lambda']:g})"
    for model, entry in (report.get("experts") or {}).items():
        rows.append({"label": f"expert {Path(model).name}", "key": "expert", "model": model, **entry})
    return rows


def _margin(gap: Optional[Mapping[str, Any]]) -> str:
    """``+0.031 (+1.8 se)``."""
    if not gap:
        return "-"
    text = f"{gap['diff']:+.3f}"
    return text + (f" ({gap['z']:+.1f} se)" if gap.get("z") is not None else "")


def verdict_lines(report: Mapping[str, Any]) -> List[str]:
    """Per method: below the base? beats the base on every task? beats the best single expert on the mean?"""
    verdicts = report.get("verdicts") or {}
    if not verdicts.get("methods"):
        return []
    expert = verdicts.get("best_expert")
    lines = [f"**{verdicts['summary'][0].upper()}{verdicts['summary'][1:]}.**", ""]
    header = ["method", "test mean", "beats the base on every task (worst task)", f"vs best expert {Path(expert).name if expert else ''} on the mean"]
    rows = []
    for row in method_rows(report):
        verdict = verdicts["methods"].get(row["method"], {})
        vs_base = verdict.get("vs_base") or {}
        if vs_base:
            worst_task = min(vs_base, key=lambda t: vs_base[t]["diff"])
            base_cell = ("yes" if verdict.get("beats_base_every_task") else "no") + f", {worst_task} {_margin(vs_base[worst_task])}"
        else:
            base_cell = "-"
        vs_expert = verdict.get("vs_best_expert")
        expert_cell = "-" if not vs_expert else ("beats, " if vs_expert["beats"] else "below, ") + _margin(vs_expert)
        mean_cell = _cell(row["test"]) + (" **below the base**" if verdict.get("below_base") else "")
        rows.append([row["method"], mean_cell, base_cell, expert_cell])
    lines += _table(header, rows)
    lines += ["", "Margins: difference of test scores, and in standard errors of the difference (lm-eval's, taken as independent)."]
    return lines


def format_markdown(report: Mapping[str, Any]) -> str:
    best = report["best"]
    trials = report["trials"]
    states: Dict[str, int] = {}
    for trial in trials:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    normalized = bool(report.get("normalized_by"))
    lines = [
        "# mergekit-ext tune",
        "",
        f"- space: `{report['space']}`",
        f"- study: `{report['study']['name']}` in `{report['study']['storage']}` ({report['sampler']} sampler, seed {report['seed']})",
        f"- trials: {', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))} (budget {report['target_trials']})",
        (
            f"- validation tasks: {', '.join(report['tasks']['validation'])}; test tasks: {', '.join(report['tasks']['test'])}"
            + (f"; limit {report['limit']} documents per task" if report.get("limit") else "")
        ),
        *(
            [f"- halving: each trial scored first on a seeded {report['halving']['fraction']:g} of every validation task's items, on the rest only if it can still win"]
            if report.get("halving")
            else []
        ),
        f"- metric: {report['metric']}" + ("; in parentheses: normalized = score / reference on the same task" if normalized else ""),
        f"- protocol: {report['protocol']}",
        "",
        "## Best setting",
        "",
        (
            f"**{best['label']}** (trial {best['trial']}): validation mean {_fmt(best['validation_mean'])}, "
            f"test mean {_cell(best.get('test'))}. Runnable config: `best.yml`."
        ),
        "",
        "## Each method's validation-best setting, scored once on test",
        "",
    ]
    header = ["method", "chosen setting", "trials (done/pruned/failed)", "validation mean", "test mean"]
    rows = []
    for row in method_rows(report):
        counts = row["trials"]
        rows.append(
            [
                row["method"] + (" **(best)**" if row["method"] == best["method"] else ""),
                f"`{row['chosen']['label']}` (#{row['chosen']['trial']})",
                f"{counts['COMPLETE']}/{counts['PRUNED']}/{counts['FAIL']}",
                _cell(row["validation"]),
                _cell(row["test"]),
            ]
        )
    for row in baseline_rows(report):
        rows.append([f"*{row['label']}*", "", "", "", _cell(row["test"])])
    untried = [m for m, e in report["methods"].items() if not e.get("chosen")]
    lines += _table(header, rows, align_right_from=2)
    if untried:
        lines += ["", f"No finished trial for: {', '.join(untried)}."]
    verdict = verdict_lines(report)
    if verdict:
        lines += ["", "## Against the base and the best single expert", ""] + verdict

    tasks = report["tasks"]["test"]
    columns = [(r["label"], r["test"]) for r in baseline_rows(report)] + [(r["method"], r["test"]) for r in method_rows(report)]
    lines += ["", "## Test scores per task", ""]
    lines += _table(["task"] + [c[0] for c in columns], [[t] + [_cell(c[1], t) for c in columns] for t in tasks] + [["**mean**"] + [_cell(c[1]) for c in columns]])

    validation_tasks = report["tasks"]["validation"]
    lines += ["", "## Trials (validation)", ""]
    trial_rows = []
    for trial in trials:
        scores = trial.get("validation") or {}
        value = trial["value"] if trial["value"] is not None else trial.get("partial_mean")
        note = trial["state"].lower()
        if trial.get("pruned_after_tasks") == "subset":
            note += f" on the subset (mean {trial['subset_mean']:.3f})"
        elif trial.get("pruned_after_tasks"):
            note += f" after {trial['pruned_after_tasks']} task(s)"
        if trial.get("error"):
            note += f": {trial['error'][:120]}"
        if trial.get("retry_of") is not None:
            note += f" (retry of #{trial['retry_of']})"
        params = ", ".join(f"{k}={v}" for k, v in (trial.get("params") or {}).items())
        trial_rows.append(
            [str(trial["number"]), note, trial.get("method") or "-", params or "-"]
            + [_cell({"scores": scores}, t) for t in validation_tasks]
            + [_fmt(value), "-" if trial.get("seconds") is None else f"{trial['seconds']:.0f}"]
        )
    lines += _table(["#", "state", "method", "parameters"] + validation_tasks + ["mean", "s"], trial_rows, align_right_from=4)
    lines += ["", "![score per trial](trials.png)", "", "![per method](methods.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Charts.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, path)
    return path


def _colours(methods: List[str]) -> Dict[str, Any]:
    plt = _pyplot()
    return {m: plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i % 20) for i, m in enumerate(methods)}


def write_trials_chart(report: Mapping[str, Any], path: PathLike) -> Path:
    """Validation mean per trial, coloured by method; pruned trials hollow at their partial mean; the running best."""
    plt = _pyplot()
    methods = list(report["methods"])
    colours = _colours(methods)
    figure, axis = plt.subplots(figsize=(8.0, 4.2), dpi=110)
    running, best_line = None, ([], [])
    for method in methods:
        done = [t for t in report["trials"] if t.get("method") == method and t["state"] == "COMPLETE" and t["value"] is not None]
        pruned = [t for t in report["trials"] if t.get("method") == method and t["state"] == "PRUNED" and t.get("partial_mean") is not None]
        if done:
            axis.scatter([t["number"] for t in done], [t["value"] for t in done], color=colours[method], label=method, s=28, zorder=3)
        if pruned:
            axis.scatter(
                [t["number"] for t in pruned], [t["partial_mean"] for t in pruned], facecolors="none", edgecolors=colours[method],
                s=28, zorder=3, label=None if done else method,
            )
    for trial in sorted(report["trials"], key=lambda t: t["number"]):
        if trial["state"] == "COMPLETE" and trial["value"] is not None:
            running = trial["value"] if running is None else max(running, trial["value"])
        if running is not None:
            best_line[0].append(trial["number"])
            best_line[1].append(running)
    if best_line[0]:
        axis.step(best_line[0], best_line[1], where="post", color="black", linewidth=1, alpha=0.6, label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(f"validation mean ({report.get('metric', '')})")
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title("score per trial (hollow: pruned, at its partial mean)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    return _save(figure, Path(path))


def write_methods_chart(report: Mapping[str, Any], path: PathLike) -> Path:
    """Per method: best validation mean and the test mean of that setting, error bars from lm-eval stderr."""
    plt = _pyplot()
    rows = method_rows(report)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 3.0), 4.4), dpi=110)
    positions = list(range(len(rows)))
    width = 0.38

    def errors(entries):
        return [e.get("mean_stderr") or 0.0 for e in entries]

    validation = [r["validation"] for r in rows]
    test = [r["test"] for r in rows]
    axis.bar([p - width / 2 for p in positions], [e["mean"] or 0.0 for e in validation], width, yerr=errors(validation), capsize=3, label="validation (best setting)", color="#7aa6d6")
    axis.bar([p + width / 2 for p in positions], [e["mean"] or 0.0 for e in test], width, yerr=errors(test), capsize=3, label="test (that setting)", color="#e08a4a")
    styles = {"base": ":", "reference": "--", "task_arithmetic_plain": "-."}
    for row in baseline_rows(report):
        if row["key"] not in styles:
            continue
        value = row["test"].get("mean")
        if value is not None:
            axis.axhline(value, linestyle=styles[row["key"]], color="grey", linewidth=1, label=f"{row['label']} (test)")
    axis.set_xticks(positions)
    axis.set_xticklabels([r["method"] for r in rows], rotation=20, ha="right")
    axis.set_ylabel(f"mean ({report.get('metric', '')})")
    axis.set_title("per method: chosen on validation, scored on test (± lm-eval stderr)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    figure.tight_layout()
    return _save(figure, Path(path))


def format_summary(report: Mapping[str, Any]) -> str:
    """A few terminal lines: each method's choice with validation and test means, then the baselines."""
    best = report["best"]
    below = {m for m, v in ((report.get("verdicts") or {}).get("methods") or {}).items() if v.get("below_base")}
    rows = [(r["method"], r["chosen"]["label"], _cell(r["validation"]), _cell(r["test"]) + (" below base" if r["method"] in below else "")) for r in method_rows(report)]
    rows += [(r["label"], "", "", _cell(r["test"])) for r in baseline_rows(report)]
    header = ("method", "chosen setting", "validation", "test")
    widths = [max(len(str(x[i])) for x in [header] + rows) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    normalized = " (normalized by the reference in parentheses)" if report.get("normalized_by") else ""
    summary = (report.get("verdicts") or {}).get("summary")
    tail = f"\n{summary}" if summary else ""
    return f"best: {best['label']} (trial {best['trial']}); test means ± lm-eval stderr{normalized}\n" + "\n".join(lines) + tail
