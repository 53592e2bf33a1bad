"""`mergekit-ext tune` against the hand grid of `benchmarks/quality.py`, on the hard zoo (issue 13).

Per zoo (one per seed), in the same run and on the same models:

- **hand grid**: ``benchmarks/quality.py --methods M…`` for the methods that ``tune``
  tries by default (9 settings each, chosen on validation with the in-process
  exact-match scorer, each method's choice scored on test with lm-eval);
- **tune**: ``mergekit-ext tune`` with nothing but models and tasks (its default
  space: ``tune.space.DEFAULT_SPACES``), validation with lm-eval and pruning,
  run twice: ``--no-halving`` (``tune``: the tasks one at a time, a trial stopped
  after a task when hopeless) and ``--halving`` (``tune_halving``: a seeded
  quarter of every task first, the rest only for a trial that can still win).

All pick one configuration overall by mean validation score; the tables report
its test exact match (lm-eval), the number of merges each spent, wall time and
CPU time (children included), the paired per-seed difference tune − hand, and
what halving saved (seconds in trials, items scored) and whether it changed any
choice.

    python benchmarks/tune_bench.py /work/cache/zoo-hard-s3 ... --threads 1 --name tune-hard-unseen
    python benchmarks/tune_bench.py --render benchmarks/results/tune-hard.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import runner  # noqa: E402
from mergekit_ext.evaluate.protocol.stats import summary, versus_reference  # noqa: E402

# A one-thread run whose wall time exceeds its CPU time by more than this factor shared its cores.
WALL_OVER_CPU = 1.5
# The tune runs of one seed: key in the results, command-line switch, label.
VARIANTS = (("tune", "--no-halving", "tune"), ("tune_halving", "--halving", "tune + halving"))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: Sequence[str], log: Path, env: Dict[str, str]) -> Dict[str, float]:
    """Run ``command`` (output to ``log``); its wall and CPU seconds. Raises on failure with the log's tail."""
    cpu_before, start = _children_cpu_s(), time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(list(command), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = {"wall_s": time.perf_counter() - start, "cpu_s": _children_cpu_s() - cpu_before}
    if completed.returncode != 0:
        tail = log.read_text()[-1500:]
        raise SystemExit(f"{' '.join(command[:3])}… failed (exit {completed.returncode}); log {log}:\n{tail}")
    return seconds


def default_methods() -> List[str]:
    from mergekit_ext.tune.space import default_method_names

    return list(default_method_names())


def space_yaml(zoo: Path) -> str:
    """A SPACE with nothing but the zoo's models and tasks: tune's default methods and spaces."""
    manifest = json.loads((zoo / "manifest.json").read_text())
    tasks = manifest["tasks"]
    lines = [f"base_model: {zoo / manifest['base']}", "models:"]
    lines += [f"  - model: {zoo / entry['expert']}" for entry in tasks.values()]
    lines += ["dtype: float32", "tune:", "  tasks:"]
    lines.append("    validation: [" + ", ".join(entry["lm_eval_task_validation"] for entry in tasks.values()) + "]")
    lines.append("    test: [" + ", ".join(entry["lm_eval_task"] for entry in tasks.values()) + "]")
    lines.append(f"  include_path: {zoo / manifest['task_yaml_dir']}")
    lines.append("  reference:")
    lines += [f"    {entry['lm_eval_task']}: {zoo / entry['expert']}" for entry in tasks.values()]
    lines.append("  metric: exact_match")
    return "\n".join(lines) + "\n"


def hand_grid(zoo: Path, methods: Sequence[str], work: Path, env: Dict[str, str], threads: int) -> Dict[str, Any]:
    name = "hand"
    command = [sys.executable, "benchmarks/quality.py", "--zoo", str(zoo), "--methods", *methods, "--threads", str(threads), "--work-dir", str(work / "quality-work"), "--out-dir", str(work), "--name", name]
    seconds = timed(command, work / "hand.log", env)
    result = json.loads((work / f"{name}.json").read_text())
    test_models = result["test_report"]["models"]
    per_method = {}
    for method, entry in result["selection"].items():
        if entry.get("chosen") is None:
            continue
        test = test_models.get(method) or test_models.get(entry.get("label"))
        per_method[method] = {
            "chosen": entry["chosen"],
            "validation": entry["chosen_validation_mean_accuracy"],
            "test": _mean_accuracy(test),
            "test_stderr": test.get("mean_stderr") if test else None,
            "merges": len(entry["grid"]),
        }
    best = max(per_method, key=lambda m: per_method[m]["validation"])
    return {
        **seconds,
        "merges": sum(entry["merges"] for entry in per_method.values()),
        "best": {"method": best, **per_method[best]},
        "methods": per_method,
        "base_test": _mean_accuracy(test_models.get("base")),
    }


def _mean_accuracy(model_entry: Optional[Dict[str, Any]]) -> Optional[float]:
    """Mean test score over tasks of one model in quality.py's test report."""
    return model_entry.get("mean_accuracy") if model_entry else None


def _items(trial: Dict[str, Any]) -> int:
    """Validation documents lm-eval scored for a trial: its full scores, else its subsets (a trial stopped by halving)."""
    scores = trial.get("validation") or trial.get("subset") or {}
    return sum(score.get("samples") or 0 for score in scores.values())


def tune_run(zoo: Path, work: Path, env: Dict[str, str], threads: int, key: str = "tune", switch: str = "--no-halving") -> Dict[str, Any]:
    space = work / "space.yml"
    space.write_text(space_yaml(zoo))
    out = work / key
    command = [sys.executable, "-c", "from mergekit_ext.cli import main; main()", "tune", str(space), str(out), "--threads", str(threads), "--quiet", switch]
    seconds = timed(command, work / f"{key}.log", env)
    return {**seconds, "switch": switch, **digest(out / "report.json")}


def study_as_report(url: str) -> Dict[str, Any]:
    """The parts of a report that a tune study holds by itself (its search, no test scores): for a study whose
    worker was stopped before its test phase. Each method's choice is its best finished trial on validation."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=url)
    trials = []
    for trial in study.trials:
        attrs = trial.user_attrs
        trials.append({"state": trial.state.name, "method": attrs.get("method"), "params": attrs.get("params"), "value": trial.value,
                       "validation": attrs.get("validation"), "subset": attrs.get("subset"),
                       "seconds": attrs.get("seconds"), "cpu_seconds": attrs.get("cpu_seconds")})
    methods: Dict[str, Any] = {}
    for trial in trials:  # the first of equal scores, in trial order, as tune keeps it
        entry = methods.get(trial["method"])
        if trial["state"] == "COMPLETE" and (entry is None or trial["value"] > entry["validation"]["mean"]):
            methods[trial["method"]] = {"chosen": {"params": trial["params"]}, "validation": {"mean": trial["value"]}, "test": {"mean": None, "mean_stderr": None}}
    best = max(methods, key=lambda m: methods[m]["validation"]["mean"])
    return {
        "halving": study.user_attrs["space"]["tune"].get("halving"),
        "trials": trials,
        "methods": methods,
        "best": {"method": best, "params": methods[best]["chosen"]["params"], "validation_mean": methods[best]["validation"]["mean"], "test": methods[best]["test"]},
    }


def digest(path) -> Dict[str, Any]:
    """What one tune report (a report.json, or a study's storage URL) says about its search: trials and their
    states, items scored, time in trials, the choices."""
    text = str(path)
    report = study_as_report(text) if text.startswith(("sqlite:", "postgresql")) else json.loads(Path(path).read_text())
    states: Dict[str, int] = {}
    for trial in report["trials"]:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    methods = {
        method: {"chosen": entry["chosen"]["params"], "validation": entry["validation"]["mean"], "test": entry["test"]["mean"], "test_stderr": entry["test"]["mean_stderr"]}
        for method, entry in report["methods"].items()
        if entry.get("chosen")
    }
    best = report["best"]
    return {
        "halving": bool(report.get("halving")),
        "merges": len(report["trials"]),
        "trial_s": sum(trial.get("seconds") or 0.0 for trial in report["trials"]),
        "trial_cpu_s": sum(trial.get("cpu_seconds") or 0.0 for trial in report["trials"]),
        "items": sum(_items(trial) for trial in report["trials"]),
        "trial_states": states,
        "best": {"method": best["method"], "chosen": best["params"], "validation": best["validation_mean"], "test": best["test"]["mean"], "test_stderr": best["test"]["mean_stderr"]},
        "methods": methods,
        "report": str(path),
    }


def compare_reports(plain: Path, halved: Path, zoo_label: str) -> Dict[str, Any]:
    """Halving against the per-task rule from two finished tune reports of the same space and zoo."""
    runs = {"tune": digest(plain), "tune_halving": digest(halved)}
    if runs["tune"]["halving"] or not runs["tune_halving"]["halving"]:
        raise SystemExit(f"{plain} must be a run without halving and {halved} one with it")
    return {"zoo": zoo_label, **runs}


def summarise_comparison(comparison: Dict[str, Any]) -> str:
    """The two searches side by side: what halving saved, and every choice it changed (validation → test)."""
    plain, halved = comparison["tune"], comparison["tune_halving"]

    def change(key: str) -> str:
        if not (plain[key] and halved[key]):
            return "–"  # not recorded (reports before per-trial CPU time)
        return f"{plain[key]:.0f} → {halved[key]:.0f} ({100 * (halved[key] / plain[key] - 1):+.0f} %)"

    lines = [
        f"# `tune` with and without successive halving: {comparison['zoo']}",
        "",
        "The same default space on the same zoo; without halving the validation tasks are scored one at a time and a trial "
        "is stopped after a task when its running mean is hopeless; with it every trial is scored first on a seeded quarter "
        "of every validation task and on the rest only if it can still win. Items: validation documents lm-eval scored in "
        "the search; seconds and CPU seconds: the trials' own (merge and scoring), summed over trials.",
        "",
        runner.markdown_table(
            ["", "validation items scored", "seconds in trials", "CPU s in trials", "trials (pruned)", "overall choice (val → test ± se)"],
            [
                ["without → with halving", change("items"), change("trial_s"), change("trial_cpu_s"),
                 f"{plain['merges']} ({plain['trial_states'].get('PRUNED', 0)}) → {halved['merges']} ({halved['trial_states'].get('PRUNED', 0)})",
                 "same: " + _chosen(plain) if _same_choice(plain["best"], halved["best"]) else f"{_chosen(plain)} → {_chosen(halved)}"],
            ],
        ),
        "",
        "Per method (validation → test):",
        "",
    ]
    rows = []
    for method in sorted(set(plain["methods"]) | set(halved["methods"])):
        cells = [method]
        for run in (plain, halved):
            entry = run["methods"].get(method)
            test = "–" if not entry or entry["test"] is None else f"{entry['test']:.3f}"
            cells.append(f"{_params(entry['chosen'])} ({entry['validation']:.3f} → {test})" if entry else "–")
        a, b = plain["methods"].get(method), halved["methods"].get(method)
        if not (a and b):
            cells.append("")
        elif _params(a["chosen"]) == _params(b["chosen"]):
            cells.append("same")
        else:
            cells.append("changed" if a["test"] is None or b["test"] is None else f"{b['test'] - a['test']:+.3f}")
        rows.append(cells)
    lines += [runner.markdown_table(["method", "without halving", "with halving", "with − without (test)"], rows), ""]
    if any(entry["test"] is None for run in (plain, halved) for entry in run["methods"].values()):
        lines += ["\"–\" on test: that search was read from its study, whose worker was stopped before its test phase.", ""]
    return "\n".join(lines)


def _stat(values: List[float], digits: int = 3) -> str:
    """mean ± sample std (the protocol's stats)."""
    stats = summary(values)
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _chosen(entry: Dict[str, Any]) -> str:
    best = entry["best"]
    stderr = f" ± {best['test_stderr']:.3f}" if best.get("test_stderr") is not None else ""
    test = "test not scored" if best["test"] is None else f"{best['test']:.3f}{stderr}"
    return f"{best['method']} {_params(best['chosen'])} ({best['validation']:.3f} → {test})"


def _same_choice(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return a["method"] == b["method"] and _params(a["chosen"]) == _params(b["chosen"])


def summarise(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    variants = [(key, label) for key, _, label in VARIANTS if all(key in row for row in rows)]
    seeds = ", ".join(str(row["seed"]) for row in rows)
    lines = [
        "# `mergekit-ext tune` (default space) against the hand grid of `benchmarks/quality.py`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; one torch thread per process; {report['machine']['date_utc']} UTC. "
        f"Zoos: the `hard` preset, seeds {seeds} (8 generation tasks, exact match; 100 validation and 200 test items per task). "
        "All choose on validation and report the chosen configuration's test exact match (lm-eval). "
        "Hand grid: 9 settings per method, validation scored in process (the scorer equals lm-eval's exact match), "
        "merged in memory. Tune: its default space (no `tune.methods` in the SPACE file), every trial a real merge to "
        "disk and an lm-eval run; "
        + (
            "`tune` scores the validation tasks one at a time and stops a trial after a task when it is hopeless; "
            "`tune + halving` scores a seeded quarter of every validation task first and the rest only for a trial "
            "that can still win. "
            if len(variants) > 1
            else "hopeless trials pruned after their first tasks. "
        )
        + "CPU s includes child processes; ± are sample standard deviations over seeds (lm-eval standard errors inside a seed).",
        "",
    ]
    header = ["seed", "hand: merges", "hand: wall s / CPU s", "hand: chosen (val → test)"]
    for _, label in variants:
        header += [f"{label}: trials (pruned)", f"{label}: wall s / CPU s", f"{label}: chosen (val → test ± se)", f"{label} − hand (test)"]
    table = []
    for row in rows:
        cells = [row["seed"], row["hand"]["merges"], f"{row['hand']['wall_s']:.0f} / {row['hand']['cpu_s']:.0f}", _chosen(row["hand"])]
        for key, _ in variants:
            run = row[key]
            cells += [
                f"{run['merges']} ({run['trial_states'].get('PRUNED', 0)})",
                f"{run['wall_s']:.0f} / {run['cpu_s']:.0f}",
                _chosen(run),
                f"{run['best']['test'] - row['hand']['best']['test']:+.3f}",
            ]
        table.append(cells)
    lines += [runner.markdown_table(header, table), ""]
    crowded = [
        f"seed {row['seed']} {label} (wall {row[key]['wall_s'] / row[key]['cpu_s']:.1f}× its CPU)"
        for row in rows
        for key, label in [("hand", "hand grid"), *variants]
        if row[key]["wall_s"] > WALL_OVER_CPU * row[key]["cpu_s"]
    ]
    if crowded:
        lines += [
            "Runs whose wall time exceeds their CPU time by more than half, i.e. other jobs shared the cores: "
            + ", ".join(crowded) + ". Compare CPU seconds there.",
            "",
        ]
    if len(rows) > 1:
        text = (
            f"Over {len(rows)} seeds (mean ± sample std): hand grid test {_stat([r['hand']['best']['test'] for r in rows])} "
            f"in {_stat([r['hand']['wall_s'] for r in rows], 0)} s wall"
        )
        for key, label in variants:
            paired = versus_reference([r[key]["best"]["test"] for r in rows], [r["hand"]["best"]["test"] for r in rows])
            text += (
                f"; {label} test {_stat([r[key]['best']['test'] for r in rows])} in {_stat([r[key]['wall_s'] for r in rows], 0)} s wall, "
                f"paired {label} − hand {_stat(paired['differences'])} (t {paired['t']:.2f}, "
                f"{'beyond' if paired['beyond_noise'] else 'within'} noise)"
            )
        lines += [text + ".", ""]
    if len(variants) > 1:
        lines += _halving_section(rows)
    lines += ["## Per method: chosen setting, validation → test", ""]
    for row in rows:
        methods = sorted(set(row["hand"]["methods"]).union(*(row[key]["methods"] for key, _ in variants)))
        table = []
        for method in methods:
            cells = [method]
            for entry in [row["hand"]["methods"].get(method)] + [row[key]["methods"].get(method) for key, _ in variants]:
                cells.append(f"{_params(entry['chosen'])} ({entry['validation']:.3f} → {entry['test']:.3f})" if entry else "–")
            table.append(cells)
        header = ["method", "hand grid"] + [label if len(variants) > 1 else "tune default space" for _, label in variants]
        lines += [f"Seed {row['seed']}:", "", runner.markdown_table(header, table), ""]
        for key, label in variants:
            same, gaps = _agreement(row["hand"]["methods"], row[key]["methods"])
            lines += [
                f"{label}: the hand grid's setting (on the parameters both search) for {len(same)} of {len(row['hand']['methods'])} methods; "
                f"mean over methods of {label} − hand grid on test {summary(gaps)['mean']:+.4f}.",
                "",
            ]
    return "\n".join(lines) + "\n"


def _agreement(hand: Dict[str, Any], tuned: Dict[str, Any]):
    """(methods where tune chose the hand grid's values on the parameters both search, per method tune − hand on test)."""
    same, gaps = [], []
    for method, entry in hand.items():
        other = tuned.get(method)
        if other is None:
            continue
        gaps.append(other["test"] - entry["test"])
        shared = (set(entry["chosen"]) & set(other["chosen"])) - {"weight", "normalize"}
        if all(float(entry["chosen"][k]) == float(other["chosen"][k]) for k in shared):
            same.append(method)
    return same, gaps


def _halving_section(rows: List[Dict[str, Any]]) -> List[str]:
    """What halving saved (items scored, seconds in trials, CPU) and which choices it changed, per seed and over seeds."""

    def change(before: float, after: float) -> str:
        return f"{before:.0f} → {after:.0f} ({100 * (after / before - 1):+.0f} %)"

    table, items, trial_s, cpu_s = [], [], [], []
    for row in rows:
        plain, halved = row["tune"], row["tune_halving"]
        changed = sorted(m for m in plain["methods"] if m in halved["methods"] and _params(plain["methods"][m]["chosen"]) != _params(halved["methods"][m]["chosen"]))
        items.append(100 * (halved["items"] / plain["items"] - 1))
        trial_s.append(100 * (halved["trial_s"] / plain["trial_s"] - 1))
        cpu_s.append(100 * (halved["cpu_s"] / plain["cpu_s"] - 1))
        table.append(
            [
                row["seed"],
                change(plain["items"], halved["items"]),
                change(plain["trial_s"], halved["trial_s"]),
                change(plain["cpu_s"], halved["cpu_s"]),
                f"{plain['trial_states'].get('PRUNED', 0)} → {halved['trial_states'].get('PRUNED', 0)}",
                "same" if _same_choice(plain["best"], halved["best"]) else f"{_chosen(plain)} → {_chosen(halved)}",
                f"{len(changed)} of {len(plain['methods'])}" + (f" ({', '.join(changed)})" if changed else ""),
            ]
        )
    lines = [
        "## Halving: time saved and choices changed (same zoos, same run)",
        "",
        "Without halving → with it. Items: validation documents lm-eval scored in the search (deterministic); seconds in trials: "
        "the trials' own wall time (merge and scoring); CPU s: the whole command's, child processes included (less disturbed by "
        "other jobs than wall time, and it includes the final test-split phase, the same work in both runs).",
        "",
        runner.markdown_table(
            ["seed", "validation items scored", "seconds in trials", "command CPU s", "pruned trials", "overall choice", "per-method choices changed"],
            table,
        ),
        "",
    ]
    if len(rows) > 1:
        def signed(values: List[float]) -> str:
            stats = summary(values)
            return f"{stats['mean']:+.1f} ± {stats['std']:.1f} %"

        lines += [
            f"Over {len(rows)} seeds (mean ± sample std), halving changed the validation items scored by {signed(items)}, "
            f"the seconds spent in trials by {signed(trial_s)} and the command's CPU seconds by {signed(cpu_s)}.",
            "",
        ]
    return lines


def _params(params: Dict[str, Any]) -> str:
    # a per-model weight of 1 and normalize are the same in every setting; RMM tunes its weight
    shown = {k: v for k, v in params.items() if k != "normalize" and not (k == "weight" and v == 1)}
    return "(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) + ")"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoos", nargs="*", type=Path, help="hard zoos, one per seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path(runner.WORK_DIR) / "tune-bench")
    parser.add_argument("--out-dir", type=Path, default=Path(runner.RESULTS_DIR))
    parser.add_argument("--name", default="tune-hard")
    parser.add_argument("--render", type=Path, help="only re-render the Markdown of an earlier JSON")
    parser.add_argument("--compare-reports", nargs=2, metavar=("PLAIN", "HALVED"), help="compare two tune searches without and with halving: report.json files, or a study's storage URL (its search only)")
    parser.add_argument("--zoo-label", default="", help="the zoo the compared reports ran on (for the title)")
    args = parser.parse_args(argv)
    if args.compare_reports:
        comparison = compare_reports(*args.compare_reports, args.zoo_label)
        runner.save_results(args.out_dir, args.name, comparison, summarise_comparison(comparison), echo=True)
        return
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(summarise(report))
        return
    if not args.zoos:
        parser.error("give at least one zoo")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    methods = default_methods()
    report: Dict[str, Any] = {"machine": runner.machine_description(), "methods": methods, "rows": []}
    results_path = args.out_dir / f"{args.name}.json"
    if results_path.exists():  # resume: keep the seeds already measured
        report["rows"] = json.loads(results_path.read_text()).get("rows", [])
    done = {row["zoo"] for row in report["rows"]}
    for zoo in args.zoos:
        zoo = zoo.resolve()
        if str(zoo) in done:
            continue
        seed = json.loads((zoo / "manifest.json").read_text()).get("seed")
        work = args.work_dir / f"seed{seed}"
        if work.exists():
            # Only a folder this benchmark made (its first write is hand.log) is cleared.
            if any(work.iterdir()) and not (work / "hand.log").is_file():
                raise SystemExit(f"{work} exists and was not made by this benchmark; give another --work-dir")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        print(f"seed {seed}: hand grid …", flush=True)
        hand = hand_grid(zoo, methods, work, env, args.threads)
        print(f"seed {seed}: hand grid {hand['wall_s']:.0f} s, best {hand['best']['method']} test {hand['best']['test']:.3f}; tune …", flush=True)
        row = {"zoo": str(zoo), "seed": seed, "hand": hand}
        for key, switch, label in VARIANTS:
            row[key] = tune_run(zoo, work, env, args.threads, key, switch)
            print(f"seed {seed}: {label} {row[key]['wall_s']:.0f} s, best {row[key]['best']['method']} test {row[key]['best']['test']:.3f}", flush=True)
        report["rows"].append(row)
        runner.save_results(args.out_dir, args.name, report, summarise(report), echo=False)
    print(summarise(report))


if __name__ == "__main__":
    main()
