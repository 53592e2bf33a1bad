"""Quality: every method of this package and mergekit's baselines on a zoo.

The papers' protocol: each method's free hyperparameters are chosen on the
VALIDATION split from a grid (the same size for every method that has free
hyperparameters: 4 settings on the multiple-choice zoos, 9 on the generation
zoo ``hard``), and the chosen setting is reported on the TEST split.

The grid is merged in memory by mergekit's own engine
(``zoo.merge_in_memory`` = ``mergekit.merge_methods.merge_state_dicts``) and
scored by the zoo's in-process scorer, which equals lm-eval's metric exactly
(``acc`` or greedy ``exact_match``; tests/test_evaluate.py and
tests/test_zoo.py check that). Each method's chosen setting is then merged
again through ``run_merge`` (the engine ``mergekit-yaml`` runs) into a model
folder, re-scored on validation (``validation_disk`` in the JSON: it must
equal the in-memory number), and evaluated on test by lm-eval itself.
Writes results/<name>.{md,json,png}.

    mergekit-ext zoo benchmarks/work/zoo-hard-s0 --preset hard --seed 0
    python benchmarks/quality.py --zoo benchmarks/work/zoo-hard-s0 --name quality-hard-s0
    # over seeds: mean ± std per method, paired difference to task arithmetic per seed
    python benchmarks/quality.py --aggregate results/quality-hard-s0.json results/quality-hard-s1.json \\
        results/quality-hard-s2.json --name quality-hard
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import runner  # noqa: E402

from mergekit_ext.evaluate.protocol import grids as _grids  # noqa: E402
from mergekit_ext.evaluate.protocol import scorer as _scorer  # noqa: E402
from mergekit_ext.evaluate.protocol import stats  # noqa: E402
from mergekit_ext.evaluate.protocol.selection import select  # noqa: E402

# The grids live in the protocol's one table (mergekit_ext/evaluate/protocol/grids.py).
GRID_SIZE, HARD_GRID_SIZE = _grids.GRID_SIZE, _grids.HARD_GRID_SIZE
LAMBDAS, WIDE_LAMBDAS = _grids.LAMBDAS, _grids.WIDE_LAMBDAS
product, paired = _grids.product, _grids.paired
GRIDS: Dict[str, List[Dict[str, Any]]] = _grids.QUALITY_GRIDS[_grids.MULTIPLE_CHOICE]
HARD_GRIDS: Dict[str, List[Dict[str, Any]]] = _grids.QUALITY_GRIDS[_grids.GENERATION]
assert all(len(grid) == HARD_GRID_SIZE for name, grid in HARD_GRIDS.items() if name not in ("linear", "model_stock"))
# Wider validation-only sweeps for the defaults (`--defaults-sweep`): not part of the
# quality table, only evidence for the constants in methods/<family>/__init__.py.
SWEEP_GRIDS: Dict[str, List[Dict[str, Any]]] = _grids.SWEEP_GRIDS


def defaults_sweep(args) -> Dict[str, Any]:
    """Validation only: SWEEP_GRIDS merged in memory and scored in process."""
    from mergekit_ext.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    methods = [m for m in SWEEP_GRIDS if not args.methods or m in args.methods]
    specs = {m: [runner.MergeSpec(f"{m}#{i}", m, setting, use_base=True if m == "cart" else None) for i, setting in enumerate(SWEEP_GRIDS[m])] for m in methods}
    validation, failures, seconds = _grid_in_memory(zoo, specs, args)
    grids = {
        m: [{"setting": dict(spec.parameters), "validation": validation["models"].get(spec.label, {}).get("mean_accuracy")} for spec in rows]
        for m, rows in specs.items()
    }
    return {**runner.zoo_context(zoo), "seed": zoo.manifest.get("seed"), "sweep": grids, "failures": failures, "validation_report": validation}


def grids_for_kind(kind: str) -> Dict[str, List[Dict[str, Any]]]:
    return HARD_GRIDS if kind == "generation" else GRIDS


def grid_for(method: str, kind: str = "multiple_choice") -> List[Dict[str, Any]]:
    if method in grids_for_kind(kind):
        return grids_for_kind(kind)[method]
    # A method registered after the table was written: tune its lambda if it has one.
    return _grids.quality_grid(method, kind, [parameter.name for parameter in runner.method_spec(method).parameters])


def quality_specs(methods: Optional[Sequence[str]], kind: str = "multiple_choice") -> Dict[str, List[runner.MergeSpec]]:
    names = list(runner.MERGEKIT_BASELINES) + runner.our_method_names()
    if methods:
        unknown = sorted(set(methods) - set(names) - {"adarank"})  # adarank: learned after the grid
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; known: {names}")
        names = [name for name in names if name in methods]
    specs: Dict[str, List[runner.MergeSpec]] = {}
    for name in names:
        # linear averages the experts only; every other method gets the base when it can use one.
        use_base = False if name == "linear" else (True if name == "cart" else None)
        specs[name] = [runner.MergeSpec(f"{name}#{index}", name, setting, use_base=use_base) for index, setting in enumerate(grid_for(name, kind))]
    return specs


# The protocol's in-process scorer (= lm-eval's acc / greedy exact_match).
Scorer = _scorer.Scorer
SCORER_NAMES = _scorer.SCORER_NAMES


def score_in_process(zoo, merged_paths: Dict[str, Path], *, split: str, device: str) -> Dict[str, Any]:
    """Per-task score of each merged model folder with the zoo's in-process scorer (= lm-eval's metric)."""
    scorer = Scorer(zoo, split, device)
    models: Dict[str, Any] = {}
    for label, path in tqdm(merged_paths.items(), desc=f"score {split}", unit="model"):
        models[label] = {"model": str(path), **scorer(path=path)}
    return {"split": split, "scorer": SCORER_NAMES[zoo.task_kind], "tasks": list(zoo.tasks), "models": models}


def adarank_selection(zoo, chosen: Dict[str, runner.MergeSpec], selection: Dict[str, Any], merged_paths: Dict[str, Path], work: Path, args) -> None:
    """AdaRank on top of the chosen Task Arithmetic and CART settings.

    AdaRank is itself a tuning method: it starts from a base method's setting
    (its prior) and learns masks and coefficients from the UNLABELED validation
    prompts. Its grid is the two variants, each from its base method's
    validation winner with the learner's defaults (steps, lr); the variant with
    the better validation accuracy is reported on test.
    """
    from mergekit_ext.methods.adarank.format import write_learned_file
    from mergekit_ext.methods.adarank.learn import LearnOptions, learn, zoo_prompts

    rows, scores = [], []
    for variant, base_method in (("ta", "task_arithmetic"), ("cart", "cart")):
        if base_method not in chosen:
            continue
        setting = dict(chosen[base_method].parameters)
        options = LearnOptions(
            variant=variant,
            prior=float(setting["lambda"]),
            init_rank_ratio=float(setting["rank_ratio"]) if variant == "cart" else 1.0,
            device=args.device,
        )
        label = f"adarank#{variant}"
        file = work / f"adarank-{variant}.safetensors"
        started = time.perf_counter()
        try:
            result = learn([zoo.expert(t) for t in zoo.tasks], [zoo_prompts(zoo, t) for t in zoo.tasks], base=zoo.base, options=options, task_names=zoo.tasks)
            write_learned_file(file, result.masks, result.coefficients, result.info)
            spec = runner.MergeSpec(label, "adarank", {"file": str(file)}, use_base=variant == "ta")
            runner.run_in_process(runner.merge_config(spec, zoo.base, [zoo.expert(t) for t in zoo.tasks], dtype="float32"), work / label.replace("#", "-"), device=args.device)
        except Exception as error:  # reported, not fatal for the other methods
            tqdm.write(f"adarank {variant} failed: {type(error).__name__}: {error}")
            continue
        merged_paths[label] = work / label.replace("#", "-")
        score = score_in_process(zoo, {label: merged_paths[label]}, split="validation", device=args.device)["models"][label]["mean_accuracy"]
        rows.append({"variant": variant, "prior": options.prior, "init_rank_ratio": options.init_rank_ratio, "steps": options.steps, "lr": options.lr, "from": base_method})
        scores.append((score, label, time.perf_counter() - started))
    if not scores:
        return
    best = select(range(len(scores)), [score for score, _, _ in scores]).index  # ties: the first variant
    selection["adarank"] = {
        "grid": rows,
        "validation_mean_accuracy": [score for score, _, _ in scores],
        "label": scores[best][1],
        "chosen": rows[best],
        "chosen_validation_mean_accuracy": scores[best][0],
        "merge_seconds": scores[best][2],
    }


def _grid_in_memory(zoo, specs: Dict[str, List[runner.MergeSpec]], args) -> Dict[str, Any]:
    """Every grid point merged in memory by mergekit's engine and scored on validation in process."""
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import merge_in_memory

    base = load_state_dict(zoo.base)
    experts = {task: load_state_dict(zoo.expert(task)) for task in zoo.tasks}
    scorer = Scorer(zoo, "validation", args.device)
    models: Dict[str, Any] = {}
    failures: Dict[str, str] = {}
    seconds: Dict[str, Dict[str, float]] = {}
    all_specs = [spec for rows in specs.values() for spec in rows]
    for spec in tqdm(all_specs, desc="grid (merge in memory + score validation)", unit="merge"):
        use_base = runner.needs_base(spec.method) if spec.use_base is None else spec.use_base
        started = time.perf_counter()
        try:
            torch.manual_seed(0)  # DARE/DELLA drop at random: the same draw in memory and on disk
            with torch.no_grad():
                merged = merge_in_memory(base, experts, spec.method, dict(spec.parameters), use_base=use_base)
        except Exception as error:  # a failing method is reported, not fatal for the others
            failures[spec.label] = f"{type(error).__name__}: {error}"
            tqdm.write(f"merge {spec.label} failed: {failures[spec.label]}")
            continue
        merged_at = time.perf_counter()
        models[spec.label] = scorer(state=merged)
        seconds[spec.label] = {"merge": merged_at - started, "score": time.perf_counter() - merged_at}
        del merged
    return {"split": "validation", "scorer": SCORER_NAMES[zoo.task_kind] + ", merged in memory", "tasks": list(zoo.tasks), "models": models}, failures, seconds


def run(args) -> Dict[str, Any]:
    from mergekit_ext.evaluate import compare_on_zoo
    from mergekit_ext.zoo import load_zoo

    started = time.perf_counter()
    zoo = load_zoo(args.zoo)
    kind = zoo.task_kind
    experts = [zoo.expert(task) for task in zoo.tasks]
    work = Path(args.work_dir) / "quality" / Path(zoo.root).name
    specs = quality_specs(args.methods, kind)
    merged_paths: Dict[str, Path] = {}
    grid_seconds: Dict[str, Any] = {}
    failures: Dict[str, str] = {}
    in_memory = args.grid == "memory" and args.validation_scorer == "fast"
    if in_memory:
        validation, failures, grid_seconds = _grid_in_memory(zoo, specs, args)
    else:
        all_specs = [spec for rows in specs.values() for spec in rows]
        for spec in tqdm(all_specs, desc="merging", unit="merge"):
            out = work / spec.label.replace("#", "-")
            try:
                torch.manual_seed(0)
                grid_seconds[spec.label] = {"merge": runner.run_in_process(runner.merge_config(spec, zoo.base, experts, dtype="float32"), out, device=args.device)}
                merged_paths[spec.label] = out
            except Exception as error:  # a failing method is reported, not fatal for the others
                failures[spec.label] = f"{type(error).__name__}: {error}"
                tqdm.write(f"merge {spec.label} failed: {failures[spec.label]}")
        if args.validation_scorer == "lm-eval":
            validation = compare_on_zoo(zoo.root, merged_paths, split="validation", device=args.device, batch_size=args.batch_size)
        else:
            validation = score_in_process(zoo, merged_paths, split="validation", device=args.device)
    grid_done = time.perf_counter()

    chosen: Dict[str, runner.MergeSpec] = {}
    selection: Dict[str, Any] = {}
    for method, rows in specs.items():
        scores = [validation["models"][spec.label]["mean_accuracy"] if spec.label in validation["models"] else None for spec in rows]
        if all(score is None for score in scores):
            continue
        picked = select(rows, scores)  # ties: the first setting; failed merges are never chosen
        best = chosen[method] = picked.setting
        selection[method] = {
            "grid": [dict(spec.parameters) for spec in rows],
            "validation_mean_accuracy": picked.scores,
            "label": best.label,
            "chosen": dict(best.parameters),
            "chosen_validation_mean_accuracy": picked.score,
            "merge_seconds": (grid_seconds.get(best.label) or {}).get("merge"),
        }
    if in_memory:
        # The chosen settings through run_merge (what mergekit-yaml runs), to folders lm-eval loads.
        validation_disk = {}
        disk_paths = {}
        for method, spec in tqdm(chosen.items(), desc="chosen settings through run_merge", unit="merge"):
            out = work / spec.label.replace("#", "-")
            try:
                torch.manual_seed(0)
                selection[method]["run_merge_seconds"] = runner.run_in_process(runner.merge_config(spec, zoo.base, experts, dtype="float32"), out, device=args.device)
            except Exception as error:
                failures[spec.label + " (run_merge)"] = f"{type(error).__name__}: {error}"
                selection.pop(method)
                continue
            merged_paths[spec.label] = out
            disk_paths[method] = out
        disk_scores = score_in_process(zoo, disk_paths, split="validation", device=args.device)["models"]
        for method, entry in disk_scores.items():
            selection[method]["validation_disk"] = entry["mean_accuracy"]
            validation_disk[method] = entry["mean_accuracy"] - selection[method]["chosen_validation_mean_accuracy"]
    if (not args.methods and kind != "generation") or (args.methods and "adarank" in args.methods):
        # AdaRank's hook: learned after the grid on top of the chosen TA and CART settings.
        adarank_selection(zoo, chosen, selection, merged_paths, work, args)
    test = compare_on_zoo(
        zoo.root,
        {method: merged_paths[info["label"]] for method, info in selection.items()},
        split="test",
        device=args.device,
        batch_size=args.batch_size,
        threads=getattr(args, "threads", None),
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    finished = time.perf_counter()
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest.get("seed"),
        "kind": kind,
        "metric": test["metric"],
        "zoo_parameters": zoo.manifest.get("parameters"),
        "zoo_build_seconds": zoo.manifest.get("build_seconds"),
        "zoo_build": zoo.manifest.get("metrics", {}).get("build"),
        "zoo_task_arithmetic": zoo.manifest.get("metrics", {}).get("task_arithmetic", {}).get("lambda"),
        "grid_size": HARD_GRID_SIZE if kind == "generation" else GRID_SIZE,
        "grid_merge": "memory (merge_state_dicts), chosen settings again through run_merge" if in_memory else "run_merge",
        "selection": selection,
        "failures": failures,
        "grid_seconds": grid_seconds,
        "seconds": {"grid": round(grid_done - started, 1), "total": round(finished - started, 1)},
        "validation_report": validation,
        "test_report": test,
    }


def metric_words(result: Dict[str, Any]) -> str:
    if result.get("kind") == "generation":
        return "lm-eval `exact_match` (greedy generation until `\\n`, case- and whitespace-exact)"
    return "lm-eval `acc` (4-way multiple choice)"


def render_markdown(result: Dict[str, Any]) -> str:
    from mergekit_ext.evaluate import format_markdown

    test = result["test_report"]
    machine = result["machine"]
    models = test["models"]
    score_name = "test EM" if result.get("kind") == "generation" else "test acc"
    rows = []
    ranked = sorted((label for label in models if label not in ("base", "expert")), key=lambda label: -(models[label]["mean_accuracy"] or 0))
    for label in ["base", "expert"] + ranked:
        model = models[label]
        chosen = result["selection"].get(label, {})
        rows.append(
            [
                label,
                f"{model['mean_accuracy']:.3f}",
                f"{model['mean_normalized_accuracy']:.3f}" if model.get("mean_normalized_accuracy") is not None else "–",
                f"{gain_normalized(test, label):.3f}" if label not in ("base", "expert") else "–",
                f"{chosen['chosen_validation_mean_accuracy']:.3f}" if chosen else "–",
                (", ".join(f"{key}={value}" for key, value in chosen["chosen"].items()) or "(defaults)") if chosen else "–",
            ]
        )
    grid_size = result.get("grid_size", GRID_SIZE)
    lines = [
        f"# Quality on the `{result['preset']}` zoo" + (f" (seed {result['seed']})" if result.get("seed") is not None else ""),
        "",
        f"Zoo: {result['zoo']} ({result['zoo_parameters']:,} parameters per model, tasks: {', '.join(test['tasks'])}). "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; {machine['date_utc']} UTC.",
        f"Protocol: every method's setting chosen on the validation split (mean over tasks) from its grid "
        f"({grid_size} settings for every method with free hyperparameters; `linear` and `model_stock` have none), "
        f"then reported on the test split. Test score: {metric_words(result)}; normalized = merged / "
        "the task's own expert; gain-normalized = (merged − base) / (expert − base), mean over tasks. Validation scorer: "
        + result["validation_report"].get("scorer", "lm-eval")
        + f". Merges: mergekit's engine on the zoo's full fine-tunes, float32 ({result.get('grid_merge', 'run_merge')}).",
        "",
        "## Test split, mean over tasks (ranked)",
        "",
        runner.markdown_table([("method"), score_name, "normalized", "gain-normalized", "validation", "chosen setting"], rows),
        "",
        "## Test split, per task",
        "",
        format_markdown(test),
        "## Validation grid",
        "",
    ]
    grid_rows = []
    for method, info in result["selection"].items():
        for setting, score in zip(info["grid"], info["validation_mean_accuracy"]):
            marker = " ←" if setting == info["chosen"] else ""
            grid_rows.append([method, ", ".join(f"{k}={v}" for k, v in setting.items()) or "(defaults)", "failed" if score is None else f"{score:.3f}{marker}"])
    lines += [runner.markdown_table(["method", "setting", "validation"], grid_rows), ""]
    if result["failures"]:
        lines += ["## Failed merges", ""] + [f"- {label}: {error}" for label, error in result["failures"].items()] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Several seeds: mean ± std per method, paired differences to task arithmetic.

# The statistics are the protocol's (mergekit_ext/evaluate/protocol/stats.py).
T_CRITICAL = stats.T_CRITICAL
REFERENCE = "task_arithmetic"


def gain_normalized(report: Dict[str, Any], label: str) -> float:
    """Mean over tasks of (merged − base) / (expert − base): the share of the fine-tuning gain kept."""
    models = report["models"]
    values = []
    for task in report["tasks"]:
        base, expert = models["base"]["accuracy"][task], models["expert"]["accuracy"][task]
        if expert - base > 1e-9:
            values.append((models[label]["accuracy"][task] - base) / (expert - base))
    return sum(values) / len(values) if values else float("nan")


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return stats.summary(values)


def aggregate(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean ± std over seeds per method (and task), and each method's paired difference to task arithmetic."""
    seeds = [result.get("seed") for result in results]
    tasks = results[0]["test_report"]["tasks"]
    labels = [label for label in results[0]["test_report"]["models"] if all(label in r["test_report"]["models"] for r in results)]
    methods: Dict[str, Any] = {}
    for label in labels:
        per_seed = [r["test_report"]["models"][label] for r in results]
        entry: Dict[str, Any] = {
            "test": [m["mean_accuracy"] for m in per_seed],
            "test_mean_std": _mean_std([m["mean_accuracy"] for m in per_seed]),
            "per_task": {task: _mean_std([m["accuracy"][task] for m in per_seed]) for task in tasks},
            "test_stderr": [m.get("mean_stderr") for m in per_seed],
        }
        if label not in ("base", "expert"):
            entry["normalized"] = [m["mean_normalized_accuracy"] for m in per_seed]
            entry["normalized_mean_std"] = _mean_std(entry["normalized"])
            entry["gain_normalized"] = [gain_normalized(r["test_report"], label) for r in results]
            entry["gain_normalized_mean_std"] = _mean_std(entry["gain_normalized"])
            entry["chosen"] = [r["selection"].get(label, {}).get("chosen") for r in results]
            entry["validation"] = [r["selection"].get(label, {}).get("chosen_validation_mean_accuracy") for r in results]
            if REFERENCE in labels:
                reference = [r["test_report"]["models"][REFERENCE]["mean_accuracy"] for r in results]
                # Within a seed: the difference against the two means' lm-eval standard
                # errors combined as if independent (conservative: both are scored on the
                # same items, so the paired error is smaller).
                reference_se = [r["test_report"]["models"][REFERENCE].get("mean_stderr") for r in results]
                versus = stats.versus_reference([m["mean_accuracy"] for m in per_seed], reference, entry["test_stderr"], reference_se)
                entry["delta_vs_ta"] = versus["differences"]
                entry["delta_vs_ta_mean_std"] = versus["summary"]
                entry["delta_vs_ta_t"] = versus["t"]
                entry["delta_vs_ta_within_seed_z"] = versus["within_seed_z"]
                entry["seeds_better_2se"] = versus["seeds_better"]
                entry["seeds_worse_2se"] = versus["seeds_worse"]
                entry["beyond_noise"] = versus["beyond_noise"] and label != REFERENCE
        methods[label] = entry
    # The validation grids, per setting: mean over seeds (the evidence for the defaults).
    grids: Dict[str, Any] = {}
    for method, info in results[0]["selection"].items():
        if not all(method in r["selection"] for r in results):
            continue
        rows = []
        for index, setting in enumerate(info["grid"]):
            values = [r["selection"][method]["validation_mean_accuracy"][index] for r in results]
            winners = [r["selection"][method]["chosen"] == setting for r in results]
            rows.append({"setting": setting, "validation": values, "mean_std": _mean_std(values), "chosen_on_seeds": sum(winners)})
        grids[method] = rows
    regime = []
    for result in results:
        models = result["test_report"]["models"]
        ta = models.get(REFERENCE, {})
        regime.append(
            {
                "seed": result.get("seed"),
                "base": models["base"]["mean_accuracy"],
                "expert": models["expert"]["mean_accuracy"],
                "task_arithmetic": ta.get("mean_accuracy"),
                "task_arithmetic_lambda": result["selection"].get(REFERENCE, {}).get("chosen", {}).get("lambda"),
                "task_arithmetic_normalized": ta.get("mean_normalized_accuracy"),
                "task_arithmetic_gain_normalized": gain_normalized(result["test_report"], REFERENCE) if ta else None,
                "spread": max(models[l]["mean_accuracy"] for l in models if l not in ("base", "expert"))
                - min(models[l]["mean_accuracy"] for l in models if l not in ("base", "expert")),
                "zoo_build_seconds": result.get("zoo_build_seconds"),
                "zoo_build": result.get("zoo_build"),
                "benchmark_seconds": result.get("seconds", {}).get("total"),
            }
        )
    first = results[0]
    return {
        "machine": first["machine"],
        "preset": first["preset"],
        "kind": first.get("kind"),
        "metric": first.get("metric"),
        "seeds": seeds,
        "zoos": [r["zoo"] for r in results],
        "zoo_parameters": first.get("zoo_parameters"),
        "grid_size": first.get("grid_size"),
        "tasks": tasks,
        "test_items_per_task": _items(first),
        "methods": methods,
        "grids": grids,
        "regime": regime,
        "reference": REFERENCE,
        "note": "std is the sample standard deviation over seeds (independent zoos); delta_vs_ta is the paired per-seed difference "
        "of test means to task arithmetic; beyond_noise: |paired t| above the two-sided 95 % critical value of Student's t",
    }


def _items(result: Dict[str, Any]) -> Optional[int]:
    base = result["test_report"]["models"]["base"]["lm_eval"]
    counts = [entry.get("n-samples", {}).get("effective") for entry in base.values()]
    return counts[0] if counts and all(c == counts[0] for c in counts) else None


def _pm(stats: Dict[str, float], digits: int = 3) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


GRID_DESIGN_NOTE = """A first run on seed 0 with plain 3 x 3 grids (VALIDATION split only informed the change)
found optima on a grid edge: the TIES family at λ 0.5 of {0.5, 0.8, 1.1} (e.g. `ties` density 0.5:
0.571 / 0.381 / 0.098), `consensus_ta` at λt 0.2 with λ 0.5 of {0.5, 0.7, 0.9} (0.578) and at λt 0.4, 0.6
still rising at 0.9, `cart` at rank 0.05 best at λ 1.5 of {1.5, 2, 2.5} (0.627), `iso_cts` rising at λ 3.5
of {1.5, 2.5, 3.5} and `rmm` at k 4, weight 0.5 (0.569). The grids in `HARD_GRIDS` move those edges
outward (pairing each mask/rank/k value with the scales that suit it); the table above is the second,
complete run on all three seeds."""


def _fixed_keys(rows: Sequence[Dict[str, Any]]) -> set:
    """Parameters with one value over a method's whole grid (shown once in the protocol, not per row)."""
    settings = [row["setting"] for row in rows]
    if len(settings) < 2:
        return {"weight", "normalize"}
    return {key for key in settings[0] if all(s.get(key) == settings[0][key] for s in settings)}


def _verdict(entry: Dict[str, Any], label: str, seeds: int) -> str:
    """Beyond noise against task arithmetic: across seeds (paired t) and within every seed (> 2 SE)."""
    if label == REFERENCE:
        return "(reference)"
    if "beyond_noise" not in entry:
        return "–"
    d = entry["delta_vs_ta_mean_std"]["mean"]
    better, worse = entry.get("seeds_better_2se", 0), entry.get("seeds_worse_2se", 0)
    t = entry.get("delta_vs_ta_t", 0.0)
    if entry["beyond_noise"]:
        return f"**yes, {'better' if d > 0 else 'worse'}** (t {t:.1f}; beyond 2 SE within {better if d > 0 else worse}/{seeds} seeds)"
    if better == seeds:
        return f"better on every seed (> 2 SE each), t {t:.1f} across seeds"
    if worse == seeds:
        return f"worse on every seed (> 2 SE each), t {t:.1f} across seeds"
    return f"no (t {t:.1f}; {better} seeds > +2 SE, {worse} < −2 SE)"


def render_aggregate_markdown(agg: Dict[str, Any]) -> str:
    methods = agg["methods"]
    merged = [label for label in methods if label not in ("base", "expert")]
    ranked = sorted(merged, key=lambda label: -methods[label]["test_mean_std"]["mean"])
    seeds = agg["seeds"]
    ours = set(runner.our_method_names()) | {"adarank"}
    score = "exact match" if agg.get("kind") == "generation" else "accuracy"
    lines = [
        f"# Quality on the `{agg['preset']}` zoo, {len(seeds)} seeds ({', '.join(str(s) for s in seeds)})",
        "",
        f"Each seed is an independent zoo (`mergekit-ext zoo DIR --preset {agg['preset']} --seed N`): "
        f"{agg['zoo_parameters']:,} parameters per model, tasks {', '.join(agg['tasks'])}, "
        f"{agg['test_items_per_task'] or '?'} test items per task. Every method's setting is chosen on each seed's validation split "
        f"from a grid of {agg['grid_size']} (none for `linear`, `model_stock`) and reported on that seed's test split with lm-eval "
        f"({'`exact_match`, greedy generation' if agg.get('kind') == 'generation' else '`acc`'}). "
        "Mean ± sample standard deviation over seeds; normalized = merged / expert, gain-normalized = (merged − base) / (expert − base), "
        "both means over tasks. Δ vs TA: the paired per-seed difference of test means to task arithmetic. "
        "Beyond noise, two ways: across seeds, **yes** when |paired t| > the two-sided 95 % critical value of Student's t "
        f"({stats.t_critical(len(seeds) - 1):.2f} for {len(seeds) - 1} degrees of freedom: strict with so few seeds); within each seed, "
        "whether Δ exceeds 2 standard errors of the two lm-eval means combined as if independent (conservative: both are scored "
        "on the same items). Bold method names are this package's.",
        "",
        "## Test, mean over tasks",
        "",
    ]
    header = ["method", f"test {score}", "normalized", "gain-normalized"] + [f"Δ vs TA s{s}" for s in seeds] + ["Δ vs TA", "beyond noise?", "chosen settings (per seed)"]
    rows = []
    for label in ["base", "expert"] + ranked:
        entry = methods[label]
        name = f"**{label}**" if label in ours else label
        if label in ("base", "expert"):
            rows.append([name, _pm(entry["test_mean_std"]), "–", "–"] + ["–"] * len(seeds) + ["–", "–", "–"])
            continue
        deltas = entry.get("delta_vs_ta") or [None] * len(seeds)
        verdict = _verdict(entry, label, len(seeds))
        hidden = _fixed_keys(agg["grids"].get(label, []))
        chosen = "; ".join(", ".join(f"{k}={v}" for k, v in (c or {}).items() if k not in hidden) or "–" for c in entry.get("chosen", []))
        rows.append(
            [name, _pm(entry["test_mean_std"]), _pm(entry["normalized_mean_std"]), _pm(entry["gain_normalized_mean_std"])]
            + [("–" if d is None else f"{d:+.3f}") for d in deltas]
            + [_pm(entry.get("delta_vs_ta_mean_std", {})) if label != REFERENCE else "–", verdict, chosen]
        )
    lines += [runner.markdown_table(header, rows), ""]
    lines += ["## Test, per task (mean ± std over seeds)", ""]
    task_rows = [[label] + [_pm(methods[label]["per_task"][task], 2) for task in agg["tasks"]] for label in ["base", "expert"] + ranked]
    lines += [runner.markdown_table(["model"] + agg["tasks"], task_rows), ""]
    lines += ["## Regime per seed (test)", ""]
    regime_rows = []
    for r in agg["regime"]:
        build = r.get("zoo_build") or {}
        regime_rows.append(
            [
                r["seed"],
                f"{r['base']:.3f}",
                f"{r['expert']:.3f}",
                f"{r['expert'] - r['base']:+.3f}",
                f"{r['task_arithmetic']:.3f} (λ {r['task_arithmetic_lambda']})" if r["task_arithmetic"] is not None else "–",
                f"{r['task_arithmetic_normalized']:.3f}" if r["task_arithmetic_normalized"] is not None else "–",
                f"{r['task_arithmetic_gain_normalized']:.3f}" if r["task_arithmetic_gain_normalized"] is not None else "–",
                f"{r['spread']:.3f}",
                build.get("pretrain_steps_done", "–"),
                f"{r['zoo_build_seconds']:.0f} s" + (f" ({build['cpu_seconds']:.0f} s CPU)" if build.get("cpu_seconds") else ""),
                f"{r['benchmark_seconds']:.0f} s" if r.get("benchmark_seconds") else "–",
            ]
        )
    lines += [
        runner.markdown_table(
            ["seed", "base", "experts", "experts − base", "TA (λ)", "TA / expert", "TA gain-norm.", "best − worst merge", "pretrain steps", "zoo build (wall)", "benchmark (wall)"],
            regime_rows,
        ),
        "",
        "## Validation grids (mean ± std over seeds; how many seeds chose each setting)",
        "",
    ]
    grid_rows = []
    for method, rows_ in agg["grids"].items():
        if len(rows_) < 2:
            continue
        best = max(range(len(rows_)), key=lambda i: rows_[i]["mean_std"]["mean"])
        hidden = _fixed_keys(rows_)
        fixed = ", ".join(f"{k}={rows_[0]['setting'][k]}" for k in rows_[0]["setting"] if k in hidden)
        for index, row in enumerate(rows_):
            setting = ", ".join(f"{k}={v}" for k, v in row["setting"].items() if k not in hidden)
            grid_rows.append([method + (f" ({fixed})" if fixed and index == 0 else ""), setting, _pm(row["mean_std"]) + (" ←" if index == best else ""), " ".join(f"{v:.3f}" for v in row["validation"]), row["chosen_on_seeds"]])
    lines += [runner.markdown_table(["method", "setting", "validation (mean ± std)", "per seed", "chosen on seeds"], grid_rows), ""]
    if agg.get("kind") == "generation":
        lines += ["## Grid design", "", GRID_DESIGN_NOTE, ""]
    return "\n".join(lines)


def write_aggregate_chart(agg: Dict[str, Any], path: Path) -> Path:
    """Bars: test score per task and mean, mean over seeds, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergekit_ext.evaluate.report import palette

    methods = agg["methods"]
    merged = sorted((l for l in methods if l not in ("base", "expert")), key=lambda l: -methods[l]["test_mean_std"]["mean"])
    labels = ["base", "expert"] + merged
    groups = agg["tasks"] + ["mean"]
    width = 0.85 / len(labels)
    colours = palette(len(labels))
    figure, axis = plt.subplots(figsize=(16, 5.2), dpi=110)
    for index, label in enumerate(labels):
        entry = methods[label]
        stats = [entry["per_task"][g] if g != "mean" else entry["test_mean_std"] for g in groups]
        positions = [g + (index - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, [s["mean"] for s in stats], width, label=label, color=colours[index], yerr=[s["std"] for s in stats], capsize=1.5, error_kw={"elinewidth": 0.7, "alpha": 0.8})
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(groups)
    axis.set_ylim(0, 1.0)
    score = "exact match" if agg.get("kind") == "generation" else "accuracy"
    axis.set_ylabel(f"test {score} (mean ± std over {len(agg['seeds'])} seeds)")
    axis.set_title(f"Quality on the {agg['preset']} zoo, seeds {', '.join(str(s) for s in agg['seeds'])}: lm-eval {score}, settings chosen on validation")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_zoo_arguments(parser, name="quality", zoo_required=False)
    parser.add_argument("--render", metavar="JSON", help="only re-render the Markdown of an earlier quality.json")
    parser.add_argument("--aggregate", nargs="+", metavar="JSON", help="combine per-seed result files into <name>.{md,json,png}")
    parser.add_argument("--methods", nargs="+", help="subset of methods (default: all of ours and mergekit's baselines; `adarank` runs its hook)")
    parser.add_argument(
        "--validation-scorer",
        choices=("fast", "lm-eval"),
        default="fast",
        help="how the grid is scored on validation: the in-process scorer that equals lm-eval's metric (fast), or lm-eval itself",
    )
    parser.add_argument(
        "--grid",
        choices=("memory", "disk"),
        default="memory",
        help="merge the grid in memory (merge_state_dicts; chosen settings again through run_merge) or every setting through run_merge",
    )
    parser.add_argument("--defaults-sweep", action="store_true", help="validation only: the wider SWEEP_GRIDS, evidence for the defaults")
    args = parser.parse_args(argv)
    import json

    if args.render:
        result = json.loads(Path(args.render).read_text())
        text = render_aggregate_markdown(result) if "methods" in result and "seeds" in result else render_markdown(result)
        Path(args.render).with_suffix(".md").write_text(text)
        return
    if args.aggregate:
        agg = aggregate([json.loads(Path(p).read_text()) for p in args.aggregate])
        out_dir = runner.save_results(args.out_dir, args.name, agg, render_aggregate_markdown(agg))
        write_aggregate_chart(agg, out_dir / f"{args.name}.png")
        return
    if not args.zoo:
        parser.error("--zoo is required")
    runner.apply_threads(args)
    if args.defaults_sweep:
        sweep = defaults_sweep(args)
        lines = [f"# Defaults sweep (validation only), {sweep['zoo']}", ""]
        for method, rows in sweep["sweep"].items():
            lines += [f"## {method}", "", runner.markdown_table(["setting", "validation"], [[", ".join(f"{k}={v}" for k, v in r["setting"].items()), "failed" if r["validation"] is None else f"{r['validation']:.3f}"] for r in rows]), ""]
        runner.save_results(args.out_dir, args.name, sweep, "\n".join(lines), echo=False)
        return
    result = run(args)
    from mergekit_ext.evaluate import write_chart

    out_dir = runner.save_results(args.out_dir, args.name, result, render_markdown(result))
    write_chart(result["test_report"], out_dir / f"{args.name}.png")


if __name__ == "__main__":
    main()
