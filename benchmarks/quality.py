"""Quality: every method of this package and mergekit's baselines on a zoo.

The papers' protocol: each method's free hyperparameters are chosen on the
VALIDATION split from a small grid (the same size, GRID_SIZE settings, for every
method that has free hyperparameters), and the chosen setting is reported on
the TEST split. Merges go through mergekit's engine (``run_merge``, in
process); accuracies come from lm-eval via ``mergekit_ext.evaluate``. Writes
results/quality.md, quality.json and quality.png.

    mergekit-ext zoo benchmarks/work/zoo-demo --preset demo
    python benchmarks/quality.py --zoo benchmarks/work/zoo-demo
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import runner  # noqa: E402

GRID_SIZE = 4


def product(**axes: Sequence[Any]) -> List[Dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[name] for name in names))]


LAMBDAS = (0.25, 0.5, 0.75, 1.0)
# TIES-family: disjoint SUM (normalize: false) scaled by lambda, as in the TIES paper.
TIES_GRID = [dict(setting, weight=1.0, normalize=False) for setting in product(density=(0.2, 0.5), **{"lambda": (0.5, 1.0)})]

# (fixed parameters, grid) per method. Fixed parameters apply to every setting.
GRIDS: Dict[str, List[Dict[str, Any]]] = {
    # No free hyperparameter: the plain average of the experts, and Model Stock's closed form.
    "linear": [dict(weight=1.0, normalize=True)],
    "model_stock": [dict()],
    "task_arithmetic": [{"weight": 1.0, "lambda": value} for value in LAMBDAS],
    "ties": TIES_GRID,
    "dare_ties": TIES_GRID,
    "breadcrumbs_ties": [dict(setting, gamma=0.01) for setting in TIES_GRID],
    "della": [dict(setting, epsilon=0.1) for setting in TIES_GRID],
    # Ours. Consensus keeps the paper's mask defaults (λt 0.4, k 2) and tunes the
    # final scale like task arithmetic / TIES.
    "consensus_ta": [{"k": 2, "tall_lambda": 0.4, "lambda": value} for value in LAMBDAS],
    "consensus_ties": [dict(k=2, tall_lambda=0.4, **setting) for setting in product(density=(0.2, 0.5), **{"lambda": (0.5, 1.0)})],
    # CART: around the paper's starting points (2.0 / 0.12 vision, 1.3 / 0.01 GPT-2).
    "cart": product(rank_ratio=(0.05, 0.15), **{"lambda": (1.3, 2.0)}),
    # OPCM in mergekit-yaml (per-tensor norm matching): its one free parameter.
    "opcm": [{"alpha": value} for value in (0.3, 0.5, 0.7, 0.9)],
    # RMM product space: basis size K and the weight of each reconstructed delta.
    "rmm": product(k=(1, 2), weight=(0.5, 1.0)),
}


def grid_for(method: str) -> List[Dict[str, Any]]:
    if method in GRIDS:
        return GRIDS[method]
    # A method registered after this file was written: tune its lambda if it has one.
    names = {parameter.name for parameter in runner.method_spec(method).parameters}
    if "lambda" in names:
        return [{"lambda": value} for value in LAMBDAS]
    return [dict()]


def quality_specs(methods: Optional[Sequence[str]]) -> Dict[str, List[runner.MergeSpec]]:
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
        specs[name] = [runner.MergeSpec(f"{name}#{index}", name, setting, use_base=use_base) for index, setting in enumerate(grid_for(name))]
    return specs


def score_in_process(zoo, merged_paths: Dict[str, Path], *, split: str, device: str) -> Dict[str, Any]:
    """Per-task accuracy of each merged model with the zoo's in-process scorer.

    ``zoo.multiple_choice_accuracy`` computes exactly lm-eval's ``acc`` (same
    requests, same sum of continuation log-probs; tests/test_evaluate.py checks
    the two agree) without lm-eval's per-request overhead: the grid's many
    validation runs use it, the reported test numbers come from lm-eval itself.
    """
    from transformers import AutoTokenizer

    from mergekit_ext.zoo import load_causal_lm, multiple_choice_accuracy

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    documents = {task: zoo.documents(task, split) for task in zoo.tasks}
    models: Dict[str, Any] = {}
    for label, path in tqdm(merged_paths.items(), desc=f"score {split}", unit="model"):
        model = load_causal_lm(path, device)
        with torch.no_grad():
            accuracy = {task: multiple_choice_accuracy(model, tokenizer, documents[task], device=device) for task in zoo.tasks}
        models[label] = {"model": str(path), "accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy)}
        del model
    return {"split": split, "scorer": "in-process (zoo.multiple_choice_accuracy, = lm-eval acc)", "tasks": list(zoo.tasks), "models": models}


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
    best = max(range(len(scores)), key=lambda index: (scores[index][0], -index))
    selection["adarank"] = {
        "grid": rows,
        "validation_mean_accuracy": [score for score, _, _ in scores],
        "label": scores[best][1],
        "chosen": rows[best],
        "chosen_validation_mean_accuracy": scores[best][0],
        "merge_seconds": scores[best][2],
    }


def run(args) -> Dict[str, Any]:
    from mergekit_ext.evaluate import compare_on_zoo
    from mergekit_ext.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    experts = [zoo.expert(task) for task in zoo.tasks]
    work = Path(args.work_dir) / "quality" / Path(zoo.root).name
    specs = quality_specs(args.methods)
    merged_paths: Dict[str, Path] = {}
    merge_seconds: Dict[str, float] = {}
    failures: Dict[str, str] = {}
    all_specs = [spec for rows in specs.values() for spec in rows]
    for spec in tqdm(all_specs, desc="merging", unit="merge"):
        out = work / spec.label.replace("#", "-")
        try:
            merge_seconds[spec.label] = runner.run_in_process(runner.merge_config(spec, zoo.base, experts, dtype="float32"), out, device=args.device)
            merged_paths[spec.label] = out
        except Exception as error:  # a failing method is reported, not fatal for the others
            failures[spec.label] = f"{type(error).__name__}: {error}"
            tqdm.write(f"merge {spec.label} failed: {failures[spec.label]}")

    if args.validation_scorer == "lm-eval":
        validation = compare_on_zoo(zoo.root, merged_paths, split="validation", device=args.device, batch_size=args.batch_size)
    else:
        validation = score_in_process(zoo, merged_paths, split="validation", device=args.device)
    chosen: Dict[str, runner.MergeSpec] = {}
    selection: Dict[str, Any] = {}
    for method, rows in specs.items():
        scored = [(validation["models"][spec.label]["mean_accuracy"], index, spec) for index, spec in enumerate(rows) if spec.label in merged_paths]
        if not scored:
            continue
        best_score, _, best = max(scored, key=lambda item: (item[0], -item[1]))  # ties: the first setting
        chosen[method] = best
        selection[method] = {
            "grid": [dict(spec.parameters) for spec in rows],
            "validation_mean_accuracy": [validation["models"][spec.label]["mean_accuracy"] if spec.label in merged_paths else None for spec in rows],
            "label": best.label,
            "chosen": dict(best.parameters),
            "chosen_validation_mean_accuracy": best_score,
            "merge_seconds": merge_seconds.get(best.label),
        }
    if not args.methods or "adarank" in args.methods:
        adarank_selection(zoo, chosen, selection, merged_paths, work, args)
    test = compare_on_zoo(zoo.root, {method: merged_paths[info["label"]] for method, info in selection.items()}, split="test", device=args.device, batch_size=args.batch_size)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        **runner.zoo_context(zoo),
        "zoo_parameters": zoo.manifest.get("parameters"),
        "grid_size": GRID_SIZE,
        "selection": selection,
        "failures": failures,
        "validation_report": validation,
        "test_report": test,
    }


def render_markdown(result: Dict[str, Any]) -> str:
    from mergekit_ext.evaluate import format_markdown

    test = result["test_report"]
    machine = result["machine"]
    models = test["models"]
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
                f"{chosen['chosen_validation_mean_accuracy']:.3f}" if chosen else "–",
                (", ".join(f"{key}={value}" for key, value in chosen["chosen"].items()) or "(defaults)") if chosen else "–",
            ]
        )
    lines = [
        f"# Quality on the `{result['preset']}` zoo",
        "",
        f"Zoo: {result['zoo']} ({result['zoo_parameters']:,} parameters per model, tasks: {', '.join(test['tasks'])}). "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; {machine['date_utc']} UTC.",
        f"Protocol: every method's setting chosen on the validation split (mean accuracy) from its grid "
        f"({GRID_SIZE} settings for every method with free hyperparameters; `linear` and `model_stock` have none), "
        "then reported on the test split. Test accuracy is lm-eval `acc` (4-way multiple choice); normalized = merged / "
        "the task's own expert. Validation scorer: "
        + result["validation_report"].get("scorer", "lm-eval")
        + ". Merges: mergekit `run_merge` on the zoo's full fine-tunes, float32.",
        "",
        "## Test split, mean over tasks (ranked by test accuracy)",
        "",
        runner.markdown_table(["method", "test acc", "normalized", "validation acc", "chosen setting"], rows),
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
    lines += [runner.markdown_table(["method", "setting", "validation acc"], grid_rows), ""]
    if result["failures"]:
        lines += ["## Failed merges", ""] + [f"- {label}: {error}" for label, error in result["failures"].items()] + [""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_zoo_arguments(parser, name="quality", zoo_required=False)
    parser.add_argument("--render", metavar="JSON", help="only re-render the Markdown of an earlier quality.json")
    parser.add_argument("--methods", nargs="+", help="subset of methods (default: all of ours and mergekit's baselines)")
    parser.add_argument(
        "--validation-scorer",
        choices=("fast", "lm-eval"),
        default="fast",
        help="how the grid is scored on validation: the in-process scorer that equals lm-eval's acc (fast), or lm-eval itself",
    )
    args = parser.parse_args(argv)
    if args.render:
        import json

        Path(args.render).with_suffix(".md").write_text(render_markdown(json.loads(Path(args.render).read_text())))
        return
    if not args.zoo:
        parser.error("--zoo is required")
    runner.apply_threads(args)
    result = run(args)
    from mergekit_ext.evaluate import write_chart

    out_dir = runner.save_results(args.out_dir, args.name, result, render_markdown(result))
    write_chart(result["test_report"], out_dir / f"{args.name}.png")


if __name__ == "__main__":
    main()
