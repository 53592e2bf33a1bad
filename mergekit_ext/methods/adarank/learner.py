"""The AdaRank learner: masks and coefficients from unlabeled prompts (``mergekit-ext adarank learn``).

AdaRank (arXiv 2503.22178, docs/methods.md#adarank) prunes singular components of each
task vector and rescales each task per tensor, choosing both at test time from
unlabeled prompts. ``prepare`` builds a ``Setup`` once (prompts, teachers, factorisation,
the merged model); ``run`` trains it from its current state and collects the result;
``learn`` is the two. ``Setup.reset`` puts a setup back to step 0 with new training options
(rate, schedule, steps, prior, objective, …), so one factorisation serves many runs.

Memory: the factorisation streams from disk tensor by tensor (one tensor of
each model at a time; no expert is ever loaded whole, except one at a time for
the distillation teachers before the learner is built); the learner then holds
one float32 origin, the candidate components of every matrix (``ta``/``cart``:
the top ``max_rank_ratio`` singular triplets of each task vector, about
2·ratio·model per task; ``tsv_m``/``iso_cts``: the method's stack, about 2·model
for all tasks together), U and V in ``factor_dtype``, and the task vectors of the
non-matrix tensors (embeddings, lm_head, norms), also in ``factor_dtype``. The
architecture it runs is built with no weights at all (meta parameters: every forward
passes the merged ones in), so no float32 copy of the checkpoint is ever loaded. With
``gradient_checkpointing`` a step keeps one decoder layer's merged weights and graph at a
time instead of the whole model's. It trains, with Adam:

* mask logits [T, band] per matrix (straight-through binary masks; frozen with
  ``coefficients_only``), and
* coefficients [T, n_tensors], initialised to ``prior``,

on one of three label-free objectives (``objectives.py``), all where a causal LM answers
(entropy over every prompt position is NOT used: those positions predict the user's own
input, and docs/methods.md#adarank says it made merges worse):

* ``entropy``: the next-token entropy right after each prompt;
* ``entropy-answer``: the entropy at every position of the merged model's own
  greedy answer (regenerated at each step with the current hard masks);
* ``distill``: KL(expert ‖ merged) at the positions of each expert's greedy
  answer to its own task's prompts. The teacher outputs (answers and top-k
  log-probabilities per position) are computed once before learning, one expert
  at a time, so no expert is in memory while learning.

Each step draws one batch of prompts per task; the loss is the sum over tasks
of the per-task mean. The merged weights are differentiable functions of the
parameters, run through ``torch.func.functional_call``. Step 0 is the base
method exactly, for every objective.

The result is a small safetensors file (hard masks, coefficients and a
fingerprint of each matrix's factorisation) that ``merge_method: adarank``
applies in the stock ``mergekit-yaml``, streaming one tensor at a time
(``apply.write_merged_model``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext import io
from mergekit_ext.methods.adarank import FINGERPRINT_RTOL, FINGERPRINT_VALUES, MASK_TEMPERATURE, SUBSPACE_VARIANTS
from mergekit_ext.methods.adarank.factorise import factorise, open_inputs
from mergekit_ext.methods.adarank.kernel import mask_rows
from mergekit_ext.methods.adarank.masks import hard_masks, mask_row_names
from mergekit_ext.methods.adarank.merged import MergedModel, empty_architecture, learner_bytes
from mergekit_ext.methods.adarank.objectives import EntropyObjective, Objective, make_objective
from mergekit_ext.methods.adarank.options import LearnOptions, split_held_out
from mergekit_ext.methods.adarank.prompts import answer_stop_ids, chat_template_of, encode_pools
from mergekit_ext.methods.adarank.training import train

# Options ``prepare`` builds the setup from (the factorisation, the prompts' tokens, the
# teachers' answers, the held-out split): ``Setup.reset`` cannot change them.
PREPARED_OPTIONS = (
    "variant", "max_rank_ratio", "svd", "factor_dtype", "device", "common_space_fraction",
    "add_special_tokens", "chat_template", "stop", "top_k", "held_out",
)  # fmt: skip


@dataclass
class LearnResult:
    masks: Dict[str, torch.Tensor]  # bool [rows, band] per matrix (rows: kernel.mask_rows)
    coefficients: Dict[str, torch.Tensor]  # float32 [rows] per tensor
    info: Dict = field(default_factory=dict)
    history: List[float] = field(default_factory=list)  # objective per step (training batches)
    fingerprints: Dict[str, torch.Tensor] = field(default_factory=dict)  # float32 [rows, FINGERPRINT_VALUES] per matrix


@dataclass
class Setup:
    """Everything the learner needs, built once by ``prepare``; ``reset`` and ``run`` use it for
    many runs (a benchmark's grid of rates, steps and objectives on one factorisation)."""

    options: LearnOptions
    model: MergedModel
    objective: Objective
    train_pools: List[list]  # the objective's items per task (prompt token ids, or teacher answers)
    held_out_pools: List[list]
    task_names: List[str]
    model_paths: List[Path]
    base_path: Optional[Path]
    tokenizer: object
    stop_ids: List[int]
    device: torch.device
    seconds: Dict[str, float]
    # The objective and items ``prepare`` built: another objective's items are made from these.
    prepared: Tuple[Objective, List[list], List[list]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prepared = (self.objective, self.train_pools, self.held_out_pools)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def reset(self, options: Optional[LearnOptions] = None) -> None:
        """Back to step 0 (the base method): initial logits and coefficients at the prior, and
        ``options`` (the rate, schedule, steps, prior, objective, …) for the next ``run``. The
        options in ``PREPARED_OPTIONS`` must stay as prepared."""
        options = (options or self.options).resolved()
        if options.chat_template is None:  # the prompts were encoded once, in prepare
            options = dataclasses.replace(options, chat_template=self.options.chat_template)
        changed = [name for name in PREPARED_OPTIONS if getattr(options, name) != getattr(self.options, name)]
        if changed:
            raise ValueError(f"adarank: {', '.join(changed)} can only be set by prepare (the setup was built with them)")
        objective = make_objective(options, self.pad_id, self.device, self.stop_ids)
        source, train_pools, held_out_pools = self.prepared
        self.train_pools, self.held_out_pools = objective.adopt(train_pools, source), objective.adopt(held_out_pools, source)
        self.objective, self.options = objective, options
        with torch.no_grad():
            self.model.coefficients.fill_(options.prior)
            for entry in self.model.entries:
                if entry.logits is not None:
                    entry.logits.copy_(entry.initial_logits(options.init_rank_ratio))
        self.model.coefficients_only = options.coefficients_only
        self.model.gradient_checkpointing = options.gradient_checkpointing

    def measure(self, pools=None, model=None) -> Tuple[float, List[float]]:
        """The objective (total, per task) on ``pools`` (default: the held-out items) for
        ``model`` (default: the merged model; any object with its ``logits``), without gradients."""
        with torch.no_grad():
            total, per_task = self.objective(self.model if model is None else model, self.held_out_pools if pools is None else pools)
        return float(total), [float(value) for value in per_task]

    def train(self, model=None, *, progress: bool = False, on_step: Optional[Callable[[int], None]] = None) -> List[float]:
        """Train ``model`` (default: the merged model; any object with ``parameters()`` and
        ``logits``) from its current state on the training items with the setup's options and
        objective; the loss per step. ``on_step(step)`` runs after each update (1-based)."""
        return train(self.model if model is None else model, self.objective, self.train_pools, self.options, progress=progress, on_step=on_step)


def prepare(
    models: Sequence[str | os.PathLike],
    prompts: Sequence[Sequence[str]],
    *,
    base: Optional[str | os.PathLike] = None,
    options: LearnOptions = LearnOptions(),
    task_names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Setup:
    """Tokenise, split held-out prompts, build the teacher cache (distill), factorise."""
    from transformers import AutoTokenizer

    options = options.resolved()
    model_paths = [Path(model).absolute() for model in models]
    base_path = Path(base).absolute() if base is not None else None
    count = len(model_paths)
    if count == 0:
        raise ValueError("adarank: no models to merge")
    if len(prompts) != count:
        raise ValueError(f"adarank: need one prompt pool per model ({count}), got {len(prompts)}")
    if options.variant in ("ta", *SUBSPACE_VARIANTS) and base_path is None:
        raise ValueError(f"adarank: variant '{options.variant}' needs --base (θ0)")
    task_names = list(task_names) if task_names is not None else [path.name for path in model_paths]
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    seconds: Dict[str, float] = {}

    reference_path, reference, loaders = open_inputs(model_paths, base_path)
    tokenizer = AutoTokenizer.from_pretrained(str(reference_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    has_template = chat_template_of(tokenizer) is not None
    if options.chat_template and not has_template:
        raise ValueError(f"adarank: --chat-template: the tokenizer of {reference_path} has no chat template")
    options = dataclasses.replace(options, chat_template=has_template if options.chat_template is None else options.chat_template)
    stop_ids = answer_stop_ids(tokenizer, options.stop, chat_template=options.chat_template)
    encoded = encode_pools(tokenizer, prompts, task_names, chat_template=options.chat_template, add_special_tokens=options.add_special_tokens)

    objective = make_objective(options, pad_id, device, stop_ids)
    clock = time.perf_counter()
    encoded = objective.items(encoded, experts=model_paths, options=options, progress=progress)
    if objective.preparation is not None:
        seconds[objective.preparation] = time.perf_counter() - clock
    train_pools, held_out_pools = split_held_out(encoded, options)

    clock = time.perf_counter()
    skeleton = empty_architecture(reference_path, io.tensor_names(reference), device)
    entries = factorise(reference, loaders, model_paths, reference if base_path is not None else None, options, device, progress=progress)
    seconds["factorise"] = time.perf_counter() - clock
    rows = mask_rows(options.variant, count)
    coefficients = torch.nn.Parameter(torch.full((rows, len(entries)), options.prior, device=device))
    model = MergedModel(
        skeleton, entries, coefficients, coefficients_only=options.coefficients_only,
        gradient_checkpointing=options.gradient_checkpointing,
    )  # fmt: skip
    return Setup(
        options=options,
        model=model,
        objective=objective,
        train_pools=train_pools,
        held_out_pools=held_out_pools,
        task_names=task_names,
        model_paths=model_paths,
        base_path=base_path,
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        device=device,
        seconds=seconds,
    )


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
    started = time.perf_counter()
    setup = prepare(models, prompts, base=base, options=options, task_names=task_names, progress=progress)
    return run(setup, progress=progress, started=started)


def run(setup: Setup, *, progress: bool = False, started: Optional[float] = None, on_step: Optional[Callable[[int], None]] = None) -> LearnResult:
    """Train from the setup's current state and collect the result (masks, coefficients, info).
    ``on_step(step)`` runs after each update (1-based), e.g. to score the merge at chosen steps."""
    started = time.perf_counter() if started is None else started
    options, model, objective = setup.options, setup.model, setup.objective
    task_names, count = setup.task_names, len(setup.model_paths)
    entropy = EntropyObjective(setup.pad_id, setup.device)
    prompt_pools = [[objective.prompt(item) for item in pool] for pool in setup.held_out_pools]

    def measures() -> Tuple[Tuple[float, List[float]], Tuple[float, List[float]]]:
        with torch.no_grad():
            primary = setup.measure()
            total, per_task = entropy(model, prompt_pools)
        return primary, (float(total), [float(value) for value in per_task])

    before, entropy_before = measures()
    clock = time.perf_counter()
    history = setup.train(progress=progress, on_step=on_step)
    seconds = {**setup.seconds, "train": time.perf_counter() - clock}
    after, entropy_after = measures()

    masks, kept = hard_masks(model.entries, options, task_names)
    final = model.coefficients.detach()
    learned_coefficients = {entry.name: final[:, entry.column].cpu() for entry in model.entries}
    fingerprints = {entry.name: entry.fingerprint for entry in model.entries if entry.fingerprint is not None}
    seconds["total"] = time.perf_counter() - started
    info = {
        "variant": options.variant,
        "prior": options.prior,
        "init_rank_ratio": options.init_rank_ratio,
        "max_rank_ratio": options.max_rank_ratio,
        **({"common_space_fraction": options.common_space_fraction} if options.variant == "iso_cts" else {}),
        "mask_rows": mask_rows(options.variant, count),
        "svd": options.svd,
        "mask_temperature": MASK_TEMPERATURE,
        "tasks": count,
        "task_names": task_names,
        "models": [{"path": str(path), "content_hash": io.content_hash(path)} for path in setup.model_paths],
        "base": None if setup.base_path is None else {"path": str(setup.base_path), "content_hash": io.content_hash(setup.base_path)},
        "tensors": len(model.entries),
        "matrices": len(masks),
        "objective": objective.description,
        "training": {
            "objective": options.objective,
            "coefficients_only": options.coefficients_only,
            "steps": options.steps,
            "lr": options.lr,
            "lr_schedule": options.lr_schedule,
            "batch_size": options.batch_size,
            "seed": options.seed,
            "prompts_per_task": [len(pool) for pool in setup.train_pools],
            "held_out_per_task": [len(pool) for pool in setup.held_out_pools],
            "add_special_tokens": options.add_special_tokens,
            "top_k": options.top_k,
            "max_new_tokens": options.max_new_tokens,
            "stop": None if options.chat_template else options.stop,
            "chat_template": bool(options.chat_template),
            "stop_token_ids": list(setup.stop_ids),
            "factor_dtype": options.factor_dtype,
            "gradient_checkpointing": options.gradient_checkpointing,
            "device": str(setup.device),
        },
        "held_out_objective": {
            "name": objective.name,
            "measure": objective.description,
            "before": {"total": before[0], **dict(zip(task_names, before[1]))},
            "after": {"total": after[0], **dict(zip(task_names, after[1]))},
        },
        # The next-token entropy after each held-out prompt, whatever the objective.
        "entropy_before": {"total": entropy_before[0], **dict(zip(task_names, entropy_before[1]))},
        "entropy_after": {"total": entropy_after[0], **dict(zip(task_names, entropy_after[1]))},
        "kept_components": kept,
        "coefficients": {
            "mean": float(final.mean()),
            "min": float(final.min()),
            "max": float(final.max()),
            "by_task": {
                name: {"mean": float(row.mean()), "min": float(row.min()), "max": float(row.max())}
                for name, row in zip(mask_row_names(options.variant, task_names), final)
            },
        },
        "learner_bytes": learner_bytes(model),
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
        "loss": {"first": history[0] if history else None, "last": history[-1] if history else None},
        "fingerprint": {"values": FINGERPRINT_VALUES, "rtol": FINGERPRINT_RTOL},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return LearnResult(masks=masks, coefficients=learned_coefficients, info=info, history=history, fingerprints=fingerprints)
