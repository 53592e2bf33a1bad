"""The demo zoo: a small, seeded model family that can tell merge methods apart.

``build_zoo(DIR)`` makes, offline and deterministically:

* a tiny Llama-architecture base with its own character tokenizer, pretrained on
  a mixture of synthetic text tasks until it is competent but not expert (the
  mixture is steered: a task the base already half-knows gets a small share);
* per task, one full fine-tune (``experts/<task>``) and one peft LoRA adapter
  (``adapters/<task>``, same LoRA init seed for every task), both trained
  lightly (low learning rate, few steps) so that their task vectors are small;
* per task, held-out validation and test JSONL and lm-eval task YAMLs
  (``tasks/``): ``zoo_<task>`` scores the test split, ``zoo_<task>_val`` the
  validation split;
* ``manifest.json``, written last: the zoo is complete exactly when it exists.

In the ``test``/``demo``/``bench`` presets every task is a 4-way multiple choice
scored by log-likelihood (lm-eval's ``multiple_choice`` output type, metric
``acc``): cheap on a CPU and with three hard distractors per item. In the
``hard``/``hard-test`` presets every task is a generation (lm-eval's
``generate_until``: greedy until ``\n``, metric ``exact_match``, case- and
whitespace-exact); the model is trained on prompt + answer + ``\n`` with the
loss on the answer and the stop only. Tasks use distinct prompt formats and alphabets
(see DESIGN.md, "What makes a zoo that can judge merges"), because tasks that
share one format conflict so strongly that every merge scores below the base.

``train.multiple_choice_accuracy`` and ``train.exact_match`` are fast in-process
scorers that compute exactly lm-eval's ``acc`` (same tokenization, same sum of
continuation log-probs) and ``exact_match`` (same greedy generation, no
padding); the build uses them for its own numbers and the tests check that they
agree with lm-eval.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_ext import io
from mergekit_ext.evaluate.protocol.selection import select
from mergekit_ext.modeling import load_state_dict
from mergekit_ext.zoo.format import (
    MANIFEST_NAME,
    TASK_PREFIX,
    ZOO_FORMAT,
    Zoo,
    ZooError,
    load_zoo,
    write_task_yamls,
)
from mergekit_ext.zoo.presets import LATER_FIELDS, PRESETS, Preset
from mergekit_ext.zoo.tasks import GENERATION, GENERATION_STOP, LM_EVAL_MAX_GEN_TOKS, document_key, draw_distinct, make_item
from mergekit_ext.zoo.train import (
    LORA_TARGETS,
    load_causal_lm,
    merge_in_memory,
    score,
    train,
)

# What the manifest says about the score, per task kind.
METRIC_DESCRIPTIONS = {
    "multiple_choice": "acc (lm-eval multiple_choice, 4 choices, chance 0.25)",
    GENERATION: (
        f"exact_match (lm-eval generate_until, greedy, until {GENERATION_STOP!r}, max_gen_toks {LM_EVAL_MAX_GEN_TOKS}; "
        "case- and whitespace-exact; no chance level)"
    ),
}


def _log(message: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message)


def _is_complete(root: Path, preset: Preset, seed: int) -> bool:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = io.read_json_object(manifest_path)
    except ValueError:
        return False
    if manifest.get("format") != ZOO_FORMAT or not _same_preset(manifest.get("preset"), preset) or manifest.get("seed") != seed:
        raise ZooError(
            f"{root} already holds a different zoo (preset {manifest.get('preset', {}).get('name')!r}, "
            f"seed {manifest.get('seed')}); choose another folder or delete it"
        )
    paths = [manifest["base"]] + [p for entry in manifest["tasks"].values() for p in (entry["expert"], entry["adapter"], entry["test"])]
    return all((root / p).exists() for p in paths)


def _same_preset(recorded, preset: Preset) -> bool:
    """The manifest's preset is ``preset`` (a manifest written before a field existed recorded its default)."""
    if not isinstance(recorded, dict):
        return False
    expected = json.loads(json.dumps(asdict(preset)))
    for name, default in LATER_FIELDS.items():
        if name not in recorded and expected.get(name) == default:
            expected.pop(name)
    return recorded == expected


def build_zoo(
    directory: str | Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: bool = True,
) -> Zoo:
    """Build the zoo in ``directory`` (or return it unchanged when it is already built).

    ``threads``: torch CPU threads while training; by default 1 for the small
    presets, whose matrices are too small to profit from more (and extra threads
    spin badly on a busy machine), unchanged for ``bench``.
    """
    from mergekit_ext.zoo.smol import SMOL_PRESETS, build_smol_zoo

    if preset in SMOL_PRESETS:  # a pretrained chat LLM's experts: its own build
        return build_smol_zoo(directory, seed=seed, settings=SMOL_PRESETS[preset], device=device, threads=threads or 1, progress=progress)
    if preset not in PRESETS:
        raise ZooError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS) + sorted(SMOL_PRESETS)}")
    settings = PRESETS[preset]
    root = Path(directory).absolute()
    if _is_complete(root, settings, seed):
        _log(f"zoo already built: {root}", progress)
        return load_zoo(root)
    from transformers.utils import logging as hf_logging

    previous_threads = torch.get_num_threads()
    wanted = threads or (1 if preset in ("test", "demo", "hard", "hard-test", "demo-hard") else previous_threads)
    torch.set_num_threads(wanted)
    # transformers' per-load/save bars would drown the build's own bars.
    hf_bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _build(root, settings, seed=seed, device=device, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
        if hf_bars_were_on:
            hf_logging.enable_progress_bar()


def _build(root: Path, settings: Preset, *, seed: int, device: str, progress: bool) -> Zoo:
    marker = root / ".zoo-building"
    if root.exists() and any(root.iterdir()) and not marker.exists() and not (root / MANIFEST_NAME).exists():
        raise ZooError(f"refusing to build a zoo in a non-empty folder that is not a zoo: {root}")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("a zoo build started here and has not finished\n")
    (root / MANIFEST_NAME).unlink(missing_ok=True)

    from tqdm.auto import tqdm

    from mergekit_ext.modeling import (
        char_tokenizer,
        llama_config,
        random_model,
        save_model,
    )

    started = time.perf_counter()
    cpu_started = time.process_time()
    torch.manual_seed(seed)
    tasks = settings.task_objects
    generation = settings.kind == GENERATION
    tokenizer = char_tokenizer(list(settings.alphabet) if settings.alphabet else None)

    # Held-out data first, so training can skip every held-out query.
    documents: Dict[str, Dict[str, List[Dict]]] = {}
    entries: Dict[str, Dict] = {}
    held_out: set = set()
    for index, task in enumerate(tasks):
        rng = random.Random(f"{seed}-{task.name}-heldout")
        seen: set = set()
        splits: Dict[str, List[Dict]] = {"validation": [], "test": []}
        for split, count in (("validation", settings.validation_items), ("test", settings.test_items)):
            splits[split] = draw_distinct(task, rng, count, seen)
            if len(splits[split]) < count:
                raise ZooError(f"task {task.name}: cannot draw {count} distinct {split} prompts")
        held_out |= seen
        documents[task.name] = splits
        data_dir = root / "data" / task.name
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, items in splits.items():
            (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items), encoding="utf-8")
        entries[task.name] = {
            "description": task.description,
            "kind": settings.kind,
            "metric": "exact_match" if generation else "acc",
            "lm_eval_task": f"{TASK_PREFIX}{task.name}",
            "lm_eval_task_validation": f"{TASK_PREFIX}{task.name}_val",
            "validation": f"data/{task.name}/validation.jsonl",
            "test": f"data/{task.name}/test.jsonl",
            "expert": f"experts/{task.name}",
            "adapter": f"adapters/{task.name}",
        }
    write_task_yamls(root, entries)

    def accuracy(model, task_name: str, split: str) -> float:
        return score(model, tokenizer, documents[task_name][split], kind=settings.kind, device=device)

    # A bar per expert inside the experts' bar is fine on a terminal; in a log file
    # nested bars leave cursor-up escape codes, so there only the outer bar runs.
    nested_progress = progress and sys.stderr.isatty()

    def train_args(step_seed: int, nested: bool = False):
        return dict(
            batch_size=settings.batch_size, seed=step_seed, held_out=held_out, device=device,
            progress=nested_progress if nested else progress,
        )

    # 1. The base: pretrained on the whole mixture.
    config = llama_config(
        len(tokenizer),
        hidden_size=settings.hidden_size,
        layers=settings.layers,
        heads=settings.heads,
        intermediate_size=settings.intermediate_size,
    )
    base_model = random_model(config, seed=seed).to(device)
    probe_documents = {}
    for task in tasks:
        rng = random.Random(f"{seed}-{task.name}-probe")
        probe_documents[task.name] = []
        probe_seen: set = set()
        while len(probe_documents[task.name]) < settings.probe_items:
            document = make_item(task, rng)
            key = document_key(task, document)
            if key in held_out or (generation and key in probe_seen):  # generation probes: distinct prompts
                continue
            probe_seen.add(key)
            probe_documents[task.name].append(document)
    pretrain_trace: List[Dict] = []
    stopped_at: List[int] = []

    def steer_mixture(step: int) -> Optional[List[float]]:
        scores = [score(base_model, tokenizer, probe_documents[t.name], kind=settings.kind, device=device) for t in tasks]
        pretrain_trace.append({"step": step, **{t.name: s for t, s in zip(tasks, scores)}})
        if all(score >= settings.base_target for score in scores):
            stopped_at.append(step)
            return None
        return [settings.mixture_floor if score >= settings.base_target else 1.0 for score in scores]

    pretrain_started = time.perf_counter()
    train(
        base_model,
        tokenizer,
        tasks,
        steps=settings.pretrain_steps,
        lr=settings.pretrain_lr,
        description="pretrain base",
        check=steer_mixture if settings.base_target else None,
        check_every=settings.probe_every,
        **train_args(seed),
    )
    phase_seconds = {"pretrain": time.perf_counter() - pretrain_started}
    with io.atomic_output_dir(root / "base", overwrite=True) as staging:
        save_model(base_model.cpu(), staging, tokenizer)
    base_model.to(device)
    base_path = root / "base"
    metrics: Dict = {"pretraining": pretrain_trace, "base": {}, "experts": {}, "adapters": {}}
    for task in tasks:
        metrics["base"][task.name] = {split: accuracy(base_model, task.name, split) for split in ("validation", "test")}

    # 2. Full fine-tunes, one per task, light.
    phase_started = time.perf_counter()
    for index, task in enumerate(tqdm(tasks, desc="fine-tune experts", disable=not progress)):
        expert = load_causal_lm(base_path, device)
        train(expert, tokenizer, [task], steps=settings.finetune_steps, lr=settings.finetune_lr, description=f"expert {task.name}", **train_args(seed + 1000 + index, nested=True))
        metrics["experts"][task.name] = {task.name: {split: accuracy(expert, task.name, split) for split in ("validation", "test")}}
        with io.atomic_output_dir(root / "experts" / task.name, overwrite=True) as staging:
            save_model(expert.cpu(), staging, tokenizer)
        del expert

    phase_seconds["finetune"] = time.perf_counter() - phase_started
    phase_started = time.perf_counter()

    # 3. LoRA adapters, one per task, all from the same LoRA initialisation.
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    for index, task in enumerate(tqdm(tasks, desc="train LoRA adapters", disable=not progress)):
        torch.manual_seed(seed + 7)  # same LoRA init for every task
        adapted = get_peft_model(load_causal_lm(base_path, device), lora_config)
        train(adapted, tokenizer, [task], steps=settings.lora_steps, lr=settings.lora_lr, description=f"LoRA {task.name}", **train_args(seed + 2000 + index, nested=True))
        metrics["adapters"][task.name] = {split: accuracy(adapted, task.name, split) for split in ("validation", "test")}
        adapted.peft_config["default"].base_model_name_or_path = str(base_path)
        with io.atomic_output_dir(root / "adapters" / task.name, overwrite=True) as staging:
            adapted.cpu().save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
        del adapted

    phase_seconds["lora"] = time.perf_counter() - phase_started
    phase_started = time.perf_counter()

    # 4. Task arithmetic over all experts through mergekit's engine, lambda picked on validation.
    base_state = load_state_dict(base_path)
    expert_states = {task.name: load_state_dict(root / "experts" / task.name) for task in tasks}
    grid: Dict[str, Dict[str, Dict[str, float]]] = {}
    probe = load_causal_lm(base_path, device)
    for scale in tqdm(settings.lambda_grid, desc="task arithmetic grid", disable=not progress):
        merged = merge_in_memory(base_state, expert_states, "task_arithmetic", {"weight": 1.0, "lambda": scale})
        probe.load_state_dict(merged, strict=True)
        grid[f"{scale:g}"] = {task.name: {"validation": accuracy(probe, task.name, "validation")} for task in tasks}
    keys = list(grid)  # the protocol's selection on the validation sum over tasks; ties: the first λ
    best = select(keys, [sum(grid[key][t]["validation"] for t in settings.tasks) for key in keys]).setting
    probe.load_state_dict(merge_in_memory(base_state, expert_states, "task_arithmetic", {"weight": 1.0, "lambda": float(best)}))
    for task in tasks:
        grid[best][task.name]["test"] = accuracy(probe, task.name, "test")
    metrics["task_arithmetic"] = {"lambda": float(best), "grid": grid}
    del probe

    phase_seconds["task_arithmetic"] = time.perf_counter() - phase_started
    elapsed = time.perf_counter() - started
    metrics["build"] = {
        "pretrain_steps_done": stopped_at[0] if stopped_at else settings.pretrain_steps,
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "phase_seconds": {name: round(value, 1) for name, value in phase_seconds.items()},
    }
    manifest = {
        "format": ZOO_FORMAT,
        "preset": asdict(settings),
        "seed": seed,
        "root": str(root),
        "build_seconds": round(elapsed, 1),
        "device": device,
        "parameters": sum(p.numel() for p in base_model.parameters()),
        "base": "base",
        "tokenizer": "char_tokenizer (saved with the base; AutoTokenizer reloads it identically)",
        "task_yaml_dir": "tasks",
        "metric": METRIC_DESCRIPTIONS[settings.kind],
        "tasks": entries,
        "lora": {"rank": settings.lora_rank, "alpha": 2 * settings.lora_rank, "target_modules": list(LORA_TARGETS), "init_seed": seed + 7},
        "metrics": metrics,
    }
    # The model card first: the manifest, written last, says the zoo is complete.
    from mergekit_ext.zoo.card import CARD_NAME, pick_example, render_card

    io.write_text(root / CARD_NAME, render_card(manifest, pick_example(Zoo(root, manifest), tokenizer, device)))
    io.write_json(root / MANIFEST_NAME, manifest)
    marker.unlink(missing_ok=True)
    zoo = load_zoo(root)
    _log(f"zoo built: {root}", progress)  # its report is the caller's to print (`zoo` prints it once)
    return zoo


def build_report_rows(zoo: Zoo, split: str = "test") -> List[Tuple[str, float, float, float, float]]:
    """(task, base, expert on own task, LoRA on own task, task arithmetic at its best lambda)."""
    metrics = zoo.manifest["metrics"]
    ta = metrics["task_arithmetic"]
    best = ta["grid"][f"{ta['lambda']:g}"]
    return [
        (
            task,
            metrics["base"][task][split],
            metrics["experts"][task][task][split],
            metrics["adapters"][task][split],
            best[task][split],
        )
        for task in zoo.tasks
    ]


def normalized_scores(rows: List[Tuple[str, float, float, float, float]]) -> Dict[str, float]:
    """Task arithmetic's mean over tasks of merged / expert and of (merged − base) / (expert − base).

    The second (gain-normalized) is the share of the fine-tuning gain a merge
    keeps; merged / expert is inflated by what the base already knew. Tasks
    where the expert is not above the base are left out of the gain mean.
    """
    ratio = [ta / expert for _, _, expert, _, ta in rows if expert > 0]
    gain = [(ta - base) / (expert - base) for _, base, expert, _, ta in rows if expert - base > 1e-9]
    return {
        "normalized": sum(ratio) / len(ratio) if ratio else float("nan"),
        "gain_normalized": sum(gain) / len(gain) if gain else float("nan"),
    }


# The regime the `hard` preset is built for (issue 11): experts at least 40
# points above the base on the mean, task arithmetic at its best lambda keeping
# 40-85 % of the experts (merged / expert).
REGIME = {"expert_gain": 0.40, "ta_normalized": (0.40, 0.85)}


def format_build_report(zoo: Zoo, split: str = "test") -> str:
    if "chat" in zoo.manifest:  # a smol zoo: no task arithmetic in its build, retention instead
        from mergekit_ext.zoo.smol import format_smol_report

        return format_smol_report(zoo.manifest, split)
    metrics = zoo.manifest["metrics"]
    rows = build_report_rows(zoo, split)
    generation = zoo.task_kind == GENERATION
    what = "exact match (greedy generation until \\n, case- and whitespace-exact)" if generation else "accuracy (4-way multiple choice)"
    build = metrics.get("build", {})
    cpu = f", {build['cpu_seconds']:.0f} s of CPU" if "cpu_seconds" in build else ""
    lines = [
        f"zoo {zoo.root} (preset {zoo.manifest['preset']['name']}, seed {zoo.manifest.get('seed')}, "
        f"{zoo.manifest['parameters']:,} parameters, built in {zoo.manifest['build_seconds']:.0f} s{cpu})",
        f"{split} {what}; task arithmetic at lambda {metrics['task_arithmetic']['lambda']:g}, picked on validation:",
        f"  {'task':<10}{'base':>8}{'expert':>8}{'LoRA':>8}{'TA':>8}",
    ]
    for task, base, expert, lora, ta in rows:
        lines.append(f"  {task:<10}{base:>8.3f}{expert:>8.3f}{lora:>8.3f}{ta:>8.3f}")
    means = [sum(r[i] for r in rows) / len(rows) for i in range(1, 5)]
    lines.append(f"  {'mean':<10}" + "".join(f"{m:>8.3f}" for m in means))
    normalized = normalized_scores(rows)
    lines.append(
        f"TA / expert {normalized['normalized']:.3f}, TA gain-normalized (TA − base) / (expert − base) "
        f"{normalized['gain_normalized']:.3f} (means over tasks)"
    )
    if generation:
        gain = means[1] - means[0]
        low, high = REGIME["ta_normalized"]
        checks = [
            f"experts − base {gain:+.3f} ({'ok' if gain >= REGIME['expert_gain'] else 'MISSED'}: ≥ {REGIME['expert_gain']:.2f})",
            f"TA / expert {normalized['normalized']:.3f} ({'ok' if low <= normalized['normalized'] <= high else 'MISSED'}: {low:.2f}–{high:.2f})",
        ]
        lines.append("regime: " + "; ".join(checks))
    return "\n".join(lines)
