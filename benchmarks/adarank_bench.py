"""AdaRank on generation zoos: objectives × base methods × learning schedules (issue 16).

For each zoo (one per seed): the base method's λ is chosen on validation exact match
(TA, TSV-M, Iso-CTS: λ grid; CART: rank ``--cart-rank``, λ grid; step 0 of each AdaRank
variant is that method exactly), then AdaRank starts from it and learns
on the validation PROMPTS (no answers), one run per (objective, masks+coefficients or
coefficients only, lr); validation and test exact match are recorded at every
checkpoint step. ``--summarise`` picks, per (base, objective, mode), the (lr, steps)
with the best mean validation exact match over the zoos and reports test there:
mean ± std over zoos, the share of the base method's gap to the experts closed,
(AdaRank − base) / (experts − base) on mean exact match, and the paired difference to
task arithmetic (its validation-chosen λ) on each zoo.

    python benchmarks/adarank_bench.py /work/scratch/hard-bench/zoo-s0 ... --out benchmarks/results/adarank.json
    python benchmarks/adarank_bench.py --summarise benchmarks/results/adarank.json
    python benchmarks/adarank_bench.py --render benchmarks/results/adarank.json   # rewrite adarank.md

``--lr-schedule cosine`` runs decay the rate to 0 over ``--steps`` (keyed ``:scosine``;
give ``--checkpoints`` only the last step: an earlier step of a cosine run is not a shorter
cosine run). ``--modes weights`` is a reference, not AdaRank: every weight of the base
method's merge trained on the same objective, prompts and teachers (``--weights-lr``),
which says how far one model of this size gets with this data.

Results are appended to ``--out`` after every run (a stopped benchmark keeps what it
measured and resumes where it stopped). Scoring is in process: greedy decoding, cut at
the first newline, exact match (the zoo scorer's definition).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import torch

SCORE_NEW_TOKENS = 9  # the zoo's MAX_ANSWER (8) + the stop token


def open_zoo(path: Path) -> Dict:
    """Tasks, base, experts and documents of a built zoo (manifest.json) or of the hard-zoo
    prototype's saved layout (base/, experts/<task>/, data/<task>/<split>.jsonl)."""
    from mergekit_ext import io

    if (path / "manifest.json").is_file():
        from mergekit_ext.zoo import load_zoo

        zoo = load_zoo(path)
        tasks = list(zoo.tasks)
        return {
            "tasks": tasks,
            "base": zoo.base,
            "experts": [zoo.expert(task) for task in tasks],
            "documents": {split: [zoo.documents(task, split) for task in tasks] for split in ("validation", "test")},
        }
    tasks = sorted(folder.name for folder in (path / "experts").iterdir())
    return {
        "tasks": tasks,
        "base": path / "base",
        "experts": [path / "experts" / task for task in tasks],
        "documents": {
            split: [io.read_jsonl(path / "data" / task / f"{split}.jsonl") for task in tasks] for split in ("validation", "test")
        },
    }


class Scorer:
    """Greedy exact match per task of a forward function, on pre-tokenised prompts."""

    def __init__(self, tokenizer, documents, stop_ids, device):
        self.tokenizer, self.stop_ids, self.device = tokenizer, stop_ids, device
        self.splits = {}
        for split, tasks in documents.items():
            self.splits[split] = [
                ([tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"] for doc in docs], [doc["answer"] for doc in docs])
                for docs in tasks
            ]

    def __call__(self, forward, split: str) -> List[float]:
        from mergekit_ext.methods.adarank.learn import greedy_answers

        prompts = [prompt for task_prompts, _ in self.splits[split] for prompt in task_prompts]
        answered = greedy_answers(forward, prompts, self.stop_ids, SCORE_NEW_TOKENS, self.device)
        scores, position = [], 0
        for task_prompts, answers in self.splits[split]:
            correct = 0
            for item, answer in zip(answered[position : position + len(task_prompts)], answers):
                tokens = item.answer
                if tokens and tokens[-1] in self.stop_ids:
                    correct += "".join(self.tokenizer.convert_ids_to_tokens(tokens[:-1])) == answer
            scores.append(correct / max(1, len(answers)))
            position += len(task_prompts)
        return scores


MODE_LABELS = {"full": "masks+coef", "coef": "coef only", "weights": "all weights (reference, not AdaRank)"}

# Prompts per task per step in every run recorded before runs were keyed by batch (`learn`'s
# own default is adarank.DEFAULT_BATCH_SIZE).
BENCH_BATCH_SIZE = 16


def _model_forward(path, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    from mergekit_ext.methods.adarank.learn import cache_keyword

    keyword = cache_keyword(model)
    return lambda ids, cache: model(input_ids=ids, use_cache=True, **{keyword: cache})


def _mean(values):
    return sum(values) / len(values)


def bench_zoo(path: Path, args, results: Dict, save) -> None:
    from mergekit_ext.evaluate.protocol.selection import select
    from mergekit_ext.methods.adarank import learn as L

    zoo_key = str(path)
    record = results.setdefault(zoo_key, {"runs": {}})
    zoo = open_zoo(path)
    tasks = zoo["tasks"]
    device = torch.device(args.device)
    prompts = [[doc["prompt"] for doc in docs] for docs in zoo["documents"]["validation"]]
    # Learning prompts: validation's, plus --unlabeled more per task (their runs get a ":uN" key);
    # a batch other than the bench's default gets ":bN" (runs of different batches never collide).
    suffix = (f":u{args.unlabeled}" if args.unlabeled else "") + (f":b{args.batch_size}" if args.batch_size != BENCH_BATCH_SIZE else "")
    suffix += f":s{args.lr_schedule}" if args.lr_schedule != "constant" else ""  # runs before schedules existed were constant
    if args.unlabeled:
        from mergekit_ext.zoo import load_zoo

        built = load_zoo(path)  # the task generators are named in a built zoo's manifest
        prompts = [L.zoo_prompts(built, task, unlabeled=args.unlabeled) for task in tasks]
    if "experts" not in record:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(zoo["base"]))
        scorer = Scorer(tokenizer, zoo["documents"], L.stop_token_ids(tokenizer, "\n"), device)
        record["tasks"] = tasks
        record["base_model"] = {split: scorer(_model_forward(zoo["base"], device), split) for split in ("validation", "test")}
        experts = {"validation": [], "test": []}
        for index, expert in enumerate(zoo["experts"]):
            forward = _model_forward(expert, device)
            for split in experts:
                experts[split].append(scorer(forward, split)[index])
        record["experts"] = experts
        save()
    for variant in args.bases:
        init = args.cart_rank if variant == "cart" else 1.0
        grid = {"ta": args.ta_grid, "cart": args.cart_grid, "tsv_m": args.tsv_grid, "iso_cts": args.iso_grid}[variant]
        options = L.LearnOptions(
            variant=variant, objective="distill", init_rank_ratio=init, prior=grid[0], max_rank_ratio=args.max_rank_ratio,
            batch_size=args.batch_size, seed=args.seed, device=args.device,
        )  # fmt: skip
        clock = time.perf_counter()
        setup = L.prepare(zoo["experts"], prompts, base=zoo["base"], options=options, task_names=tasks, progress=False)
        prepare_seconds = time.perf_counter() - clock
        scorer = Scorer(setup.tokenizer, zoo["documents"], setup.stop_ids, device)
        model = setup.model

        def score_with(weights, split):
            return scorer(model.forward_with(weights), split)

        def score(split):
            return score_with(model.hard_weights(), split)

        base_key = f"{variant}:base"
        if base_key not in record["runs"]:
            validation = {}
            for value in grid:
                setup.reset(L.LearnOptions(**{**asdict(options), "prior": value}))
                validation[str(value)] = score("validation")
            # ties: the λ nearest the grid's middle (the method's default), then the first
            middle = grid[len(grid) // 2]
            best = select(grid, [_mean(validation[str(value)]) for value in grid], prefer=lambda value: -abs(value - middle)).setting
            setup.reset(L.LearnOptions(**{**asdict(options), "prior": best}))
            record["runs"][base_key] = {
                "prior": best, "init_rank_ratio": init, "grid": validation,
                "validation": validation[str(best)], "test": score("test"), "prepare_seconds": prepare_seconds,
            }  # fmt: skip
            save()
        prior = record["runs"][base_key]["prior"]
        for objective, mode, lr, steps in args.plan:
            key = f"{variant}:{objective}:{mode}{suffix}:{lr}"
            if key in record["runs"]:
                continue
            run_options = L.LearnOptions(
                **{**asdict(options), "prior": prior, "objective": objective, "lr": lr, "lr_schedule": args.lr_schedule, "steps": steps, "coefficients_only": mode == "coef"}
            )
            setup.reset(run_options)  # the objective too: its items come from the teachers' answers prepared above
            checkpoints = {}

            def on_step(step):
                if step in args.checkpoints or step == steps:
                    with torch.no_grad():
                        checkpoints[str(step)] = {"validation": score("validation"), "test": score("test")}

            clock = time.perf_counter()
            if mode == "weights":
                run = record["runs"][key] = train_all_weights(setup, steps, args.checkpoints, score_with)
                run["seconds"] = time.perf_counter() - clock
                print(f"{path.name} {key}: test {_mean(run['checkpoints'][str(steps)]['test']):.3f}; {run['seconds']:.0f} s", flush=True)
                save()
                continue
            result = L.run(setup, on_step=on_step)
            kept = result.info["kept_components"]
            record["runs"][key] = {
                "checkpoints": checkpoints,
                "seconds": time.perf_counter() - clock,
                "history": result.history[:: max(1, steps // 50)],
                "held_out_objective": result.info["held_out_objective"],
                "kept": {"before": kept["before"], "after": kept["after"], "band": kept["band"]},
                "coefficients": {k: result.info["coefficients"][k] for k in ("mean", "min", "max")},
            }
            best_step = max(checkpoints, key=lambda s: _mean(checkpoints[s]["validation"]))
            print(
                f"{path.name} {key}: val {_mean(record['runs'][base_key]['validation']):.3f} -> best {_mean(checkpoints[best_step]['validation']):.3f} "
                f"@{best_step} (test {_mean(checkpoints[best_step]['test']):.3f}); kept {kept['before']}->{kept['after']}; "
                f"{record['runs'][key]['seconds']:.0f} s",
                flush=True,
            )
            save()


class AllWeights:
    """A reference, not AdaRank: every weight of the base method's merge is a free parameter,
    trained on the same objective, prompts and teachers (a full fine-tune from the merge). It
    shows what one model of this size reaches with this data, the bound under which a learner
    of masks and coefficients works."""

    def __init__(self, model):
        self.skeleton = model.skeleton
        self.weights = {name: tensor.clone().requires_grad_(True) for name, tensor in model.hard_weights().items()}

    def parameters(self):
        return list(self.weights.values())

    def logits(self, ids, attention):
        kwargs = {"input_ids": ids, "attention_mask": attention}
        return torch.func.functional_call(self.skeleton, self.weights, args=(), kwargs=kwargs).logits


def train_all_weights(setup, steps, wanted, score_with) -> Dict:
    """Train AllWeights from the setup's current state (the base method) with the learner's own
    loop and options; the held-out objective before and after."""
    reference = AllWeights(setup.model)
    checkpoints = {}
    before = setup.measure(model=reference)[0]

    def on_reference_step(step):
        if step in wanted or step == steps:
            with torch.no_grad():
                weights = {name: tensor.detach() for name, tensor in reference.weights.items()}
                checkpoints[str(step)] = {"validation": score_with(weights, "validation"), "test": score_with(weights, "test")}

    history = setup.train(reference, on_step=on_reference_step)
    after = setup.measure(model=reference)[0]
    return {
        "checkpoints": checkpoints,
        "history": history[:: max(1, steps // 50)],
        "held_out_objective": {"name": setup.objective.name, "before": {"total": before}, "after": {"total": after}},
    }


def summarise(results: Dict) -> str:
    from mergekit_ext.evaluate.protocol.selection import select
    from mergekit_ext.evaluate.protocol.stats import summary

    zoos = [key for key in results if isinstance(results[key], dict) and "experts" in results[key]]
    lines = [
        "| base | objective | mode | lr | steps | val EM | test EM (mean ± std) | base test EM | gap closed (mean ± std) | normalized | − TA per zoo | zoos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    configs = sorted({key.rsplit(":", 1)[0] for zoo in zoos for key in results[zoo]["runs"] if not key.endswith(":base")})
    expert_test = [_mean(results[zoo]["experts"]["test"]) for zoo in zoos]
    base_model = [_mean(results[zoo]["base_model"]["test"]) for zoo in zoos]
    lines_head = [
        f"zoos: {len(zoos)}; base model test EM {_mean(base_model):.3f}; experts {_mean(expert_test):.3f}",
        "",
    ]

    def stats(values):
        entry = summary(values)  # mean and SAMPLE std over zoos, as in every table of the project
        return entry["mean"], entry["std"]

    ta_runs = [results[zoo]["runs"].get("ta:base") for zoo in zoos]
    ta_test = [_mean(run["test"]) for run in ta_runs] if all(ta_runs) else None

    def versus_ta(test):
        """Test EM minus task arithmetic's on the same zoo, in zoo order (paired by seed)."""
        return "" if ta_test is None else " ".join(f"{t - a:+.3f}" for t, a in zip(test, ta_test))

    for variant in ("ta", "cart", "tsv_m", "iso_cts"):
        base_runs = [results[zoo]["runs"].get(f"{variant}:base") for zoo in zoos]
        if not all(base_runs):
            continue
        base_test = [_mean(run["test"]) for run in base_runs]
        m, s = stats(base_test)
        gaps = [e - b for e, b in zip(expert_test, base_test)]
        lines.append(
            f"| {variant} | (base method, λ {', '.join(str(run['prior']) for run in base_runs)}) | | | 0 | "
            f"{_mean([_mean(run['validation']) for run in base_runs]):.3f} | {m:.3f} ± {s:.3f} | {m:.3f} | 0 | "
            f"{_mean([_mean([a / max(x, 1e-9) for a, x in zip(run['test'], results[z]['experts']['test'])]) for run, z in zip(base_runs, zoos)]):.3f} | "
            f"{versus_ta(base_test)} | {len(zoos)} |"
        )
        for config in configs:
            if not config.startswith(variant + ":"):
                continue
            _, objective, mode, *extras = config.split(":")
            settings = {extra[0]: extra[1:] for extra in extras}  # u: unlabeled prompts per task, b: batch per task, s: lr schedule
            candidates = {}
            for zoo in zoos:
                for key, run in results[zoo]["runs"].items():
                    if key.rsplit(":", 1)[0] != config:
                        continue
                    lr = key.rsplit(":", 1)[1]
                    for step, point in run["checkpoints"].items():
                        candidates.setdefault((lr, int(step)), {})[zoo] = point
            complete = {k: v for k, v in candidates.items() if len(v) == len(zoos)}
            if not complete:
                continue
            choices = list(complete)  # ties: the first (lr, step)
            lr, step = select(choices, [_mean([_mean(p["validation"]) for p in complete[choice].values()]) for choice in choices]).setting
            points = complete[(lr, step)]
            test = [_mean(points[zoo]["test"]) for zoo in zoos]
            closed = [(t - b) / g for t, b, g in zip(test, base_test, gaps)]
            normalized = [_mean([a / max(x, 1e-9) for a, x in zip(points[zoo]["test"], results[zoo]["experts"]["test"])]) for zoo in zoos]
            tm, ts = stats(test)
            cm, cs = stats(closed)
            unlabeled_text = f" + {settings['u']} unlabeled prompts/task" if "u" in settings else ""
            lines.append(
                f"| {variant} | {objective} | {MODE_LABELS[mode]}"
                f"{unlabeled_text}, batch {settings.get('b', BENCH_BATCH_SIZE)}/task | {lr} {settings.get('s', 'constant')} | {step} | "
                f"{_mean([_mean(points[z]['validation']) for z in zoos]):.3f} | {tm:.3f} ± {ts:.3f} | {_mean(base_test):.3f} | "
                f"{cm:+.2f} ± {cs:.2f} | {_mean(normalized):.3f} | {versus_ta(test)} | {len(zoos)} |"
            )
    return "\n".join(lines_head + lines + every_run(results, zoos, expert_test))


def every_run(results: Dict, zoos: List[str], expert_test: List[float]) -> List[str]:
    """Every run complete on all zoos at its last checkpoint (the table above keeps the best lr
    per configuration): how each lr and schedule did, with the paired difference to its base."""
    from mergekit_ext.evaluate.protocol.stats import summary

    lines = [
        "",
        "Every run at its last step (test EM per zoo in zoo order; gap closed of its own base method):",
        "",
        "| run | steps | val EM | test EM (mean ± std) | per zoo | gap closed (mean ± std) | − its base, per zoo |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({key for zoo in zoos for key in results[zoo]["runs"] if not key.endswith(":base")})
    for key in keys:
        runs = [results[zoo]["runs"].get(key) for zoo in zoos]
        bases = [results[zoo]["runs"].get(key.split(":", 1)[0] + ":base") for zoo in zoos]
        if not all(runs) or not all(bases):
            continue
        last = [run["checkpoints"][max(run["checkpoints"], key=int)] for run in runs]
        test = [_mean(point["test"]) for point in last]
        base_test = [_mean(base["test"]) for base in bases]
        closed = [(t - b) / (e - b) for t, b, e in zip(test, base_test, expert_test)]
        lines.append(
            f"| `{key}` | {max(runs[0]['checkpoints'], key=int)} | {_mean([_mean(point['validation']) for point in last]):.3f} | "
            f"{summary(test)['mean']:.3f} ± {summary(test)['std']:.3f} | {' '.join(f'{t:.3f}' for t in test)} | "
            f"{summary(closed)['mean']:+.2f} ± {summary(closed)['std']:.2f} | {' '.join(f'{t - b:+.3f}' for t, b in zip(test, base_test))} |"
        )
    return lines


def _floats(text):
    return [float(value) for value in text.split(",") if value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoos", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adarank.json"))
    parser.add_argument("--summarise", type=Path, default=None, help="Print the table of a results file and exit.")
    parser.add_argument("--render", type=Path, default=None, help="Rewrite the .md beside a results file from its JSON (no model is run) and exit.")
    parser.add_argument("--bases", default="cart,ta")
    parser.add_argument("--objectives", default="distill,entropy,entropy-answer")
    parser.add_argument("--modes", default="full,coef")
    parser.add_argument("--lrs", default="1e-3,3e-3", help="lr grid for distill masks+coef; the others use --other-lr")
    parser.add_argument("--other-lr", type=float, default=1e-3)
    parser.add_argument("--weights-lr", type=float, default=3e-4, help="lr of --modes weights (the reference that trains every weight; the zoo's fine-tuning lr)")
    parser.add_argument("--lr-schedule", default="constant", help="constant or cosine (runs get a :s<schedule> key)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--entropy-steps", type=int, default=200)
    parser.add_argument("--checkpoints", default="50,100,200,300")
    from mergekit_ext.evaluate.protocol.grids import ADARANK_PRIOR_GRIDS

    # The base grids are the protocol table's (adarank_prior): each method's hard-zoo default in the middle.
    priors = {variant: ",".join(f"{value:g}" for value in grid) for variant, grid in ADARANK_PRIOR_GRIDS.items()}
    parser.add_argument("--ta-grid", default=priors["ta"])
    parser.add_argument("--cart-grid", default=priors["cart"])
    parser.add_argument("--tsv-grid", default=priors["tsv_m"], help="TSV-M λ grid (the hard zoo's default, 2.0, in the middle)")
    parser.add_argument("--iso-grid", default=priors["iso_cts"], help="Iso-CTS λ grid (the hard zoo's default, 3.0, in the middle)")
    parser.add_argument("--cart-rank", type=float, default=0.1)
    parser.add_argument("--max-rank-ratio", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=BENCH_BATCH_SIZE, help="prompts per task per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled", type=int, default=0, help="Learn on this many more prompts per task, drawn from the zoo's task generators (never a validation or test prompt).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.summarise is not None:
        print(summarise(json.loads(args.summarise.read_text())))
        return
    if args.render is not None:
        args.render.with_suffix(".md").write_text(summarise(json.loads(args.render.read_text())) + "\n")
        return
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.bases = args.bases.split(",")
    args.ta_grid, args.cart_grid = _floats(args.ta_grid), _floats(args.cart_grid)
    args.tsv_grid, args.iso_grid = _floats(args.tsv_grid), _floats(args.iso_grid)
    args.checkpoints = {int(value) for value in args.checkpoints.split(",")}
    plan = []
    for objective in args.objectives.split(","):
        for mode in args.modes.split(","):
            if objective == "distill" and mode == "full":
                plan += [(objective, mode, lr, args.steps) for lr in _floats(args.lrs)]
            elif mode == "weights":
                plan.append((objective, mode, args.weights_lr, args.steps))
            else:
                steps = args.steps if objective == "distill" else args.entropy_steps
                plan.append((objective, mode, args.other_lr if objective != "distill" else max(_floats(args.lrs)), steps))
    # Most informative first: every objective's masks+coefficients run, then the ablations.
    args.plan = sorted(plan, key=lambda item: (item[1] != "full", ["distill", "entropy", "entropy-answer"].index(item[0])))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(json.dumps(results, indent=1))
        temporary.replace(args.out)

    for zoo in args.zoos:
        bench_zoo(zoo.absolute(), args, results, save)
    table = summarise(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
