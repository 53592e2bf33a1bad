"""Our consensus/OPCM against FusionBench's code on the same state dicts.

FusionBench 0.2.33 needs transformers < 5 and mergekit 0.1.5 needs 5, so
FusionBench runs in its own venv (see README) through fusionbench_worker.py.
Every run, ours and theirs, is a separate process measured the same way (wall
time, own peak RSS); outputs are compared tensor by tensor (largest
elementwise difference). Writes results/fusionbench.md and fusionbench.json.

    python benchmarks/fusionbench_compare.py --fb-python benchmarks/work/fb-venv/bin/python --size 0.1B --T 4
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import runner, speed  # noqa: E402

WORKER = Path(__file__).resolve().parent / "fusionbench_worker.py"
DIFFERENT = 1e-5  # an element counts as differing above this (float32 rounding of sums stays far below)

CONVENTIONS = {
    "consensus_ta": (
        "Same formula: masks |τt| > λ·|τMTL − τt| (utils.generate_task_masks, the paper's), consensus = count ≥ k, "
        "θ0 + scale·τMTL⊙mask over every tensor. FusionBench's consensus helper only reads masks from disk (its "
        "loader cannot read what its writer saves), so its counting rule is applied in the worker to the masks its "
        "code generated. FusionBench flattens the whole model into one vector; ours streams tensor by tensor."
    ),
    "consensus_ta (FB TallMaskTaskArithmetic masks)": (
        "FusionBench's TallMaskTaskArithmeticAlgorithm compares |θ0 − τt| (pretrained WEIGHTS minus the task "
        "vector) where the paper and ours compare |τt|: a different mask, so a large difference is expected."
    ),
    "opcm (continual, global scaling)": (
        "Same algorithm (first model unscaled, full SVD of the merged task vector, split rank by cumsum(s)/sum(s) > α, "
        "top-left block and diagonal zeroed, one global norm-matching scale). Differences: FusionBench projects every "
        "nn.Linear, the LM head included, where ours projects only matrices inside the transformer blocks (lm_head is "
        "summed unprojected); FusionBench runs the SVD in the model dtype (float32 here, so no difference from that)."
    ),
    "opcm (mergekit-yaml, per-tensor scaling)": (
        "The `merge_method: opcm` form sees one tensor at a time, so it matches each tensor's norm instead of the "
        "paper's one global factor (documented deviation): differences everywhere are expected."
    ),
}


def load_output(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.is_file():
        return load_file(path)
    state: Dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def compare(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Largest elementwise difference overall, without lm_head, and the scale of the update."""
    common = sorted(set(ours) & set(theirs))
    per_tensor = {}
    differing = total = differing_without_head = 0
    for name in common:
        difference = (ours[name].float() - theirs[name].float()).abs()
        per_tensor[name] = float(difference.max())
        count = int((difference > DIFFERENT).sum())
        differing += count
        differing_without_head += 0 if "lm_head" in name else count
        total += difference.numel()
    update = max(float((ours[name].float() - base[name].float()).abs().max()) for name in common)
    worst = max(per_tensor, key=per_tensor.get)
    without_head = [value for name, value in per_tensor.items() if "lm_head" not in name]
    return {
        "max_abs_diff": max(per_tensor.values()),
        "worst_tensor": worst,
        "max_abs_diff_without_lm_head": max(without_head) if without_head else None,
        "max_abs_diff_lm_head": max((v for n, v in per_tensor.items() if "lm_head" in n), default=None),
        "max_abs_update_ours": update,
        "tensors_compared": len(common),
        "elements_differing": differing,
        "elements_differing_without_lm_head": differing_without_head,
        "elements_compared": total,
        "only_ours": sorted(set(ours) - set(theirs))[:5],
        "only_theirs": sorted(set(theirs) - set(ours))[:5],
    }


def make_models(size: str, count: int, folder: Path) -> List[Path]:
    config = speed.llama_shape_config(size)
    layout = speed.tensor_layout(config)
    paths = []
    for index in range(count + 1):
        path = folder / f"model{index}"
        speed.write_random_model(path, config, layout, index=index, dtype=torch.float32)
        paths.append(path)
    return paths


def run_all(args) -> Dict[str, Any]:
    work = Path(args.work_dir) / "fusionbench" / f"{args.size}-T{args.T}"
    work.mkdir(parents=True, exist_ok=True)
    paths = make_models(args.size, args.T, work / "models")
    base, models = paths[0], paths[1:]
    base_state = load_output(base)
    fb_env = runner.child_env(args.threads)
    fb_env.pop("PYTHONPATH", None)  # the FusionBench venv must not see this checkout or mergekit
    rows: List[Dict[str, Any]] = []

    def fusionbench(task: str, extra: Sequence[str]) -> Dict[str, Any]:
        out = work / f"fb-{task}.safetensors"
        command = [args.fb_python, str(WORKER), task, str(out), str(base), *map(str, models), *extra]
        measurement = runner.run_measured(command, log_path=work / f"fb-{task}.log", env=fb_env)
        if not measurement.ok:
            raise RuntimeError(f"FusionBench {task} failed:\n{measurement.log_tail}")
        return {"path": out, "measurement": measurement}

    def record(label: str, ours_path: Path, ours_measurements: Sequence[runner.Measurement], theirs: Dict[str, Any]) -> None:
        ours_state = load_output(ours_path)
        theirs_state = load_output(theirs["path"])
        rows.append(
            {
                "label": label,
                "ours_wall_s": sum(m.wall_s for m in ours_measurements),
                "ours_cpu_s": sum(m.cpu_s for m in ours_measurements),
                "ours_peak_rss_mib": max(m.peak_rss_mib for m in ours_measurements),
                "fb_wall_s": theirs["measurement"].wall_s,
                "fb_cpu_s": theirs["measurement"].cpu_s,
                "fb_peak_rss_mib": theirs["measurement"].peak_rss_mib,
                **compare(ours_state, theirs_state, base_state),
                "conventions": CONVENTIONS[label],
            }
        )

    # Consensus TA (TALL masks), defaults of both: λt = 0.4, k = 2, scale 1.
    consensus_parameters = {"tall_lambda": args.tall_lambda, "k": args.k, "lambda": 1.0}
    ours_out = work / "ours-consensus_ta"
    spec = runner.MergeSpec("consensus_ta", "consensus_ta", consensus_parameters)
    measurement = runner.run_yaml(runner.merge_config(spec, base, models, dtype="float32"), ours_out, threads=args.threads)
    if not measurement.ok:
        raise RuntimeError(f"our consensus_ta failed:\n{measurement.log_tail}")
    tall_options = ["--tall-lambda", str(args.tall_lambda), "--k", str(args.k), "--scale", "1.0"]
    record("consensus_ta", ours_out, [measurement], fusionbench("tall-paper", tall_options))
    record("consensus_ta (FB TallMaskTaskArithmetic masks)", ours_out, [measurement], fusionbench("tall-class", tall_options))

    # OPCM: the continual command (paper's global scaling) and the mergekit-yaml form.
    fb_opcm = fusionbench("opcm", ["--alpha", str(args.alpha)])
    state = work / "ours-opcm-state"
    shutil.rmtree(state, ignore_errors=True)
    executable = shutil.which("mergekit-ext") or "mergekit-ext"
    steps = [[executable, "continual", "init", str(state), "--base", str(base), str(models[0]), "--alpha", str(args.alpha)]]
    steps += [[executable, "continual", "add", str(state), str(model)] for model in models[1:]]
    continual_measurements = []
    for index, command in enumerate(steps):
        step = runner.run_measured(command, log_path=work / f"ours-continual-{index}.log", env=runner.child_env(args.threads))
        if not step.ok:
            raise RuntimeError(f"mergekit-ext continual failed:\n{step.log_tail}")
        continual_measurements.append(step)
    record("opcm (continual, global scaling)", state, continual_measurements, fb_opcm)  # the state folder is the merged model
    ours_yaml = work / "ours-opcm-yaml"
    spec = runner.MergeSpec("opcm", "opcm", {"alpha": args.alpha})
    measurement = runner.run_yaml(runner.merge_config(spec, base, models, dtype="float32"), ours_yaml, threads=args.threads)
    if not measurement.ok:
        raise RuntimeError(f"our opcm failed:\n{measurement.log_tail}")
    record("opcm (mergekit-yaml, per-tensor scaling)", ours_yaml, [measurement], fb_opcm)

    config = speed.llama_shape_config(args.size)
    report = {
        "machine": runner.machine_description(),
        "size": args.size,
        "parameters": speed.parameter_count(speed.tensor_layout(config)),
        "T": args.T,
        "dtype": "float32",
        "threads": args.threads,
        "rows": rows,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report


def render_markdown(report: Dict[str, Any]) -> str:
    machine = report["machine"]
    header = ["comparison", "ours wall s", "FB wall s", "ours CPU s", "FB CPU s", "ours RSS MiB", "FB RSS MiB", "max |ours − FB|", "… without lm_head", f"elements > {DIFFERENT:g} (without lm_head)", "max |update|"]
    table = []
    for row in report["rows"]:
        table.append(
            [
                row["label"],
                round(row["ours_wall_s"], 1),
                round(row["fb_wall_s"], 1),
                round(row["ours_cpu_s"], 1),
                round(row["fb_cpu_s"], 1),
                round(row["ours_peak_rss_mib"]),
                round(row["fb_peak_rss_mib"]),
                f"{row['max_abs_diff']:.2e}",
                f"{row['max_abs_diff_without_lm_head']:.2e}" if row["max_abs_diff_without_lm_head"] is not None else "–",
                f"{row['elements_differing']:,} ({row.get('elements_differing_without_lm_head', '?'):,}) of {row['elements_compared']:,}"
                if "elements_differing_without_lm_head" in row
                else f"{row['elements_differing']:,} of {row['elements_compared']:,}",
                f"{row['max_abs_update_ours']:.2e}",
            ]
        )
    lines = [
        "# Against FusionBench 0.2.33 on the same state dicts",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; {machine['date_utc']} UTC. "
        f"Inputs: {report['size']} Llama-shaped random models ({report['parameters'] / 1e6:.0f}M parameters), "
        f"base + T = {report['T']} fine-tunes, float32 (so no rounding hides a difference). "
        "Each run is its own process: wall time, user+system CPU time, own peak RSS. Ours: stock `mergekit-yaml` "
        "(consensus_ta, opcm) and `mergekit-ext continual init/add` (OPCM with the paper's global scaling; times and "
        "CPU summed over the T processes, RSS the largest). FusionBench: its own functions/classes run by "
        "benchmarks/fusionbench_worker.py in a separate venv.",
        "",
        runner.markdown_table(header, table),
        "",
        "Worst tensor and conventions, per comparison:",
        "",
    ]
    for row in report["rows"]:
        lines.append(f"- **{row['label']}** — worst tensor `{row['worst_tensor']}`"
                     + (f", lm_head diff {row['max_abs_diff_lm_head']:.2e}" if row["max_abs_diff_lm_head"] is not None else "")
                     + f". {row['conventions']}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fb-python", default=str(runner.WORK_DIR / "fb-venv" / "bin" / "python"), help="python of the FusionBench venv")
    parser.add_argument("--size", default="0.1B", choices=list(speed.SIZES))
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--tall-lambda", type=float, default=0.4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work-dir", default=str(runner.WORK_DIR))
    parser.add_argument("--out-dir", default=str(runner.RESULTS_DIR))
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs in the work dir")
    args = parser.parse_args(argv)
    if not Path(args.fb_python).exists():
        raise SystemExit(f"FusionBench python not found: {args.fb_python} (see benchmarks/README.md to create the venv)")
    report = run_all(args)
    runner.save_results(args.out_dir, "fusionbench", report, render_markdown(report))


if __name__ == "__main__":
    main()
