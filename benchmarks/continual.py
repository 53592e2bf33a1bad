"""Continual merging on a zoo: OPCM against continual TA, TIES and weight average.

Experts arrive one at a time in a random task order; after each step the
state is evaluated on the task just added, and after the last step on every
task. ACC = mean accuracy over all tasks after the last step; BWT = mean over
the tasks added before the last of (accuracy at the end − accuracy right after
that task was added) (docs/methods.md#opcm). Mean ± std over ``--orders`` random
orders. States are built by ``mergekit_ext.methods.opcm.format`` (the `mergekit-ext
continual` command's library API: the paper's global scaling); accuracies come
from lm-eval via ``mergekit_ext.evaluate``. Writes results/continual.{md,json}.

    python benchmarks/continual.py --zoo benchmarks/work/zoo-demo --orders 3
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from benchmarks import runner  # noqa: E402

# label -> ContinualOptions fields. Paper baselines: c = 0.3 (8 tasks), TIES top 20 %.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "opcm": dict(method="opcm", alpha=0.5, zero_diagonal=True),
    "opcm (keep diagonal)": dict(method="opcm", alpha=0.5, zero_diagonal=False),
    "continual TA": dict(method="ta", coefficient=0.3),
    "continual TIES": dict(method="ties", coefficient=0.3, density=0.2),
    "continual average": dict(method="average"),
}


def build_states(zoo, order: Sequence[str], options, folder: Path) -> List[Path]:
    """One state folder per step (a copy of the previous state plus one `add`)."""
    from mergekit_ext.methods.opcm.format import add_model, init_state

    steps: List[Path] = []
    for index, task in enumerate(order):
        step = folder / f"step{index + 1}"
        shutil.rmtree(step, ignore_errors=True)
        if index == 0:
            init_state(step, zoo.base, zoo.expert(task), options=options, progress=False)
        else:
            shutil.copytree(steps[-1], step)
            add_model(step, zoo.expert(task), progress=False)
        steps.append(step)
    return steps


def run(args) -> Dict[str, Any]:
    from mergekit_ext.evaluate import compare_on_zoo, lm_eval_results
    from mergekit_ext.methods.opcm.kernel import ContinualOptions
    from mergekit_ext.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    work = Path(args.work_dir) / "continual" / Path(zoo.root).name
    rng = random.Random(args.seed)
    orders = []
    for _ in range(args.orders):
        order = list(zoo.tasks)
        rng.shuffle(order)
        orders.append(order)
    variants = {label: VARIANTS[label] for label in (args.variants or VARIANTS)}
    runs: List[Dict[str, Any]] = []
    finals: Dict[str, Path] = {}
    for label, fields in variants.items():
        options = ContinualOptions(**fields)
        for order_index, order in enumerate(tqdm(orders, desc=label, unit="order")):
            folder = work / label.replace(" ", "_").replace("(", "").replace(")", "") / f"order{order_index}"
            steps = build_states(zoo, order, options, folder)
            just_added = {}
            for step, task in zip(steps, order):
                lm_task = zoo.lm_eval_task(task, "test")
                result = lm_eval_results(step, [lm_task], zoo.task_dir, batch_size=args.batch_size, device=args.device, cache_dir=zoo.eval_cache)
                just_added[task] = float(result[lm_task][zoo.metric])
            key = f"{label} | order {order_index}"
            finals[key] = steps[-1]
            runs.append({"variant": label, "order_index": order_index, "order": order, "accuracy_when_added": just_added, "final_state": str(steps[-1])})
    final_report = compare_on_zoo(zoo.root, finals, split="test", device=args.device, batch_size=args.batch_size)
    for entry in runs:
        model = final_report["models"][f"{entry['variant']} | order {entry['order_index']}"]
        final = model["accuracy"]
        entry["final_accuracy"] = final
        entry["final_normalized_accuracy"] = model["normalized_accuracy"]
        entry["ACC"] = sum(final.values()) / len(final)
        earlier = entry["order"][:-1]
        entry["BWT"] = sum(final[task] - entry["accuracy_when_added"][task] for task in earlier) / max(1, len(earlier))
    summary = {}
    for label in variants:
        mine = [entry for entry in runs if entry["variant"] == label]
        summary[label] = {
            metric: {
                "mean": statistics.mean(entry[metric] for entry in mine),
                "std": statistics.stdev(entry[metric] for entry in mine) if len(mine) > 1 else 0.0,
            }
            for metric in ("ACC", "BWT")
        }
        summary[label]["normalized_ACC"] = {
            "mean": statistics.mean(
                statistics.mean(v for v in entry["final_normalized_accuracy"].values() if v is not None) for entry in mine
            )
        }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    models = final_report["models"]
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest.get("seed"),
        "metric": zoo.metric,
        "variants": variants,
        "orders": orders,
        "base_accuracy": models["base"]["accuracy"],
        "expert_accuracy": models["expert"]["accuracy"],
        "summary": summary,
        "runs": runs,
    }


def render_markdown(result: Dict[str, Any]) -> str:
    machine = result["machine"]
    base = result["base_accuracy"]
    expert = result["expert_accuracy"]
    rows = [["base (no merge)", f"{sum(base.values()) / len(base):.3f}", "–", "–"], ["experts (each on its own task)", f"{sum(expert.values()) / len(expert):.3f}", "–", "1.000"]]
    for label, info in result["summary"].items():
        rows.append(
            [
                label,
                f"{info['ACC']['mean']:.3f} ± {info['ACC']['std']:.3f}",
                f"{info['BWT']['mean']:+.3f} ± {info['BWT']['std']:.3f}",
                f"{info['normalized_ACC']['mean']:.3f}",
            ]
        )
    settings = "; ".join(f"{label}: " + ", ".join(f"{k}={v}" for k, v in fields.items()) for label, fields in result["variants"].items())
    lines = [
        f"# Continual merging on the `{result['preset']}` zoo" + (f" (seed {result['seed']})" if result.get("seed") is not None else ""),
        "",
        f"Zoo: {result['zoo']}. Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; "
        f"{machine['date_utc']} UTC. States built with `mergekit_ext.methods.opcm.format` (init + add, the paper's global scaling "
        f"for OPCM); score: lm-eval `{result.get('metric', 'acc,none').split(',')[0]}` on the test split. ACC: mean over all tasks after the last step. "
        "BWT: mean over tasks added before the last of (final accuracy − accuracy right after it was added). "
        f"Mean ± std over {len(result['orders'])} random task orders: "
        + "; ".join(" → ".join(order) for order in result["orders"])
        + ".",
        f"Settings (fixed, not tuned): {settings}.",
        "",
        runner.markdown_table(["method", "ACC", "BWT", "normalized ACC"], rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_zoo_arguments(parser, name="continual")
    parser.add_argument("--orders", type=int, default=3, help="number of random task orders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    args = parser.parse_args(argv)
    runner.apply_threads(args)
    result = run(args)
    runner.save_results(args.out_dir, args.name, result, render_markdown(result))


if __name__ == "__main__":
    main()
