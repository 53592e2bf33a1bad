"""What `mergekit-ext tune` adds to a trial over a bare `mergekit-yaml` + `lm_eval`, on a `hard` zoo (issue 29).

For one setting (task arithmetic λ 0.5 on the zoo's 8 experts) and the zoo's 8
validation tasks, each repeat times, in this order and as a user runs them:

- **bare**: ``mergekit-yaml CONFIG OUT`` then ``lm_eval --model hf --model_args
  pretrained=OUT,dtype=float32 --tasks … --include_path TASKS`` (two subprocesses);
- **in-process floor**: the same merge and ONE lm-eval call over all 8 tasks, timed
  inside one Python process after its imports (the least a trial can cost with
  these libraries; what tune's own machinery is measured against);
- **tune**: ``mergekit-ext tune SPACE OUT`` with a one-setting space, with
  ``--no-halving`` (the default; ``--switches`` adds ``--halving``). From its report: the trial's own
  seconds (merge + scoring), the trial's wall time in the study (start to finish)
  and the command's phases: start-up until the trial starts, the trial, and the
  final phase after it (the chosen setting, the base and every expert scored on
  the test split, and the reports), which a bare run does not do.

Ratios are tune / bare per repeat, then mean ± sample std over repeats.

    python benchmarks/tune_overhead.py /work/cache/zoo-hard-s3 --repeats 3 --threads 1
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import runner  # noqa: E402
from benchmarks.tune_bench import space_yaml  # noqa: E402
from mergekit_ext.evaluate.protocol.stats import summary  # noqa: E402

LAMBDA = 0.5  # task arithmetic's scale: the hard zoo's validation winner (quality-hard.md)
BATCH_SIZE = 64  # lm-eval's batch size in both paths (tune's default)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: Sequence[str], log: Path, env: Dict[str, str]) -> Tuple[float, float]:
    """(wall, CPU) seconds of a subprocess (output to ``log``); raises with the log's tail on failure."""
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(log, "w") as handle:
        completed = subprocess.run(list(command), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])}… failed (exit {completed.returncode}); log {log}:\n{log.read_text()[-1500:]}")
    return seconds, _children_cpu_s() - cpu


def _config(zoo: Path) -> str:
    manifest = json.loads((zoo / "manifest.json").read_text())
    lines = ["merge_method: task_arithmetic", f"base_model: {zoo / manifest['base']}", "models:"]
    for entry in manifest["tasks"].values():
        lines += [f"  - model: {zoo / entry['expert']}", "    parameters: {weight: 1.0}"]
    lines += [f"parameters: {{lambda: {LAMBDA}}}", "dtype: float32"]
    return "\n".join(lines) + "\n"


def _one_setting_space(zoo: Path) -> str:
    return space_yaml(zoo).replace("tune:\n", f"tune:\n  methods: {{task_arithmetic: {{lambda: [{LAMBDA}]}}}}\n", 1)


def _prepared(zoo: Path, work: Path, out_name: str) -> Tuple[str, Path, Path, Path]:
    """(the validation tasks comma-separated, the zoo's task folder, the merge config written, an empty output path)."""
    manifest = json.loads((zoo / "manifest.json").read_text())
    tasks = ",".join(entry["lm_eval_task_validation"] for entry in manifest["tasks"].values())
    config, out = work / "config.yml", work / out_name
    config.write_text(_config(zoo))
    shutil.rmtree(out, ignore_errors=True)
    return tasks, zoo / manifest["task_yaml_dir"], config, out


def bare(zoo: Path, work: Path, env: Dict[str, str]) -> Dict[str, float]:
    tasks, include, config, out = _prepared(zoo, work, "merged")
    merge, merge_cpu = _run(["mergekit-yaml", str(config), str(out)], work / "mergekit-yaml.log", env)
    evaluate, evaluate_cpu = _run(
        [
            "lm_eval", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32", "--tasks", tasks,
            "--include_path", str(include), "--batch_size", str(BATCH_SIZE), "--device", "cpu",
            "--output_path", str(work / "lm_eval_out"),
        ],
        work / "lm_eval.log",
        env,
    )
    shutil.rmtree(out, ignore_errors=True)
    # The same merge and items as tune's trial: the validation mean must agree.
    (results_file,) = sorted((work / "lm_eval_out").rglob("results_*.json"))[-1:]
    results = json.loads(results_file.read_text())["results"]
    shutil.rmtree(work / "lm_eval_out", ignore_errors=True)
    scores = [results[task]["exact_match,none"] for task in tasks.split(",")]
    return {
        "mergekit_yaml_s": merge, "lm_eval_s": evaluate, "total_s": merge + evaluate,
        "mergekit_yaml_cpu_s": merge_cpu, "lm_eval_cpu_s": evaluate_cpu, "total_cpu_s": merge_cpu + evaluate_cpu,
        "validation_mean": sum(scores) / len(scores),
    }


# The same merge and one lm-eval call over every task, timed inside one process after its imports:
# the least a trial can cost with these libraries (what tune's own machinery is measured against).
FLOOR = """
import json, sys, time
from mergekit_ext.engine import quiet_options, run_merge_atomic
from mergekit_ext.evaluate.harness import lm_eval_results
import yaml
config, out, include, tasks, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5])
start, cpu = time.perf_counter(), time.process_time()
run_merge_atomic(yaml.safe_load(open(config)), out, options=quiet_options(), overwrite=True)
merged = time.perf_counter()
results = lm_eval_results(out, tasks, include, batch_size=batch, threads=1, progress=False)
done, cpu_done = time.perf_counter(), time.process_time()
scores = [results[t]["exact_match,none"] for t in tasks]
print(json.dumps({"merge_s": merged - start, "lm_eval_s": done - merged, "total_s": done - start, "total_cpu_s": cpu_done - cpu,
                  "validation_mean": sum(scores) / len(scores)}))
"""


def floor(zoo: Path, work: Path, env: Dict[str, str]) -> Dict[str, float]:
    tasks, include, config, out = _prepared(zoo, work, "floor-merged")
    log = work / "floor.log"
    _run([sys.executable, "-c", FLOOR, str(config), str(out), str(include), tasks, str(BATCH_SIZE)], log, env)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(log.read_text().strip().splitlines()[-1])


def tune(zoo: Path, work: Path, env: Dict[str, str], threads: int, switch: str) -> Dict[str, float]:
    space, out = work / "space.yml", work / f"tune{switch}"
    space.write_text(_one_setting_space(zoo))
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", "from mergekit_ext.cli import main; main()", "tune", str(space), str(out), "--threads", str(threads), "--quiet", switch]
    started = datetime.now(timezone.utc)
    total, total_cpu = _run(command, work / f"tune{switch}.log", env)
    report = json.loads((out / "report.json").read_text())
    (trial,) = report["trials"]
    trial_start = datetime.fromisoformat(trial["started"]).astimezone(timezone.utc)
    trial_end = datetime.fromisoformat(trial["finished"]).astimezone(timezone.utc)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "trial_s": trial["seconds"],
        "trial_cpu_s": trial["cpu_seconds"],
        "command_cpu_s": total_cpu,
        "trial_wall_s": (trial_end - trial_start).total_seconds(),
        "startup_s": (trial_start - started).total_seconds(),
        "until_trial_done_s": (trial_end - started).total_seconds(),
        "final_phase_s": total - (trial_end - started).total_seconds(),
        "command_s": total,
        "validation_mean": trial["value"],
    }


def _stat(values: List[float], digits: int = 3) -> str:
    stats = summary(values)
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def summarise(report: Dict[str, Any]) -> str:
    repeats = report["repeats"]
    lines = [
        "# What `mergekit-ext tune` adds to a trial over bare `mergekit-yaml` + `lm_eval`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (shared with other jobs); one torch thread per process; "
        f"{report['machine']['date_utc']} UTC. Zoo: `{report['zoo']}` (`hard` preset, 8 experts). Setting: task arithmetic λ {LAMBDA} "
        f"on the 8 experts; tasks: the 8 validation tasks (100 items each, greedy generation, exact match); lm-eval batch size {BATCH_SIZE}. "
        "Bare: `mergekit-yaml CONFIG OUT`, then `lm_eval --model hf --tasks … --include_path …` (two subprocesses). "
        "In-process floor: the same merge and one lm-eval call over all 8 tasks inside one Python process, timed after its imports. "
        "Tune: `mergekit-ext tune SPACE OUT` with that one setting; trial = its merge and scoring (the trial's own seconds, and its "
        "wall time in the study, and the process's CPU seconds meanwhile); start to trial done = from the command's start "
        "(Python start-up, imports, space checks, study) to the end of the trial; final phase = what follows (test-split scores "
        "of the choice, the base and every expert, reports), which the bare path does not do. CPU s: user + system seconds of "
        "the processes themselves, which other jobs on the machine disturb less than wall time. Ratios are taken within a "
        "repeat; mean ± sample std over repeats.",
        "",
    ]
    header = ["repeat", "bare: mergekit-yaml + lm_eval, wall s (CPU s)", "in-process floor: merge + lm-eval, wall s (CPU s)"]
    for switch in report["switches"]:
        header += [f"tune {switch}: trial wall s (CPU s)", "start to trial done s", "final phase s"]
    rows = []
    for index, repeat in enumerate(repeats):
        bare_run, floor_run = repeat["bare"], repeat["floor"]
        row = [
            index + 1,
            f"{bare_run['mergekit_yaml_s']:.1f} + {bare_run['lm_eval_s']:.1f} = {bare_run['total_s']:.1f} ({bare_run['total_cpu_s']:.1f})",
            f"{floor_run['merge_s']:.1f} + {floor_run['lm_eval_s']:.1f} = {floor_run['total_s']:.1f} ({floor_run['total_cpu_s']:.1f})",
        ]
        for switch in report["switches"]:
            run = repeat[switch]
            row += [f"{run['trial_wall_s']:.1f} ({run['trial_cpu_s']:.1f})", f"{run['until_trial_done_s']:.1f}", f"{run['final_phase_s']:.1f}"]
        rows.append(row)
    lines += [runner.markdown_table(header, rows), ""]
    same = all(abs(r[s]["validation_mean"] - r["bare"]["validation_mean"]) < 1e-12 for r in repeats for s in [*report["switches"], "floor"])
    lines += [f"Validation mean of the merge: {repeats[0]['bare']['validation_mean']:.4f} in every path ({'identical' if same else 'NOT identical'} in every repeat).", ""]
    lines += [
        f"Over {len(repeats)} repeats (mean ± sample std): bare {_stat([r['bare']['total_s'] for r in repeats], 1)} s wall, "
        f"{_stat([r['bare']['total_cpu_s'] for r in repeats], 1)} s CPU; in-process floor {_stat([r['floor']['total_s'] for r in repeats], 1)} s wall, "
        f"{_stat([r['floor']['total_cpu_s'] for r in repeats], 1)} s CPU.",
        "",
    ]
    table = []
    for switch in report["switches"]:
        table.append(
            [
                f"tune {switch}",
                _stat([r[switch]["trial_wall_s"] / r["bare"]["total_s"] for r in repeats]),
                _stat([r[switch]["trial_cpu_s"] / r["bare"]["total_cpu_s"] for r in repeats]),
                _stat([r[switch]["until_trial_done_s"] / r["bare"]["total_s"] for r in repeats]),
                _stat([r[switch]["trial_wall_s"] / r["floor"]["total_s"] for r in repeats]),
                _stat([r[switch]["trial_cpu_s"] / r["floor"]["total_cpu_s"] for r in repeats]),
            ]
        )
    lines += [
        runner.markdown_table(
            ["ratio (mean ± sample std)", "trial / bare, wall", "trial / bare, CPU", "start to trial done / bare, wall", "trial / floor, wall", "trial / floor, CPU"],
            table,
        ),
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoo", type=Path, help="a hard zoo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path(runner.WORK_DIR) / "tune-overhead")
    parser.add_argument("--out-dir", type=Path, default=Path(runner.RESULTS_DIR))
    parser.add_argument("--name", default="tune-overhead")
    parser.add_argument("--switches", nargs="+", default=["--no-halving"], help="tune runs per repeat, by their halving switch (default: the default, --no-halving)")
    parser.add_argument("--render", type=Path, help="only re-render the Markdown of an earlier JSON")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(summarise(report))
        return
    zoo = args.zoo.resolve()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    switches = args.switches
    report: Dict[str, Any] = {"machine": runner.machine_description(), "zoo": str(zoo), "lambda": LAMBDA, "switches": switches, "repeats": []}
    for index in range(args.repeats):
        repeat = {"bare": bare(zoo, args.work_dir, env), "floor": floor(zoo, args.work_dir, env)}
        for switch in switches:
            repeat[switch] = tune(zoo, args.work_dir, env, args.threads, switch)
        report["repeats"].append(repeat)
        print(f"repeat {index + 1}: bare {repeat['bare']['total_s']:.1f} s; " + "; ".join(f"tune {s} trial {repeat[s]['trial_wall_s']:.1f} s" for s in switches), flush=True)
        runner.save_results(args.out_dir, args.name, report, summarise(report), echo=False)
    print(summarise(report))


if __name__ == "__main__":
    main()
