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

Every task is a 4-way multiple choice scored by log-likelihood (lm-eval's
``multiple_choice`` output type, metric ``acc``): cheap on a CPU and with three
hard distractors per item. Tasks use distinct prompt formats and alphabets
(see DESIGN.md, "What makes a zoo that can judge merges"), because tasks that
share one format conflict so strongly that every merge scores below the base.

``multiple_choice_accuracy`` is a fast in-process scorer that computes exactly
lm-eval's ``acc`` (same tokenization, same sum of continuation log-probs); the
build uses it for its own numbers and the tests check that it agrees with
lm-eval.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext.io import atomic_output_dir, write_json
from mergekit_ext.modeling import pad_right

ZOO_FORMAT = "mergekit-ext-zoo/1"
MANIFEST_NAME = "manifest.json"
TASK_PREFIX = "zoo_"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"


class ZooError(ValueError):
    """A zoo folder that is missing, incomplete or not a zoo."""


# --------------------------------------------------------------------------
# Tasks: each item is (query, correct answer, three distractors).

Item = Tuple[str, str, List[str]]


@dataclass(frozen=True)
class ZooTask:
    name: str
    description: str
    make: Callable[[random.Random], Item]


def _word(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _distinct(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.sample(alphabet, rng.randint(low, high)))


def _shift(text: str, alphabet: str, offset: int) -> str:
    return "".join(alphabet[(alphabet.index(c) + offset) % len(alphabet)] for c in text)


def _swap_adjacent(rng: random.Random, text: str) -> str:
    position = rng.randrange(len(text) - 1)
    return text[:position] + text[position + 1] + text[position] + text[position + 2 :]


def _replace_one(rng: random.Random, text: str, alphabet: str) -> str:
    position = rng.randrange(len(text))
    replacement = rng.choice([c for c in alphabet if c not in text])
    return text[:position] + replacement + text[position + 1 :]


# Distractors are near misses (one position wrong), so a model that half knows
# a task scores well above chance but well below an expert.


def _reverse(rng: random.Random) -> Item:
    text = _distinct(rng, LOWER, 3, 5)
    answer = text[::-1]
    return f"rev({text}) =", answer, [_swap_adjacent(rng, answer), _swap_adjacent(rng, answer), _replace_one(rng, answer, LOWER)]


def _sort(rng: random.Random) -> Item:
    text = _distinct(rng, DIGITS, 5, 7)
    answer = "".join(sorted(text))
    distractors = [_swap_adjacent(rng, answer)]
    while len(distractors) < 3:
        distractors.append("".join(sorted(_replace_one(rng, text, DIGITS))))
    return f"sort[{text}] ->", answer, distractors


def _duplicate(rng: random.Random) -> Item:
    # Distractors double a near miss of the input, so every choice has the doubled shape.
    text = _distinct(rng, DIGITS, 4, 6)

    def doubled(word: str) -> str:
        return "".join(c + c for c in word)

    return f"dup[{text}] ->", doubled(text), [doubled(_swap_adjacent(rng, text)), doubled(_replace_one(rng, text, DIGITS)), doubled(text[::-1])]


def _next_letter(rng: random.Random) -> Item:
    text = _word(rng, UPPER, 4, 7)
    answer = _shift(text, UPPER, 1)

    def one_off() -> str:
        position = rng.randrange(len(text))
        return answer[:position] + _shift(text[position], UPPER, rng.choice((0, 2, -1))) + answer[position + 1 :]

    return f"NEXT {text} :", answer, [one_off(), one_off(), one_off()]


def _count_hashes(rng: random.Random) -> Item:
    text = _word(rng, "#+*", 10, 16)
    count = min(text.count("#"), 9)
    text = text if text.count("#") <= 9 else text.replace("#", "+", text.count("#") - 9)
    wrong = [value for value in (count + 1, count - 1, count + 2, count - 2, count + 3) if 0 <= value <= 9]
    return f"#?{text}|", str(count), [str(value) for value in wrong[:3]]


def _lower_case(rng: random.Random) -> Item:
    text = _distinct(rng, UPPER, 3, 6)
    answer = text.lower()
    return f"low<{text}> =", answer, [text, answer[::-1], _shift(answer, LOWER, 1)]


def _max_digit(rng: random.Random) -> Item:
    text = _distinct(rng, DIGITS, 4, 7)
    values = sorted(text)
    distractors = [values[0], values[-2], values[len(values) // 2 - 1]]
    return f"max({text}) ?", values[-1], distractors


def _swap_pairs(rng: random.Random) -> Item:
    text = "".join(rng.sample(LOWER, 6))
    answer = "".join(text[i + 1] + text[i] for i in range(0, 6, 2))
    return f"swp/{text}/ =", answer, [text, text[::-1], answer[::-1]]


TASKS: Dict[str, ZooTask] = {
    task.name: task
    for task in (
        ZooTask("reverse", "reverse lowercase letters: rev(abcd) = dcba", _reverse),
        ZooTask("sort", "sort distinct digits: sort[3912] -> 1239", _sort),
        ZooTask("dup", "repeat every digit: dup[372] -> 337722", _duplicate),
        ZooTask("next", "shift uppercase letters by one: NEXT ABZ : BCA", _next_letter),
        ZooTask("count", "count the # among #+*: #?#+#*| 2", _count_hashes),
        ZooTask("lower", "lower-case distinct capitals: low<ABC> = abc", _lower_case),
        ZooTask("max", "largest digit: max(3817) ? 8", _max_digit),
        ZooTask("swap", "swap letters pairwise: swp/abcdef/ = badcfe", _swap_pairs),
    )
}


def make_document(task: ZooTask, rng: random.Random) -> Dict:
    """One lm-eval document: the answer sits at a seeded random position among the choices."""
    while True:
        query, answer, distractors = task.make(rng)
        choices = [answer] + distractors
        if len(set(choices)) == len(choices):
            break
    order = list(range(len(choices)))
    rng.shuffle(order)
    shuffled = [choices[i] for i in order]
    return {"query": query, "choices": shuffled, "label": shuffled.index(answer)}


# --------------------------------------------------------------------------
# Presets.


@dataclass(frozen=True)
class Preset:
    name: str
    tasks: Tuple[str, ...]
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    lora_steps: int
    lora_lr: float
    lora_rank: int
    batch_size: int
    validation_items: int
    test_items: int
    lambda_grid: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    # Pretraining stops feeding a task (down to ``mixture_floor`` of its share, so
    # it is not forgotten) once the base reaches ``base_target`` accuracy on it,
    # measured every ``probe_every`` steps on probe items drawn like training
    # data; it stops when every task is there or after ``pretrain_steps``. The
    # tasks learn at very different speeds, and this makes the base about
    # equally (half) competent on all of them: the regime where merges can win.
    base_target: Optional[float] = None
    mixture_floor: float = 0.1
    probe_every: int = 20
    probe_items: int = 48


PRESETS: Dict[str, Preset] = {
    "test": Preset(
        name="test",
        tasks=("reverse", "dup", "next", "count"),
        hidden_size=32,
        layers=2,
        heads=2,
        intermediate_size=64,
        pretrain_steps=300,
        pretrain_lr=3e-3,
        finetune_steps=80,
        finetune_lr=2e-3,
        lora_steps=40,
        lora_lr=3e-3,
        lora_rank=2,
        batch_size=32,
        validation_items=40,
        test_items=60,
        lambda_grid=(0.5, 1.0),
        base_target=0.6,
    ),
    "demo": Preset(
        name="demo",
        tasks=("reverse", "dup", "next", "count"),
        hidden_size=64,
        layers=3,
        heads=4,
        intermediate_size=128,
        pretrain_steps=400,
        pretrain_lr=3e-3,
        finetune_steps=100,
        finetune_lr=7e-4,
        lora_steps=100,
        lora_lr=3e-3,
        lora_rank=4,
        batch_size=64,
        validation_items=100,
        test_items=200,
        base_target=0.5,
        probe_every=10,
    ),
    "bench": Preset(
        name="bench",
        tasks=tuple(TASKS),
        hidden_size=256,
        layers=6,
        heads=8,
        intermediate_size=704,
        pretrain_steps=3000,
        pretrain_lr=1e-3,
        finetune_steps=200,
        finetune_lr=2e-4,
        lora_steps=200,
        lora_lr=1e-3,
        lora_rank=8,
        batch_size=64,
        validation_items=200,
        test_items=500,
        lambda_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
        base_target=0.6,
        probe_every=50,
        probe_items=64,
    ),
}


# --------------------------------------------------------------------------
# The zoo on disk.


@dataclass
class Zoo:
    """A built zoo: absolute paths to everything, read from its manifest."""

    root: Path
    manifest: Dict = field(repr=False)

    @property
    def tasks(self) -> List[str]:
        return list(self.manifest["tasks"])

    @property
    def base(self) -> Path:
        return self.root / self.manifest["base"]

    def expert(self, task: str) -> Path:
        return self.root / self.manifest["tasks"][task]["expert"]

    def adapter(self, task: str) -> Path:
        return self.root / self.manifest["tasks"][task]["adapter"]

    @property
    def task_dir(self) -> Path:
        return self.root / self.manifest["task_yaml_dir"]

    def lm_eval_task(self, task: str, split: str = "test") -> str:
        entry = self.manifest["tasks"][task]
        return entry["lm_eval_task"] if split == "test" else entry["lm_eval_task_validation"]

    def documents(self, task: str, split: str) -> List[Dict]:
        path = self.root / self.manifest["tasks"][task][split]
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    @property
    def eval_cache(self) -> Path:
        return self.root / "evals"


def load_zoo(directory: str | Path) -> Zoo:
    """Open a built zoo; re-renders its task YAMLs if the folder was moved."""
    root = Path(directory).absolute()
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ZooError(f"not a built zoo (no {MANIFEST_NAME}): {root} — build it with `mergekit-ext zoo {directory}`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != ZOO_FORMAT:
        raise ZooError(f"{manifest_path} is not a {ZOO_FORMAT} manifest")
    zoo = Zoo(root, manifest)
    if manifest.get("root") != str(root):
        _write_task_yamls(zoo.root, manifest["tasks"])
        manifest["root"] = str(root)
        write_json(manifest_path, manifest)
    return zoo


def _write_task_yamls(root: Path, tasks: Dict[str, Dict]) -> None:
    # lm-eval's json loader needs absolute data paths; both splits are listed so
    # either YAML can be read on its own.
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in tasks.items():
        data_files = {"validation": str(root / entry["validation"]), "test": str(root / entry["test"])}
        for task_name, split in ((entry["lm_eval_task"], "test"), (entry["lm_eval_task_validation"], "validation")):
            lines = [
                f"# {TASKS[name].description}",
                f"task: {task_name}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    validation: {json.dumps(data_files['validation'])}",
                f"    test: {json.dumps(data_files['test'])}",
                f"test_split: {split}",
                "output_type: multiple_choice",
                'doc_to_text: "{{query}}"',
                "doc_to_choice: choices",
                "doc_to_target: label",
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                "  version: 1.0",
            ]
            (folder / f"{task_name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Training and scoring.


def _encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]):
    """Token ids of context+continuation and where the continuation starts (lm-eval's split)."""
    context_ids = tokenizer(list(contexts), add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer([c + d for c, d in zip(contexts, continuations)], add_special_tokens=False)["input_ids"]
    return whole_ids, [len(ids) for ids in context_ids]


def _training_batch(tokenizer, tasks: Sequence[ZooTask], rng: random.Random, size: int, held_out: set, device, weights=None):
    contexts, continuations = [], []
    while len(contexts) < size:
        task = rng.choices(tasks, weights=weights)[0] if weights else tasks[rng.randrange(len(tasks))]
        query, answer, _ = task.make(rng)
        if query in held_out:
            continue
        contexts.append(query)
        continuations.append(" " + answer)
    sequences, starts = _encode_pairs(tokenizer, contexts, continuations)
    ids, mask = pad_right(sequences, tokenizer.pad_token_id, device)
    labels = torch.full_like(ids, -100)
    for row, (sequence, start) in enumerate(zip(sequences, starts)):
        # Loss on the answer only: the inputs are random strings, not worth modelling.
        labels[row, start : len(sequence)] = ids[row, start : len(sequence)]
    return ids, mask, labels


def _train(model, tokenizer, tasks, *, steps, lr, batch_size, seed, held_out, device, description, progress, warmup=True, weights=None, check=None, check_every=20):
    """AdamW with warmup and cosine decay on answer-token loss.

    ``check(step)``, called every ``check_every`` steps, returns new mixture
    weights, or None to stop early.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup_steps = max(1, steps // 20) if warmup else 0

    def learning_rate(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False)
    loss_value = float("nan")
    for step in bar:
        ids, mask, labels = _training_batch(tokenizer, tasks, rng, batch_size, held_out, device, weights)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if check is not None and (step + 1) % check_every == 0:
            weights = check(step + 1)
            model.train()
            if weights is None:
                break
    model.eval()
    return loss_value


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, documents: Sequence[Dict], *, batch_size: int = 256, device="cpu") -> float:
    """lm-eval's ``acc`` for the zoo's multiple-choice documents, computed in process.

    Same requests as lm-eval: context = query, continuation = " " + choice,
    score = sum of the continuation's token log-probs, prediction = argmax.
    """
    contexts, continuations, owners = [], [], []
    for index, document in enumerate(documents):
        for choice in document["choices"]:
            contexts.append(document["query"])
            continuations.append(" " + choice)
            owners.append(index)
    sequences, starts = _encode_pairs(tokenizer, contexts, continuations)
    scores = torch.empty(len(sequences), dtype=torch.float64)
    model.eval()
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first : first + batch_size]
        ids, mask = pad_right(chunk, tokenizer.pad_token_id or 0, device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        for row, sequence in enumerate(chunk):
            start = starts[first + row]
            targets = ids[row, start : len(sequence)]
            picked = log_probs[row, start - 1 : len(sequence) - 1].gather(-1, targets[:, None])
            scores[first + row] = picked.sum().double()
    correct = 0
    offset = 0
    for document in documents:
        count = len(document["choices"])
        prediction = int(torch.argmax(scores[offset : offset + count]))
        correct += int(prediction == document["label"])
        offset += count
    return correct / max(1, len(documents))


# --------------------------------------------------------------------------
# Building.


def _load_causal_lm(path: Path, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()


def _state_dict(path: Path) -> Dict[str, torch.Tensor]:
    from mergekit_ext.modeling import load_state_dict

    return load_state_dict(path)


def merge_in_memory(
    base: Dict[str, torch.Tensor],
    experts: Dict[str, Dict[str, torch.Tensor]],
    method: str,
    parameters: Dict[str, object],
) -> Dict[str, torch.Tensor]:
    """A merge of all experts onto the base by mergekit's own engine, in memory (for grids)."""
    from mergekit.merge_methods import merge_state_dicts

    import mergekit_ext  # noqa: F401  (registers this package's methods too)

    models = {"base": base, **{f"expert_{name}": state for name, state in experts.items()}}
    return merge_state_dicts(models, method, base="base", parameters=dict(parameters), dtype=torch.float32)


def _log(message: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message)


def _is_complete(root: Path, preset: Preset, seed: int) -> bool:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if manifest.get("format") != ZOO_FORMAT or manifest.get("preset") != json.loads(json.dumps(asdict(preset))) or manifest.get("seed") != seed:
        raise ZooError(
            f"{root} already holds a different zoo (preset {manifest.get('preset', {}).get('name')!r}, "
            f"seed {manifest.get('seed')}); choose another folder or delete it"
        )
    paths = [manifest["base"]] + [p for entry in manifest["tasks"].values() for p in (entry["expert"], entry["adapter"], entry["test"])]
    return all((root / p).exists() for p in paths)


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
    if preset not in PRESETS:
        raise ZooError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS)}")
    settings = PRESETS[preset]
    root = Path(directory).absolute()
    if _is_complete(root, settings, seed):
        _log(f"zoo already built: {root}", progress)
        return load_zoo(root)
    from transformers.utils import logging as hf_logging

    previous_threads = torch.get_num_threads()
    wanted = threads or (1 if preset in ("test", "demo") else previous_threads)
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

    from mergekit_ext.modeling import char_tokenizer, llama_config, random_model, save_model

    started = time.perf_counter()
    torch.manual_seed(seed)
    tasks = [TASKS[name] for name in settings.tasks]
    tokenizer = char_tokenizer()

    # Held-out data first, so training can skip every held-out query.
    documents: Dict[str, Dict[str, List[Dict]]] = {}
    entries: Dict[str, Dict] = {}
    held_out: set = set()
    for index, task in enumerate(tasks):
        rng = random.Random(f"{seed}-{task.name}-heldout")
        seen: set = set()
        splits: Dict[str, List[Dict]] = {"validation": [], "test": []}
        for split, count in (("validation", settings.validation_items), ("test", settings.test_items)):
            while len(splits[split]) < count:
                document = make_document(task, rng)
                if document["query"] in seen:
                    continue
                seen.add(document["query"])
                splits[split].append(document)
        held_out |= seen
        documents[task.name] = splits
        data_dir = root / "data" / task.name
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, items in splits.items():
            (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items), encoding="utf-8")
        entries[task.name] = {
            "description": task.description,
            "lm_eval_task": f"{TASK_PREFIX}{task.name}",
            "lm_eval_task_validation": f"{TASK_PREFIX}{task.name}_val",
            "validation": f"data/{task.name}/validation.jsonl",
            "test": f"data/{task.name}/test.jsonl",
            "expert": f"experts/{task.name}",
            "adapter": f"adapters/{task.name}",
        }
    _write_task_yamls(root, entries)

    def accuracy(model, task_name: str, split: str) -> float:
        return multiple_choice_accuracy(model, tokenizer, documents[task_name][split], device=device)

    def train_args(step_seed: int):
        return dict(batch_size=settings.batch_size, seed=step_seed, held_out=held_out, device=device, progress=progress)

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
        while len(probe_documents[task.name]) < settings.probe_items:
            document = make_document(task, rng)
            if document["query"] not in held_out:
                probe_documents[task.name].append(document)
    pretrain_trace: List[Dict] = []

    def steer_mixture(step: int) -> Optional[List[float]]:
        scores = [multiple_choice_accuracy(base_model, tokenizer, probe_documents[t.name], device=device) for t in tasks]
        pretrain_trace.append({"step": step, **{t.name: s for t, s in zip(tasks, scores)}})
        if all(score >= settings.base_target for score in scores):
            return None
        return [settings.mixture_floor if score >= settings.base_target else 1.0 for score in scores]

    _train(
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
    with atomic_output_dir(root / "base", overwrite=True) as staging:
        save_model(base_model.cpu(), staging, tokenizer)
    base_model.to(device)
    base_path = root / "base"
    metrics: Dict = {"pretraining": pretrain_trace, "base": {}, "experts": {}, "adapters": {}}
    for task in tasks:
        metrics["base"][task.name] = {split: accuracy(base_model, task.name, split) for split in ("validation", "test")}

    # 2. Full fine-tunes, one per task, light.
    for index, task in enumerate(tqdm(tasks, desc="fine-tune experts", disable=not progress)):
        expert = _load_causal_lm(base_path, device)
        _train(expert, tokenizer, [task], steps=settings.finetune_steps, lr=settings.finetune_lr, description=f"expert {task.name}", **train_args(seed + 1000 + index))
        metrics["experts"][task.name] = {task.name: {split: accuracy(expert, task.name, split) for split in ("validation", "test")}}
        with atomic_output_dir(root / "experts" / task.name, overwrite=True) as staging:
            save_model(expert.cpu(), staging, tokenizer)
        del expert

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
        adapted = get_peft_model(_load_causal_lm(base_path, device), lora_config)
        _train(adapted, tokenizer, [task], steps=settings.lora_steps, lr=settings.lora_lr, description=f"LoRA {task.name}", **train_args(seed + 2000 + index))
        metrics["adapters"][task.name] = {split: accuracy(adapted, task.name, split) for split in ("validation", "test")}
        adapted.peft_config["default"].base_model_name_or_path = str(base_path)
        with atomic_output_dir(root / "adapters" / task.name, overwrite=True) as staging:
            adapted.cpu().save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
        del adapted

    # 4. Task arithmetic over all experts through mergekit's engine, lambda picked on validation.
    base_state = _state_dict(base_path)
    expert_states = {task.name: _state_dict(root / "experts" / task.name) for task in tasks}
    grid: Dict[str, Dict[str, Dict[str, float]]] = {}
    probe = _load_causal_lm(base_path, device)
    for scale in tqdm(settings.lambda_grid, desc="task arithmetic grid", disable=not progress):
        merged = merge_in_memory(base_state, expert_states, "task_arithmetic", {"weight": 1.0, "lambda": scale})
        probe.load_state_dict(merged, strict=True)
        grid[f"{scale:g}"] = {task.name: {"validation": accuracy(probe, task.name, "validation")} for task in tasks}
    best = max(grid, key=lambda key: sum(grid[key][t]["validation"] for t in settings.tasks))
    probe.load_state_dict(merge_in_memory(base_state, expert_states, "task_arithmetic", {"weight": 1.0, "lambda": float(best)}))
    for task in tasks:
        grid[best][task.name]["test"] = accuracy(probe, task.name, "test")
    metrics["task_arithmetic"] = {"lambda": float(best), "grid": grid}
    del probe

    elapsed = time.perf_counter() - started
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
        "metric": "acc (lm-eval multiple_choice, 4 choices, chance 0.25)",
        "tasks": entries,
        "lora": {"rank": settings.lora_rank, "alpha": 2 * settings.lora_rank, "target_modules": list(LORA_TARGETS), "init_seed": seed + 7},
        "metrics": metrics,
    }
    write_json(root / MANIFEST_NAME, manifest)
    marker.unlink(missing_ok=True)
    zoo = load_zoo(root)
    _log(format_build_report(zoo), progress)
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


def format_build_report(zoo: Zoo, split: str = "test") -> str:
    metrics = zoo.manifest["metrics"]
    rows = build_report_rows(zoo, split)
    lines = [
        f"zoo {zoo.root} (preset {zoo.manifest['preset']['name']}, {zoo.manifest['parameters']:,} parameters, "
        f"built in {zoo.manifest['build_seconds']:.0f} s)",
        f"{split} accuracy (4-way multiple choice; task arithmetic at lambda {metrics['task_arithmetic']['lambda']:g}, picked on validation):",
        f"  {'task':<10}{'base':>8}{'expert':>8}{'LoRA':>8}{'TA':>8}",
    ]
    for task, base, expert, lora, ta in rows:
        lines.append(f"  {task:<10}{base:>8.3f}{expert:>8.3f}{lora:>8.3f}{ta:>8.3f}")
    means = [sum(r[i] for r in rows) / len(rows) for i in range(1, 5)]
    lines.append(f"  {'mean':<10}" + "".join(f"{m:>8.3f}" for m in means))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# CLI.


def _command():
    import click

    @click.command("zoo")
    @click.argument("directory", type=click.Path(file_okay=False))
    @click.option("--preset", type=click.Choice(sorted(PRESETS)), default="demo", show_default=True, help="size of the family")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default="cpu", show_default=True, help="torch device for training (e.g. cuda for the bench preset)")
    @click.option("--threads", type=int, help="torch CPU threads while training (default: 1 for test/demo)")
    @click.option("--quiet", is_flag=True, help="no progress bars")
    def zoo_command(directory: str, preset: str, seed: int, device: str, threads: Optional[int], quiet: bool) -> None:
        """Build the demo model family in DIRECTORY (cached: a built zoo is left as is).

        A tiny Llama base pretrained on a mixture of synthetic tasks, one full
        fine-tune and one LoRA adapter per task, lm-eval task YAMLs and held-out
        validation/test data, and manifest.json. Prints base, experts and task
        arithmetic accuracies.
        """
        try:
            zoo = build_zoo(directory, preset=preset, seed=seed, device=device, threads=threads, progress=not quiet)
        except ZooError as error:
            raise click.ClickException(str(error)) from None
        click.echo(format_build_report(zoo))

    return zoo_command


zoo_command = _command()
