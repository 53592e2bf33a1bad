"""`mergekit-ext tune` against the hand grid of `benchmarks/quality.py`, on the hard zoo (issue 13).

Per zoo (one per seed), in the same run and on the same models:

- **hand grid**: ``benchmarks/quality.py --methods M…`` for the methods that ``tune``
  tries by default (9 settings each, chosen on validation with the in-process
  exact-match scorer, each method's choice scored on test with lm-eval);
- **tune**: ``mergekit-ext tune`` with nothing but models and tasks (its default
  space: ``tune.space.DEFAULT_SPACES``), validation with lm-eval and pruning.

Both pick one configuration overall by mean validation score; the table reports
its test exact match (lm-eval), the number of merges each spent, wall time and
CPU time (children included), and the paired per-seed difference tune − hand.

    python benchmarks/tune_bench.py /work/scratch/hard-bench/zoo-s0 ... --threads 1
    python benchmarks/tune_bench.py --render benchmarks/results/tune-hard.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import runner  # noqa: E402


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


def tune_run(zoo: Path, work: Path, env: Dict[str, str], threads: int) -> Dict[str, Any]:
    space = work / "space.yml"
    space.write_text(space_yaml(zoo))
    out = work / "tune"
    command = [sys.executable, "-c", "from mergekit_ext.cli import main; main()", "tune", str(space), str(out), "--threads", str(threads), "--quiet"]
    seconds = timed(command, work / "tune.log", env)
    report = json.loads((out / "report.json").read_text())
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
        **seconds,
        "merges": len(report["trials"]),
        "trial_states": states,
        "best": {"method": best["method"], "chosen": best["params"], "validation": best["validation_mean"], "test": best["test"]["mean"], "test_stderr": best["test"]["mean_stderr"]},
        "methods": methods,
        "report": str(out / "report.json"),
    }


def summarise(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "# `mergekit-ext tune` (default space) against the hand grid of `benchmarks/quality.py`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; one torch thread per process; {report['machine']['date_utc']} UTC. "
        "Zoos: the `hard` preset, one per seed (8 generation tasks, exact match; 100 validation and 200 test items per task). "
        "Both choose on validation and report the chosen configuration's test exact match (lm-eval). "
        "Hand grid: 9 settings per method, validation scored in process (the scorer equals lm-eval's exact match), "
        "merged in memory. Tune: its default space (no `tune.methods` in the SPACE file), every trial a real merge to "
        "disk and an lm-eval run, hopeless trials pruned after their first tasks. CPU s includes child processes.",
        "",
        runner.markdown_table(
            ["seed", "hand: merges", "hand: wall s / CPU s", "hand: chosen (val → test)", "tune: trials (pruned)", "tune: wall s / CPU s", "tune: chosen (val → test ± se)", "tune − hand (test)"],
            [
                [
                    row["seed"],
                    row["hand"]["merges"],
                    f"{row['hand']['wall_s']:.0f} / {row['hand']['cpu_s']:.0f}",
                    f"{row['hand']['best']['method']} {_params(row['hand']['best']['chosen'])} ({row['hand']['best']['validation']:.3f} → {row['hand']['best']['test']:.3f})",
                    f"{row['tune']['merges']} ({row['tune']['trial_states'].get('PRUNED', 0)})",
                    f"{row['tune']['wall_s']:.0f} / {row['tune']['cpu_s']:.0f}",
                    f"{row['tune']['best']['method']} {_params(row['tune']['best']['chosen'])} ({row['tune']['best']['validation']:.3f} → {row['tune']['best']['test']:.3f} ± {row['tune']['best']['test_stderr']:.3f})",
                    f"{row['tune']['best']['test'] - row['hand']['best']['test']:+.3f}",
                ]
                for row in rows
            ],
        ),
        "",
    ]
    if len(rows) > 1:
        def stat(values: List[float], digits: int = 3) -> str:
            return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

        diffs = [row["tune"]["best"]["test"] - row["hand"]["best"]["test"] for row in rows]
        lines += [
            f"Over {len(rows)} seeds (mean ± std): hand grid test {stat([r['hand']['best']['test'] for r in rows])} "
            f"in {stat([r['hand']['wall_s'] for r in rows], 0)} s wall; tune test {stat([r['tune']['best']['test'] for r in rows])} "
            f"in {stat([r['tune']['wall_s'] for r in rows], 0)} s wall; paired tune − hand {stat(diffs)}.",
            "",
        ]
    lines += ["## Per method: chosen setting, validation → test", ""]
    for row in rows:
        methods = sorted(set(row["hand"]["methods"]) | set(row["tune"]["methods"]))
        table = []
        for method in methods:
            hand = row["hand"]["methods"].get(method)
            tune = row["tune"]["methods"].get(method)
            table.append(
                [
                    method,
                    f"{_params(hand['chosen'])} ({hand['validation']:.3f} → {hand['test']:.3f})" if hand else "–",
                    f"{_params(tune['chosen'])} ({tune['validation']:.3f} → {tune['test']:.3f})" if tune else "–",
                ]
            )
        lines += [f"Seed {row['seed']}:", "", runner.markdown_table(["method", "hand grid", "tune default space"], table), ""]
    return "\n".join(lines) + "\n"


def _params(params: Dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k not in ("weight", "normalize")}
    return "(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) + ")"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoos", nargs="*", type=Path, help="hard zoos, one per seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path(runner.WORK_DIR) / "tune-bench")
    parser.add_argument("--out-dir", type=Path, default=Path(runner.RESULTS_DIR))
    parser.add_argument("--name", default="tune-hard")
    parser.add_argument("--render", type=Path, help="only re-render the Markdown of an earlier JSON")
    args = parser.parse_args(argv)
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
        tuned = tune_run(zoo, work, env, args.threads)
        print(f"seed {seed}: tune {tuned['wall_s']:.0f} s, best {tuned['best']['method']} test {tuned['best']['test']:.3f}", flush=True)
        report["rows"].append({"zoo": str(zoo), "seed": seed, "hand": hand, "tune": tuned})
        runner.save_results(args.out_dir, args.name, report, summarise(report), echo=False)
    print(summarise(report))


if __name__ == "__main__":
    main()
