"""Quality on a real pretrained LLM: every merge method on a `smol` zoo (SmolLM2-135M-Instruct experts).

What a user of mergekit gets without tuning, against the one baseline that the
study of real LLM merges (arXiv 2511.21437) finds reliable:

* ``base`` and each ``expert`` on its own task (the zoo's build scores);
* ``task_arithmetic`` with its λ chosen on the VALIDATION split (mean exact
  match over the instruction tasks) from its grid: the reference;
* every other method of this package and of mergekit at its shipped setting
  (our methods' documented defaults, mergekit's methods as the recipes in
  ``recipes/`` set them); no validation is spent on them, so the comparison
  with the tuned reference is conservative for them.

The settings are the ``smol`` entries of the protocol's grid table
(``mergekit_ext.evaluate.protocol.grids.SMOL_GRIDS``).

Every merge runs through mergekit's own engine (``merge_state_dicts``) and is
scored on the TEST split by the smol zoo's in-process scorer (greedy chat
replies, exact match; tests/test_smol_zoo.py checks it against lm-eval reply
by reply), plus the retention task (what the base knew). Per item results are
kept, so each method's difference to task arithmetic has a paired standard
error within the seed.

    mergekit-ext zoo /work/cache/zoo-smol-s0 --preset smol --seed 0
    python benchmarks/smol_quality.py --zoo /work/cache/zoo-smol-s0 --name smol-quality-s0 --threads 1
    python benchmarks/smol_quality.py --aggregate results/smol-quality-s0.json results/smol-quality-s1.json ... --name smol-quality
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import runner  # noqa: E402

REFERENCE = "task_arithmetic"


def smol_settings() -> Dict[str, List[Dict[str, Any]]]:
    """Each method's settings on the smol zoo, from the protocol's one grid table."""
    from mergekit_ext.evaluate.protocol.grids import SMOL_GRIDS

    return SMOL_GRIDS


def open_smol_zoo(path):
    """The zoo at ``path``, refused in one line unless it is a smol (chat) zoo."""
    from mergekit_ext.zoo import load_zoo

    zoo = load_zoo(path)
    if "chat" not in zoo.manifest:
        raise SystemExit(f"{zoo.root} is not a smol zoo (build one with `mergekit-ext zoo DIR --preset smol`)")
    return zoo


def add_smol_arguments(parser, *, zoo_required: bool = True, device: bool = True) -> None:
    """The options the smol benchmarks share."""
    parser.add_argument("--zoo", required=zoo_required, help="a smol zoo (`mergekit-ext zoo DIR --preset smol --seed N`)")
    if device:
        parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 lets a second job share a 2-core machine)")
    parser.add_argument("--out-dir", default=str(runner.RESULTS_DIR))
    parser.add_argument("--name", required=True, help="basename of the result files")
    parser.add_argument("-q", "--quiet", action="store_true")


class SmolScorer:
    """Per item correctness of a state dict on a split of every task (one model object, weights swapped)."""

    def __init__(self, zoo, device: str = "cpu"):
        from transformers import AutoTokenizer

        from mergekit_ext.zoo import load_causal_lm
        from mergekit_ext.zoo.smol import end_of_turn, smol_documents

        self.zoo, self.device = zoo, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
        self.stop = end_of_turn(self.tokenizer)
        self.max_new_tokens = zoo.manifest["chat"]["max_new_tokens"]
        self.retention = list(zoo.manifest.get("retention", {}))
        self.documents = {(name, split): smol_documents(zoo, name, split) for name in zoo.tasks + self.retention for split in ("validation", "test")}
        self.model = load_causal_lm(zoo.base, device)
        self.tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()  # the checkpoint stores the embedding once

    def __call__(self, state: Dict[str, torch.Tensor], split: str, names: Sequence[str]) -> Dict[str, List[int]]:
        from mergekit_ext.zoo.smol import chat_generate
        from mergekit_ext.zoo.train import multiple_choice_correct

        outcome = self.model.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state.items()}, strict=False)
        untied_missing = [name for name in outcome.missing_keys if name not in self.tied]
        if outcome.unexpected_keys or untied_missing:
            raise ValueError(f"merged state does not fit the base: missing {untied_missing[:3]}, unexpected {outcome.unexpected_keys[:3]}")
        items: Dict[str, List[int]] = {}
        with torch.no_grad():
            for name in names:
                documents = self.documents[(name, split)]
                if name in self.retention:
                    items[name] = multiple_choice_correct(self.model, self.tokenizer, documents, batch_size=32, device=self.device, delimiter="")
                else:
                    replies = chat_generate(self.model, self.tokenizer, [d["prompt"] for d in documents], stop=self.stop, max_new_tokens=self.max_new_tokens, device=self.device)
                    items[name] = [int(reply == d["answer"]) for reply, d in zip(replies, documents)]
        return items


def choose_reference(scorer: SmolScorer, merge: Callable[[str, Dict[str, Any]], Dict[str, torch.Tensor]], tasks: Sequence[str], *, quiet: bool = False) -> Dict[str, Any]:
    """Task arithmetic's λ chosen on the validation split from the smol grid (ties: the smaller λ)."""
    from tqdm import tqdm

    from mergekit_ext.evaluate.protocol.selection import select

    grid = smol_settings()[REFERENCE]
    validation = []
    for setting in tqdm(grid, desc="task arithmetic λ on validation", unit="λ", disable=quiet):
        scores = scorer(merge(REFERENCE, setting), "validation", tasks)
        validation.append(sum(sum(v) / len(v) for v in scores.values()) / len(tasks))
    chosen = select(grid, validation)
    return {"grid": chosen.settings, "validation_mean_accuracy": validation, "chosen": chosen.setting, "chosen_validation_mean_accuracy": chosen.score}


def stderr_of(items: Sequence[float]) -> float:
    """lm-eval's standard error of a mean metric: sample std / sqrt(n)."""
    from mergekit_ext.evaluate.protocol.stats import standard_error

    return standard_error(items) if len(items) > 1 else float("nan")


def summarize(items: Dict[str, List[int]], tasks: Sequence[str], retention: Sequence[str], expert_scores: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Per task accuracy and stderr, the mean over the instruction tasks (its stderr), retention, normalized."""
    accuracy = {name: sum(values) / len(values) for name, values in items.items()}
    stderr = {name: stderr_of(values) for name, values in items.items()}
    entry: Dict[str, Any] = {
        "accuracy": {task: accuracy[task] for task in tasks},
        "stderr": {task: stderr[task] for task in tasks},
        "mean_accuracy": sum(accuracy[task] for task in tasks) / len(tasks),
        "mean_stderr": math.sqrt(sum(stderr[task] ** 2 for task in tasks)) / len(tasks),
        "retention": {name: accuracy[name] for name in retention if name in accuracy},
        "retention_stderr": {name: stderr[name] for name in retention if name in stderr},
    }
    if expert_scores:
        normalized = {task: accuracy[task] / expert_scores[task] for task in tasks if expert_scores[task] > 0}
        entry["normalized_accuracy"] = normalized
        entry["mean_normalized_accuracy"] = sum(normalized.values()) / len(normalized) if normalized else None
    return entry


def paired_difference(items: Dict[str, List[int]], reference: Dict[str, List[int]], tasks: Sequence[str]) -> Dict[str, float]:
    """Mean over tasks of (method − reference) on the same items, with its paired standard error."""
    means, variances = [], []
    for task in tasks:
        differences = [a - b for a, b in zip(items[task], reference[task])]
        means.append(sum(differences) / len(differences))
        variances.append(stderr_of(differences) ** 2)
    delta = sum(means) / len(tasks)
    se = math.sqrt(sum(variances)) / len(tasks)
    return {"delta": delta, "stderr": se, "z": delta / se if se > 0 else (math.inf if delta else 0.0)}


def zoo_merger(zoo):
    """The zoo's base and experts, and ``merge(method, setting)``: all experts onto the base by mergekit's engine, in memory."""
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import merge_in_memory

    base_state = load_state_dict(zoo.base)
    experts = {task: load_state_dict(zoo.expert(task)) for task in zoo.tasks}

    def merge(method: str, setting: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        torch.manual_seed(0)  # DARE and DELLA drop at random: the same draw on every run
        with torch.no_grad():
            return merge_in_memory(base_state, experts, method, dict(setting), use_base=runner.needs_base(method) or method == "cart")

    return base_state, experts, merge


def run(args) -> Dict[str, Any]:
    started = time.perf_counter()
    zoo = open_smol_zoo(args.zoo)
    tasks = zoo.tasks
    scorer = SmolScorer(zoo, args.device)
    retention = scorer.retention
    every = tasks + retention
    metrics = zoo.manifest["metrics"]
    expert_scores = {task: metrics["experts"][task][task]["test"] for task in tasks}

    base_state, experts, merge = zoo_merger(zoo)
    models: Dict[str, Any] = {}
    items_by_label: Dict[str, Dict[str, List[int]]] = {}
    seconds: Dict[str, Dict[str, float]] = {}

    items_by_label["base"] = scorer(base_state, "test", every)
    models["base"] = summarize(items_by_label["base"], tasks, retention)
    models["expert"] = {
        "accuracy": dict(expert_scores),
        "mean_accuracy": sum(expert_scores.values()) / len(tasks),
        "retention": {name: min(metrics["experts"][task][name]["test"] for task in tasks) for name in retention},
        "note": "each expert on its own task (the zoo build's score); retention: the lowest over the experts",
    }

    single = single_experts(scorer, experts, quiet=args.quiet)

    grids = smol_settings()
    selection = {REFERENCE: choose_reference(scorer, merge, tasks, quiet=args.quiet)}
    chosen_reference = selection[REFERENCE]["chosen"]
    settings = {REFERENCE: chosen_reference, **{m: grid[0] for m, grid in grids.items() if m != REFERENCE and (not args.methods or m in args.methods)}}
    failures: Dict[str, str] = {}
    score_methods(settings, merge, scorer, models, items_by_label, seconds, failures, expert_scores, quiet=args.quiet)
    compare(models, items_by_label, tasks, retention)
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest["seed"],
        "parameters": zoo.manifest["parameters"],
        "tasks": tasks,
        "retention_tasks": retention,
        "test_items_per_task": len(scorer.documents[(tasks[0], "test")]),
        "metric": "exact match of the greedy chat reply (instruction tasks); 4-way log-likelihood choice (retention)",
        "reference": REFERENCE,
        "selection": selection,
        "settings": settings,
        "failures": failures,
        "seconds": {"per_method": seconds, "total": round(time.perf_counter() - started, 1)},
        "test_report": {"split": "test", "tasks": tasks, "models": models},
        **single,
        "items": items_by_label,
    }


def single_experts(scorer: SmolScorer, experts: Dict[str, Dict[str, torch.Tensor]], *, quiet: bool = False) -> Dict[str, Any]:
    """Each expert on every instruction task's test split, and the best of them on the mean: the bar a merge
    must clear to be worth more than picking one expert."""
    from tqdm import tqdm

    tasks = scorer.zoo.tasks
    single: Dict[str, Any] = {}
    for task in tqdm(tasks, desc="each expert on every task", unit="expert", disable=quiet):
        scored = summarize(scorer(experts[task], "test", tasks), tasks, [])
        single[task] = {"accuracy": scored["accuracy"], "mean_accuracy": scored["mean_accuracy"]}
    best = max(single, key=lambda task: single[task]["mean_accuracy"])
    return {"single_experts": single, "best_single_expert": {"expert": best, **single[best]}}


def score_methods(settings, merge, scorer: SmolScorer, models, items_by_label, seconds, failures, expert_scores, *, quiet: bool = False) -> None:
    """Merge and score each method's setting on the test split, into the result's tables (a failure is recorded, not fatal)."""
    from tqdm import tqdm

    tasks, retention = scorer.zoo.tasks, scorer.retention
    for method, setting in tqdm(settings.items(), desc="merge + score test", unit="method", disable=quiet):
        begun = time.perf_counter()
        try:
            state = merge(method, setting)
        except Exception as error:  # a failing method is reported, not fatal for the others
            failures[method] = f"{type(error).__name__}: {error}"
            tqdm.write(f"merge {method} failed: {failures[method]}")
            continue
        merged_at = time.perf_counter()
        if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
            failures[method] = "non-finite merged weights"
            continue
        failures.pop(method, None)
        items_by_label[method] = scorer(state, "test", tasks + retention)
        models[method] = summarize(items_by_label[method], tasks, retention, expert_scores)
        models[method]["setting"] = setting
        seconds[method] = {"merge": round(merged_at - begun, 1), "score": round(time.perf_counter() - merged_at, 1)}
        del state


def compare(models, items_by_label, tasks: Sequence[str], retention: Sequence[str]) -> None:
    """Each scored model's paired difference to task arithmetic, and to the base on each retention task."""
    for label in models:
        if label in items_by_label and label != "base":
            models[label]["vs_task_arithmetic"] = paired_difference(items_by_label[label], items_by_label[REFERENCE], tasks)
            models[label]["vs_base_retention"] = {
                name: paired_difference(items_by_label[label], items_by_label["base"], [name]) for name in retention
            }


def update(args, earlier: Dict[str, Any]) -> Dict[str, Any]:
    """``earlier`` with ``args.methods`` merged again at their current shipped settings and scored on the same items,
    and with each expert scored on every task if ``earlier`` lacks that bar.

    The references (base, experts, task arithmetic's validation choice) are kept: scoring is
    deterministic, so only the methods whose shipped setting changed need to run again.
    """
    started = time.perf_counter()
    zoo = open_smol_zoo(args.zoo)
    if zoo.manifest["seed"] != earlier["seed"] or list(zoo.tasks) != list(earlier["tasks"]):
        raise SystemExit(f"{args.update}: made on seed {earlier['seed']}'s zoo, not on {zoo.root} (seed {zoo.manifest['seed']})")
    methods = list(args.methods or [])
    if not methods and "best_single_expert" in earlier:
        raise SystemExit(f"{args.update}: nothing to update (give --methods; its single-expert bar is already there)")
    unknown = [m for m in methods if m == REFERENCE or m not in smol_settings()]
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} cannot be updated (the reference is chosen on validation; others must be in the smol grid)")
    scorer = SmolScorer(zoo, args.device)
    _, experts, merge = zoo_merger(zoo)
    result = dict(earlier)
    if "best_single_expert" not in result:
        result.update(single_experts(scorer, experts, quiet=args.quiet))
    if not methods:
        result.setdefault("updates", []).append({"methods": [], "added": ["single_experts"], "seconds": round(time.perf_counter() - started, 1)})
        return result
    models, items_by_label = result["test_report"]["models"], result["items"]
    # what the update replaces stays in the result: the evidence for the change
    replaced = {method: {key: models[method][key] for key in ("setting", "mean_accuracy", "retention", "vs_task_arithmetic", "vs_base_retention") if key in models[method]}
                for method in methods if method in models}
    settings = {method: smol_settings()[method][0] for method in methods}
    metrics = zoo.manifest["metrics"]
    expert_scores = {task: metrics["experts"][task][task]["test"] for task in zoo.tasks}
    score_methods(settings, merge, scorer, models, items_by_label, result["seconds"]["per_method"], result["failures"], expert_scores, quiet=args.quiet)
    compare(models, items_by_label, zoo.tasks, scorer.retention)
    result["settings"].update(settings)
    # {} means the declared defaults: record their values, which is what changed
    defaults = {method: {p.name: p.default for p in runner.method_spec(method).parameters} for method in methods}
    result.setdefault("updates", []).append({"methods": methods, "settings": settings, "defaults": defaults, "replaced": replaced, "seconds": round(time.perf_counter() - started, 1)})
    return result


# --------------------------------------------------------------------------
# Reports.


def _row(label: str, model: Dict[str, Any], tasks: Sequence[str], retention: Sequence[str]) -> List[str]:
    cells = [label, f"{model['mean_accuracy']:.3f}" + (f" ± {model['mean_stderr']:.3f}" if "mean_stderr" in model else "")]
    cells += [f"{model['accuracy'][task]:.3f}" for task in tasks]
    cells += [f"{model['retention'][name]:.3f}" for name in retention]
    versus = model.get("vs_task_arithmetic")
    cells.append(f"{versus['delta']:+.3f} ± {versus['stderr']:.3f}" if versus and label != REFERENCE else "")
    return cells


def render_markdown(result: Dict[str, Any]) -> str:
    tasks, retention = result["tasks"], result["retention_tasks"]
    models = result["test_report"]["models"]
    chosen = result["selection"][REFERENCE]
    order = ["base", "expert", REFERENCE] + sorted((m for m in models if m not in ("base", "expert", REFERENCE)), key=lambda m: -models[m]["mean_accuracy"])
    header = ["model", "mean ± stderr"] + tasks + [f"{name} (retention)" for name in retention] + ["− task arithmetic (paired)"]
    rows = [_row(label, models[label], tasks, retention) for label in order]
    lines = [
        f"# Merging SmolLM2-135M-Instruct experts: smol zoo, seed {result['seed']}",
        "",
        f"Test split, {result['test_items_per_task']} items per task; {result['metric']}. "
        f"task arithmetic's λ chosen on validation: {chosen['chosen']['lambda']} "
        f"(validation means {', '.join(f'{v:.3f}' for v in chosen['validation_mean_accuracy'])} for λ {', '.join(str(g['lambda']) for g in chosen['grid'])}). "
        "Every other method at its shipped setting. `expert`: each expert on its own task; its retention is the lowest over the experts.",
        "",
        runner.markdown_table(header, rows),
        "",
    ]
    if result["failures"]:
        lines += ["Failures: " + "; ".join(f"{m}: {e}" for m, e in result["failures"].items()), ""]
    lines.append(f"Benchmark time {result['seconds']['total']:.0f} s on this machine.")
    return "\n".join(lines) + "\n"


def beats_base_everywhere(result: Dict[str, Any], label: str) -> bool:
    """Above the base on every instruction task of one seed's test split, and not below it on retention."""
    models = result["test_report"]["models"]
    model, base = models[label], models["base"]
    return all(model["accuracy"][t] > base["accuracy"][t] for t in result["tasks"]) and all(
        model["retention"][name] >= base["retention"][name] for name in result["retention_tasks"]
    )


def aggregate(results: Sequence[Dict[str, Any]], reference: str = REFERENCE) -> Dict[str, Any]:
    """Per method over seeds: mean ± sample std of the test mean and of retention, and the paired difference
    to task arithmetic (per seed, its within-seed z on the same items; across seeds, the paired t and the
    beyond-noise verdict of the project's one statistics helper). ``reference``: task arithmetic's row label
    (``smol_lora.py`` labels its rows by merge path)."""
    from mergekit_ext.evaluate.protocol.stats import beyond_noise, paired_t, summary

    tasks, retention = results[0]["tasks"], results[0]["retention_tasks"]
    labels = [label for label in results[0]["test_report"]["models"] if all(label in r["test_report"]["models"] for r in results)]
    methods: Dict[str, Any] = {}
    for label in labels:
        per_seed = [r["test_report"]["models"][label] for r in results]
        entry: Dict[str, Any] = {
            "test": [m["mean_accuracy"] for m in per_seed],
            "test_mean_std": summary([m["mean_accuracy"] for m in per_seed]),
            "per_task": {task: summary([m["accuracy"][task] for m in per_seed]) for task in tasks},
            "retention": {name: summary([m["retention"][name] for m in per_seed]) for name in retention},
        }
        if "vs_task_arithmetic" in per_seed[0] and label != reference:
            deltas = [m["vs_task_arithmetic"]["delta"] for m in per_seed]
            entry["delta_vs_ta"] = deltas
            entry["delta_vs_ta_mean_std"] = summary(deltas)
            entry["delta_vs_ta_within_seed_z"] = [m["vs_task_arithmetic"]["z"] for m in per_seed]
            entry["delta_vs_ta_t"] = paired_t(deltas)
            entry["beyond_noise"] = beyond_noise(deltas)
        if all("vs_base_retention" in m for m in per_seed):
            entry["below_base_retention_2se"] = {
                name: sum(1 for m in per_seed if m["vs_base_retention"][name]["z"] < -2) for name in retention
            }
        if label not in ("base", "expert", "lora expert"):
            entry["beats_base_every_task"] = sum(beats_base_everywhere(r, label) for r in results)
            bars = [r["best_single_expert"]["mean_accuracy"] for r in results if "best_single_expert" in r]
            scored = [m["mean_accuracy"] for m, r in zip(per_seed, results) if "best_single_expert" in r]
            entry["beats_best_single_expert"] = {"seeds": sum(a > b for a, b in zip(scored, bars)), "of": len(bars)}
        if label == reference:
            entry["lambda"] = [r["selection"][REFERENCE]["chosen"]["lambda"] for r in results]
        methods[label] = entry
    return {
        "machine": results[0]["machine"],
        "seeds": [r["seed"] for r in results],
        "zoos": [r["zoo"] for r in results],
        "reference": reference,
        "parameters": results[0].get("parameters"),
        "tasks": tasks,
        "retention_tasks": retention,
        "test_items_per_task": results[0]["test_items_per_task"],
        "metric": results[0].get("metric"),
        "settings": results[0].get("settings"),
        "methods": methods,
        "best_single_expert": [r.get("best_single_expert") for r in results],
        "note": "std: sample standard deviation over seeds (independent zoos); delta_vs_ta: per seed, the method's test mean minus "
        "task arithmetic's on the same items; beyond_noise: |paired t| over seeds above Student's two-sided 95 % critical value; "
        "beats_base_every_task: seeds where the merge is above the base on every instruction task and not below it on retention; "
        "beats_best_single_expert: seeds where the merge's test mean is above the best single expert's mean over all tasks "
        "(counted on the seeds whose benchmark scored every expert on every task)",
    }


def pm(stats: Dict[str, float], sign: str = "") -> str:
    """mean ± sample std over seeds (the mean alone for one seed, which has no spread to state)."""
    value = f"{stats['mean']:{sign}.3f}"
    return value if stats["n"] < 2 else f"{value} ± {stats['std']:.3f}"


def aggregate_table(agg: Dict[str, Any]) -> str:
    """The aggregate as one Markdown table: references first, then the methods by test mean."""
    methods, retention = agg["methods"], agg["retention_tasks"]
    reference = agg.get("reference", REFERENCE)
    references = [label for label in ("base", "expert", "lora expert", reference) if label in methods]
    order = references + sorted((m for m in methods if m not in references), key=lambda m: -methods[m]["test_mean_std"]["mean"])

    header = ["model", "test exact match"] + [f"{name} (retention)" for name in retention] + [
        f"{name} > 2 se below base" for name in retention
    ] + ["− task arithmetic", "paired z per seed", "beyond noise over seeds?", "> base on every task", "> best single expert"]
    seeds = len(agg["seeds"])
    rows = []
    for label in order:
        entry = methods[label]
        verdict, within = "", ""
        if "delta_vs_ta_mean_std" in entry:
            d = entry["delta_vs_ta_mean_std"]
            within = " / ".join(f"{z:+.1f}" for z in entry["delta_vs_ta_within_seed_z"])
            if d["n"] < 2:
                verdict = "– (one seed)"
            else:
                verdict = (f"**yes, {'better' if d['mean'] > 0 else 'worse'}**" if entry["beyond_noise"] else "no") + f" (t {entry['delta_vs_ta_t']:.1f})"
        delta = pm(entry["delta_vs_ta_mean_std"], "+") if "delta_vs_ta_mean_std" in entry else ("(reference)" if label == reference else "")
        counts = ["", ""]
        if "beats_base_every_task" in entry:
            single = entry["beats_best_single_expert"]
            counts = [f"{entry['beats_base_every_task']}/{seeds}", f"{single['seeds']}/{single['of']}" if single["of"] else "–"]
        below = entry.get("below_base_retention_2se", {})
        dropped = [f"{below[name]}/{seeds}" if name in below else "" for name in retention]
        rows.append([label, pm(entry["test_mean_std"])] + [pm(entry["retention"][name]) for name in retention] + dropped + [delta, within, verdict] + counts)
    return runner.markdown_table(header, rows) + "\n"


def render_aggregate_markdown(agg: Dict[str, Any]) -> str:
    seeds = len(agg["seeds"])
    lambdas = agg["methods"][REFERENCE]["lambda"]
    lines = [
        f"# Merging SmolLM2-135M-Instruct experts: {seeds} seeds",
        "",
        f"Test split of {seeds} smol zoos (seeds {', '.join(map(str, agg['seeds']))}), {agg['test_items_per_task']} items per task and seed; "
        f"mean ± sample std over seeds. task arithmetic's λ chosen on validation per seed ({', '.join(map(str, lambdas))}); "
        "every other method at its shipped setting. − task arithmetic: the paired per-seed difference; paired z: that difference "
        "over its paired standard error on the seed's items; beyond noise: paired t over seeds above the 95 % critical value. "
        "> base on every task: seeds where the merge is above the base on every instruction task and not below it on retention; "
        "> best single expert: seeds where its test mean is above that of the best single expert over all tasks (on the seeds "
        "whose run scored every expert on every task).",
        "",
        aggregate_table(agg),
    ]
    return "\n".join(lines)


def dispatch(parser, argv, *, run, update, aggregate, render, render_aggregate) -> None:
    """The smol benchmarks' one entry: ``--aggregate`` per-seed result files, ``--update`` one seed's result,
    or run on ``--zoo``; the results are written atomically under ``--out-dir``."""
    import json

    parser.add_argument("--aggregate", nargs="+", metavar="RESULT_JSON", help="aggregate per-seed result files instead of running")
    args = parser.parse_args(argv)
    if args.aggregate:
        agg = aggregate([json.loads(Path(path).read_text()) for path in args.aggregate])
        runner.save_results(args.out_dir, args.name, agg, render_aggregate(agg), echo=not args.quiet)
        return
    if not args.zoo:
        parser.error("give --zoo DIR (or --aggregate FILES)")
    if args.update and (Path(args.out_dir) / f"{args.name}.json").resolve() == Path(args.update).resolve():
        parser.error(f"--update {args.update}: the result would be written over the file it reads; give another --name or --out-dir")
    runner.apply_threads(args)
    runner.ensure_registered()
    result = update(args, json.loads(Path(args.update).read_text())) if args.update else run(args)
    runner.save_results(args.out_dir, args.name, result, render(result), echo=not args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smol_arguments(parser, zoo_required=False)
    parser.add_argument("--methods", nargs="+", help="only these methods (besides the references)")
    parser.add_argument("--update", metavar="RESULT_JSON", help="re-run only --methods at their shipped settings into this seed's result "
                        "(references kept), and score each expert on every task where the result lacks that bar")
    dispatch(parser, argv, run=run, update=update, aggregate=aggregate, render=render_markdown, render_aggregate=render_aggregate_markdown)


if __name__ == "__main__":
    main()
