"""AdaRank on a real pretrained LLM: one `distill` learn run on a `smol` zoo, against its base method.

AdaRank's step 0 is its base method exactly (CART, or task arithmetic with the
prior as λ); the question is how much of that method's gap to the experts the
label-free learning closes, (AdaRank − base method) / (experts − base method),
and at what cost on this machine. One run:

* the base method's merge at AdaRank's starting point (``--prior``,
  ``--init-rank-ratio``), in memory through mergekit's engine;
* ``learn`` on the zoo's validation PROMPTS plus ``--unlabeled`` prompts per
  task from the task generators (answers never read), posed as the zoo's
  rendered chat conversations; the experts' greedy replies end at the template's
  end-of-turn token;
* the learned file applied by ``merge_method: adarank`` through mergekit's
  engine (written to a temporary folder, then scored).

Both merges are scored on the TEST split with the smol benchmark's scorer
(greedy chat replies, exact match; retention by log-likelihood choice), with
per-item paired differences. The learn run's wall and CPU seconds and peak
memory are recorded, so the schedule's fit to a CPU budget is measured, not
assumed.

    python benchmarks/smol_adarank.py --zoo /work/cache/zoo-smol-s2 --variant cart --steps 60 --batch-size 4 --name smol-adarank-s2-cart --threads 1
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import runner  # noqa: E402
from benchmarks.smol_quality import SmolScorer, open_smol_zoo, paired_difference, summarize  # noqa: E402
from mergekit_ext.methods.adarank import DEFAULT_LR, DEFAULT_LR_SCHEDULE  # noqa: E402


def base_method_setting(variant: str, prior: float, init_rank_ratio: float) -> tuple[str, Dict[str, Any]]:
    """The mergekit method and parameters that AdaRank's step 0 equals for ``variant``."""
    if variant == "cart":
        return "cart", {"weight": 1.0, "rank_ratio": init_rank_ratio, "lambda": prior}
    if variant == "ta":
        return "task_arithmetic", {"weight": 1.0, "lambda": prior}
    raise SystemExit(f"--variant {variant}: this benchmark runs cart or ta")


def run(args) -> Dict[str, Any]:
    from mergekit_ext.methods.adarank import learn
    from mergekit_ext.methods.adarank.format import write_learned_file
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import merge_in_memory

    zoo = open_smol_zoo(args.zoo)
    tasks = zoo.tasks
    options = learn.LearnOptions(
        variant=args.variant,
        prior=args.prior,
        init_rank_ratio=args.init_rank_ratio,
        max_rank_ratio=args.max_rank_ratio,
        steps=args.steps,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        objective="distill",
        max_new_tokens=zoo.manifest["chat"]["max_new_tokens"],  # the zoo's reply budget, as its scorer uses
    ).resolved()
    scorer = SmolScorer(zoo)
    every = tasks + scorer.retention
    metrics = zoo.manifest["metrics"]
    expert_scores = {task: metrics["experts"][task][task]["test"] for task in tasks}
    experts = [zoo.expert(task) for task in tasks]

    method, setting = base_method_setting(args.variant, options.prior, options.init_rank_ratio)
    base_state = load_state_dict(zoo.base)
    with torch.no_grad():
        step0 = merge_in_memory(base_state, {task: load_state_dict(zoo.expert(task)) for task in tasks}, method, setting, use_base=True)
    items = {"base": scorer(base_state, "test", every), method: scorer(step0, "test", every)}
    del step0, base_state

    pools = [learn.zoo_prompts(zoo, task, unlabeled=args.unlabeled) for task in tasks]
    cpu_before, learn_started = time.process_time(), time.perf_counter()
    result = learn.learn(experts, pools, base=zoo.base, options=options, task_names=tasks, progress=not args.quiet)
    learn_seconds = {"wall": round(time.perf_counter() - learn_started, 1), "cpu": round(time.process_time() - cpu_before, 1)}
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    with tempfile.TemporaryDirectory(prefix="smol-adarank-") as folder:
        file = Path(folder) / "adarank.safetensors"
        write_learned_file(file, result.masks, result.coefficients, result.info, result.fingerprints)
        merged = learn.write_merged_model(file, experts, Path(folder) / "merged", base=zoo.base)
        items["adarank"] = scorer(load_state_dict(merged), "test", every)

    models = {"base": summarize(items["base"], tasks, scorer.retention)}
    models["expert"] = {"accuracy": dict(expert_scores), "mean_accuracy": sum(expert_scores.values()) / len(tasks)}
    for label in (method, "adarank"):
        models[label] = summarize(items[label], tasks, scorer.retention, expert_scores)
    start, learned, experts_mean = models[method]["mean_accuracy"], models["adarank"]["mean_accuracy"], models["expert"]["mean_accuracy"]
    return {
        **runner.zoo_context(zoo),
        "seed": zoo.manifest["seed"],
        "tasks": tasks,
        "retention_tasks": scorer.retention,
        "test_items_per_task": len(scorer.documents[(tasks[0], "test")]),
        "options": {key: value for key, value in vars(options).items() if not key.startswith("_")},
        "unlabeled_per_task": args.unlabeled,
        "prompts_per_task": len(pools[0]),
        "base_method": {"method": method, "setting": setting},
        "learn_seconds": learn_seconds,
        "seconds_per_step": round(learn_seconds["wall"] / max(options.steps, 1), 2),
        "peak_rss_gib": round(peak_rss_gib, 2),
        "learn_info": {key: value for key, value in result.info.items() if isinstance(value, (int, float, str))},
        "models": models,
        "gap_closed": (learned - start) / (experts_mean - start) if experts_mean != start else None,
        "vs_base_method": paired_difference(items["adarank"], items[method], tasks),
        "retention_vs_base": {name: paired_difference(items["adarank"], items["base"], [name]) for name in scorer.retention},
        "items": items,
    }


def render_markdown(result: Dict[str, Any]) -> str:
    tasks, retention = result["tasks"], result["retention_tasks"]
    models, method = result["models"], result["base_method"]["method"]
    options = result["options"]
    header = ["model", "test mean ± stderr"] + tasks + [f"{name} (retention)" for name in retention]
    rows = []
    for label in ("base", "expert", method, "adarank"):
        model = models[label]
        cells = [label, f"{model['mean_accuracy']:.3f}" + (f" ± {model['mean_stderr']:.3f}" if "mean_stderr" in model else "")]
        cells += [f"{model['accuracy'][task]:.3f}" for task in tasks]
        cells += [f"{model['retention'][name]:.3f}" if "retention" in model else "" for name in retention]
        rows.append(cells)
    versus = result["vs_base_method"]
    gap = result["gap_closed"]
    return "\n".join(
        [
            f"# AdaRank `distill` on a smol zoo (seed {result['seed']}), from {method}",
            "",
            f"Schedule: {options['steps']} steps, {options['lr_schedule']} lr {options['lr']}, {options['batch_size']} prompts per task per step, "
            f"max rank ratio {options['max_rank_ratio']}, prior {options['prior']}, initial rank ratio {options['init_rank_ratio']}; "
            f"{result['prompts_per_task']} prompts per task ({result['unlabeled_per_task']} of them unlabeled generator prompts). "
            f"Learn run: {result['learn_seconds']['wall']:.0f} s wall, {result['learn_seconds']['cpu']:.0f} s CPU "
            f"({result['seconds_per_step']:.1f} s per step incl. set-up), peak memory {result['peak_rss_gib']:.1f} GiB. "
            f"Test split, {result['test_items_per_task']} items per task.",
            "",
            runner.markdown_table(header, rows),
            "",
            f"AdaRank − {method}: {versus['delta']:+.3f} ± {versus['stderr']:.3f} (paired z {versus['z']:+.1f}); "
            f"share of {method}'s gap to the experts closed: {gap:.2f}." if gap is not None else "",
            "",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, help="a smol zoo (`mergekit-ext zoo DIR --preset smol --seed N`)")
    parser.add_argument("--variant", default="cart", choices=("cart", "ta"))
    parser.add_argument("--prior", type=float, default=None, help="the base method's λ (default: the variant's)")
    parser.add_argument("--init-rank-ratio", type=float, default=None)
    parser.add_argument("--max-rank-ratio", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--lr-schedule", default=DEFAULT_LR_SCHEDULE, choices=("constant", "cosine"))
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per task per step")
    parser.add_argument("--unlabeled", type=int, default=0, help="more prompts per task from the task generators")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(runner.RESULTS_DIR))
    parser.add_argument("--name", required=True, help="basename of the result files")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    runner.save_results(args.out_dir, args.name, result, render_markdown(result))


if __name__ == "__main__":
    main()
