"""The AdaRank learner: masks and coefficients from unlabeled prompts (``mergekit-ext adarank learn``).

AdaRank (arXiv 2503.22178, METHODS.md §3) prunes singular components of each
task vector and rescales each task per tensor, choosing both at test time by
minimising the entropy of the merged model's predictions on unlabeled inputs.
The kernels are in ``kernel.py`` and the learned file's format in ``format.py``;
this module is the learner.

The learner holds the base and every expert in memory at once (float32), plus
the top-``max_rank_ratio`` singular triplets of every task vector (about twice
the model per task at ``max_rank_ratio = 1``): it is meant for models that fit
in memory several times over. It trains, with Adam:

* mask logits [T, band] per matrix (straight-through binary masks), and
* coefficients [T, n_tensors], initialised to ``prior``,

on the summed (over tasks) mean Shannon entropy of the next-token
distribution right after each prompt: the position where a causal LM starts
its answer. Entropy over every prompt position is NOT used: those positions
predict the user's own input (METHODS.md §3 measured it making merges worse).
Each step draws one batch of prompts per task. The merged weights are
differentiable functions of the parameters, run through
``torch.func.functional_call`` on one float32 copy of the architecture.

The result is a small safetensors file (hard masks and coefficients) that
``merge_method: adarank`` applies in the stock ``mergekit-yaml``, streaming one
tensor at a time; ``--merge-out`` runs that merge right away.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext import io
from mergekit_ext.methods.adarank import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MAX_RANK_RATIO,
    DEFAULT_STEPS,
    DEFAULT_SVD,
    DEFAULT_VARIANT,
    MASK_TEMPERATURE,
    VARIANT_DEFAULTS,
    VARIANTS,
)
from mergekit_ext.methods.adarank.kernel import (
    band_rank,
    factorize,
    initial_logits,
    merge_matrix,
    merge_other,
    origin_and_vectors,
    straight_through_mask,
)
from mergekit_ext.modeling import pad_right
from mergekit_ext.tensors import is_block_matrix

# lm-eval puts this between a multiple-choice context and its continuation, so
# the zoo's answer starts after "query ".
ZOO_TARGET_DELIMITER = " "


@dataclass(frozen=True)
class LearnOptions:
    variant: str = DEFAULT_VARIANT
    prior: Optional[float] = None  # None: the variant's default
    init_rank_ratio: Optional[float] = None  # None: the variant's default
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    svd: str = DEFAULT_SVD
    add_special_tokens: bool = False
    device: str = "cpu"

    def resolved(self) -> "LearnOptions":
        """The options with the variant's defaults filled in, validated."""
        if self.variant not in VARIANTS:
            raise ValueError(f"adarank: unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        defaults = VARIANT_DEFAULTS[self.variant]
        prior = defaults["prior"] if self.prior is None else self.prior
        init = defaults["init_rank_ratio"] if self.init_rank_ratio is None else self.init_rank_ratio
        for label, value in (("init_rank_ratio", init), ("max_rank_ratio", self.max_rank_ratio)):
            if not 0 < value <= 1:
                raise ValueError(f"adarank: {label} must be in (0, 1], got {value}")
        if init > self.max_rank_ratio:
            raise ValueError(
                f"adarank: init_rank_ratio {init} is above max_rank_ratio {self.max_rank_ratio}: "
                "step 0 could not be the base method"
            )
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("adarank: steps must be >= 0, batch_size >= 1 and lr > 0")
        return LearnOptions(**{**asdict(self), "prior": float(prior), "init_rank_ratio": float(init)})


@dataclass
class LearnResult:
    masks: Dict[str, torch.Tensor]  # bool [T, band] per matrix
    coefficients: Dict[str, torch.Tensor]  # float32 [T] per tensor
    info: Dict = field(default_factory=dict)
    history: List[float] = field(default_factory=list)  # objective per step (training batches)


# ---------------------------------------------------------------------------
# Prompts


def read_prompts(path: str | os.PathLike) -> List[str]:
    """Prompts from a file: JSONL (a string, or an object's "prompt", "query" or "text") or plain text, one per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".jsonl":
        prompts = []
        for number, item in enumerate(io.read_jsonl(path), 1):
            if isinstance(item, dict):
                item = next((item[key] for key in ("prompt", "query", "text") if key in item), None)
            if not isinstance(item, str):
                raise ValueError(f'{path}:{number}: expected a string or an object with "prompt", "query" or "text"')
            prompts.append(item)
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def zoo_prompts(zoo, task: str, split: str = "validation") -> List[str]:
    """A zoo task's queries, each followed by lm-eval's target delimiter (where the answer starts)."""
    return [document["query"] + ZOO_TARGET_DELIMITER for document in zoo.documents(task, split)]


# ---------------------------------------------------------------------------
# The learner


@dataclass
class _Entry:
    """One tensor of the merge: its origin and either its task vectors or their top-band SVD."""

    name: str
    column: int
    origin: torch.Tensor
    vectors: Optional[torch.Tensor] = None  # non-matrix tensors
    factors: Optional[tuple] = None  # (U, s, Vh) for matrices
    logits: Optional[torch.nn.Parameter] = None


def _encode(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> List[List[int]]:
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [ids for ids in encoded if ids]


def answer_entropy(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution after each (right-padded) prompt: [batch]."""
    last = logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1].float()
    log_probs = torch.log_softmax(last, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def _open_inputs(model_paths: Sequence[Path], base_path: Optional[Path]):
    """Loaders for the models (and base), checked to hold the same tensors."""
    reference_path = base_path or model_paths[0]
    reference = io.open_model(reference_path)
    loaders = [io.open_model(path) for path in model_paths]
    for path, loader in zip(model_paths, loaders):
        io.check_same_tensors(reference, loader, reference_label=str(reference_path), other_label=str(path))
    return reference_path, reference, loaders


def factorise(reference, loaders, model_paths, base_loader, options: "LearnOptions", device, *, progress: bool) -> List[_Entry]:
    """Origins and task vectors tensor by tensor; matrices keep only their top-band SVD and get mask logits."""
    from tqdm.auto import tqdm

    count = len(loaders)
    entries: List[_Entry] = []
    for name in tqdm(io.tensor_names(reference), desc="adarank: factorise task vectors", disable=not progress, leave=False):
        first = reference.get_tensor(name)
        if not first.is_floating_point():
            continue
        tensors = [loader.get_tensor(name) for loader in loaders]
        for path, tensor in zip(model_paths, tensors):
            io.check_shape(name, tensor, first, label=str(path), reference_label="the first input")
        base_tensor = base_loader.get_tensor(name).to(device, torch.float32) if base_loader is not None else None
        origin, vectors = origin_and_vectors(base_tensor, [t.to(device, torch.float32) for t in tensors], options.variant)
        entry = _Entry(name=name, column=len(entries), origin=origin)
        if is_block_matrix(name, first.shape):
            band = band_rank(first.shape, options.max_rank_ratio)
            entry.factors = factorize(vectors, band, svd=options.svd)
            entry.logits = torch.nn.Parameter(initial_logits(count, first.shape, band, options.init_rank_ratio).to(device))
        else:
            entry.vectors = vectors
        entries.append(entry)
        del tensors, vectors
    if not any(entry.logits is not None for entry in entries):
        raise ValueError("adarank: no matrix tensors found (2-D weights inside transformer blocks)")
    return entries


class MergedModel:
    """The merged weights as a differentiable function of masks and coefficients, run through one
    float32 copy of the architecture (``torch.func.functional_call``)."""

    def __init__(self, skeleton, entries: List[_Entry], coefficients: torch.nn.Parameter):
        self.skeleton = skeleton
        self.entries = entries
        self.coefficients = coefficients
        self._module_keys = set(skeleton.state_dict().keys())

    def parameters(self) -> List[torch.nn.Parameter]:
        return [self.coefficients] + [entry.logits for entry in self.entries if entry.logits is not None]

    def weights(self) -> Dict[str, torch.Tensor]:
        weights = {}
        for entry in self.entries:
            if entry.name not in self._module_keys:
                continue  # in the checkpoint but not in the module: keeps its prior coefficient
            column = self.coefficients[:, entry.column]
            if entry.factors is not None:
                mask = straight_through_mask(entry.logits, MASK_TEMPERATURE)
                weights[entry.name] = merge_matrix(entry.origin, *entry.factors, mask, column)
            else:
                weights[entry.name] = merge_other(entry.origin, entry.vectors, column)
        return weights

    def logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        output = torch.func.functional_call(self.skeleton, self.weights(), args=(), kwargs={"input_ids": ids, "attention_mask": attention})
        return output.logits


class EntropyObjective:
    """Per task, the mean entropy of the next-token distribution right after each prompt (where a
    causal LM starts its answer); the loss is the sum over tasks."""

    name = "entropy"
    description = "sum over tasks of the mean entropy (nats) of the next-token distribution after each prompt"

    def __init__(self, pad_id: int, device):
        self.pad_id, self.device = pad_id, device

    def __call__(self, model: MergedModel, batches: Sequence[Sequence[Sequence[int]]]) -> Tuple[torch.Tensor, torch.Tensor]:
        sequences = [sequence for batch in batches for sequence in batch]
        ids, attention = pad_right(sequences, self.pad_id, self.device)
        entropy = answer_entropy(model.logits(ids, attention), attention.sum(dim=1))
        per_task = torch.stack([chunk.mean() for chunk in entropy.split([len(batch) for batch in batches])])
        return per_task.sum(), per_task


def _train(model: MergedModel, objective, pools, options: "LearnOptions", *, progress: bool) -> List[float]:
    """Adam on masks and coefficients, one batch of prompts per task per step; the loss per step."""
    from tqdm.auto import tqdm

    rng = random.Random(options.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    history: List[float] = []
    bar = tqdm(range(options.steps), desc=f"adarank ({options.variant})", disable=not progress)
    for step in bar:
        batches = [[pool[i] for i in rng.sample(range(len(pool)), min(options.batch_size, len(pool)))] for pool in pools]
        loss, _ = objective(model, batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if step % 10 == 0 or step == options.steps - 1:
            bar.set_postfix({objective.name: f"{history[-1]:.4f}"})
    return history


def _hard_masks(entries: List[_Entry], options: "LearnOptions") -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """The binary masks and how many components were kept at step 0 and now, of how many candidates."""
    masks, kept = {}, {"before": 0, "after": 0, "band": 0}
    for entry in entries:
        if entry.logits is None:
            continue
        hard = torch.sigmoid(entry.logits.detach() / MASK_TEMPERATURE) > 0.5
        masks[entry.name] = hard.cpu()
        start = initial_logits(hard.shape[0], entry.origin.shape, hard.shape[1], options.init_rank_ratio) > 0
        kept["before"] += int(start.sum())
        kept["after"] += int(hard.sum())
        kept["band"] += hard.numel()
    return masks, kept


def learn(
    models: Sequence[str | os.PathLike],
    prompts: Sequence[Sequence[str]],
    *,
    base: Optional[str | os.PathLike] = None,
    options: LearnOptions = LearnOptions(),
    task_names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> LearnResult:
    """Learn masks and coefficients for ``models`` (one prompt pool per model) on top of ``base``.

    Deterministic for ``options.seed`` on one machine.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options.resolved()
    model_paths = [Path(model).absolute() for model in models]
    base_path = Path(base).absolute() if base is not None else None
    count = len(model_paths)
    if count == 0:
        raise ValueError("adarank: no models to merge")
    if len(prompts) != count:
        raise ValueError(f"adarank: need one prompt pool per model ({count}), got {len(prompts)}")
    if options.variant == "ta" and base_path is None:
        raise ValueError("adarank: variant 'ta' needs --base (θ0)")
    task_names = list(task_names) if task_names is not None else [path.name for path in model_paths]
    device = torch.device(options.device)
    torch.manual_seed(options.seed)

    reference_path, reference, loaders = _open_inputs(model_paths, base_path)
    skeleton = AutoModelForCausalLM.from_pretrained(str(reference_path), dtype=torch.float32).to(device).eval()
    for parameter in skeleton.parameters():
        parameter.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(reference_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pools = []
    for name, pool in zip(task_names, prompts):
        encoded = _encode(tokenizer, pool, options.add_special_tokens)
        if not encoded:
            raise ValueError(f"adarank: no non-empty prompts for {name}")
        pools.append(encoded)

    entries = factorise(reference, loaders, model_paths, reference if base_path is not None else None, options, device, progress=progress)
    coefficients = torch.nn.Parameter(torch.full((count, len(entries)), options.prior, device=device))
    model = MergedModel(skeleton, entries, coefficients)
    objective = EntropyObjective(pad_id, device)

    evaluation = [pool[: options.batch_size] for pool in pools]  # fixed: before/after on the same prompts
    with torch.no_grad():
        before_total, before_tasks = objective(model, evaluation)
    history = _train(model, objective, pools, options, progress=progress)
    with torch.no_grad():
        after_total, after_tasks = objective(model, evaluation)

    masks, kept = _hard_masks(entries, options)
    final = coefficients.detach()
    learned_coefficients = {entry.name: final[:, entry.column].cpu() for entry in entries}
    info = {
        "variant": options.variant,
        "prior": options.prior,
        "init_rank_ratio": options.init_rank_ratio,
        "max_rank_ratio": options.max_rank_ratio,
        "svd": options.svd,
        "mask_temperature": MASK_TEMPERATURE,
        "tasks": count,
        "task_names": task_names,
        "models": [{"path": str(path), "content_hash": io.content_hash(path)} for path in model_paths],
        "base": None if base_path is None else {"path": str(base_path), "content_hash": io.content_hash(base_path)},
        "tensors": len(entries),
        "matrices": len(masks),
        "objective": objective.description,
        "training": {
            "steps": options.steps,
            "lr": options.lr,
            "batch_size": options.batch_size,
            "seed": options.seed,
            "prompts_per_task": [len(pool) for pool in pools],
            "add_special_tokens": options.add_special_tokens,
        },
        "entropy_before": {"total": float(before_total), **dict(zip(task_names, map(float, before_tasks)))},
        "entropy_after": {"total": float(after_total), **dict(zip(task_names, map(float, after_tasks)))},
        "kept_components": kept,
        "coefficients": {"mean": float(final.mean()), "min": float(final.min()), "max": float(final.max())},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return LearnResult(masks=masks, coefficients=learned_coefficients, info=info, history=history)


# ---------------------------------------------------------------------------
# Writing the model through mergekit's engine


def merge_config(file: str | os.PathLike, models: Sequence[str | os.PathLike], base: Optional[str | os.PathLike], dtype: Optional[str] = None) -> dict:
    """A mergekit config that applies a learned file (absolute paths)."""
    config = {
        "merge_method": "adarank",
        "models": [{"model": str(Path(model).absolute())} for model in models],
        "parameters": {"file": str(Path(file).absolute())},
    }
    if base is not None:
        config["base_model"] = str(Path(base).absolute())
    if dtype is not None:
        config["dtype"] = dtype
    return config


def write_merged_model(
    file: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    base: Optional[str | os.PathLike] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Run ``merge_method: adarank`` with ``file`` through mergekit's engine, atomically into ``out``."""
    from mergekit_ext.engine import run_merge_atomic

    return run_merge_atomic(merge_config(file, models, base, dtype), out, overwrite=overwrite)


def describe(info: Dict) -> List[str]:
    """Human-readable lines for a learned file's metadata."""
    before, after = info["entropy_before"], info["entropy_after"]
    kept = info["kept_components"]
    training = info["training"]
    lines = [
        f"variant {info['variant']}  prior {info['prior']}  init_rank_ratio {info['init_rank_ratio']}  "
        f"max_rank_ratio {info['max_rank_ratio']}",
        f"training: {training['steps']} steps, lr {training['lr']}, batch {training['batch_size']} per task, seed {training['seed']}",
        f"kept singular components: {kept['before']} -> {kept['after']} of {kept['band']} candidates",
        "coefficients: mean {mean:.4g}, min {min:.4g}, max {max:.4g}".format(**info["coefficients"]),
        f"answer entropy (nats, fixed prompts): total {before['total']:.4f} -> {after['total']:.4f}",
    ]
    for name in info["task_names"]:
        lines.append(f"  {name:<16} {before[name]:.4f} -> {after[name]:.4f}")
    return lines
