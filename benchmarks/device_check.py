"""GPU check (issue 15): merge Llama-shaped models with every method on the GPU and on the CPU, compare.

Run through ``benchmarks/device_check.sh`` (one command, a time limit). Builds
synthetic bf16 models with ``speed.py``'s maker, runs stock ``mergekit-yaml``
once with ``--cuda`` and once on the CPU per method (our methods with their
defaults, mergekit's ``task_arithmetic`` and ``ties``), then compares every
output tensor in float32: the max over tensors of the relative Frobenius error
``‖gpu − cpu‖ / ‖cpu‖``, and the max absolute error. bf16 outputs round at
~4e-3 relative, so errors up to ~1e-2 on a few tensors are output rounding;
larger means the GPU path computes something else. Writes
``results/speed-device-check.{md,json}``. AdaRank needs a learned file and is not merged here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import runner, speed  # noqa: E402


def load(folder: Path):
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def compare(cpu_dir: Path, gpu_dir: Path) -> dict:
    gpu = dict(load(gpu_dir))
    worst_rel, worst_abs, worst_name, count = 0.0, 0.0, None, 0
    for name, reference in load(cpu_dir):
        other = gpu.pop(name, None)
        if other is None:
            return {"error": f"{name} missing from the GPU output"}
        reference, other = reference.float(), other.float()
        difference = (other - reference).norm()
        relative = float(difference / reference.norm()) if reference.norm() > 0 else float(difference)
        absolute = float((other - reference).abs().max()) if reference.numel() else 0.0
        if relative > worst_rel:
            worst_rel, worst_name = relative, name
        worst_abs = max(worst_abs, absolute)
        count += 1
    if gpu:
        return {"error": f"{len(gpu)} tensors only in the GPU output"}
    return {"tensors": count, "max_rel": worst_rel, "max_abs": worst_abs, "worst_tensor": worst_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1B", choices=list(speed.SIZES))
    parser.add_argument("--T", type=int, default=2)
    parser.add_argument("--methods", nargs="+", help="default: task_arithmetic, ties and every method of ours")
    parser.add_argument("--threads", type=int, help="CPU threads for the CPU merges (default: torch's)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per merge")
    parser.add_argument("--work-dir", default=str(runner.WORK_DIR / "device-check"))
    parser.add_argument("--out-dir", default=str(runner.RESULTS_DIR))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device visible; nothing was run")
    work = Path(args.work_dir)
    config = speed.llama_shape_config(args.size)
    layout = speed.tensor_layout(config)
    models_dir = work / "models" / args.size
    start = time.perf_counter()
    for index in range(args.T + 1):
        speed.write_random_model(models_dir / f"model{index}", config, layout, index=index)
    print(f"models written in {time.perf_counter() - start:.0f} s", flush=True)
    specs = speed.speed_specs(args.methods)
    base = models_dir / "model0"
    models = [models_dir / f"model{index}" for index in range(1, args.T + 1)]
    rows = []
    for spec in specs:
        merge_config = runner.merge_config(spec, base, models, dtype="bfloat16")
        row = {"method": spec.label}
        outputs = {}
        for device, extra in (("cuda", ["--cuda"]), ("cpu", [])):
            out = work / "out" / f"{spec.label}-{device}"
            measured = runner.run_yaml(merge_config, out, threads=args.threads if device == "cpu" else None, timeout_s=args.timeout, extra_args=extra)
            row[f"{device}_wall_s"] = round(measured.wall_s, 1)
            row[f"{device}_cpu_s"] = round(measured.cpu_s, 1)
            row[f"{device}_rss_mib"] = round(measured.peak_rss_mib)
            if not measured.ok:
                row["error"] = f"{device}: " + measured.log_tail[-400:]
                break
            outputs[device] = out
        if len(outputs) == 2:
            row.update(compare(outputs["cpu"], outputs["cuda"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = runner.machine_description()
    header = ["method", "GPU wall s", "GPU-run CPU s", "CPU wall s", "CPU s", "max rel err", "max abs err", "worst tensor"]
    table = [
        [
            row["method"], row.get("cuda_wall_s", "–"), row.get("cuda_cpu_s", "–"), row.get("cpu_wall_s", "–"), row.get("cpu_cpu_s", "–"),
            f"{row['max_rel']:.2e}" if "max_rel" in row else row.get("error", "–")[:80].replace("\n", " "),
            f"{row['max_abs']:.2e}" if "max_abs" in row else "–", row.get("worst_tensor", "–"),
        ]
        for row in rows
    ]
    markdown = "\n".join(
        [
            "# GPU check: every method through `mergekit-yaml --cuda` against the CPU",
            "",
            f"Machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}; torch {machine['torch']}, "
            f"mergekit {machine['mergekit']}; {machine['date_utc']} UTC. Inputs: {args.size} Llama-shaped bf16 models, T = {args.T}.",
            "Errors are over the bf16 outputs (float32 math on both devices; bf16 output rounding is ~4e-3 relative).",
            "",
            runner.markdown_table(header, table),
            "",
        ]
    )
    runner.save_results(args.out_dir, "speed-device-check", {"machine": machine, "size": args.size, "T": args.T, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
