"""The LoRA paths on a real pretrained LLM: a `smol` zoo's peft adapters, merged three ways.

Every row is scored on the TEST split with the smol benchmark's scorer (greedy
chat replies, exact match; retention by log-likelihood choice), per item, so
each merge has a paired difference to task arithmetic on the same items:

* ``BASE+ADAPTER``: each adapter applied to the base (θ0 + B·A, what mergekit
  does with ``model: base+adapter``), then merged as full models by mergekit's
  engine. Task arithmetic's λ is chosen on validation; the other methods run at
  their shipped settings (the same protocol as ``smol_quality.py``). One more
  row is TSV-M at its default λ times the zoo's mean ‖τ_full‖/‖ΔW_lora‖: the
  docs' advice for scaling merges of adapters, measured.
* ``lora merge``: the same merges re-factorized to one adapter of the adapters'
  rank r (``adapters.merge.merge_adapters``, what `mergekit-ext lora merge` runs).
* RMM: a basis of K adapters built from all n (``build_basis``, what
  `mergekit-ext rmm build` runs), for K = 2 … n in the factor and product
  variants; each task reverted to its own adapter and scored on its own task
  and on retention. K = n must give back the individual adapters.

    python benchmarks/smol_lora.py --zoo ZOO --name smol-lora-s2 --threads 1
    python benchmarks/smol_lora.py --aggregate results/smol-lora-s{0,1,2}.json --name smol-lora
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import runner  # noqa: E402
from mergekit_ext.methods.tsv import DEFAULT_LAMBDA as TSV_DEFAULT_LAMBDA  # noqa: E402
from benchmarks.smol_quality import REFERENCE, SmolScorer, add_smol_arguments, aggregate_table, choose_reference, dispatch, pm, open_smol_zoo, paired_difference, smol_settings, summarize  # noqa: E402

DENSE_METHODS = ("tsv_m", "iso_c", "cart", "iso_cts")  # the full fine-tunes' leaders on the smol zoos
ADAPTER_METHODS = (REFERENCE, "tsv_m", "iso_c")
RMM_VARIANTS = ("factor", "product")
# The docs' advice for adapters (docs/commands.md, "Scale LoRA merges down"), measured on TSV-M, whose
# full-fine-tune default costs retention on adapters.
NORM_SCALED_LABEL = "tsv_m, λ × norm ratio (BASE+ADAPTER)"


def with_updates(base_state: Dict[str, torch.Tensor], updates: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """θ0 + ΔW for the updated tensors (float32), the base's tensors for the rest."""
    state = dict(base_state)
    for name, delta in updates.items():
        state[name] = base_state[name].to(torch.float32) + delta.to(torch.float32)
    return state


def factor_updates(factors) -> Dict[str, torch.Tensor]:
    """Dense updates of a module → LoraFactors mapping, keyed by the base tensor's name."""
    from mergekit_ext.adapters.peft_io import weight_name

    return {weight_name(module): pair.delta() for module, pair in factors.items()}


def mean_normalized(accuracy: Dict[str, float], reference: Dict[str, float]) -> Optional[float]:
    """Mean of accuracy / reference over the tasks where the reference scores at all."""
    ratios = [accuracy[task] / reference[task] for task in accuracy if reference[task] > 0]
    return sum(ratios) / len(ratios) if ratios else None


class AdapterZoo:
    """A smol zoo's base, its adapters applied to the base as dense states, and the test scorer."""

    def __init__(self, args):
        from mergekit_ext.adapters import peft_io
        from mergekit_ext.modeling import load_state_dict

        self.zoo = open_smol_zoo(args.zoo)
        self.tasks = self.zoo.tasks
        self.scorer = SmolScorer(self.zoo, args.device)
        self.retention = self.scorer.retention
        self.adapter_metrics = self.zoo.manifest["metrics"]["adapters"]
        self.lora_scores = {task: self.adapter_metrics[task][task]["test"] for task in self.tasks}
        self.base_state = load_state_dict(self.zoo.base)
        self.adapters = peft_io.load_adapters([str(self.zoo.adapter(task)) for task in self.tasks], str(self.zoo.base), names=self.tasks)
        self.rank = max(pair.rank for adapter in self.adapters for pair in adapter.modules.values())
        self.applied = {adapter.name: with_updates(self.base_state, factor_updates(adapter.modules)) for adapter in self.adapters}

    def dense(self, method: str, setting: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The adapters applied to the base and merged as full models by mergekit's engine."""
        from mergekit_ext.zoo import merge_in_memory

        with torch.no_grad():
            return merge_in_memory(self.base_state, self.applied, method, dict(setting), use_base=True)

    def norm_ratios(self) -> Dict[str, float]:
        """Per task ‖τ_full‖ / ‖ΔW_lora‖ over the matrices the adapter updates (the task's full fine-tune
        against its adapter): the factor docs/commands.md scales a full-fine-tune λ by for adapters."""
        from mergekit_ext.modeling import load_state_dict

        ratios = {}
        for adapter in self.adapters:  # one adapter's dense updates at a time: the applied states already hold them
            updates = factor_updates(adapter.modules)
            expert = load_state_dict(self.zoo.expert(adapter.name))
            full = sum(float((expert[name].float() - self.base_state[name].float()).pow(2).sum()) for name in updates)
            lora = sum(float(delta.float().pow(2).sum()) for delta in updates.values())
            ratios[adapter.name] = (full / lora) ** 0.5
        return ratios

    def norm_scaled(self) -> tuple[str, Dict[str, Any], Dict[str, float]]:
        """TSV-M at its default λ times the mean norm ratio: the docs' advice for adapters, measured."""
        ratios = self.norm_ratios()
        factor = sum(ratios.values()) / len(ratios)
        setting = {"lambda": round(TSV_DEFAULT_LAMBDA * factor, 3)}
        return NORM_SCALED_LABEL, setting, ratios


def compare(models: Dict[str, Any], items: Dict[str, Dict[str, List[int]]], tasks: Sequence[str], retention: Sequence[str], reference: str) -> None:
    """Each merge's paired difference to task arithmetic (BASE+ADAPTER) and to the base on retention."""
    for label in items:
        if label == "base":
            continue
        models[label]["vs_task_arithmetic"] = paired_difference(items[label], items[reference], tasks)
        models[label]["vs_base_retention"] = {name: paired_difference(items[label], items["base"], [name]) for name in retention}
        models[label]["beats_base_on_every_task"] = all(models[label]["accuracy"][t] > models["base"]["accuracy"][t] for t in tasks)


def run(args) -> Dict[str, Any]:
    from tqdm import tqdm

    from mergekit_ext.adapters.merge import merge_adapters
    from mergekit_ext.methods.rmm.format import reverted_factors
    from mergekit_ext.methods.rmm.kernel import adapter_parameter_count, build_basis

    started = time.perf_counter()
    lora = AdapterZoo(args)
    zoo, tasks, scorer, retention, every = lora.zoo, lora.tasks, lora.scorer, lora.retention, lora.tasks + lora.retention
    adapter_metrics, lora_scores = lora.adapter_metrics, lora.lora_scores
    base_state, adapters, rank, dense = lora.base_state, lora.adapters, lora.rank, lora.dense
    quiet = args.quiet

    items: Dict[str, Dict[str, List[int]]] = {}
    models: Dict[str, Any] = {}
    seconds: Dict[str, float] = {}

    def score(label: str, state: Dict[str, torch.Tensor], setting: Dict[str, Any], path: str) -> None:
        begun = time.perf_counter()
        items[label] = scorer(state, "test", every)
        models[label] = {**summarize(items[label], tasks, retention, lora_scores), "setting": setting, "path": path}
        seconds[label] = round(time.perf_counter() - begun, 1)

    items["base"] = scorer(base_state, "test", every)
    models["base"] = summarize(items["base"], tasks, retention)
    models["lora expert"] = {
        "accuracy": dict(lora_scores),
        "mean_accuracy": sum(lora_scores.values()) / len(tasks),
        "retention": {name: min(adapter_metrics[task][name]["test"] for task in tasks) for name in retention},
        "note": "each adapter on its own task (the zoo build's score); retention: the lowest over the adapters",
    }

    grids = smol_settings()
    selection = choose_reference(scorer, dense, tasks, quiet=quiet)
    settings = {REFERENCE: selection["chosen"], **{method: grids[method][0] for method in DENSE_METHODS}}

    for method, setting in tqdm(settings.items(), desc="BASE+ADAPTER merges", unit="method", disable=quiet):
        score(f"{method} (BASE+ADAPTER)", dense(method, setting), setting, "BASE+ADAPTER")
    label, setting, ratios = lora.norm_scaled()
    score(label, dense("tsv_m", setting), setting, "BASE+ADAPTER")
    models[label]["norm_ratios"] = ratios
    for method in tqdm(ADAPTER_METHODS, desc="lora merge, rank r", unit="method", disable=quiet):
        with torch.no_grad():
            factors = merge_adapters(adapters, base_state.__getitem__, method, rank, parameters=settings[method])
        score(f"{method} (lora merge, rank {rank})", with_updates(base_state, factor_updates(factors)), settings[method], "lora merge")

    total = adapter_parameter_count(adapters)
    rmm: List[Dict[str, Any]] = []
    for variant in RMM_VARIANTS:
        for k in tqdm(range(2, len(tasks) + 1), desc=f"RMM {variant}", unit="K", disable=quiet):
            basis = build_basis(adapters, k, variant)
            own: Dict[str, float] = {}
            kept: Dict[str, Dict[str, float]] = {}
            for task in tasks:
                with torch.no_grad():
                    state = with_updates(base_state, factor_updates(reverted_factors(basis, task)))
                scored = scorer(state, "test", [task, *retention])
                own[task] = sum(scored[task]) / len(scored[task])
                kept[task] = {name: sum(scored[name]) / len(scored[name]) for name in retention}
            rmm.append(
                {
                    "variant": variant,
                    "k": k,
                    "storage": basis.parameter_count() / total,
                    "accuracy": own,
                    "mean_accuracy": sum(own.values()) / len(tasks),
                    "normalized": mean_normalized(own, lora_scores),
                    "retention": {name: min(kept[t][name] for t in tasks) for name in retention},
                }
            )

    reference = f"{REFERENCE} (BASE+ADAPTER)"
    compare(models, items, tasks, retention, reference)
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest["seed"],
        "tasks": tasks,
        "retention_tasks": retention,
        "adapter_rank": rank,
        "test_items_per_task": len(scorer.documents[(tasks[0], "test")]),
        "reference": reference,
        "selection": {REFERENCE: selection},
        "test_report": {"split": "test", "tasks": tasks, "models": models},
        "rmm": rmm,
        "seconds": {"per_model": seconds, "total": round(time.perf_counter() - started, 1)},
        "items": items,
    }


def update(args, earlier: Dict[str, Any]) -> Dict[str, Any]:
    """``earlier`` with the norm-scaled TSV-M row added (or merged again), scored on the same test items;
    every other row is kept, since scoring is deterministic."""
    started = time.perf_counter()
    lora = AdapterZoo(args)
    if lora.zoo.manifest["seed"] != earlier["seed"] or list(lora.tasks) != list(earlier["tasks"]):
        raise SystemExit(f"{args.update}: made on seed {earlier['seed']}'s zoo, not on {lora.zoo.root} (seed {lora.zoo.manifest['seed']})")
    result = dict(earlier)
    models, items = result["test_report"]["models"], result["items"]
    label, setting, ratios = lora.norm_scaled()
    begun = time.perf_counter()
    items[label] = lora.scorer(lora.dense("tsv_m", setting), "test", lora.tasks + lora.retention)
    models[label] = {**summarize(items[label], lora.tasks, lora.retention, lora.lora_scores), "setting": setting, "path": "BASE+ADAPTER", "norm_ratios": ratios}
    result["seconds"]["per_model"][label] = round(time.perf_counter() - begun, 1)
    compare(models, items, lora.tasks, lora.retention, result["reference"])
    result.setdefault("updates", []).append({"added": [label], "setting": setting, "seconds": round(time.perf_counter() - started, 1)})
    return result


def render_markdown(result: Dict[str, Any]) -> str:
    tasks, retention = result["tasks"], result["retention_tasks"]
    models = result["test_report"]["models"]
    selection = result["selection"][REFERENCE]
    header = ["model", "mean ± stderr"] + tasks + [f"{name} (retention)" for name in retention] + ["− task arithmetic (paired)", "> base on every task"]
    rows = []
    for label, model in models.items():
        mean = f"{model['mean_accuracy']:.3f}" + (f" ± {model['mean_stderr']:.3f}" if "mean_stderr" in model else "")
        versus = model.get("vs_task_arithmetic")
        paired = "" if versus is None or label == result["reference"] else f"{versus['delta']:+.3f} ± {versus['stderr']:.3f}"
        every = {True: "yes", False: "no"}.get(model.get("beats_base_on_every_task"), "")
        rows.append([label, mean] + [f"{model['accuracy'][t]:.3f}" for t in tasks] + [f"{model['retention'][n]:.3f}" for n in retention] + [paired, every])
    lambdas = ", ".join(f"{v:.3f}" for v in selection["validation_mean_accuracy"])
    lines = [
        f"# LoRA adapters of SmolLM2-135M-Instruct merged: smol zoo, seed {result['seed']}",
        "",
        f"{len(tasks)} peft LoRA adapters of rank {result['adapter_rank']}; test split, {result['test_items_per_task']} items per task; "
        "exact match of the greedy chat reply (instruction tasks), 4-way log-likelihood choice (retention). "
        f"`lora expert`: each adapter on its own task, retention the lowest over the adapters. task arithmetic's λ chosen on validation: "
        f"{selection['chosen']['lambda']} (validation means {lambdas} over the grid); every other method at its shipped setting. "
        "BASE+ADAPTER: adapters applied to the base, merged as full models; lora merge: the same merge re-factorized to one adapter of rank r.",
        "",
        runner.markdown_table(header, rows),
        "",
        "RMM: each task reverted from a basis of K adapters to its own adapter, scored on its own task "
        "(normalized = / the task's own adapter); retention: the lowest over the reverted adapters.",
        "",
    ]
    rmm_header = ["variant", "K", "storage"] + tasks + ["mean", "normalized"] + [f"{n} (retention)" for n in retention]
    rmm_rows = [
        [row["variant"], str(row["k"]), f"{row['storage']:.2f}"] + [f"{row['accuracy'][t]:.3f}" for t in tasks]
        + [f"{row['mean_accuracy']:.3f}", "–" if row["normalized"] is None else f"{row['normalized']:.3f}"] + [f"{row['retention'][n]:.3f}" for n in retention]
        for row in result["rmm"]
    ]
    lines += [runner.markdown_table(rmm_header, rmm_rows), "", f"Benchmark time {result['seconds']['total']:.0f} s on this machine.", ""]
    return "\n".join(lines)


def aggregate(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Over seeds: every merge as ``smol_quality.aggregate`` summarizes it (paired to task arithmetic on
    BASE+ADAPTER), and each RMM variant and K with the mean ± sample std of its own-task score, its share
    of the adapters' own scores, and its lowest retention."""
    from benchmarks import smol_quality
    from mergekit_ext.evaluate.protocol.stats import summary

    merged = smol_quality.aggregate(results, reference=results[0]["reference"])
    rmm = []
    for row in results[0]["rmm"]:
        same = [next(r for r in result["rmm"] if (r["variant"], r["k"]) == (row["variant"], row["k"])) for result in results]
        rmm.append(
            {
                "variant": row["variant"],
                "k": row["k"],
                "storage": summary([r["storage"] for r in same]),
                "mean_accuracy": summary([r["mean_accuracy"] for r in same]),
                "normalized": summary([r["normalized"] for r in same]),
                "retention": {name: summary([r["retention"][name] for r in same]) for name in merged["retention_tasks"]},
            }
        )
    return {
        **merged,
        "adapter_rank": [r["adapter_rank"] for r in results],
        "lambda": [r["selection"][REFERENCE]["chosen"]["lambda"] for r in results],
        "rmm": rmm,
        "seconds": [r["seconds"]["total"] for r in results],
    }


def rmm_aggregate_table(agg: Dict[str, Any]) -> str:
    retention = agg["retention_tasks"]
    header = ["RMM variant", "K", "storage", "own-task exact match", "/ own adapter"] + [f"{n} (retention, lowest)" for n in retention]
    rows = [
        [row["variant"], str(row["k"]), f"{row['storage']['mean']:.2f}", pm(row["mean_accuracy"]), pm(row["normalized"])]
        + [pm(row["retention"][n]) for n in retention]
        for row in agg["rmm"]
    ]
    return runner.markdown_table(header, rows) + "\n"


def render_aggregate_markdown(agg: Dict[str, Any]) -> str:
    seeds = len(agg["seeds"])
    return "\n".join(
        [
            f"# LoRA adapters of SmolLM2-135M-Instruct merged: {seeds} seeds",
            "",
            f"Test split of {seeds} smol zoos (seeds {', '.join(map(str, agg['seeds']))}), {agg['test_items_per_task']} items per task and seed; "
            f"mean ± sample std over seeds. task arithmetic's λ chosen on validation per seed ({', '.join(map(str, agg['lambda']))}); "
            "every other method at its shipped setting. − task arithmetic: the paired per-seed difference to task arithmetic "
            "(BASE+ADAPTER); paired z: that difference over its paired standard error on the seed's items; beyond noise: paired t "
            "over seeds above the 95 % critical value. `lora expert`: each adapter on its own task, retention the lowest over the adapters.",
            "",
            aggregate_table(agg),
            "RMM: each task reverted from a basis of K adapters to its own adapter, scored on its own task "
            "(/ own adapter: the mean share of each task's own adapter score); retention: the lowest over the reverted adapters.",
            "",
            rmm_aggregate_table(agg),
            f"Benchmark time per seed: {', '.join(f'{s:.0f}' for s in agg['seconds'])} s on this machine.",
            "",
        ]
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_smol_arguments(parser, zoo_required=False)
    parser.add_argument("--update", metavar="RESULT_JSON", help="add the norm-scaled TSV-M row to this seed's result, on the same items")
    dispatch(parser, argv, run=run, update=update, aggregate=aggregate, render=render_markdown, render_aggregate=render_aggregate_markdown)


if __name__ == "__main__":
    main()
