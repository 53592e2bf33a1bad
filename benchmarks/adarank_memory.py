"""Peak memory of the AdaRank learner on synthetic Llama shapes (issue 16).

For each configuration a fresh process runs the real learner (``adarank.learn.prepare`` +
``run``: streamed factorisation, then a few training steps on a handful of synthetic
prompts) on a synthetic base and T fine-tunes of ``benchmarks/speed.py``'s shapes, and
reports its peak resident memory (VmHWM) next to the process's resident memory before
learning (Python, torch and transformers loaded) and the learner's own accounting
(``learner_bytes``). The models are bfloat16 on disk, like released checkpoints.

    python benchmarks/adarank_memory.py --sizes 0.1B --out benchmarks/results/adarank-memory.json
    python benchmarks/adarank_memory.py --summarise benchmarks/results/adarank-memory.json

The projection to a larger model (default: Llama-3-8B shapes, 4 experts) scales each
part the learner holds from the tensor shapes alone (computed on the meta device) and
adds the measured per-step working set (peak minus what the learner holds minus the
runtime) as the same share of the float32 model that it was at the largest size measured
with that setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
# Llama-3-8B (hidden 4096, 32 layers, MLP 14336, 32 heads, 8 KV heads, vocabulary 128256).
PROJECTION = dict(vocab_size=128256, hidden_size=4096, layers=32, intermediate_size=14336, heads=32, kv_heads=8)


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_models(size: str, count: int, root: Path) -> Dict[str, Path]:
    """Base and ``count`` fine-tunes of speed.py's shape ``size`` (bfloat16), with a character tokenizer."""
    from benchmarks.speed import llama_shape_config, tensor_layout, write_random_model
    from mergekit_ext.modeling import char_tokenizer

    config = llama_shape_config(size)
    layout = tensor_layout(config)
    folders = {}
    for index in range(count + 1):
        folder = root / size / ("base" if index == 0 else f"expert{index}")
        write_random_model(folder, config, layout, index=index)
        if not (folder / "tokenizer.json").is_file():
            char_tokenizer().save_pretrained(folder)
        folders["base" if index == 0 else f"expert{index}"] = folder
    return folders


def measure(args) -> Dict:
    """One configuration, in this (fresh) process: the learner's peak memory."""
    import torch

    from mergekit_ext.methods.adarank import learn as L

    torch.set_num_threads(1)
    folders = build_models(args.size, args.tasks, Path(args.work_dir))
    import transformers.models.llama.modeling_llama  # noqa: F401  (loaded before the baseline: the learner needs it)

    before = _rss()
    prompts = [[f"q{task}: " + "abcdefgh"[i % 8] * (4 + i % 5) + " = " for i in range(8)] for task in range(args.tasks)]
    options = L.LearnOptions(
        variant=args.variant, objective=args.objective, steps=args.steps, batch_size=2, held_out=2,
        max_rank_ratio=args.max_rank_ratio, factor_dtype=args.factor_dtype, max_new_tokens=4, prior=None,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    clock = time.process_time()
    setup = L.prepare([folders[f"expert{t + 1}"] for t in range(args.tasks)], prompts, base=folders["base"], options=options, progress=False)
    prepared = _peak_rss()
    result = L.run(setup)
    return {
        "size": args.size, "tasks": args.tasks, "variant": args.variant, "objective": args.objective, "steps": args.steps,
        "max_rank_ratio": args.max_rank_ratio, "factor_dtype": args.factor_dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "rss_before_bytes": before, "peak_after_prepare_bytes": prepared, "peak_bytes": _peak_rss(),
        "learner_bytes": result.info["learner_bytes"], "cpu_s": round(time.process_time() - clock, 1),
        "seconds": result.info["seconds"],
    }  # fmt: skip


def projection(rows: List[Dict], tasks: int) -> List[Dict]:
    """Each measured (ratio, dtype, checkpointing) setting projected to PROJECTION's shapes with ``tasks`` experts."""
    import torch

    from mergekit_ext.modeling import llama_config
    from mergekit_ext.tensors import is_block_matrix, rank_from_ratio

    config = llama_config(PROJECTION["vocab_size"], hidden_size=PROJECTION["hidden_size"], layers=PROJECTION["layers"],
                          heads=PROJECTION["heads"], intermediate_size=PROJECTION["intermediate_size"])  # fmt: skip
    config.num_key_value_heads = PROJECTION["kv_heads"]
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = [(name, tuple(t.shape)) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()]
    params = sum(torch.Size(shape).numel() for _, shape in shapes)
    def setting(row):
        return (row["max_rank_ratio"], row["factor_dtype"], row["gradient_checkpointing"])

    largest = {}  # each setting at the largest size it was measured at
    for row in rows:
        if row["variant"] in ("ta", "cart"):
            if setting(row) not in largest or row["learner_bytes"]["model_float32"] > largest[setting(row)]["learner_bytes"]["model_float32"]:
                largest[setting(row)] = row
    out = []
    for row in largest.values():
        width = 2 if row["factor_dtype"] == "bfloat16" else 4
        factors = other = 0
        for name, shape in shapes:
            if is_block_matrix(name, shape):
                band = rank_from_ratio(shape, row["max_rank_ratio"])
                factors += tasks * band * ((shape[0] + shape[1]) * width + 4)
            else:
                other += tasks * torch.Size(shape).numel() * width
        held = row["learner_bytes"]
        static = sum(value for key, value in held.items() if key != "model_float32")
        # What a step adds on top of what the learner holds (graph, activations, Adam, runtime), as a share of the model.
        working = max(0, row["peak_bytes"] - row["rss_before_bytes"] - static) / held["model_float32"]
        origin = params * 4
        total = origin + factors + other + working * origin
        out.append({
            "max_rank_ratio": row["max_rank_ratio"], "factor_dtype": row["factor_dtype"],
            "gradient_checkpointing": row["gradient_checkpointing"], "parameters": params, "tasks": tasks, "from_size": row["size"],
            "origin_gib": origin / GIB, "factors_gib": factors / GIB, "other_task_vectors_gib": other / GIB,
            "working_share": working, "total_gib": total / GIB,
        })  # fmt: skip
    return out


def summarise(report: Dict) -> str:
    rows = report["rows"]
    lines = [
        report.get("note", ""),
        "",
        "| size | T | variant | band | factors | checkpointing | peak RSS GiB | before learning GiB | learner state GiB (origin / factors / other τ / architecture) | model fp32 GiB | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        held = row["learner_bytes"]
        parts = " / ".join(f"{held[key] / GIB:.2f}" for key in ("origin", "factors", "other_task_vectors", "architecture"))
        lines.append(
            f"| {row['size']} | {row['tasks']} | {row['variant']} | {row['max_rank_ratio']} | {row['factor_dtype']} | "
            f"{'on' if row['gradient_checkpointing'] else 'off'} | {row['peak_bytes'] / GIB:.2f} | {row['rss_before_bytes'] / GIB:.2f} | "
            f"{parts} | {held['model_float32'] / GIB:.2f} | {row['cpu_s']} |"
        )
    projected = report.get("projection") or []
    if projected:
        first = projected[0]
        lines += [
            "",
            f"Projected to Llama-3-8B shapes ({first['parameters'] / 1e9:.2f}B parameters) with {first['tasks']} experts "
            "(shapes exact; the rest of the measured peak, above what the learner holds: the memory-mapped checkpoint pages (T + 1 bfloat16 models), the merged weights a step builds with their gradients, a step's graph, scaled as a share of the float32 model from the size named):",
            "",
            "| band | factors | checkpointing | from | origin GiB | factors GiB | other τ GiB | rest of the peak (× fp32 model) | total GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in projected:
            lines.append(
                f"| {row['max_rank_ratio']} | {row['factor_dtype']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                f"{row.get('from_size', '')} | {row['origin_gib']:.1f} | {row['factors_gib']:.1f} | {row['other_task_vectors_gib']:.1f} | "
                f"{row['working_share']:.2f} | {row['total_gib']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1B"])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--variant", default="cart", help="cart (the default variant; init rank 0.1 fits inside a 0.16 band)")
    parser.add_argument("--objective", default="entropy")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["1.0:float32:off", "1.0:float32:on", "0.16:float32:off", "0.16:bfloat16:off", "0.16:bfloat16:on"],
                        help="band:factor dtype:checkpointing, one process each")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/adarank-memory"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adarank-memory.json"))
    parser.add_argument("--summarise", type=Path, default=None)
    parser.add_argument("--project-tasks", type=int, default=4)
    parser.add_argument("--note", default="")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one configuration
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--max-rank-ratio", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--factor-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    if args.summarise is not None:
        print(summarise(json.loads(args.summarise.read_text())))
        return
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    if args.note:
        report["note"] = args.note
    for size in args.sizes:  # in this process: the measured ones only read them
        build_models(size, args.tasks, args.work_dir)
    done = {(r["size"], r["tasks"], r["variant"], r["max_rank_ratio"], r["factor_dtype"], r["gradient_checkpointing"]) for r in report["rows"]}
    for size in args.sizes:
        for setting in args.settings:
            ratio, dtype, checkpointing = setting.split(":")
            key = (size, args.tasks, args.variant, float(ratio), dtype, checkpointing == "on")
            if key in done:
                continue
            command = [sys.executable, __file__, "--one", "--size", size, "--tasks", str(args.tasks), "--variant", args.variant,
                       "--objective", args.objective, "--steps", str(args.steps), "--max-rank-ratio", ratio,
                       "--factor-dtype", dtype, "--work-dir", str(args.work_dir)] + (["--gradient-checkpointing"] if checkpointing == "on" else [])  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True, env=os.environ)
            if completed.returncode != 0:
                print(completed.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"adarank_memory: {size} {setting} failed (exit {completed.returncode})")
            row = json.loads(completed.stdout.strip().splitlines()[-1])
            report["rows"].append(row)
            print(f"{size} {setting}: peak {row['peak_bytes'] / GIB:.2f} GiB (before learning {row['rss_before_bytes'] / GIB:.2f}), {row['cpu_s']} CPU s", flush=True)
            report["projection"] = projection(report["rows"], args.project_tasks)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    text = summarise(report)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
