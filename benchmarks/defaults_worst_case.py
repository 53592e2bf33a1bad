"""Defaults that never hurt: each candidate scored on every zoo, the default is the best worst case.

A default is what a user gets without tuning, on models we have never seen, so
it is chosen for its worst zoo, not its best: for each candidate value (λ, or
RMM's per-model weight), the share of the fine-tuning gain the merge keeps,
(merged − base) / (expert − base), on the validation split of every zoo, and the
default is the value whose smallest share over the zoos is largest (a share
below 0 is a merge below the base). A method's worst case is taken over the
zoos it was swept on.

Zoos: each ``--zoo DIR`` is swept here with the zoo's own scorer (the one
``mergekit-ext demo --tune`` uses: exact match for generation zoos, accuracy for
multiple-choice ones); the `hard` zoos' 3-seed sweep is read from
``results/quality-hard-defaults-sweep.json`` (validation, per seed), with each
seed's base and expert levels from ``results/quality-hard.json`` (its test split:
validation levels were not recorded there).

A `smol` zoo (real SmolLM2 experts) is swept with the smol benchmark's scorer
(greedy chat replies, exact match over the instruction tasks), with its base and
expert levels from the zoo's own validation scores; each candidate's retention
score (what the base knew) is kept beside its share. Zoos swept by an earlier run
stay in the result unless ``--zoo`` sweeps them again (``--fresh`` drops them), so
one more zoo costs only its own sweep; ``--methods`` sweeps only some methods there
and keeps the zoo's other methods from the earlier run.

    mergekit-ext zoo ZOO_DEMO --preset demo; mergekit-ext demo   # the recipes' zoo and the demo's (./demo-zoo)
    python benchmarks/defaults_worst_case.py --zoo demo=ZOO_DEMO --zoo demo-hard=demo-zoo --threads 1
    python benchmarks/defaults_worst_case.py --zoo smol-s2=ZOO_SMOL_S2 --threads 1   # adds a column
    python benchmarks/defaults_worst_case.py --methods rmm --zoo hard-s3=ZOO_HARD_S3 --zoo smol-s2=ZOO_SMOL_S2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "defaults-worst-case"

# The values of the hard sweep (a candidate must be scored on every zoo); they bracket each zoo's best.
CANDIDATES: Dict[str, List[Dict]] = {
    "tsv_m": [{"weight": 1.0, "lambda": value} for value in (1.0, 1.5, 2.0, 2.5)],
    "iso_cts": [{"weight": 1.0, "lambda": value, "common_space_fraction": 0.8} for value in (2.0, 2.5, 3.0, 3.5)],
    "iso_c": [{"weight": 1.0, "lambda": value} for value in (2.0, 2.5, 3.0, 3.5)],  # shares iso_cts' constant
    # RMM at its default basis size: the weight every model's reconstructed delta gets.
    "rmm": [{"k": 1, "weight": value} for value in (0.3, 0.45, 0.6, 0.8, 1.0)],
}
# The parameter each method's candidates vary (and each result row is keyed by).
SWEPT: Dict[str, str] = {"tsv_m": "lambda", "iso_cts": "lambda", "iso_c": "lambda", "rmm": "weight"}


def _key(method: str, setting: Dict) -> float:
    return float(setting[SWEPT[method]])


def sweep_zoo(zoo_dir: str, methods: List[str]) -> Dict:
    """Validation scores of base, experts and each method's candidates on one zoo (in memory, mergekit's engine)."""
    import torch
    from transformers import AutoTokenizer

    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import load_causal_lm, load_zoo, merge_in_memory, score

    zoo = load_zoo(zoo_dir)
    if "chat" in zoo.manifest:
        return sweep_smol_zoo(zoo, methods)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    base_state = load_state_dict(zoo.base)
    experts = {task: load_state_dict(zoo.expert(task)) for task in zoo.tasks}
    documents = {task: zoo.documents(task, "validation") for task in zoo.tasks}
    model = load_causal_lm(zoo.base, "cpu")

    def mean_score(state_for_task) -> float:
        total = 0.0
        for task in zoo.tasks:
            with torch.no_grad():
                model.load_state_dict(state_for_task(task), strict=True)
            total += score(model, tokenizer, documents[task], kind=zoo.task_kind)
        return total / len(zoo.tasks)

    base = mean_score(lambda task: base_state)
    expert = mean_score(lambda task: experts[task])
    swept = {}
    for method in methods:
        rows = []
        for setting in CANDIDATES[method]:
            merged = merge_in_memory(base_state, experts, method, setting)
            rows.append({SWEPT[method]: _key(method, setting), "validation": mean_score(lambda task: merged)})
        swept[method] = rows
    return {"zoo": str(zoo.root), "kind": zoo.task_kind, "metric": zoo.metric, "base": base, "expert": expert, "methods": swept}


def sweep_smol_zoo(zoo, methods: List[str]) -> Dict:
    """The sweep on a real-LLM `smol` zoo: validation exact match of the chat replies, retention beside it."""
    import torch

    from benchmarks.smol_quality import SmolScorer
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import merge_in_memory

    tasks = zoo.tasks
    scorer = SmolScorer(zoo)
    levels = zoo.manifest["metrics"]
    base_state = load_state_dict(zoo.base)
    experts = {task: load_state_dict(zoo.expert(task)) for task in tasks}

    def scores(state) -> Dict[str, float]:
        items = scorer(state, "validation", tasks + scorer.retention)
        accuracy = {name: sum(values) / len(values) for name, values in items.items()}
        return {"validation": sum(accuracy[task] for task in tasks) / len(tasks), "retention": {name: accuracy[name] for name in scorer.retention}}

    swept = {}
    for method in methods:
        rows = []
        for setting in CANDIDATES[method]:
            with torch.no_grad():
                merged = merge_in_memory(base_state, experts, method, dict(setting))
            rows.append({SWEPT[method]: _key(method, setting), **scores(merged)})
        swept[method] = rows
    return {
        "zoo": str(zoo.root),
        "kind": "chat",
        "metric": zoo.metric,
        "base": sum(levels["base"][task]["validation"] for task in tasks) / len(tasks),
        "expert": sum(levels["experts"][task][task]["validation"] for task in tasks) / len(tasks),
        "base_retention": {name: levels["base"][name]["validation"] for name in scorer.retention},
        "levels_from": "the zoo's build scores (validation split)",
        "methods": swept,
    }


HARD_SWEEP = RESULTS / "quality-hard-defaults-sweep.json"


def hard_zoos() -> Dict[str, Dict]:
    """The `hard` seeds from the committed sweep: validation per λ, base and expert levels per seed.

    Only the methods that sweep covers; the others are swept on other zoos with ``--zoo``.
    """
    sweep = json.loads(HARD_SWEEP.read_text(encoding="utf-8"))
    quality = json.loads((RESULTS / "quality-hard.json").read_text(encoding="utf-8"))
    zoos = {}
    for index, seed in enumerate(sweep["seeds"]):
        methods = {}
        for method, settings in CANDIDATES.items():
            if method not in sweep["grids"]:
                continue
            wanted = {_key(method, setting) for setting in settings}
            fraction = settings[0].get("common_space_fraction")
            rows = [
                {SWEPT[method]: _key(method, entry["setting"]), "validation": entry["per_seed"][index]}
                for entry in sweep["grids"][method]
                if _key(method, entry["setting"]) in wanted and entry["setting"].get("common_space_fraction") == fraction
            ]
            methods[method] = sorted(rows, key=lambda row: row[SWEPT[method]])
        zoos[f"hard-s{seed}"] = {
            "zoo": sweep["zoos"][index],
            "kind": "generation",
            "metric": quality["metric"],
            "base": quality["methods"]["base"]["test"][index],
            "expert": quality["methods"]["expert"]["test"][index],
            "levels_from": "test split (quality-hard.json)",
            "methods": methods,
        }
    return zoos


def _column_order(item) -> tuple:
    """Zoo columns by family (demo, smol, hard), then by name."""
    family = {"demo": 0, "smol": 1, "hard": 2}.get(item[0].split("-")[0], 3)
    return family, item[0]


def earlier_sweeps() -> Dict[str, Dict]:
    """The zoos an earlier run swept here (not the `hard` seeds of the committed sweep, read from it)."""
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    from_sweep = {f"hard-s{seed}" for seed in json.loads(HARD_SWEEP.read_text(encoding="utf-8"))["seeds"]}
    return {name: zoo for name, zoo in earlier["zoos"].items() if name not in from_sweep}


def choose(zoos: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per method: the gain share per (value, zoo), the worst zoo per value, and the value with the best worst case.

    A method's zoos are those that swept it; a value counts only if every one of them scored it.
    """
    chosen = {}
    for method in CANDIDATES:
        swept_on = [name for name, zoo in zoos.items() if method in zoo["methods"]]
        if not swept_on:
            continue
        table: Dict[float, Dict[str, float]] = {}
        for name in swept_on:
            zoo = zoos[name]
            gain = zoo["expert"] - zoo["base"]
            for row in zoo["methods"][method]:
                table.setdefault(row[SWEPT[method]], {})[name] = (row["validation"] - zoo["base"]) / gain
        complete = {value: shares for value, shares in table.items() if len(shares) == len(swept_on)}
        worst = {value: min(shares.values()) for value, shares in complete.items()}
        best = max(sorted(worst), key=lambda value: worst[value])
        chosen[method] = {
            "parameter": SWEPT[method],
            "value": best,
            "zoos": swept_on,
            "worst_share": worst[best],
            "shares": {str(v): complete[v] for v in sorted(complete)},
            "worst": {str(v): worst[v] for v in sorted(worst)},
        }
    return chosen


def retention_columns(result: Dict) -> List[str]:
    """The zoos that score retention (real-LLM zoos), in column order."""
    return [name for name, zoo in result["zoos"].items() if "base_retention" in zoo]


def retention_cell(result: Dict, zoo_name: str, method: str, value: str) -> str:
    """A candidate's retention on one zoo, with the base's beside it (``0.93 (base 0.95)``); ``–`` if not swept there."""
    zoo = result["zoos"][zoo_name]
    if method not in zoo["methods"]:
        return "–"
    row = next(row for row in zoo["methods"][method] if row[SWEPT[method]] == float(value))
    return " / ".join(f"{row['retention'][name]:.2f} (base {base:.2f})" for name, base in zoo["base_retention"].items())


def render_markdown(result: Dict) -> str:
    lines = [
        "# Defaults for the worst case over every zoo",
        "",
        "Share of the fine-tuning gain kept on each zoo's validation split, (merged − base) / (expert − base);",
        "below 0 = below the base. The default is the value with the largest worst share over the zoos the method was swept on.",
        "",
    ]
    for method, entry in result["chosen"].items():
        zoo_names = entry["zoos"]
        kept = [name for name in retention_columns(result) if name in zoo_names]
        header = f"| {entry['parameter']} | " + " | ".join(zoo_names) + " | worst |" + "".join(f" {name} retention |" for name in kept)
        lines += [f"## {method}: {entry['parameter']} {entry['value']}", "", header, "|---|" + "---|" * (len(zoo_names) + 1 + len(kept))]
        for value, shares in entry["shares"].items():
            mark = "**" if float(value) == entry["value"] else ""
            cells = " | ".join(f"{shares[name]:.2f}" for name in zoo_names)
            retained = "".join(f" {retention_cell(result, name, method, value)} |" for name in kept)
            lines.append(f"| {mark}{value}{mark} | {cells} | {mark}{entry['worst'][value]:.2f}{mark} |{retained}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", action="append", default=[], help="NAME=DIR of a built zoo to sweep (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="forget the zoos swept by earlier runs (default: keep those not swept again)")
    parser.add_argument("--methods", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES), help="sweep only these methods on the --zoo zoos")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    zoos = {} if args.fresh else earlier_sweeps()
    for item in args.zoo:
        name, _, folder = item.partition("=")
        swept = time.perf_counter()
        fresh = sweep_zoo(folder, args.methods)
        fresh["seconds"] = round(time.perf_counter() - swept, 1)
        kept = {m: rows for m, rows in zoos.get(name, {}).get("methods", {}).items() if m not in args.methods}
        zoos[name] = {**fresh, "methods": {**kept, **fresh["methods"]}}
    zoos.update(hard_zoos())
    zoos = dict(sorted(zoos.items(), key=_column_order))
    result = {"candidates": CANDIDATES, "zoos": zoos, "chosen": choose(zoos), "seconds": round(time.perf_counter() - started, 1)}
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (RESULTS / f"{NAME}.md").write_text(render_markdown(result) + "\n", encoding="utf-8")
    print(render_markdown(result))


if __name__ == "__main__":
    main()
