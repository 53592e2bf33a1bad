"""The result tables of README.md and docs/*.md, rendered from the committed result files.

Each rendered table sits in README.md or in a page of docs/ between two markers::

    <!-- begin table:NAME -->
    | ... |
    <!-- end table:NAME -->

and ``RENDERERS[NAME]`` is the function that renders it from files under
``benchmarks/results/`` (a result file a command of this repository wrote).
A new table is one ``@renderer("name")`` function here plus its two markers, in
one of those files (each table is marked once). A table whose result file has
not been written yet is listed in ``PENDING`` and stays empty until it has.

    python -m benchmarks.render_readme           # rewrite the tables in README.md and docs/*.md
    python -m benchmarks.render_readme --check   # exit 1 naming every table that differs from its file

tests/test_readme_tables.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
DOCS = REPO / "docs"

RENDERERS: Dict[str, Callable[[], str]] = {}
# Tables marked before their benchmark has written its file: NAME -> that file under
# benchmarks/results/. The block must stay empty while the file is missing; once the
# file exists, the table needs its renderer like any other.
PENDING: Dict[str, str] = {}
_BLOCK = re.compile(r"(<!-- begin table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end table:(?P=name) -->)", re.S)


def renderer(name: str):
    """Register ``function() -> Markdown`` as the renderer of table ``name``."""

    def register(function: Callable[[], str]) -> Callable[[], str]:
        RENDERERS[name] = function
        return function

    return register


def _load(name: str) -> Dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def _ours() -> set:
    """This package's method names (bold in tables), from the stored catalog: nothing imported."""
    catalog = json.loads((REPO / "mergekit_ext" / "registry_catalog.json").read_text(encoding="utf-8"))
    return {entry["name"] for entry in catalog["methods"]}


# ---------------------------------------------------------------------------
# The tables


@renderer("demo")
def demo_table() -> str:
    """`mergekit-ext demo`'s summary, from the report.json it wrote (benchmarks/results/demo.json)."""
    from mergekit_ext.evaluate.report import format_summary_markdown

    return format_summary_markdown(_load("demo.json"))


@renderer("demo-time")
def demo_time_table() -> str:
    """Where the demo's time went, from the same run's report (benchmarks/results/demo.json)."""
    run = _load("demo.json")["demo"]
    phases = run["phase_seconds"]
    rows = [
        ("build the zoo", run["zoo_seconds"]),
        ("AdaRank learn", phases.get("adarank_learn", 0.0)),
        ("merges", phases["merge"]),
        ("lm-eval", phases["evaluate"]),
        ("**total (wall)**", run["total_seconds"]),
        ("CPU", run["cpu_seconds"]),
    ]
    lines = ["| phase | seconds |", "|---|---:|"] + [f"| {name} | {seconds:.1f} |" for name, seconds in rows]
    return "\n".join(lines) + "\n"


@renderer("quality-hard")
def quality_hard_table() -> str:
    """The 3-seed quality table on the `hard` zoo (benchmarks/results/quality-hard.json, `quality.py --aggregate`)."""
    result = _load("quality-hard.json")
    methods, reference = result["methods"], result.get("reference", "task_arithmetic")
    ours = _ours()
    header = "| method | test exact match | normalized | gain-normalized | Δ vs TA (seeds " + " / ".join(map(str, result["seeds"])) + ") | Δ vs TA |"
    lines = [header, "|---|---|---|---|---|---|"]

    def mean_std(entry: Dict) -> str:
        return f"{entry['mean']:.3f} ± {entry['std']:.3f}"

    for label in ("base", "expert"):
        lines.append(f"| {label} | {mean_std(methods[label]['test_mean_std'])} | – | – | – | – |")
    merged = sorted((label for label in methods if label not in ("base", "expert")), key=lambda label: -methods[label]["test_mean_std"]["mean"])
    for label in merged:
        entry = methods[label]
        name = f"**{label}**" if label in ours else label
        if label == reference:
            deltas, delta = "(reference)", "–"
        else:
            deltas = " / ".join(_signed(value) for value in entry["delta_vs_ta"])
            delta = f"{_signed(entry['delta_vs_ta_mean_std']['mean'])} ± {entry['delta_vs_ta_mean_std']['std']:.3f}"
        lines.append(
            f"| {name} | {mean_std(entry['test_mean_std'])} | {mean_std(entry['normalized_mean_std'])} | "
            f"{mean_std(entry['gain_normalized_mean_std'])} | {deltas} | {delta} |"
        )
    return "\n".join(lines) + "\n"


@renderer("defaults-worst-case")
def defaults_worst_case_table() -> str:
    """Defaults chosen for the worst zoo: the gain share per zoo, the worst, the chosen (`defaults_worst_case.py`)."""
    from benchmarks.defaults_worst_case import retention_cell, retention_columns

    result = _load("defaults-worst-case.json")
    zoos = list(result["zoos"])
    kept = retention_columns(result)
    header = "| method | value | " + " | ".join(zoos) + " | worst |" + "".join(f" {zoo} retention |" for zoo in kept)
    lines = [header, "|---|---|" + "---|" * (len(zoos) + 1 + len(kept))]
    for method, entry in result["chosen"].items():
        for value, shares in entry["shares"].items():
            chosen = float(value) == entry["value"]
            bold = (lambda text: f"**{text}**") if chosen else (lambda text: text)
            cells = " | ".join(bold(f"{shares[zoo]:.2f}".replace("-", "−")) if zoo in shares else "–" for zoo in zoos)
            worst = bold(f"{entry['worst'][value]:.2f}".replace("-", "−"))
            retained = "".join(f" {retention_cell(result, zoo, method, value)} |" for zoo in kept)
            lines.append(f"| {method} | {bold(entry['parameter'] + ' ' + value)} | {cells} | {worst} |{retained}")
    return "\n".join(lines) + "\n"


@renderer("smol-quality")
def smol_quality_table() -> str:
    """Every method on the real-LLM smol zoos, over seeds (`smol_quality.py --aggregate`, results/smol-quality.json)."""
    from benchmarks.smol_quality import aggregate_table

    result = _load("smol-quality.json")
    caption = (
        f"Seeds {', '.join(map(str, result['seeds']))} ({len(result['seeds'])} zoo(s)), {result['test_items_per_task']} test items per task "
        f"and seed; mean ± sample std over seeds; task arithmetic's λ per seed: {', '.join(map(str, result['methods']['task_arithmetic']['lambda']))}.\n\n"
    )
    return caption + aggregate_table(result)


@renderer("orderings")
def orderings_table() -> str:
    """The toy `hard` zoo's ordering beside the real-LLM smol zoo's (quality-hard.json, smol-quality.json)."""
    hard, smol = _load("quality-hard.json")["methods"], _load("smol-quality.json")["methods"]
    ours = _ours()
    merged = [label for label in hard if label in smol and label not in ("base", "expert")]

    def ranks(methods: Dict) -> Dict[str, int]:
        order = sorted(merged, key=lambda label: -methods[label]["test_mean_std"]["mean"])
        return {label: order.index(label) + 1 for label in order}

    def delta(entry: Dict, label: str) -> str:
        if label == "task_arithmetic" or "delta_vs_ta_mean_std" not in entry:
            return "(reference)"
        d = entry["delta_vs_ta_mean_std"]
        verdict = " *" if entry.get("beyond_noise") else ""
        return f"{_signed(d['mean'])} ± {d['std']:.3f}{verdict}"

    hard_rank, smol_rank = ranks(hard), ranks(smol)
    lines = [
        "| method | toy `hard`: rank | test | − task arithmetic | real `smol`: rank | test | − task arithmetic |",
        "|---|---:|---|---|---:|---|---|",
    ]
    for label in sorted(merged, key=lambda label: smol_rank[label]):
        name = f"**{label}**" if label in ours else label
        h, r = hard[label]["test_mean_std"], smol[label]["test_mean_std"]
        lines.append(
            f"| {name} | {hard_rank[label]} | {h['mean']:.3f} ± {h['std']:.3f} | {delta(hard[label], label)} | "
            f"{smol_rank[label]} | {r['mean']:.3f} ± {r['std']:.3f} | {delta(smol[label], label)} |"
        )
    return "\n".join(lines) + "\n"


@renderer("smol-adarank")
def smol_adarank_table() -> str:
    """AdaRank's learn runs on smol zoos against their base method (`smol_adarank.py`, results/smol-adarank-*.json)."""
    lines = [
        "| zoo | base method | base method test | AdaRank test | experts | gap closed | AdaRank − base method (paired z) | retention (base) | learn run: wall / CPU s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("smol-adarank-*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        models, method = run["models"], run["base_method"]["method"]
        start, learned = models[method], models["adarank"]
        versus = run["vs_base_method"]
        retention = " / ".join(f"{learned['retention'][n]:.3f} ({models['base']['retention'][n]:.3f})" for n in run["retention_tasks"])
        lines.append(
            f"| smol seed {run['seed']} | {method} | {start['mean_accuracy']:.3f} ± {start['mean_stderr']:.3f} | "
            f"{learned['mean_accuracy']:.3f} ± {learned['mean_stderr']:.3f} | {models['expert']['mean_accuracy']:.3f} | "
            f"{run['gap_closed']:.2f} | {_signed(versus['delta'])} ({versus['z']:+.1f}) | {retention} | "
            f"{run['learn_seconds']['wall']:.0f} / {run['learn_seconds']['cpu']:.0f} | {run['peak_rss_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


@renderer("smol-lora")
def smol_lora_table() -> str:
    """The LoRA paths over the smol seeds (`smol_lora.py --aggregate`, results/smol-lora.json): merges, then RMM."""
    from benchmarks.smol_lora import rmm_aggregate_table
    from benchmarks.smol_quality import aggregate_table

    agg = _load("smol-lora.json")
    seeds = ", ".join(map(str, agg["seeds"]))
    lines = [
        f"{'Seed' if len(agg['seeds']) == 1 else 'Seeds'} {seeds}: {len(agg['tasks'])} adapters of rank {agg['adapter_rank'][0]} per seed, {agg['test_items_per_task']} test items "
        f"per task and seed; mean ± sample std over seeds; task arithmetic's λ chosen on validation per seed: "
        f"{', '.join(map(str, agg['lambda']))}.",
        "",
        aggregate_table(agg),
        rmm_aggregate_table(agg),
    ]
    return "\n".join(lines)


@renderer("smol-lmeval")
def smol_lmeval_table() -> str:
    """The chosen smol merges through mergekit-yaml and lm-eval (`smol_lmeval.py`, results/smol-lmeval-s*.json)."""
    lines = [
        "| zoo | model | lm-eval test exact match | retention (lm-eval acc) | in-process mean | largest per-task difference | mergekit-yaml s | lm-eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("smol-lmeval-s*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        tasks, retention = run["tasks"], run["retention_tasks"]
        for row in run["rows"]:
            kept = " / ".join(f"{row['lm_eval'][n]:.3f} ± {row['lm_eval_stderr'][n]:.3f}" for n in retention)
            in_process = sum(row["in_process"][t] for t in tasks) / len(tasks)
            merge = f"{row['merge_wall_s']:.0f}" if "merge_wall_s" in row else ""
            lines.append(
                f"| smol seed {run['seed']} | {row['label']} | {row['lm_eval_mean']:.3f} ± {row['lm_eval_mean_stderr']:.3f} | {kept} | "
                f"{in_process:.3f} | {row['max_abs_difference']:.3f} | {merge} | {row['lm_eval_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


@renderer("tune-smol")
def tune_smol_table() -> str:
    """`mergekit-ext tune` (default space) on a smol zoo (its report.json, results/tune-smol-s*.json), beside the
    same methods at their shipped settings from that seed's smol_quality.py run."""
    lines = [
        "| zoo | search | method | shipped setting: test | tune's choice | validation | test ± se | choice − shipped | > base on every task | > best expert |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("tune-smol-s*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        seed = path.stem.rsplit("-s", 1)[1]
        # A study run without halving (--no-halving) stopped its trials task by task.
        search = "successive halving" if report.get("halving") else "per-task stopping"
        shipped = _load(f"smol-quality-s{seed}.json")["test_report"]["models"]
        verdicts = report["verdicts"]["methods"]
        best = report["best"]["method"]
        for method, entry in sorted(report["methods"].items(), key=lambda item: -item[1]["validation"]["mean"]):
            if not entry.get("chosen"):
                continue
            test, verdict = entry["test"], verdicts.get(method, {})
            default = shipped.get(method, {}).get("mean_accuracy")
            versus = "" if default is None else _signed(test["mean"] - default)
            expert = verdict.get("vs_best_expert", {})
            lines.append(
                f"| smol seed {seed} | {search} | {'**' + method + '**' if method == best else method} | {'' if default is None else f'{default:.3f}'} | "
                f"{entry['chosen']['label']} | {entry['validation']['mean']:.3f} | {test['mean']:.3f} ± {test['mean_stderr']:.3f} | {versus} | "
                f"{'yes' if verdict.get('beats_base_every_task') else 'no'} | "
                f"{'yes' if expert.get('beats') else 'no'} ({_signed(expert.get('diff', 0.0))}, z {expert.get('z', 0.0):+.1f}) |"
            )
    return "\n".join(lines) + "\n"


@renderer("architectures")
def architectures_table() -> str:
    """Every method and command per architecture (`architectures.py`, results/architectures.json)."""
    from benchmarks.architectures import render_table

    return render_table(_load("architectures.json"))


@renderer("adarank")
def adarank_table() -> str:
    """AdaRank's learner on every base method (`adarank_bench.py`): validation prompts only
    (results/adarank.json), + 384 unlabeled prompts at the earlier constant rate, and the
    learner's defaults (results/adarank-schedule.json); mean ± sample std over the zoos."""
    from mergekit_ext.evaluate.protocol.selection import select
    from mergekit_ext.evaluate.protocol.stats import summary
    from mergekit_ext.methods import adarank as defaults

    def zoos(result: Dict) -> List[str]:
        return [key for key, value in result.items() if isinstance(value, dict) and "experts" in value]

    def mean(values) -> float:
        return sum(values) / len(values)

    def test_of(result: Dict, key: str) -> List[float]:
        """Each zoo's test exact match of run ``key``: a base method's, or a learned run's at its last step."""
        scores = []
        for zoo in zoos(result):
            run = result[zoo]["runs"][key]
            if "checkpoints" in run:
                run = run["checkpoints"][max(run["checkpoints"], key=int)]
            scores.append(mean(run["test"]))
        return scores

    def validation_chosen(result: Dict, config: str) -> List[float]:
        """Test per zoo at the (lr, step) of ``config`` with the best mean validation (adarank_bench --summarise)."""
        candidates: Dict[Tuple[str, int], Dict[str, Dict]] = {}
        for zoo in zoos(result):
            for key, run in result[zoo]["runs"].items():
                if key.rsplit(":", 1)[0] == config:
                    for step, point in run["checkpoints"].items():
                        candidates.setdefault((key.rsplit(":", 1)[1], int(step)), {})[zoo] = point
        complete = [choice for choice, points in candidates.items() if len(points) == len(zoos(result))]
        scores = [mean([mean(point["validation"]) for point in candidates[choice].values()]) for choice in complete]
        points = candidates[select(complete, scores).setting]
        return [mean(points[zoo]["test"]) for zoo in zoos(result)]

    def closed(test: List[float], base: List[float], experts: List[float]) -> Dict:
        return summary([(t - b) / (e - b) for t, b, e in zip(test, base, experts)])

    def cell(test: List[float], gap: Dict, bold: bool = False) -> Tuple[str, str]:
        stats = summary(test)
        score = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
        share = f"{100 * gap['mean']:.0f} ± {100 * gap['std']:.0f} %"
        return (f"**{score}**", f"**{share}**") if bold else (score, share)

    before, after = _load("adarank.json"), _load("adarank-schedule.json")
    experts = [mean(after[zoo]["experts"]["test"]) for zoo in zoos(after)]
    experts_before = [mean(before[zoo]["experts"]["test"]) for zoo in zoos(before)]
    ta = test_of(after, "ta:base")
    constant = f"u{defaults.DEFAULT_ZOO_UNLABELED}:b{defaults.DEFAULT_BATCH_SIZE}:0.003"
    default = f"u{defaults.DEFAULT_ZOO_UNLABELED}:b{defaults.DEFAULT_BATCH_SIZE}:s{defaults.DEFAULT_LR_SCHEDULE}:{defaults.DEFAULT_LR:g}"
    rate = f"{defaults.DEFAULT_LR:.0e}".replace("e-0", "e-")
    names = {"cart": "CART", "ta": "TA", "tsv_m": "TSV-M", "iso_cts": "Iso-CTS"}
    lines = [
        f"| base method (λ chosen on validation per seed) | base | validation prompts only, ≤ 300 steps, constant lr 3e-3, batch 16 |"
        f" + {defaults.DEFAULT_ZOO_UNLABELED} unlabeled, {defaults.DEFAULT_STEPS} steps, constant lr 3e-3 |"
        f" **defaults: {defaults.DEFAULT_LR_SCHEDULE} lr {rate}** | gap closed (defaults) | − task arithmetic, per seed (defaults) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, name in names.items():
        priors = ", ".join(str(after[zoo]["runs"][f"{variant}:base"]["prior"]) for zoo in zoos(after))
        base = test_of(after, f"{variant}:base")
        base_before = test_of(before, f"{variant}:base")
        first = validation_chosen(before, f"{variant}:distill:full")
        second = test_of(after, f"{variant}:distill:full:{constant}")
        learned = test_of(after, f"{variant}:distill:full:{default}")
        score, share = cell(learned, closed(learned, base, experts), bold=True)
        cells = [
            "{} ({})".format(*cell(first, closed(first, base_before, experts_before))),
            "{} ({})".format(*cell(second, closed(second, base, experts))),
            score,
            share,
            " / ".join(_signed(t - a) for t, a in zip(learned, ta)),
        ]
        lines.append(f"| {name} ({priors}) | {cell(base, summary([0.0]))[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------


def documents() -> List[Path]:
    """The files whose tables are rendered: README.md and every docs/*.md."""
    return [README] + sorted(DOCS.glob("*.md"))


def _check_pending(name: str, body: str) -> None:
    if (RESULTS / PENDING[name]).exists():
        raise KeyError(f"table '{name}': benchmarks/results/{PENDING[name]} exists, so the table needs its renderer in benchmarks/render_readme.py")
    if body.strip():
        raise KeyError(f"table '{name}' has no renderer yet: its block must stay empty until benchmarks/results/{PENDING[name]} exists")


def render(text: str) -> str:
    """``text`` with every marked table re-rendered; unknown table names are an error."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            if name in PENDING:
                _check_pending(name, match.group("body"))
                return match.group(0)
            raise KeyError(f"table '{name}' has no renderer in benchmarks/render_readme.py")
        return match.group(1) + RENDERERS[name]() + match.group(4)

    return _BLOCK.sub(replace, text)


def stale_tables(text: str) -> List[str]:
    """Names of the marked tables whose text differs from what their result files give."""
    stale = []
    for match in _BLOCK.finditer(text):
        name = match.group("name")
        if name not in RENDERERS:
            if name in PENDING and not (RESULTS / PENDING[name]).exists() and not match.group("body").strip():
                continue
            stale.append(name)
        elif RENDERERS[name]() != match.group("body"):
            stale.append(name)
    return stale


def marked_tables(text: str) -> List[str]:
    return [match.group("name") for match in _BLOCK.finditer(text)]


def table_locations() -> Dict[str, List[Path]]:
    """Every marked table name -> the files that mark it (README.md and docs/*.md)."""
    locations: Dict[str, List[Path]] = {}
    for path in documents():
        for name in marked_tables(path.read_text(encoding="utf-8")):
            locations.setdefault(name, []).append(path)
    return locations


def table_file(name: str) -> Optional[Path]:
    """The file that marks table ``name`` (None if none does)."""
    return next(iter(table_locations().get(name, [])), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table differs from its file")
    parser.add_argument("--readme", type=Path, default=None, help="one file only (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    paths = [args.readme] if args.readme else documents()
    stale_any = False
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if not marked_tables(text):
            continue
        if args.check:
            for name in stale_tables(text):
                stale_any = True
                print(f"{path}: table '{name}' differs from its result file; run: python -m benchmarks.render_readme", file=sys.stderr)
            continue
        rendered = render(text)
        if rendered != text:
            path.write_text(rendered, encoding="utf-8")
        print(f"{path}: {len(marked_tables(text))} tables rendered ({', '.join(marked_tables(text))})")
    return 1 if stale_any else 0


if __name__ == "__main__":
    sys.exit(main())
