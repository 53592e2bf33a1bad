"""Speed and memory: every method against mergekit `task_arithmetic` and `ties`.

Builds Llama-shaped models with random weights (bf16 safetensors, written one
tensor at a time so a 1B model never sits in memory several times), then merges
T of them with every method this package registers and with mergekit's
baselines, each merge a separate stock ``mergekit-yaml`` process whose wall
time and own peak RSS are recorded. Writes results/speed.md and speed.json.

    python benchmarks/speed.py --sizes 0.1B --T 2 4 8
    python benchmarks/speed.py --sizes 0.1B 0.5B 1B --T 2 4 8   # the full grid
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import runner  # noqa: E402

VOCAB_SIZE = 32000
# Llama shapes giving about 0.1, 0.5 and 1 billion parameters (untied head).
SIZES: Dict[str, Dict[str, int]] = {
    "0.02B": dict(hidden_size=256, layers=4, intermediate_size=688, heads=4),  # smoke tests only
    "0.1B": dict(hidden_size=768, layers=8, intermediate_size=2048, heads=12),
    "0.5B": dict(hidden_size=1536, layers=14, intermediate_size=4096, heads=12),
    "1B": dict(hidden_size=2048, layers=16, intermediate_size=5504, heads=16),
}
BASE_STD = 0.02
FINETUNE_STD = 0.002  # a fine-tune moves weights by ~10 % of their scale
BASELINES = ("task_arithmetic", "ties")
REFERENCE = "ties"
FLOOR = "task_arithmetic"  # close to the I/O floor: read T + 1 models, write one

# Settings per method. Our methods run with their defaults; a required
# parameter without a default is filled from here.
FIXED_PARAMETERS: Dict[str, Dict[str, Any]] = {
    "task_arithmetic": {"weight": 1.0, "lambda": 0.3},
    "ties": {"weight": 1.0, "density": 0.2, "normalize": False, "lambda": 0.3},
}
FILL_REQUIRED = {"weight": 1.0, "density": 0.2, "lambda": 1.0}


def llama_shape_config(size: str):
    from mergekit_ext.modeling import llama_config

    shape = SIZES[size]
    return llama_config(VOCAB_SIZE, hidden_size=shape["hidden_size"], layers=shape["layers"], heads=shape["heads"], intermediate_size=shape["intermediate_size"])


def tensor_layout(config) -> List[tuple]:
    """(name, shape) of every weight, from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def parameter_count(layout: Sequence[tuple]) -> int:
    total = 0
    for _, shape in layout:
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def write_random_model(folder: Path, config, layout: Sequence[tuple], *, index: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Model ``index`` (0 = base, t > 0 = base + seeded noise), streamed tensor by tensor.

    The base tensor is regenerated from its own seed for every model, so only
    one tensor is in memory at a time.
    """
    from mergekit_ext import io

    config.architectures = ["LlamaForCausalLM"]  # mergekit picks the architecture from this
    config.dtype = str(dtype).replace("torch.", "")
    if (folder / ".complete").exists():
        config.save_pretrained(folder)
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    writer = io.tensor_writer(folder, max_shard_size=1000**3)
    for position, (name, shape) in enumerate(layout):
        if len(shape) == 1:  # norms
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=torch.Generator().manual_seed(position)) * BASE_STD
        if index > 0:
            generator = torch.Generator().manual_seed(1_000_003 * index + position)
            tensor += torch.randn(shape, generator=generator) * FINETUNE_STD
        writer.save_tensor(name, tensor.to(dtype))
        del tensor
    writer.finalize()
    config.save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")


def method_parameters(name: str) -> Optional[Dict[str, Any]]:
    """Parameters to run ``name`` with, or None when a required one cannot be filled."""
    if name in FIXED_PARAMETERS:
        return dict(FIXED_PARAMETERS[name])
    from mergekit.merge_methods.base import MISSING

    parameters: Dict[str, Any] = {}
    for parameter in runner.method_spec(name).parameters:
        if parameter.default is MISSING:
            if parameter.name not in FILL_REQUIRED:
                return None
            parameters[parameter.name] = FILL_REQUIRED[parameter.name]
    return parameters


def speed_specs(methods: Optional[Sequence[str]]) -> List[runner.MergeSpec]:
    names = list(BASELINES) + [name for name in runner.our_method_names() if name not in BASELINES]
    if methods:
        unknown = sorted(set(methods) - set(names))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; known: {names}")
        names = [name for name in names if name in methods or name == REFERENCE]
    specs = []
    for name in names:
        parameters = method_parameters(name)
        if parameters is None:
            print(f"skipping {name}: it has a required parameter this benchmark cannot fill", file=sys.stderr)
            continue
        specs.append(runner.MergeSpec(label=name, method=name, parameters=parameters))
    return specs


def run_grid(args) -> Dict[str, Any]:
    work = Path(args.work_dir)
    specs = speed_specs(args.methods)
    results_path = Path(args.out_dir) / "speed.json"
    previous: Dict[tuple, Dict[str, Any]] = {}
    if args.resume and results_path.exists():
        for row in json.loads(results_path.read_text()).get("rows", []):
            if row.get("ok"):
                previous[(row["size"], row["T"], row["label"])] = row
    rows: List[Dict[str, Any]] = []
    report: Dict[str, Any] = {
        "machine": runner.machine_description(),
        "threads": args.threads,
        "repeats": args.repeats,
        "sizes": {},
        "rows": rows,
        "note": args.note,
    }
    for size in args.sizes:
        config = llama_shape_config(size)
        layout = tensor_layout(config)
        report["sizes"][size] = {"parameters": parameter_count(layout), **SIZES[size], "vocab_size": VOCAB_SIZE}
        model_dir = work / "speed-models" / size
        needed = max(args.T)
        for index in tqdm(range(needed + 1), desc=f"writing {size} models", unit="model"):
            write_random_model(model_dir / f"model{index}", config, layout, index=index)
        base = model_dir / "model0"
        for count in args.T:
            models = [model_dir / f"model{index}" for index in range(1, count + 1)]
            for spec in tqdm(specs, desc=f"{size} T={count}", unit="merge"):
                key = (size, count, spec.label)
                if key in previous:
                    rows.append(previous[key])
                    continue
                config_dict = runner.merge_config(spec, base, models, dtype="bfloat16")
                out = work / "speed-out" / f"{size}-T{count}-{spec.label}"
                measurements = []
                for _ in range(args.repeats):
                    measurement = runner.run_yaml(config_dict, out, threads=args.threads, device=args.device, timeout_s=args.timeout)
                    measurements.append(measurement)
                    shutil.rmtree(out, ignore_errors=True)
                    if not measurement.ok:
                        break
                ok = all(m.ok for m in measurements)
                row = {
                    "size": size,
                    "T": count,
                    "label": spec.label,
                    "method": spec.method,
                    "parameters": dict(spec.parameters),
                    "ok": ok,
                    "wall_s": min(m.wall_s for m in measurements),
                    "wall_s_all": [round(m.wall_s, 3) for m in measurements],
                    "cpu_s": min(m.cpu_s for m in measurements),
                    "peak_rss_mib": max(m.peak_rss_mib for m in measurements),
                }
                if not ok:
                    timed_out = args.timeout is not None and measurements[-1].wall_s >= args.timeout
                    row["error"] = f"killed after {args.timeout:.0f} s" if timed_out else measurements[-1].log_tail[-600:]
                    tqdm.write(f"FAILED {key}: {row['error'][-300:]}")
                rows.append(row)
                write_results(report, Path(args.out_dir))
    write_results(report, Path(args.out_dir))
    if not args.keep_models:
        shutil.rmtree(work / "speed-models", ignore_errors=True)
        shutil.rmtree(work / "speed-out", ignore_errors=True)
    return report


def _reference(rows: Sequence[Dict[str, Any]], size: str, count: int, label: str = REFERENCE) -> Optional[Dict[str, Any]]:
    for row in rows:
        if row["size"] == size and row["T"] == count and row["label"] == label and row["ok"]:
            return row
    return None


def _fit_exponent(points: Sequence[tuple]) -> Optional[float]:
    """Least-squares slope of log(y) on log(x) over (x, y) points; None with fewer than two distinct x."""
    points = [(math.log(x), math.log(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def growth_exponents(report: Dict[str, Any], field: str = "cpu_s") -> Dict[str, Dict[str, Optional[float]]]:
    """Per method: exponent in model size (parameters, pooled over T after dividing out T's fit) and in T."""
    rows = [row for row in report["rows"] if row["ok"] and row.get(field)]
    result: Dict[str, Dict[str, Optional[float]]] = {}
    for label in dict.fromkeys(row["label"] for row in rows):
        mine = [row for row in rows if row["label"] == label]
        # T exponent: fitted within each size, averaged over sizes with two or more T.
        t_fits = []
        for size in dict.fromkeys(row["size"] for row in mine):
            fit = _fit_exponent([(row["T"], row[field]) for row in mine if row["size"] == size])
            if fit is not None:
                t_fits.append(fit)
        t_exponent = sum(t_fits) / len(t_fits) if t_fits else None
        size_fits = []
        for count in dict.fromkeys(row["T"] for row in mine):
            fit = _fit_exponent([(report["sizes"][row["size"]]["parameters"], row[field]) for row in mine if row["T"] == count])
            if fit is not None:
                size_fits.append(fit)
        size_exponent = sum(size_fits) / len(size_fits) if size_fits else None
        result[label] = {"size": size_exponent, "T": t_exponent}
    return result


# Llama-3-8B: hidden 4096, 32 layers, MLP 14336, 8 KV heads, vocabulary 128256.
TARGET = {"name": "8B", "parameters": 8.03e9, "T": 4}


def projections(report: Dict[str, Any]) -> List[list]:
    """CPU s and peak RSS at TARGET, from the largest measured size (nearest T) and the fitted exponents."""
    cpu = growth_exponents(report, "cpu_s")
    rss = growth_exponents(report, "peak_rss_mib")
    table = []
    for label, exponents in cpu.items():
        if exponents["size"] is None:
            continue  # one size measured: no basis for a projection
        mine = [row for row in report["rows"] if row["ok"] and row["label"] == label]
        largest = max(mine, key=lambda row: (report["sizes"][row["size"]]["parameters"], -abs(row["T"] - TARGET["T"])))
        parameters = report["sizes"][largest["size"]]["parameters"]
        size_exponent = exponents["size"]
        t_exponent = exponents["T"] if exponents["T"] is not None else 1.0
        scale = (TARGET["parameters"] / parameters) ** size_exponent * (TARGET["T"] / largest["T"]) ** t_exponent
        rss_exponent = rss.get(label, {}).get("size")
        rss_scale = (TARGET["parameters"] / parameters) ** rss_exponent if rss_exponent is not None else float("nan")
        table.append(
            [
                label,
                f"{largest['size']} T={largest['T']}",
                "–" if exponents["size"] is None else f"{exponents['size']:.2f}",
                "–" if exponents["T"] is None else f"{exponents['T']:.2f}",
                f"{largest['cpu_s'] * scale / 3600:.2f}",
                f"{largest['peak_rss_mib'] * rss_scale / 1024:.1f}",
            ]
        )
    return table


def startup_cpu_s() -> float:
    """CPU s a ``mergekit-yaml`` process spends importing mergekit and registering this package (no merge)."""
    import subprocess

    code = (
        "import time, mergekit.scripts.run_yaml, mergekit.merge; from mergekit_ext.registry import register_all; "
        "register_all(); print(time.process_time())"
    )
    output = subprocess.run([sys.executable, "-c", code], env=runner.child_env(1), capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def block_parameters(kernels: Dict[str, Any], size: str) -> int:
    return sum(shape[0] * shape[1] for _, shape in kernels["blocks"][size]["matrices"])


def kernel_projection(report: Dict[str, Any], kernels: Dict[str, Any], startup_cpu_s: float = 0.0, target: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """CPU s at ``target`` (default TARGET: name, T, parameters) per method: the measured TARGET-block kernel time × its layers, plus the rest of a merge.

    At a measured size s and T_s, rest_m = full-pipeline CPU s − layers × block-kernel CPU s
    (both measured). task_arithmetic's rest, less the start-up (``startup_cpu_s``, imports),
    is reading T + 1 models and writing one: scaled linearly in parameters N and in T + 1.
    What a method spends beyond that outside the blocks (ties' sparsification of the
    embeddings and head, and so on) is scaled in the non-block parameters E and in T:

        CPU = S + L·K_block + (rest_TA − S)·(N/N_s)·(T+1)/(T_s+1) + max(rest_m − rest_TA, 0)·(E/E_s)·(T/T_s)

    from the T nearest TARGET's, then the largest size with both measurements. ``adarank apply``
    has no pipeline row (the method needs a learned file): its rest is task_arithmetic's.
    """
    target = target or TARGET
    target_size, target_t = target["name"], target["T"]
    block = {(row["size"], row["T"], row["kernel"]): row["fast_cpu_s"] for row in kernels["rows"]}
    layers = {size: info["layers"] for size, info in kernels.get("blocks", {}).items()}
    pipeline = {(row["size"], row["T"], row["label"]): row for row in report["rows"] if row["ok"]}
    order = list(SIZES)

    def rest(label: str, size: str, count: int) -> Optional[float]:
        row = pipeline.get((size, count, label))
        kernel = block.get((size, count, label))
        if row is None or kernel is None or size not in layers:
            return None
        return row["cpu_s"] - layers[size] * kernel

    if target_size not in layers:
        return []
    target_parameters = target["parameters"]
    target_other = target_parameters - layers[target_size] * block_parameters(kernels, target_size)
    table = []
    for name in dict.fromkeys(row["kernel"] for row in kernels["rows"]):
        target_block = block.get((target_size, target_t, name))
        if target_block is None:
            continue
        source = FLOOR if name == ADARANK_KERNEL else name
        candidates = [
            (size, count)
            for (size, count, label) in pipeline
            if label == source and size in order and rest(source, size, count) is not None and rest(FLOOR, size, count) is not None
        ]
        if not candidates:
            continue
        # T nearest TARGET's first: the rest's growth in T is the least certain part (on a
        # machine whose page cache holds the models, reading them costs little per model).
        size, count = max(candidates, key=lambda key: (-abs(key[1] - target_t), order.index(key[0])))
        parameters = report["sizes"][size]["parameters"]
        other = parameters - layers[size] * block_parameters(kernels, size)
        floor_rest, own_rest = rest(FLOOR, size, count), rest(source, size, count)
        io = max(floor_rest - startup_cpu_s, 0.0) * target_parameters / parameters * (target_t + 1) / (count + 1)
        extra = max(own_rest - floor_rest, 0.0) * target_other / other * target_t / count
        blocks = layers[target_size] * target_block
        table.append(
            {
                "target": f"{target_size} T={target_t}",
                "method": name,
                "block_cpu_s": target_block,
                "blocks_cpu_s": blocks,
                "rest_from": f"{size} T={count}" + (" (task_arithmetic's)" if name == ADARANK_KERNEL else ""),
                "rest_cpu_s": own_rest,
                "io_cpu_s": io,
                "extra_cpu_s": extra,
                "startup_cpu_s": startup_cpu_s,
                "total_cpu_s": startup_cpu_s + blocks + io + extra,
            }
        )
    reference = next((row["total_cpu_s"] for row in table if row["method"] == REFERENCE), None)
    floor = next((row["total_cpu_s"] for row in table if row["method"] == FLOOR), None)
    for row in table:
        row["vs_ties"] = row["total_cpu_s"] / reference if reference else None
        row["vs_task_arithmetic"] = row["total_cpu_s"] / floor if floor else None
    return table


def render_markdown(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    machine = report["machine"]
    lines = [
        "# Speed and memory: merge methods through the stock `mergekit-yaml`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {machine['torch']}, mergekit {machine['mergekit']}; {machine['date_utc']} UTC.",
        f"Threads per merge: {report['threads'] or 'torch default'}; wall time is the best of {report['repeats']} run(s); "
        "CPU s is the process's user + system time (steadier than wall time when the machine is shared); "
        "peak RSS is the merge process's own `ru_maxrss` (os.wait4). Each merge includes the ~5–10 s "
        "`mergekit-yaml` start-up (imports), the same for every method.",
        "Inputs: Llama-shaped models with random bf16 weights (base N(0, 0.02²), fine-tunes base + N(0, 0.002²)), "
        "vocabulary 32000, untied head; every method reads the same files. Ratios are to mergekit `ties` "
        f"({FIXED_PARAMETERS['ties']}) on the same inputs. Goals (not asserted): consensus ≤ 1.3× ties time, "
        "SVD-based methods ≤ 3×, peak memory ≤ 1.2×.",
        "",
        *([report["note"], ""] if report.get("note") else []),
        "Sizes: "
        + "; ".join(f"{name} = {info['parameters'] / 1e6:.0f}M parameters (hidden {info['hidden_size']}, {info['layers']} layers)" for name, info in report["sizes"].items()),
        "",
    ]
    groups = sorted({(row["size"], row["T"]) for row in rows}, key=lambda key: (list(SIZES).index(key[0]), key[1]))
    for size, count in groups:
        reference = _reference(rows, size, count)
        table = []
        for row in rows:
            if row["size"] != size or row["T"] != count:
                continue
            if not row["ok"]:
                status = row.get("error", "") if str(row.get("error", "")).startswith("killed") else "failed"
                table.append([row["label"], status, "", "", "", "", ""])
                continue

            def ratio(field: str) -> str:
                return f"{row[field] / reference[field]:.2f}" if reference and reference.get(field) else "–"

            floor = _reference(rows, size, count, FLOOR)

            def to_floor(field: str) -> str:
                return f"{row[field] / floor[field]:.2f}" if floor and floor.get(field) else "–"

            table.append(
                [row["label"], round(row["wall_s"], 1), ratio("wall_s"), round(row.get("cpu_s", 0.0), 1), ratio("cpu_s"), to_floor("cpu_s"), round(row["peak_rss_mib"]), ratio("peak_rss_mib")]
            )
        header = ["method", "wall s", "wall / ties", "CPU s", "CPU / ties", "CPU / task_arithmetic", "peak RSS MiB", "RSS / ties"]
        lines += [f"## {size}, T = {count}", "", runner.markdown_table(header, table), ""]
    labels = list(dict.fromkeys(row["label"] for row in rows))
    sizes = [size for size in SIZES if any(row["size"] == size for row in rows)]
    counts = sorted({row["T"] for row in rows})
    lookup = {(row["size"], row["T"], row["label"]): row for row in rows if row["ok"]}
    def growth(first: Optional[float], last: Optional[float]) -> str:
        return f"{last / first:.2f}" if first and last else "–"

    if len(counts) > 1:
        lines += ["## Growth with T (wall s / CPU s; growth = largest T over smallest T, CPU time)", ""]
        for size in sizes:
            table = []
            for label in labels:
                cells = [lookup.get((size, count, label)) for count in counts]
                if not any(cells):
                    continue
                text = [f"{row['wall_s']:.1f} / {row.get('cpu_s', 0):.0f}" if row else "–" for row in cells]
                table.append([label] + text + [growth(cells[0] and cells[0].get("cpu_s"), cells[-1] and cells[-1].get("cpu_s"))])
            lines += [f"{size}:", "", runner.markdown_table(["method"] + [f"T={count}" for count in counts] + ["CPU growth"], table), ""]
    if len(sizes) > 1:
        lines += [
            "## Growth with model size (wall s / CPU s; growth = largest size over smallest, CPU time; "
            "parameters grow " + growth(report["sizes"][sizes[0]]["parameters"], report["sizes"][sizes[-1]]["parameters"]) + "×)",
            "",
        ]
        for count in counts:
            present = [size for size in sizes if any(key[0] == size and key[1] == count for key in lookup)]
            if len(present) < 2:
                continue
            table = []
            for label in labels:
                cells = [lookup.get((size, count, label)) for size in present]
                if sum(cell is not None for cell in cells) < 2:
                    continue
                text = [f"{row['wall_s']:.1f} / {row.get('cpu_s', 0):.0f}" if row else "–" for row in cells]
                table.append([label] + text + [growth(cells[0] and cells[0].get("cpu_s"), cells[-1] and cells[-1].get("cpu_s"))])
            lines += [f"T = {count}:", "", runner.markdown_table(["method"] + present + ["CPU growth"], table), ""]
    table = projections(report)
    if table:
        lines += [
            (f"## Growth exponents of the full merges, and an exponent-only projection to {TARGET['name']} × T = {TARGET['T']} "
            "(CPU: prefer the block-based projection below; peak RSS: this is the memory projection)"),
            "",
            "Exponents are least-squares slopes of log CPU s on log parameters (per T, averaged) and on log T (per size, "
            "averaged), from the rows above; a missing T exponent is taken as 1; methods measured at one size only are left out. "
            "The projection scales the largest measured size's row; the size exponent from small models "
            "understates SVD methods (their per-matrix cost is m·n², so it grows with the hidden size faster than "
            "the parameter count once the SVDs dominate the I/O).",
            "",
            runner.markdown_table(["method", "from", "size exp.", "T exp.", f"{TARGET['name']} T={TARGET['T']} CPU h", "peak RSS GiB"], table),
            "",
        ]
    projections_by_target: Dict[str, List[Dict[str, Any]]] = {}
    for row in report.get("projection_from_kernels") or []:
        projections_by_target.setdefault(row.get("target", f"{TARGET['name']} T={TARGET['T']}"), []).append(row)
    estimates = {key: rows for key, rows in projections_by_target.items() if not key.startswith(TARGET["name"] + " ")}
    if estimates:
        methods = list(dict.fromkeys(row["method"] for rows in estimates.values() for row in rows))
        lookup = {(key, row["method"]): row for key, rows in estimates.items() for row in rows}
        lines += [
            "## Full merges at 1B estimated from the measured 1B blocks (CPU, one thread)",
            "",
            ("Not measured end to end in this session (the 2-core machine could not fit 1B × T = 2, 4, 8 for every method "
            "in the time): the same formula as the 8B projection below, with the 1B blocks' measured CPU s (16 layers) and "
            "the rest measured with the same T at the largest size measured with that T; only the rest is scaled (in N and E). mergekit's own ties at 1B, T = 2 measured 177 CPU s end to end on this machine on 2026-11-23 (results/local/speed-1B-T2.md; ties is mergekit's code, unchanged since)."),
            "",
            runner.markdown_table(
                ["method"] + [f"{key}: CPU s est. (/ ties)" for key in estimates],
                [
                    [method]
                    + [
                        "–" if (key, method) not in lookup else f"{lookup[(key, method)]['total_cpu_s']:.0f} ({lookup[(key, method)]['vs_ties']:.2f})"
                        for key in estimates
                    ]
                    for method in methods
                ],
            ),
            "",
        ]
    projected = projections_by_target.get(f"{TARGET['name']} T={TARGET['T']}") or []
    if projected:
        target = f"{TARGET['name']} × T = {TARGET['T']}"
        lines += [
            f"## Projection to {target} from the measured {TARGET['name']} block (CPU, one thread)",
            "",
            (f"CPU ≈ S + L·K + (rest_TA − S)·(N/Nₛ)·(T+1)/(Tₛ+1) + max(rest_m − rest_TA, 0)·(E/Eₛ)·(T/Tₛ). "
            f"K: measured CPU s of one {TARGET['name']} block (speed-kernels.md; hidden 4096, MLP 14336, k/v 1024 × 4096), "
            f"L = {KERNEL_SIZES[TARGET['name']]['layers']} layers. rest_m: full-pipeline CPU s − layers × block CPU s, both "
            "measured at size s and Tₛ (T nearest 4 first, then the largest size with both); task_arithmetic's rest is reading T + 1 "
            "models and writing one, so it scales with all parameters N (8.03B) and T + 1; a method's extra rest is its "
            "work on the non-block tensors (embeddings, head, norms: E = 1.05B at 8B), scaled with E and T. "
            f"S = {projected[0]['startup_cpu_s']:.1f} CPU s, the measured import time of `mergekit-yaml` with this package, "
            "counted once. The block term carries the factorizations' m·n² growth at the real widths; nothing is extrapolated "
            "in width. `adarank apply` uses task_arithmetic's rest (the method itself needs a learned file)."),
            "",
            runner.markdown_table(
                ["method", f"{TARGET['name']} block CPU s", "× layers, h", "rest from", "rest there, s", "I/O at target, h", "extra at target, h", "total CPU h", "/ ties", "/ task_arithmetic"],
                [
                    [
                        row["method"],
                        f"{row['block_cpu_s']:.1f}",
                        f"{row['blocks_cpu_s'] / 3600:.2f}",
                        row["rest_from"],
                        f"{row['rest_cpu_s']:.1f}",
                        f"{row['io_cpu_s'] / 3600:.2f}",
                        f"{row['extra_cpu_s'] / 3600:.2f}",
                        f"{row['total_cpu_s'] / 3600:.2f}",
                        "–" if row["vs_ties"] is None else f"{row['vs_ties']:.2f}",
                        "–" if row["vs_task_arithmetic"] is None else f"{row['vs_task_arithmetic']:.2f}",
                    ]
                    for row in projected
                ],
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def write_results(report: Dict[str, Any], out_dir: Path) -> None:
    # Called after every merge, so an interrupted grid keeps what it measured.
    runner.save_results(out_dir, "speed", report, render_markdown(report), echo=False)


# Kernel-only shapes (never written as models): Llama-3-8B's block, grouped-query attention
# with 8 KV heads, so k_proj and v_proj are 1024 × 4096.
KERNEL_SIZES: Dict[str, Dict[str, int]] = {
    "8B": dict(hidden_size=4096, layers=32, intermediate_size=14336, heads=32, kv_heads=8, vocab_size=128256),
}
KERNEL_REFERENCES = ("ties", "task_arithmetic")  # mergekit's own implementations, timed on the same tensors
SVD_KERNELS = ("cart", "tsv_m", "iso_c", "iso_cts", "opcm", "adarank apply")
ADARANK_KERNEL = "adarank apply"
# Not a method: the T Gram matrices and their eigensolvers alone, the first step of every
# exact full-spectrum factorization of the task vectors (TSV-M, AdaRank's apply, CART at
# T >= 4). Its ratio to ties bounds from below what any such method can reach on a CPU.
GRAM_FLOOR = "gram floor"


def block_matrices(size: str) -> List[tuple]:
    """(name, shape) of the 2-D weights of layer 0, from the model's own layout (meta device)."""
    if size in KERNEL_SIZES:
        from mergekit_ext.modeling import llama_config

        shape = KERNEL_SIZES[size]
        config = llama_config(shape["vocab_size"], hidden_size=shape["hidden_size"], layers=1, heads=shape["heads"], intermediate_size=shape["intermediate_size"])
        config.num_key_value_heads = shape["kv_heads"]  # llama_config has no GQA switch
    else:
        config = llama_shape_config(size)
    return [(name, shape) for name, shape in tensor_layout(config) if ".layers.0." in name and len(shape) == 2]


def kernel_parameters(name: str, ids: Sequence[int], base_id: int) -> Dict[str, Any]:
    """Keyword arguments for ``name``'s ``merge_group``, bound the way mergekit binds them (per-model → {id: value})."""
    from mergekit.merge_methods.base import MISSING, ParameterScope

    chosen = method_parameters(name)
    if chosen is None:
        raise SystemExit(f"{name}: it has a required parameter the kernel benchmark cannot fill")
    bound: Dict[str, Any] = {}
    for parameter in runner.method_spec(name).parameters:
        value = chosen.get(parameter.name, parameter.default)
        if value is MISSING:
            raise SystemExit(f"{name}: parameter {parameter.name} has no default and no benchmark value")
        if parameter.scope == ParameterScope.NON_BASE:
            value = {index: value for index in ids}
        elif parameter.scope == ParameterScope.INPUT:
            value = {index: value for index in (base_id, *ids)}
        bound[parameter.name] = value
    return bound


def kernel_names() -> List[str]:
    """mergekit's baselines, then every method this package registers that runs without a file, then AdaRank's apply."""
    return list(KERNEL_REFERENCES) + [name for name in runner.our_method_names() if name not in KERNEL_REFERENCES] + [ADARANK_KERNEL, GRAM_FLOOR]


def kernel_times(size: str, counts: Sequence[int], *, names: Optional[Sequence[str]] = None, lapack: bool = True, dtype: torch.dtype = torch.bfloat16, repeats: int = 1, on_row=None) -> Dict[str, Any]:
    """CPU seconds of every method's per-tensor merge on one transformer block of ``size``.

    No files and no mergekit executor: each method's own ``merge_group`` (for
    ``ties`` and ``task_arithmetic``, mergekit 0.1.5's implementation, through
    its registry) on the same random tensors of the block's matrix shapes, in
    ``dtype`` (bf16, what ``mergekit-yaml`` hands a method when the models are
    bf16). Each distinct shape is timed once and counted as often as the block
    has it (q/o, k/v and gate/up share shapes). The factorization's share of a
    merge shows here; reading and writing the models is the full benchmark's
    business. ``lapack``: also time the SVD methods with ``torch.linalg.svd``
    in place of ``tensors.all_singular_triplets`` (what they ran before issue 15).
    ``repeats``: each shape is merged that many times and the fastest counts (on a
    shared machine one ties call can take 1.3x another).
    AdaRank is its apply step (every triplet of every task vector, a random
    mask), as its method needs a learned file.
    """
    import time

    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_ext import tensors
    from mergekit_ext.methods.adarank import kernel as adarank_kernel
    from mergekit_ext.methods.opcm import kernel as opcm_kernel
    from mergekit_ext.methods.tsv import kernel as tsv_kernel

    runner.ensure_registered()
    matrices = block_matrices(size)
    distinct: Dict[tuple, List[str]] = {}
    for name, shape in matrices:
        distinct.setdefault(shape, []).append(name)
    names = list(names) if names else kernel_names()

    def lapack_triplets(matrix, needed=None):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return (u, s, vh) if needed is None else (u[..., :needed], s[..., :needed], vh[..., :needed, :])

    def run(name: str, tensor_name: str, base, models):
        if name == GRAM_FLOOR:
            vectors = tensors.task_vectors(base, models)
            short = vectors if vectors.shape[-2] <= vectors.shape[-1] else vectors.mT
            tensors.gram_eigenvectors(short)  # the methods' own Gram + eigensolver (on the CPU: ?syrk, ?syevd)
            return base
        if name == ADARANK_KERNEL:
            mask = (torch.rand(len(models), min(base.shape), generator=torch.Generator().manual_seed(0)) > 0.3).float()
            return adarank_kernel.apply_masks(base, models, variant="ta", coefficients=torch.full((len(models),), 0.4), mask=mask)
        ids = list(range(1, len(models) + 1))
        group = TensorGroup.from_tensors([base, *models], ids=[0, *ids], base_index=0, name=tensor_name)
        return registry.get(name).merge_group(group, **kernel_parameters(name, ids, 0))

    rows = []
    for count in counts:
        for name in names:
            paths = ("fast", "lapack") if lapack and name in SVD_KERNELS else ("fast",)
            times = {}
            for path in paths:
                patched = []
                if path == "lapack":
                    for module in (tensors, adarank_kernel, tsv_kernel, opcm_kernel):
                        patched.append((module, module.all_singular_triplets))
                        module.all_singular_triplets = lapack_triplets
                try:
                    total = 0.0
                    for position, (shape, tensor_names) in enumerate(distinct.items()):
                        generator = torch.Generator().manual_seed(position)
                        base = torch.randn(shape, generator=generator) * BASE_STD
                        models = [(base + torch.randn(shape, generator=generator) * FINETUNE_STD).to(dtype) for _ in range(count)]
                        base = base.to(dtype)
                        fastest = float("inf")
                        for _ in range(max(1, repeats)):
                            start = time.process_time()
                            merged = run(name, tensor_names[0], base, models)
                            fastest = min(fastest, time.process_time() - start)
                        total += fastest * len(tensor_names)
                        if merged.shape != base.shape:
                            raise RuntimeError(f"{name} returned shape {tuple(merged.shape)} for {shape}")
                        del base, models, merged
                finally:
                    for module, original in patched:
                        module.all_singular_triplets = original
                times[path] = total
            row = {"size": size, "T": count, "kernel": name, "dtype": str(dtype).replace("torch.", ""), "fast_cpu_s": round(times["fast"], 3)}
            if "lapack" in times:
                row["lapack_cpu_s"] = round(times["lapack"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row is not None:
                on_row(row)
    return {
        "machine": runner.machine_description(),
        "threads": torch.get_num_threads(),
        "blocks": {size: {"matrices": [[name, list(shape)] for name, shape in matrices], "layers": (KERNEL_SIZES.get(size) or SIZES[size])["layers"]}},
        "rows": rows,
    }


def render_kernels(report: Dict[str, Any]) -> str:
    """Markdown for speed-kernels.json: CPU s per block, ratios to mergekit's ties and task_arithmetic."""
    rows = report["rows"]
    lookup = {(row["size"], row["T"], row["kernel"]): row for row in rows}
    table = []
    for row in rows:
        ratios = []
        for reference in KERNEL_REFERENCES:
            other = lookup.get((row["size"], row["T"], reference))
            ratios.append(f"{row['fast_cpu_s'] / other['fast_cpu_s']:.2f}" if other and other["fast_cpu_s"] > 0 else "–")
        lapack = row.get("lapack_cpu_s")
        table.append([row["size"], row["T"], row["kernel"], f"{row['fast_cpu_s']:.3g}", *ratios, "–" if lapack is None else f"{lapack:.3g}", "–" if lapack is None else f"{lapack / max(row['fast_cpu_s'], 1e-9):.2f}"])
    blocks = "; ".join(
        f"{size}: " + ", ".join(f"{name.split('.')[-2]} {shape[0]}×{shape[1]}" for name, shape in info["matrices"]) + f" ({info['layers']} layers)"
        for size, info in report.get("blocks", {}).items()
    )
    machine = report["machine"]
    lines = [
        "# Per-block merge kernels: CPU s for one transformer block, every method on the same tensors",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {report['threads']} thread(s); torch {machine['torch']}, mergekit {machine['mergekit']}; {machine['date_utc']} UTC.",
        ("Each method's own per-tensor `merge_group` (mergekit 0.1.5's implementation for `ties` and `task_arithmetic`, "
        f"settings {FIXED_PARAMETERS}; ours at their defaults) on the same random bf16 tensors of one block's matrices "
        "(base N(0, 0.02²), fine-tunes base + N(0, 0.002²)); no files, no executor. Each distinct shape is merged "
        f"{report.get('repeats', 1)} time(s), the fastest counted, as often as the block has that shape. "
        "`adarank apply` is AdaRank's apply step for variant `ta` (every singular triplet of every task "
        "vector, a random mask dropping 30 % of them): the `adarank` method needs a learned file, so the full benchmark skips it. "
        "`gram floor` is no method: the T task vectors' Gram matrices and eigensolvers alone (`tensors.gram_eigenvectors`, "
        "what the methods use), the first step of every "
        "exact full-spectrum factorization (TSV-M, AdaRank's apply, CART at T ≥ 4), so its ratio to ties bounds theirs from below. "
        "LAPACK: the SVD methods with `torch.linalg.svd` in place of the Gram-eigh factorization (what they ran before issue 15)."),
        "",
        f"Block matrices: {blocks}.",
        "",
        *([report["note"], ""] if report.get("note") else []),
        runner.markdown_table(["size", "T", "method", "CPU s / block", "/ ties", "/ task_arithmetic", "LAPACK CPU s", "LAPACK / fast"], table),
        "",
    ]
    exponents = kernel_exponents(report)
    if exponents:
        ordered = sorted(report.get("blocks", {}), key=lambda size: block_parameters(report, size))
        sizes_by_t = {count: [size for size in ordered if (size, count, REFERENCE) in lookup] for count in sorted({row["T"] for row in rows})}
        size_columns = [count for count, sizes in sizes_by_t.items() if len(sizes) > 1]
        t_columns = [size for size in ordered if len({row["T"] for row in rows if row["size"] == size}) > 1]
        header = ["method"] + [f"T exp. at {size}" for size in t_columns] + [f"size exp. at T={count} ({', '.join(sizes_by_t[count])})" for count in size_columns]
        table = [
            [name]
            + ["–" if values["T"].get(size) is None else f"{values['T'][size]:.2f}" for size in t_columns]
            + ["–" if values["size"].get(count) is None else f"{values['size'][count]:.2f}" for count in size_columns]
            for name, values in exponents.items()
        ]
        lines += [
            "## Growth exponents of the block kernels",
            "",
            ("Least-squares slopes of log CPU s on log T (per size) and on log block parameters (per T, over the sizes "
            "measured at that T). A dense factorization of an m × n block matrix (m ≥ n) costs m·n², so at fixed shape "
            "ratios its exponent in block parameters is 1.5; ties and the masks are linear (1.0) up to the sort's log factor."),
            "",
            runner.markdown_table(header, table),
            "",
        ]
    return "\n".join(lines) + "\n"


def kernel_exponents(report: Dict[str, Any]) -> Dict[str, Dict[str, Dict[Any, Optional[float]]]]:
    """Per kernel: {"T": {size: exponent in T}, "size": {T: exponent in block parameters}}."""
    rows = [row for row in report["rows"] if row["fast_cpu_s"] > 0]
    blocks = report.get("blocks", {})
    result: Dict[str, Dict[str, Dict[Any, Optional[float]]]] = {}
    for name in dict.fromkeys(row["kernel"] for row in rows):
        mine = [row for row in rows if row["kernel"] == name]
        by_t = {size: _fit_exponent([(row["T"], row["fast_cpu_s"]) for row in mine if row["size"] == size]) for size in dict.fromkeys(row["size"] for row in mine)}
        by_size = {
            count: _fit_exponent([(block_parameters(report, row["size"]), row["fast_cpu_s"]) for row in mine if row["T"] == count and row["size"] in blocks])
            for count in sorted({row["T"] for row in mine})
        }
        result[name] = {"T": by_t, "size": by_size}
    return result


def merge_kernel_reports(previous: Optional[Dict[str, Any]], current: Dict[str, Any]) -> Dict[str, Any]:
    """``current`` with ``previous``'s rows (same machine) kept where ``current`` did not measure that (size, T, kernel)."""
    if not previous:
        return current
    keys = {(row["size"], row["T"], row["kernel"]) for row in current["rows"]}
    kept = [row for row in previous["rows"] if (row["size"], row["T"], row["kernel"]) not in keys]
    return {**current, "rows": kept + current["rows"], "blocks": {**previous.get("blocks", {}), **current.get("blocks", {})}}


def run_kernels(args) -> None:
    unknown = sorted(set(args.sizes) - set(SIZES) - set(KERNEL_SIZES))
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = kernel_names()
    if args.methods:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            raise SystemExit(f"unknown kernels {unknown}; known: {names}")
        names = [name for name in names if name in args.methods or name in KERNEL_REFERENCES]
    out_dir = Path(args.out_dir)
    results_path = out_dir / "speed-kernels.json"
    previous = json.loads(results_path.read_text()) if args.resume and results_path.exists() else None
    measured: Dict[str, Any] = {"rows": [], "blocks": {}}

    def save() -> None:
        # After every row, so an interrupted run keeps what it measured.
        report = merge_kernel_reports(previous, {**runner_meta, **measured, "note": args.note})
        runner.save_results(out_dir, "speed-kernels", report, render_kernels(report), echo=False)

    runner_meta = {"machine": runner.machine_description(), "threads": torch.get_num_threads(), "repeats": args.repeats}
    for size in args.sizes:
        measured["blocks"][size] = {"matrices": [[name, list(shape)] for name, shape in block_matrices(size)], "layers": (KERNEL_SIZES.get(size) or SIZES[size])["layers"]}

        def on_row(row) -> None:
            measured["rows"].append(row)
            save()

        kernel_times(size, args.T, names=names, lapack=not args.no_lapack, repeats=args.repeats, on_row=on_row)
    report = merge_kernel_reports(previous, {**runner_meta, **measured, "note": args.note})
    print(render_kernels(report))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1B"], choices=list(SIZES) + list(KERNEL_SIZES), help="model sizes (8B: --kernels only)")
    parser.add_argument("--T", nargs="+", type=int, default=[2, 4, 8], help="numbers of models merged")
    parser.add_argument("--methods", nargs="+", help="subset of methods (ties, the reference, always runs; with --kernels, also 'adarank apply')")
    parser.add_argument("--threads", type=int, help="OMP threads per merge process (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per merge; the fastest is reported")
    parser.add_argument("--device", default="cpu", help="mergekit --device (cpu, cuda)")
    parser.add_argument("--timeout", type=float, help="seconds before a merge is killed and marked failed")
    parser.add_argument("--work-dir", default=str(runner.WORK_DIR))
    parser.add_argument("--out-dir", default=str(runner.RESULTS_DIR))
    parser.add_argument("--keep-models", action="store_true", help="keep generated models in the work dir")
    parser.add_argument("--resume", action="store_true", help="reuse successful rows already in speed.json (with --kernels: keep speed-kernels.json's other rows)")
    parser.add_argument("--note", help="a line for the report saying what was run and why")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only combine earlier speed.json files (same machine) into one report")
    parser.add_argument("--kernels-json", metavar="JSON", help="with --render: speed-kernels.json, for the projection from the measured 8B block")
    parser.add_argument("--kernels", action="store_true", help="only time every method's per-tensor merge on one block per size (8B allowed) → speed-kernels.{md,json}")
    parser.add_argument("--no-lapack", action="store_true", help="with --kernels: skip the LAPACK-path comparison of the SVD methods")
    args = parser.parse_args(argv)
    if args.kernels:
        run_kernels(args)
        return
    if args.render:
        reports = [json.loads(Path(path).read_text()) for path in args.render]
        latest = {(row["size"], row["T"], row["label"]): row for item in reports for row in item["rows"]}  # later files win
        report = dict(reports[0], rows=list(latest.values()), sizes={})
        for item in reports:
            report["sizes"].update(item["sizes"])
        if args.note:
            report["note"] = args.note
        if args.kernels_json:
            report["startup_cpu_s"] = startup_cpu_s()
            kernels = json.loads(Path(args.kernels_json).read_text())
            one_b = {"name": "1B", "parameters": parameter_count(tensor_layout(llama_shape_config("1B")))}
            report["projection_from_kernels"] = [
                row
                for target in [{**one_b, "T": count} for count in (2, 4, 8)] + [TARGET]
                for row in kernel_projection(report, kernels, report["startup_cpu_s"], target)
            ]
        markdown = render_markdown(report)
        runner.save_results(Path(args.out_dir), "speed", report, markdown, echo=False)
        print(markdown)
        return
    print(render_markdown(run_grid(args)))


if __name__ == "__main__":
    main()
