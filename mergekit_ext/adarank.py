"""``mergekit-ext adarank``: learn AdaRank masks and coefficients from unlabeled prompts.

AdaRank (arXiv 2503.22178, METHODS.md §3) prunes singular components of each
task vector and rescales each task per tensor, choosing both at test time by
minimising the entropy of the merged model's predictions on unlabeled inputs.
The kernels and the learned file's format live in
``mergekit_ext.methods.adarank``; this module is the learner and its command.

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

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import click
import torch

from mergekit_ext import io
from mergekit_ext.methods.adarank import (
    DEFAULT_SVD,
    MASK_TEMPERATURE,
    VARIANTS,
    band_rank,
    factorize,
    initial_logits,
    merge_matrix,
    merge_other,
    open_learned_file,
    origin_and_vectors,
    straight_through_mask,
    write_learned_file,
)
from mergekit_ext.modeling import pad_right
from mergekit_ext.tensors import is_block_matrix

# Base-method settings each variant starts from (step 0 is that method exactly):
# Task Arithmetic's lambda from the demo zoo's validation grid (mergekit_ext.demo),
# CART's defaults from mergekit_ext.methods.cart (same evidence).
VARIANT_DEFAULTS = {
    "ta": {"prior": 0.4, "init_rank_ratio": 1.0},
    "cart": {"prior": 1.3, "init_rank_ratio": 0.15},
}
DEFAULT_VARIANT = "cart"
DEFAULT_MAX_RANK_RATIO = 1.0
# Chosen on the demo zoo's validation split (README, "AdaRank"; 200 steps, 16
# prompts per task): lower answer entropy did NOT mean higher accuracy there.
# lr 5e-4 left CART at its accuracy (val 0.818 -> 0.823 / 0.818 over two seeds)
# while 1e-3, 2e-3 and 1e-2 cut the entropy further and the accuracy with it
# (CART val 0.798, 0.760, 0.683; TA likewise). With p = sigmoid(logit / 10) and
# logits at ±0.1, Adam moves a logit ~lr per step, so lr·steps (0.1 here) is
# how far a logit can travel: the papers' language setting (5e-5 to 1e-4 for
# 5,000 steps) allows 0.25 to 0.5, vision (1e-3 for 10,000) allows 10.
DEFAULT_STEPS = 200
DEFAULT_LR = 5e-4
DEFAULT_BATCH_SIZE = 16
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
    prompts: List[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None
                if isinstance(item, dict):
                    item = next((item[key] for key in ("prompt", "query", "text") if key in item), None)
                if not isinstance(item, str):
                    raise ValueError(f'{path}:{number}: expected a string or an object with "prompt", "query" or "text"')
                line = item
            prompts.append(line)
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
    name: str
    column: int
    origin: torch.Tensor
    vectors: Optional[torch.Tensor] = None  # non-matrix tensors
    factors: Optional[tuple] = None  # (U, s, Vh) for matrices
    logits: Optional[torch.nn.Parameter] = None


def _encode(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> List[List[int]]:
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [ids for ids in encoded if ids]


def _batch(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    ids, attention = pad_right(sequences, pad_id, device)
    return ids, attention, attention.sum(dim=1)


def answer_entropy(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution after each (right-padded) prompt: [batch]."""
    last = logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1].float()
    log_probs = torch.log_softmax(last, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


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
    from tqdm.auto import tqdm
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
    rng = random.Random(options.seed)

    reference_path = base_path or model_paths[0]
    reference = io.open_model(reference_path)
    loaders = [io.open_model(path) for path in model_paths]
    for path, loader in zip(model_paths, loaders):
        io.check_same_tensors(reference, loader, reference_label=str(reference_path), other_label=str(path))
    base_loader = reference if base_path is not None else None

    skeleton = AutoModelForCausalLM.from_pretrained(str(reference_path), dtype=torch.float32).to(device).eval()
    for parameter in skeleton.parameters():
        parameter.requires_grad_(False)
    module_keys = set(skeleton.state_dict().keys())
    tokenizer = AutoTokenizer.from_pretrained(str(reference_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    pools = []
    for name, pool in zip(task_names, prompts):
        encoded = _encode(tokenizer, pool, options.add_special_tokens)
        if not encoded:
            raise ValueError(f"adarank: no non-empty prompts for {name}")
        pools.append(encoded)

    # Origins, task vectors and their factorisations, tensor by tensor.
    entries: List[_Entry] = []
    names = [name for name in io.tensor_names(reference)]
    for name in tqdm(names, desc="adarank: factorise task vectors", disable=not progress, leave=False):
        first = reference.get_tensor(name)
        if not first.is_floating_point():
            continue
        tensors = [loader.get_tensor(name) for loader in loaders]
        for path, tensor in zip(model_paths, tensors):
            if tensor.shape != first.shape:
                raise ValueError(
                    f"adarank: tensor {name} has shape {list(tensor.shape)} in {path} but {list(first.shape)} in {reference_path}"
                )
        base_tensor = base_loader.get_tensor(name).to(device, torch.float32) if base_loader is not None else None
        origin, vectors = origin_and_vectors(base_tensor, [t.to(device, torch.float32) for t in tensors], options.variant)
        entry = _Entry(name=name, column=len(entries), origin=origin)
        if is_block_matrix(name, first.shape):
            band = band_rank(first.shape, options.max_rank_ratio)
            entry.factors = factorize(vectors, band, svd=options.svd)
            entry.logits = torch.nn.Parameter(
                initial_logits(count, first.shape, band, options.init_rank_ratio).to(device)
            )
        else:
            entry.vectors = vectors
        entries.append(entry)
        del tensors, vectors
    if not any(entry.logits is not None for entry in entries):
        raise ValueError("adarank: no matrix tensors found (2-D weights inside transformer blocks)")

    coefficients = torch.nn.Parameter(torch.full((count, len(entries)), options.prior, device=device))
    parameters = [coefficients] + [entry.logits for entry in entries if entry.logits is not None]
    optimizer = torch.optim.Adam(parameters, lr=options.lr)

    def merged_weights() -> Dict[str, torch.Tensor]:
        weights = {}
        for entry in entries:
            if entry.name not in module_keys:
                continue  # in the checkpoint but not in the module: keeps its prior coefficient
            column = coefficients[:, entry.column]
            if entry.factors is not None:
                mask = straight_through_mask(entry.logits, MASK_TEMPERATURE)
                weights[entry.name] = merge_matrix(entry.origin, *entry.factors, mask, column)
            else:
                weights[entry.name] = merge_other(entry.origin, entry.vectors, column)
        return weights

    def objective(batches) -> tuple:
        """Summed over tasks of the mean answer entropy; also the per-task means."""
        weights = merged_weights()
        sequences = [sequence for batch in batches for sequence in batch]
        ids, attention, lengths = _batch(sequences, pad_id, device)
        output = torch.func.functional_call(skeleton, weights, args=(), kwargs={"input_ids": ids, "attention_mask": attention})
        entropy = answer_entropy(output.logits, lengths)
        per_task = torch.stack([chunk.mean() for chunk in entropy.split([len(batch) for batch in batches])])
        return per_task.sum(), per_task

    evaluation = [pool[: options.batch_size] for pool in pools]  # fixed: before/after on the same prompts
    with torch.no_grad():
        before_total, before_tasks = objective(evaluation)

    history: List[float] = []
    bar = tqdm(range(options.steps), desc=f"adarank ({options.variant})", disable=not progress)
    for step in bar:
        batches = [[pool[i] for i in rng.sample(range(len(pool)), min(options.batch_size, len(pool)))] for pool in pools]
        loss, _ = objective(batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if step % 10 == 0 or step == options.steps - 1:
            bar.set_postfix(entropy=f"{history[-1]:.4f}")

    with torch.no_grad():
        after_total, after_tasks = objective(evaluation)

    masks = {}
    kept_before = kept_after = total_band = 0
    for entry in entries:
        if entry.logits is None:
            continue
        hard = torch.sigmoid(entry.logits.detach() / MASK_TEMPERATURE) > 0.5
        masks[entry.name] = hard.cpu()
        kept_after += int(hard.sum())
        kept_before += int((initial_logits(count, entry.origin.shape, hard.shape[1], options.init_rank_ratio) > 0).sum())
        total_band += hard.numel()
    learned_coefficients = {entry.name: coefficients.detach()[:, entry.column].cpu() for entry in entries}
    final = coefficients.detach()

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
        "objective": "sum over tasks of the mean entropy (nats) of the next-token distribution after each prompt",
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
        "kept_components": {"before": kept_before, "after": kept_after, "band": total_band},
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
    """Run ``merge_method: adarank`` with ``file`` through ``mergekit.merge.run_merge``, atomically into ``out``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ext  # noqa: F401  (registers our methods)

    config = MergeConfiguration.model_validate(merge_config(file, models, base, dtype))
    with io.atomic_output_dir(out, overwrite=overwrite) as staging:
        run_merge(config, str(staging), options=MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=True))
    return Path(out)


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


# ---------------------------------------------------------------------------
# Commands


def _resolve_inputs(models, base, zoo_dir, prompt_files):
    """Models, base, task names and one prompt pool per model from the command's options."""
    models = [Path(model).absolute() for model in models]
    names = [model.name for model in models]
    pools: List[List[str]] = [[] for _ in models]
    if zoo_dir is not None:
        from mergekit_ext.zoo import load_zoo

        zoo = load_zoo(zoo_dir)
        experts = {zoo.expert(task).absolute(): task for task in zoo.tasks}
        if not models:
            models = list(experts)
            names = list(experts.values())
        else:
            missing = [str(model) for model in models if model not in experts]
            if missing:
                raise ValueError(f"adarank: not experts of the zoo {zoo.root}: {', '.join(missing)}; give --prompts instead")
            names = [experts[model] for model in models]
        pools = [zoo_prompts(zoo, name) for name in names]
        base = base if base is not None else zoo.base
    if not models:
        raise ValueError("adarank: give the models to merge (or --zoo to use a zoo's experts)")
    if prompt_files:
        files = [read_prompts(path) for path in prompt_files]
        if len(files) == 1:
            pools = [pool + files[0] for pool in pools]
        elif len(files) == len(models):
            pools = [pool + extra for pool, extra in zip(pools, files)]
        else:
            raise ValueError(
                f"adarank: give one --prompts file for every model ({len(models)}) or one shared by all, got {len(files)}"
            )
    if not all(pools):
        raise ValueError("adarank: no prompts; give --zoo or --prompts")
    return models, base, names, pools


@click.group("adarank")
def adarank_group() -> None:
    """AdaRank: learn which singular components of each task vector to keep.

    `learn` trains binary masks and per-tensor coefficients on unlabeled
    prompts (entropy of the answer's first token) and writes a small file;
    `merge_method: adarank` with `parameters: {file: ...}` applies it in the
    stock mergekit-yaml.
    """


@adarank_group.command("learn")
@click.argument("models", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The learned file to write (.safetensors).")
@click.option("--base", default=None, type=click.Path(exists=True, file_okay=False), help="θ0, the pretrained model (required for --variant ta; default with --zoo: the zoo's base).")
@click.option("--zoo", "zoo_dir", default=None, type=click.Path(exists=True, file_okay=False), help="A built zoo: its experts (when no MODELS are given), its base, and each task's validation prompts.")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Prompts, one per line (.txt) or JSONL; once for all tasks, or once per model in order. Added to the zoo's.")
@click.option("--variant", type=click.Choice(VARIANTS), default=DEFAULT_VARIANT, show_default=True, help="Origin: θ0 (ta, Task Arithmetic) or θavg (cart, CART).")
@click.option("--prior", type=float, default=None, help="Initial coefficient, the base method's λ  [default: ta 0.4, cart 1.3]")
@click.option("--init-rank-ratio", type=float, default=None, help="Components kept at step 0  [default: ta 1.0, cart 0.15]")
@click.option("--max-rank-ratio", type=float, default=DEFAULT_MAX_RANK_RATIO, show_default=True, help="Candidate band per matrix; components below it are dropped (memory ~ 2·ratio·model per task).")
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True)
@click.option("--lr", type=float, default=DEFAULT_LR, show_default=True, help="Adam learning rate for logits and coefficients.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, help="Prompts per task per step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--add-special-tokens", is_flag=True, help="Let the tokenizer add BOS/EOS to prompts (off, like lm-eval's log-likelihood requests).")
@click.option("--device", default="cpu", show_default=True, help="Where to learn (e.g. cuda).")
@click.option("--merge-out", default=None, type=click.Path(file_okay=False), help="Also write the merged model here (mergekit's engine, merge_method adarank).")
@click.option("--dtype", default=None, help="Output dtype for --merge-out (default: the models').")
@click.option("--overwrite", is_flag=True, help="Replace --out and --merge-out if they exist.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def learn_command(models, out, base, zoo_dir, prompt_files, variant, prior, init_rank_ratio, max_rank_ratio, steps, lr, batch_size, seed, add_special_tokens, device, merge_out, dtype, overwrite, quiet) -> None:
    """Learn AdaRank masks and coefficients for MODELS and write them to --out."""
    out_path = Path(out).absolute()
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"output already exists (pass --overwrite to replace it): {out_path}")
    if merge_out is not None and Path(merge_out).exists() and not overwrite:
        raise FileExistsError(f"output already exists (pass --overwrite to replace it): {Path(merge_out).absolute()}")
    models, base, names, pools = _resolve_inputs(models, base, zoo_dir, prompt_files)
    options = LearnOptions(
        variant=variant,
        prior=prior,
        init_rank_ratio=init_rank_ratio,
        max_rank_ratio=max_rank_ratio,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        add_special_tokens=add_special_tokens,
        device=device,
    )
    result = learn(models, pools, base=base, options=options, task_names=names, progress=not quiet)
    write_learned_file(out_path, result.masks, result.coefficients, result.info)
    for line in describe(result.info):
        click.echo(line)
    click.echo(f"wrote {out_path}")
    if merge_out is not None:
        write_merged_model(out_path, models, merge_out, base=base, dtype=dtype, overwrite=overwrite)
        click.echo(f"wrote {Path(merge_out).absolute()}")


@adarank_group.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as JSON.")
def show_command(file, as_json) -> None:
    """Print a learned file's settings, kept ranks and entropy before/after."""
    info = open_learned_file(file).info
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in describe(info):
        click.echo(line)


__all__ = ["LearnOptions", "LearnResult", "adarank_group", "learn", "read_prompts", "write_merged_model", "zoo_prompts"]
