"""The README's result tables, rendered from the committed result files.

Each rendered table sits in README.md between two markers::

    <!-- begin table:NAME -->
    | ... |
    <!-- end table:NAME -->

and ``RENDERERS[NAME]`` is the function that renders it from files under
``benchmarks/results/`` (a result file a command of this repository wrote).
A new table is one ``@renderer("name")`` function here plus its two markers.

    python -m benchmarks.render_readme           # rewrite the tables in README.md
    python -m benchmarks.render_readme --check   # exit 1 naming every table that differs from its file

tests/test_readme_tables.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"

RENDERERS: Dict[str, Callable[[], str]] = {}
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
    """λ defaults of tsv_m and iso_cts: the gain share per zoo, the worst, the chosen (`defaults_worst_case.py`)."""
    result = _load("defaults-worst-case.json")
    zoos = list(result["zoos"])
    lines = ["| method | λ | " + " | ".join(zoos) + " | worst |", "|---|---|" + "---|" * (len(zoos) + 1)]
    for method, entry in result["chosen"].items():
        for value, shares in entry["shares"].items():
            chosen = float(value) == entry["lambda"]
            bold = (lambda text: f"**{text}**") if chosen else (lambda text: text)
            cells = " | ".join(bold(f"{shares[zoo]:.2f}".replace("-", "−")) for zoo in zoos)
            worst = bold(f"{entry['worst'][value]:.2f}".replace("-", "−"))
            lines.append(f"| {method} | {bold(value)} | {cells} | {worst} |")
    return "\n".join(lines) + "\n"


@renderer("architectures")
def architectures_table() -> str:
    """Every method and command per architecture (`architectures.py`, results/architectures.json)."""
    from benchmarks.architectures import render_table

    return render_table(_load("architectures.json"))


# ---------------------------------------------------------------------------


def render(text: str) -> str:
    """``text`` with every marked table re-rendered; unknown table names are an error."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"README table '{name}' has no renderer in benchmarks/render_readme.py")
        return match.group(1) + RENDERERS[name]() + match.group(4)

    return _BLOCK.sub(replace, text)


def stale_tables(text: str) -> List[str]:
    """Names of the marked tables whose text differs from what their result files give."""
    stale = []
    for match in _BLOCK.finditer(text):
        name = match.group("name")
        if name not in RENDERERS or RENDERERS[name]() != match.group("body"):
            stale.append(name)
    return stale


def marked_tables(text: str) -> List[str]:
    return [match.group("name") for match in _BLOCK.finditer(text)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a table differs from its file")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    if args.check:
        stale = stale_tables(text)
        for name in stale:
            print(f"{args.readme}: table '{name}' differs from its result file; run: python -m benchmarks.render_readme", file=sys.stderr)
        return 1 if stale else 0
    rendered = render(text)
    if rendered != text:
        args.readme.write_text(rendered, encoding="utf-8")
    print(f"{args.readme}: {len(marked_tables(text))} tables rendered ({', '.join(marked_tables(text))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
