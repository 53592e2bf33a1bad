"""LoRA experts: merged adapters and RMM bases against the individual adapters.

Rows (all on the zoo's LoRA experts, evaluated as base + peft adapter by
lm-eval through ``mergekit_ext.evaluate``; normalized = accuracy / the task's
own LoRA expert):

* individual adapters (storage 1, the reference);
* task arithmetic and TIES on the A and B factors separately (the conventional
  baseline RMM is compared with; ``adapters.merge.merge_factors``);
* dense merges re-factorized to one adapter (``adapters.merge.merge_adapters``, what
  `mergekit-ext lora merge` runs): task arithmetic at rank r and n·r (lossless),
  and this package's methods at rank r;
* RMM for K = 1 … n in each variant (factor, position, product): the basis is
  built once, every task is reverted to its own adapter and evaluated on its
  own task (``rmm_cli.reverted_factors``, what `mergekit-ext rmm revert` runs).

Settings are fixed (listed in the report), not tuned. Writes
results/lora.{md,json,png} (PNG: mean normalized accuracy against storage).

    python benchmarks/lora_bench.py --zoo benchmarks/work/zoo-demo
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from benchmarks import runner  # noqa: E402

FACTOR_MERGES = {
    "TA on factors": ("task_arithmetic", {"weight": 1.0, "lambda": 0.5}),
    "TIES on factors": ("ties", {"weight": 1.0, "density": 0.5, "lambda": 1.0, "normalize": False}),
}
# label -> (method, parameters, rank multiplier of the adapters' rank r)
DENSE_MERGES = {
    "TA dense, rank n·r": ("task_arithmetic", {"weight": 1.0, "lambda": 0.5}, "n"),
    "TA dense, rank r": ("task_arithmetic", {"weight": 1.0, "lambda": 0.5}, 1),
    "TIES dense, rank r": ("ties", {"weight": 1.0, "density": 0.5, "lambda": 1.0, "normalize": False}, 1),
    "consensus_ta dense, rank r": ("consensus_ta", {"lambda": 0.5}, 1),
    "cart dense, rank r": ("cart", {"rank_ratio": 0.15, "lambda": 1.3}, 1),
}
VARIANTS = ("factor", "position", "product")


def run(args) -> Dict[str, Any]:
    import torch

    from mergekit_ext.adapters import peft_io as lora
    from mergekit_ext.adapters.merge import merge_adapters, merge_factors
    from mergekit_ext.evaluate import ModelSpec, compare_on_zoo, lm_eval_results
    from mergekit_ext.io import open_model
    from mergekit_ext.methods.rmm.format import reverted_factors
    from mergekit_ext.methods.rmm.kernel import adapter_parameter_count, build_basis
    from mergekit_ext.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    tasks = zoo.tasks
    n = len(tasks)
    work = Path(args.work_dir) / "lora" / Path(zoo.root).name
    shutil.rmtree(work, ignore_errors=True)
    adapters = lora.load_adapters([str(zoo.adapter(task)) for task in tasks], str(zoo.base), names=tasks)
    rank = max(f.rank for adapter in adapters for f in adapter.modules.values())
    total = adapter_parameter_count(adapters)
    base_loader = open_model(zoo.base)
    template = adapters[0].config
    written: Dict[str, Path] = {}
    storage: Dict[str, float] = {}
    settings: Dict[str, str] = {}

    def write(label: str, factors) -> None:
        folder = work / label.replace(" ", "_").replace(",", "").replace("·", "")
        lora.write_adapter(folder, factors, base_model=str(zoo.base), dtype=torch.float32, template=template)
        written[label] = folder
        storage[label] = sum(f.a.numel() + f.b.numel() for f in factors.values()) / total

    for label, (method, parameters) in tqdm(FACTOR_MERGES.items(), desc="factor merges"):
        write(label, merge_factors(adapters, method, parameters=parameters))
        settings[label] = f"{method} {parameters}"
    methods = set(runner.our_method_names()) | {"task_arithmetic", "ties"}
    for label, (method, parameters, multiplier) in tqdm(DENSE_MERGES.items(), desc="dense merges"):
        if method not in methods:
            continue
        target = rank * (n if multiplier == "n" else multiplier)
        factors = merge_adapters(adapters, base_loader.get_tensor, method, target, parameters=parameters)
        write(label, factors)
        settings[label] = f"{method} {parameters}, re-factorized to rank {target}"

    merged_specs = {label: ModelSpec(zoo.base, folder) for label, folder in written.items()}
    report = compare_on_zoo(zoo.root, merged_specs, split="test", experts="lora", device=args.device, batch_size=args.batch_size)
    expert = report["models"]["expert"]["accuracy"]
    rows: List[Dict[str, Any]] = [
        {"label": "individual adapters", "storage": 1.0, "accuracy": expert, "setting": f"n = {n} adapters of rank {rank}"}
    ]
    for label in written:
        rows.append({"label": label, "storage": storage[label], "accuracy": report["models"][label]["accuracy"], "setting": settings[label]})

    ks = sorted({k for k in (args.ks or range(1, n + 1)) if 1 <= k <= n})
    rmm_variants = list(args.variants or VARIANTS)
    for variant in rmm_variants:
        for k in tqdm(ks, desc=f"RMM {variant}"):
            basis = build_basis(adapters, k, variant)
            accuracy = {}
            for task in tasks:
                folder = work / f"rmm-{variant}-k{k}" / task
                lora.write_adapter(folder, reverted_factors(basis, task), base_model=str(zoo.base), dtype=torch.float32, template=template)
                lm_task = zoo.lm_eval_task(task, "test")
                result = lm_eval_results(ModelSpec(zoo.base, folder), [lm_task], zoo.task_dir, batch_size=args.batch_size, device=args.device, cache_dir=zoo.eval_cache)
                accuracy[task] = float(result[lm_task][zoo.metric])
            rows.append(
                {
                    "label": f"RMM {variant}, K={k}",
                    "storage": basis.parameter_count() / total,
                    "accuracy": accuracy,
                    "setting": f"basis of {k} adapters + coefficients; each task reverted to its own adapter",
                }
            )
    for row in rows:
        row["mean_accuracy"] = sum(row["accuracy"].values()) / n
        row["normalized"] = {task: (row["accuracy"][task] / expert[task] if expert[task] else None) for task in tasks}
        valid = [v for v in row["normalized"].values() if v is not None]
        row["mean_normalized"] = sum(valid) / len(valid) if valid else None
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest.get("seed"),
        "metric": zoo.metric,
        "tasks": tasks,
        "adapter_rank": rank,
        "rmm": {"variants": rmm_variants, "ks": ks},
        "base_accuracy": report["models"]["base"]["accuracy"],
        "rows": rows,
    }


def render_markdown(result: Dict[str, Any]) -> str:
    machine = result["machine"]
    tasks = result["tasks"]
    base = result["base_accuracy"]
    header = ["row", "storage"] + tasks + ["mean", "normalized"]
    table = [["base (no adapter)", "0"] + [f"{base[t]:.3f}" for t in tasks] + [f"{sum(base.values()) / len(tasks):.3f}", "–"]]
    for row in result["rows"]:
        table.append([row["label"], f"{row['storage']:.3f}"] + [f"{row['accuracy'][t]:.3f}" for t in tasks] + [f"{row['mean_accuracy']:.3f}", f"{row['mean_normalized']:.3f}"])
    lines = [
        f"# LoRA experts on the `{result['preset']}` zoo: merged adapters and RMM",
        "",
        f"Zoo: {result['zoo']}; {len(tasks)} LoRA adapters of rank {result['adapter_rank']}. Machine: {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['memory_gib']} GiB RAM; {machine['date_utc']} UTC. Test split, lm-eval `{result.get('metric', 'acc,none').split(',')[0]}` "
        "(base + peft adapter); normalized = accuracy / the task's own LoRA adapter. Storage = stored LoRA parameters "
        "(plus RMM coefficients) / those of all individual adapters. Merged adapters (one for all tasks) are evaluated "
        "on every task; RMM reverts each task to its own adapter from the shared basis. Settings are fixed, not tuned:",
        "",
    ]
    lines += [f"- {row['label']}: {row['setting']}" for row in result["rows"] if not row["label"].startswith("RMM")]
    rmm = result.get("rmm", {"variants": list(VARIANTS), "ks": list(range(1, len(tasks) + 1))})
    lines.append(
        f"- RMM {{{', '.join(rmm['variants'])}}}, K ∈ {{{', '.join(map(str, rmm['ks']))}}}: `build_basis(adapters, K, variant)` "
        "(basis rank = the adapters' rank); each task reverted to its own adapter"
    )
    lines += ["", runner.markdown_table(header, table), ""]
    return "\n".join(lines)


def write_chart(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    markers = {"factor": "o-", "position": "s-", "product": "^-"}
    for variant, marker in markers.items():
        points = [(row["storage"], row["mean_normalized"]) for row in result["rows"] if row["label"].startswith(f"RMM {variant},")]
        if points:
            axis.plot(*zip(*points), marker, label=f"RMM {variant} (K = {', '.join(str(k) for k in result.get('rmm', {}).get('ks', [])) or '1 … n'})")
    for row in result["rows"]:
        if row["label"].startswith("RMM"):
            continue
        axis.scatter([row["storage"]], [row["mean_normalized"]], marker="x" if row["label"] != "individual adapters" else "*", s=60)
        axis.annotate(row["label"], (row["storage"], row["mean_normalized"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    axis.set_xlabel("storage (fraction of keeping every adapter)")
    axis.set_ylabel("mean normalized accuracy (merged / LoRA expert)")
    axis.set_title(f"LoRA experts, {result['preset']} zoo")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_zoo_arguments(parser, name="lora")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="RMM variants (default: all)")
    parser.add_argument("--ks", nargs="+", type=int, help="RMM basis sizes K (default: 1 … number of tasks)")
    args = parser.parse_args(argv)
    runner.apply_threads(args)
    result = run(args)
    out_dir = runner.save_results(args.out_dir, args.name, result, render_markdown(result))
    write_chart(result, out_dir / f"{args.name}.png")


if __name__ == "__main__":
    main()
