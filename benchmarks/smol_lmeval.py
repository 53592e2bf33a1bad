"""The smol benchmark's chosen merges, made by `mergekit-yaml` and scored by lm-eval.

``smol_quality.py`` scores its grids in process (the shared chat prefix's KV
cache reused, weights swapped into one model object). This checks its chosen
settings end to end, the way a user would run them: each merge written by the
stock ``mergekit-yaml`` command (float32, this checkout's methods registered by
the startup hook), then scored by lm-eval on the zoo's test task files
(``generate_until`` through the chat template, exact match; retention by
log-likelihood), with lm-eval's own standard errors. Each lm-eval score is put
beside the in-process score of the same merge from the quality result file.

    python benchmarks/smol_lmeval.py --zoo ZOO \
        --quality benchmarks/results/smol-quality-s2.json --name smol-lmeval-s2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import runner  # noqa: E402
from benchmarks.smol_quality import add_smol_arguments, open_smol_zoo  # noqa: E402

DEFAULT_METHODS = ("task_arithmetic", "tsv_m", "cart", "iso_c")


def metric_keys(kind: str) -> tuple[str, str]:
    """lm-eval's result keys (value, standard error) for a zoo task of ``kind``."""
    name = "acc" if kind == "multiple_choice" else "exact_match"
    return f"{name},none", f"{name}_stderr,none"


def run(args) -> Dict[str, Any]:
    from tqdm import tqdm

    from mergekit_ext.evaluate import ModelSpec, lm_eval_results

    started = time.perf_counter()
    zoo = open_smol_zoo(args.zoo)
    quality = json.loads(Path(args.quality).read_text())
    if quality.get("seed") != zoo.manifest.get("seed"):
        raise SystemExit(f"{args.quality} is seed {quality.get('seed')}, the zoo {zoo.root} is seed {zoo.manifest.get('seed')}")
    tasks = zoo.tasks
    retention = list(zoo.manifest.get("retention", {}))
    entries = {**zoo.manifest["tasks"], **zoo.manifest.get("retention", {})}
    lm_task = {name: entries[name]["lm_eval_task"] for name in tasks + retention}
    in_process = quality["test_report"]["models"]
    experts = [zoo.expert(task) for task in tasks]

    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="smol-lmeval-") as scratch:
        for label in tqdm(["base", *args.methods], desc="mergekit-yaml + lm-eval", unit="model", disable=args.quiet):
            row: Dict[str, Any] = {"label": label}
            if label == "base":
                model = zoo.base
            else:
                if label not in quality["settings"]:
                    raise SystemExit(f"{args.quality} has no chosen setting for {label}")
                setting = quality["settings"][label]
                spec = runner.MergeSpec(label=label, method=label, parameters=setting)
                config = runner.merge_config(spec, zoo.base, experts, dtype="float32")
                model = Path(scratch) / label
                measured = runner.run_yaml(config, model, threads=args.threads, copy_tokenizer=True)
                if not measured.ok:
                    raise SystemExit(f"mergekit-yaml failed for {label}: {measured.log_tail[-500:]}")
                row.update(setting=setting, merge_wall_s=round(measured.wall_s, 1), merge_cpu_s=round(measured.cpu_s, 1))
            begun = time.perf_counter()
            results = lm_eval_results(
                ModelSpec(model), list(lm_task.values()), zoo.task_dir, batch_size=args.batch_size, threads=args.threads, progress=not args.quiet
            )
            row["lm_eval_s"] = round(time.perf_counter() - begun, 1)
            row["lm_eval"], row["lm_eval_stderr"] = {}, {}
            for name, task_name in lm_task.items():
                value_key, stderr_key = metric_keys(entries[name].get("kind", "generation"))
                row["lm_eval"][name] = float(results[task_name][value_key])
                row["lm_eval_stderr"][name] = float(results[task_name][stderr_key])
            reference = in_process[label]
            row["in_process"] = {**reference["accuracy"], **reference.get("retention", {})}
            row["max_abs_difference"] = max(abs(row["lm_eval"][name] - row["in_process"][name]) for name in lm_task)
            row["lm_eval_mean"] = sum(row["lm_eval"][task] for task in tasks) / len(tasks)
            row["lm_eval_mean_stderr"] = sum(row["lm_eval_stderr"][task] ** 2 for task in tasks) ** 0.5 / len(tasks)
            rows.append(row)
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest["seed"],
        "quality_file": Path(args.quality).name,
        "tasks": tasks,
        "retention_tasks": retention,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def render_markdown(result: Dict[str, Any]) -> str:
    tasks, retention = result["tasks"], result["retention_tasks"]
    header = ["model", "lm-eval mean ± stderr"] + tasks + [f"{name} (retention)" for name in retention] + ["in-process mean", "largest |lm-eval − in-process|", "merge s", "lm-eval s"]
    table = []
    for row in result["rows"]:
        cells = [row["label"], f"{row['lm_eval_mean']:.3f} ± {row['lm_eval_mean_stderr']:.3f}"]
        cells += [f"{row['lm_eval'][name]:.3f} ± {row['lm_eval_stderr'][name]:.3f}" for name in tasks + retention]
        in_process_mean = sum(row["in_process"][task] for task in tasks) / len(tasks)
        cells += [f"{in_process_mean:.3f}", f"{row['max_abs_difference']:.3f}", f"{row.get('merge_wall_s', '')}", f"{row['lm_eval_s']}"]
        table.append(cells)
    lines = [
        f"# The smol zoo's chosen merges through mergekit-yaml and lm-eval: seed {result['seed']}",
        "",
        f"Each merge written by the stock `mergekit-yaml` (float32) at the setting {result['quality_file']} chose, then scored by lm-eval "
        "on the zoo's test task files (greedy chat replies, exact match; retention: log-likelihood choice), with lm-eval's standard errors. "
        f"`in-process`: the same merge's score in {result['quality_file']} (the benchmark's own scorer).",
        "",
        runner.markdown_table(header, table),
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; {result['machine']['date_utc']} UTC; total {result['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_smol_arguments(parser, device=False)
    parser.add_argument("--quality", required=True, help="the zoo's smol_quality.py result file (chosen settings, in-process scores)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods to merge and score (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    runner.apply_threads(args)
    runner.ensure_registered()
    result = run(args)
    runner.save_results(args.out_dir, args.name, result, render_markdown(result), echo=not args.quiet)


if __name__ == "__main__":
    main()
