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
            f"## Growth exponents and a projection to {TARGET['name']} × T = {TARGET['T']} (CPU, one thread)",
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
    return "\n".join(lines) + "\n"


def write_results(report: Dict[str, Any], out_dir: Path) -> None:
    # Called after every merge, so an interrupted grid keeps what it measured.
    runner.save_results(out_dir, "speed", report, render_markdown(report), echo=False)


def kernel_times(size: str, counts: Sequence[int], *, layers: int = 1) -> Dict[str, Any]:
    """CPU seconds of each SVD kernel on ``layers`` transformer block(s) of ``size``, fast path and LAPACK path.

    No files, no mergekit: the kernels alone on random float32 task vectors of
    the block's seven matrix shapes, so the factorization's share of a merge is
    visible (mergekit's I/O and ``ties`` are the full benchmark's business).
    The LAPACK path swaps ``torch.linalg.svd`` in for ``tensors.all_singular_triplets``
    (OPCM: ``svd="full"``), which is what the kernels ran before issue 15.
    AdaRank is its apply step (every triplet of every task vector, random mask).
    """
    import time

    import mergekit_ext.tensors as tensors
    from mergekit_ext.methods.adarank import kernel as adarank_kernel
    from mergekit_ext.methods.cart.kernel import cart_merge
    from mergekit_ext.methods.iso import kernel as iso_kernel
    from mergekit_ext.methods.opcm import kernel as opcm_kernel
    from mergekit_ext.methods.tsv import kernel as tsv_kernel

    shape = SIZES[size]
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    matrices = [(hidden, hidden)] * 4 + [(inner, hidden), (inner, hidden), (hidden, inner)]

    def lapack_triplets(matrix):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u, s, vh

    def run(name: str, base, models):
        if name == "opcm":
            return opcm_kernel.opcm_merge(base, models, project=True)
        if name == "cart":
            return cart_merge(models)
        vectors = torch.stack([model - base for model in models])
        if name == "tsv_m":
            return tsv_kernel.tsv_update(vectors)
        if name == "iso_c":
            return iso_kernel.iso_c_update(vectors)
        if name == "iso_cts":
            return iso_kernel.iso_cts_update(vectors, 0.8)
        mask = (torch.rand(len(models), min(base.shape), generator=torch.Generator().manual_seed(0)) > 0.3).float()
        return adarank_kernel.apply_masks(base, models, variant="ta", coefficients=torch.full((len(models),), 0.4), mask=mask)

    rows = []
    for count in counts:
        for name in ("opcm", "cart", "tsv_m", "iso_c", "iso_cts", "adarank apply"):
            times = {}
            for path in ("fast", "lapack"):
                patched = []
                if path == "lapack":
                    for module in (tensors, adarank_kernel, tsv_kernel, opcm_kernel):
                        patched.append((module, module.all_singular_triplets))
                        module.all_singular_triplets = lapack_triplets
                try:
                    total = 0.0
                    for position, (rows_, cols) in enumerate(matrices * layers):
                        generator = torch.Generator().manual_seed(position)
                        base = torch.randn(rows_, cols, generator=generator) * BASE_STD
                        models = [base + torch.randn(rows_, cols, generator=generator) * FINETUNE_STD for _ in range(count)]
                        start = time.process_time()
                        run(name, base, models)
                        total += time.process_time() - start
                finally:
                    for module, original in patched:
                        module.all_singular_triplets = original
                times[path] = total
            rows.append({"size": size, "T": count, "kernel": name, "layers": layers, "fast_cpu_s": round(times["fast"], 2), "lapack_cpu_s": round(times["lapack"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    return {"machine": runner.machine_description(), "threads": torch.get_num_threads(), "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1B"], choices=list(SIZES))
    parser.add_argument("--T", nargs="+", type=int, default=[2, 4, 8], help="numbers of models merged")
    parser.add_argument("--methods", nargs="+", help="subset of methods (ties, the reference, always runs)")
    parser.add_argument("--threads", type=int, help="OMP threads per merge process (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per merge; the fastest is reported")
    parser.add_argument("--device", default="cpu", help="mergekit --device (cpu, cuda)")
    parser.add_argument("--timeout", type=float, help="seconds before a merge is killed and marked failed")
    parser.add_argument("--work-dir", default=str(runner.WORK_DIR))
    parser.add_argument("--out-dir", default=str(runner.RESULTS_DIR))
    parser.add_argument("--keep-models", action="store_true", help="keep generated models in the work dir")
    parser.add_argument("--resume", action="store_true", help="reuse successful rows already in speed.json")
    parser.add_argument("--note", help="a line for the report saying what was run and why")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only combine earlier speed.json files (same machine) into one report")
    parser.add_argument("--kernels", action="store_true", help="only time the SVD kernels on one block per size (fast vs LAPACK path) → speed-kernels.{md,json}")
    args = parser.parse_args(argv)
    if args.kernels:
        if args.threads:
            torch.set_num_threads(args.threads)
        report = {"rows": []}
        for size in args.sizes:
            part = kernel_times(size, args.T)
            report = {**part, "rows": report["rows"] + part["rows"]}
        table = [[row["size"], row["T"], row["kernel"], row["fast_cpu_s"], row["lapack_cpu_s"], f"{row['lapack_cpu_s'] / max(row['fast_cpu_s'], 1e-9):.2f}"] for row in report["rows"]]
        markdown = "# SVD kernels alone: CPU s for one transformer block (7 matrices), fast path vs LAPACK path\n\n" + (
            f"{report['machine']['cpu']}, {report['threads']} thread(s); {report['machine']['date_utc']} UTC. " + (args.note or "") + "\n\n"
        ) + runner.markdown_table(["size", "T", "kernel", "fast CPU s", "LAPACK CPU s", "speed-up"], table) + "\n"
        runner.save_results(Path(args.out_dir), "speed-kernels", report, markdown)
        return
    if args.render:
        reports = [json.loads(Path(path).read_text()) for path in args.render]
        latest = {(row["size"], row["T"], row["label"]): row for item in reports for row in item["rows"]}  # later files win
        report = dict(reports[0], rows=list(latest.values()), sizes={})
        for item in reports:
            report["sizes"].update(item["sizes"])
        if args.note:
            report["note"] = args.note
        write_results(report, Path(args.out_dir))
        print(render_markdown(report))
        return
    print(render_markdown(run_grid(args)))


if __name__ == "__main__":
    main()
