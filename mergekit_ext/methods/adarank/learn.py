"""The AdaRank learner: masks and coefficients from unlabeled prompts (``mergekit-ext adarank learn``).

AdaRank (arXiv 2503.22178, docs/methods.md#adarank) prunes singular components of each
task vector and rescales each task per tensor, choosing both at test time from
unlabeled prompts. The kernels are in ``kernel.py`` and the learned file's
format in ``format.py``; this module is the learner.

Memory: the factorisation streams from disk tensor by tensor (one tensor of
each model at a time; no expert is ever loaded whole, except one at a time for
the distillation teachers before the learner is built); the learner then holds
one float32 origin, the candidate components of every matrix (``ta``/``cart``:
the top ``max_rank_ratio`` singular triplets of each task vector, about
2·ratio·model per task; ``tsv_m``/``iso_cts``: the method's stack, about 2·model
for all tasks together), U and V in ``factor_dtype``, and the task vectors of the
non-matrix tensors (embeddings, lm_head, norms), also in ``factor_dtype``. The
architecture it runs is built with no weights at all (meta parameters: every forward
passes the merged ones in), so no float32 copy of the checkpoint is ever loaded. With ``gradient_checkpointing`` a step keeps one decoder layer's merged
weights and graph at a time instead of the whole model's. It trains, with Adam:

* mask logits [T, band] per matrix (straight-through binary masks; frozen with
  ``coefficients_only``), and
* coefficients [T, n_tensors], initialised to ``prior``,

on one of three label-free objectives, all where a causal LM answers (entropy
over every prompt position is NOT used: those positions predict the user's own
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
applies in the stock ``mergekit-yaml``, streaming one tensor at a time;
``--merge-out`` runs that merge right away.
"""

from __future__ import annotations

import dataclasses
import math
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
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_RANK_RATIO,
    DEFAULT_OBJECTIVE,
    DEFAULT_STEPS,
    DEFAULT_STOP,
    DEFAULT_SVD,
    DEFAULT_TOP_K,
    DEFAULT_VARIANT,
    FACTOR_DTYPES,
    FINGERPRINT_RTOL,
    FINGERPRINT_VALUES,
    LR_SCHEDULES,
    MASK_TEMPERATURE,
    OBJECTIVES,
    SUBSPACE_VARIANTS,
    VARIANT_DEFAULTS,
    VARIANTS,
)
from mergekit_ext.methods.adarank.kernel import (
    band_rank,
    initial_grid_logits,
    mask_rows,
    matrix_components,
    merge_components,
    merge_other,
    origin_and_vectors,
    other_vectors,
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
    lr_schedule: str = DEFAULT_LR_SCHEDULE  # constant, or cosine decay to 0 over the steps
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    svd: str = DEFAULT_SVD
    add_special_tokens: bool = False
    device: str = "cpu"
    objective: str = DEFAULT_OBJECTIVE
    coefficients_only: bool = False  # masks frozen at step 0 (AdaMerging-style ablation)
    top_k: int = DEFAULT_TOP_K  # distill: teacher log-probs kept per answer position
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # greedy answers (entropy-answer, distill)
    stop: Optional[str] = DEFAULT_STOP  # an answer ends at this token (or EOS); None: EOS only
    factor_dtype: str = "float32"  # storage of the learner's U, V and non-matrix task vectors (bfloat16 halves them)
    held_out: Optional[int] = None  # prompts per task kept out of training; None: min(batch, pool // 2)
    common_space_fraction: float = DEFAULT_COMMON_SPACE_FRACTION  # iso_cts only (1: Iso-C)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
    # Pose each prompt as a user turn through the tokenizer's chat template (answers then end at
    # the template's end-of-turn token or EOS, not at ``stop``); None: when the tokenizer has one.
    chat_template: Optional[bool] = None

    def resolved(self) -> "LearnOptions":
        """The options with the variant's defaults filled in, validated."""
        if self.variant not in VARIANTS:
            raise ValueError(f"adarank: unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"adarank: unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"adarank: unknown lr_schedule {self.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"adarank: factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {self.factor_dtype!r}")
        defaults = VARIANT_DEFAULTS[self.variant]
        prior = defaults["prior"] if self.prior is None else self.prior
        init = defaults["init_rank_ratio"] if self.init_rank_ratio is None else self.init_rank_ratio
        for label, value in (("init_rank_ratio", init), ("max_rank_ratio", self.max_rank_ratio)):
            if not 0 < value <= 1:
                raise ValueError(f"adarank: {label} must be in (0, 1], got {value}")
        if self.variant in SUBSPACE_VARIANTS and (init != 1.0 or self.max_rank_ratio != 1.0):
            raise ValueError(
                f"adarank: variant {self.variant} starts from every component of the method's stack: "
                f"init_rank_ratio and max_rank_ratio must be 1 (got {init} and {self.max_rank_ratio})"
            )
        if init > self.max_rank_ratio:
            raise ValueError(
                f"adarank: init_rank_ratio {init} is above max_rank_ratio {self.max_rank_ratio}: "
                "step 0 could not be the base method"
            )
        if not 0 < self.common_space_fraction <= 1:
            raise ValueError(f"adarank: common_space_fraction must be in (0, 1], got {self.common_space_fraction}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("adarank: steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.top_k < 1 or self.max_new_tokens < 1 or (self.held_out is not None and self.held_out < 0):
            raise ValueError("adarank: top_k and max_new_tokens must be >= 1, held_out >= 0")
        for label, value in (("--lr", self.lr), ("--prior", prior)):
            if not math.isfinite(value):  # inf/nan would train NaN masks and coefficients
                raise ValueError(f"adarank: {label} must be a finite number, got {value}")
        return LearnOptions(**{**asdict(self), "prior": float(prior), "init_rank_ratio": float(init)})


@dataclass
class LearnResult:
    masks: Dict[str, torch.Tensor]  # bool [rows, band] per matrix (rows: kernel.mask_rows)
    coefficients: Dict[str, torch.Tensor]  # float32 [rows] per tensor
    info: Dict = field(default_factory=dict)
    history: List[float] = field(default_factory=list)  # objective per step (training batches)
    fingerprints: Dict[str, torch.Tensor] = field(default_factory=dict)  # float32 [rows, FINGERPRINT_VALUES] per matrix


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
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:  # attention memory grows with the square of the length
            raise ValueError(f"{path}: prompt {number} has {len(prompt):,} characters; AdaRank learns from short prompts (at most {MAX_PROMPT_CHARS:,})")
    return prompts


MAX_PROMPT_CHARS = 4096


def zoo_prompts(zoo, task: str, split: str = "validation", unlabeled: int = 0) -> List[str]:
    """A zoo task's prompts (never its answers): a generation task's ``prompt``, or a
    multiple-choice ``query`` followed by lm-eval's target delimiter (where the answer starts);
    then ``unlabeled`` more from the task's generator, none of them a validation or test prompt."""
    documents = zoo.documents(task, split) + (zoo.unlabeled_documents(task, unlabeled) if unlabeled else [])
    return [
        document["prompt"] if "prompt" in document else document["query"] + ZOO_TARGET_DELIMITER
        for document in documents
    ]


# ---------------------------------------------------------------------------
# Greedy answers and the teacher cache


@dataclass
class Answered:
    """A prompt and a greedy answer: ``ids`` = prompt + answer[:-1] (the model's input);
    answer token j is predicted at position ``start - 1 + j``, j < ``length``."""

    ids: List[int]
    start: int
    length: int
    answer: List[int]


def stop_token_ids(tokenizer, stop: Optional[str]) -> List[int]:
    """EOS and, when ``stop`` is one token, that token: where a greedy answer ends."""
    ids = set()
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if stop:
        encoded = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids)


def chat_template_of(tokenizer) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def chat_prompts(tokenizer, prompts: Sequence[str]) -> List[str]:
    """Each prompt as one user turn followed by the assistant's generation prompt (the text
    ``lm_eval --apply_chat_template`` sends); the template writes any BOS itself. A prompt that
    already ends with the assistant's generation prompt (a chat zoo's stored prompts, with their
    system message and example turns) is already a rendered conversation and is kept as is."""
    opening = _generation_prompt(tokenizer)
    return [
        prompt
        if opening and prompt.endswith(opening)
        else tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]


def _generation_prompt(tokenizer) -> str:
    """The text the template appends to open the assistant's turn (``<|im_start|>assistant\n``), or ""."""
    turn = [{"role": "user", "content": "question"}]
    with_opening = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
    return with_opening[len(without):] if with_opening.startswith(without) else ""


def end_of_turn_ids(tokenizer) -> List[int]:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, …): the first token after a rendered answer, when it is
    a special token; [] when the template closes turns with plain text only."""
    marker = "\u2063answer\u2063"  # text no template rewrites
    conversation = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that refuses this conversation: EOS alone ends answers
        return []
    if marker not in rendered:
        return []
    after = rendered.split(marker, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)
    return [ids[0]] if ids and ids[0] in special else []


def greedy_answers(forward, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], max_new_tokens: int, device, *, batch_size: int = 256) -> List[Answered]:
    """Greedy continuation of each prompt up to and including the first stop token (else
    ``max_new_tokens`` tokens). Prompts are grouped by length (no padding: each answer is
    what unbatched greedy decoding gives) and decoded with a KV cache; ``forward(ids,
    cache)`` returns a causal-LM output."""
    from transformers import DynamicCache

    results: List[Optional[Answered]] = [None] * len(prompts)
    groups: Dict[int, List[int]] = {}
    for index, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(index)
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    with torch.no_grad():
        for length in sorted(groups):
            members = groups[length]
            for first in range(0, len(members), batch_size):
                chunk = members[first : first + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
                cache = DynamicCache()
                output = forward(ids, cache)
                generated, done = [], torch.zeros(len(chunk), dtype=torch.bool, device=device)
                for step in range(max_new_tokens):
                    token = output.logits[:, -1, :].argmax(dim=-1)
                    generated.append(token)
                    done |= torch.isin(token, stops)
                    if bool(done.all()) or step == max_new_tokens - 1:
                        break
                    output = forward(token[:, None], cache)  # the cache is updated in place
                rows = torch.stack(generated, dim=1).tolist()
                for row, index in zip(rows, chunk):
                    cut = next((j + 1 for j, token in enumerate(row) if token in stop_ids), len(row))
                    answer = row[:cut]
                    prompt = list(prompts[index])
                    results[index] = Answered(prompt + answer[:-1], len(prompt), len(answer), answer)
    return results  # type: ignore[return-value]


def cache_keyword(model) -> str:
    """The keyword a causal LM's forward takes its KV cache by (``cache`` since transformers 5.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _answer_positions(sequences: Sequence[Answered], device) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = torch.cat([torch.full((item.length,), row, dtype=torch.long) for row, item in enumerate(sequences)])
    columns = torch.cat([torch.arange(item.start - 1, item.start - 1 + item.length) for item in sequences])
    return rows.to(device), columns.to(device)


def answer_logits(logits_fn, sequences: Sequence[Answered], pad_id: int, device) -> torch.Tensor:
    """float32 logits [Σ lengths, vocab] at every answer position of ``sequences`` (in order)."""
    ids, attention = pad_right([item.ids for item in sequences], pad_id, device)
    rows, columns = _answer_positions(sequences, device)
    return logits_fn(ids, attention)[rows, columns].float()


@dataclass
class TeacherItem:
    """One prompt of the distillation cache: the expert's greedy answer and, at each answer
    position, the expert's top-k log-probabilities [length, k] and their token ids."""

    sequence: Answered
    log_probs: torch.Tensor
    indices: torch.Tensor


def teacher_cache(expert_path, prompts: Sequence[Sequence[int]], *, stop_ids, options: "LearnOptions", pad_id: int, device, batch_size: int = 64) -> List[TeacherItem]:
    """Load one expert, answer its task's prompts greedily, keep the top-k log-probs of
    each answer position, free the expert: the experts never sit in memory during learning."""
    from transformers import AutoModelForCausalLM

    expert = AutoModelForCausalLM.from_pretrained(str(expert_path), dtype=torch.float32).to(device).eval()
    keyword = cache_keyword(expert)
    answered = greedy_answers(
        lambda ids, cache: expert(input_ids=ids, use_cache=True, **{keyword: cache}),
        prompts, stop_ids, options.max_new_tokens, device,
    )  # fmt: skip
    items: List[TeacherItem] = []
    with torch.no_grad():
        for first in range(0, len(answered), batch_size):
            chunk = answered[first : first + batch_size]
            logits = answer_logits(lambda ids, attention: expert(input_ids=ids, attention_mask=attention).logits, chunk, pad_id, device)
            top = torch.log_softmax(logits, dim=-1).topk(min(options.top_k, logits.shape[-1]), dim=-1)
            for item, values, indices in zip(chunk, top.values.split([s.length for s in chunk]), top.indices.split([s.length for s in chunk])):
                items.append(TeacherItem(item, values.cpu(), indices.cpu()))
    expert = None  # the closures above hold the name: rebinding frees the model (and keeps linters sure it is bound)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return items


# ---------------------------------------------------------------------------
# The learner


@dataclass
class _Entry:
    """One tensor of the merge: its origin and either its task vectors or its candidate components."""

    name: str
    column: int
    origin: torch.Tensor
    vectors: Optional[torch.Tensor] = None  # non-matrix tensors (what the coefficients multiply)
    factors: Optional[tuple] = None  # matrices: (left [m, K], sigma [K], right [K, n]), kernel.Components
    slots: Optional[tuple] = None  # (rows [K], positions [K]): each component's mask cell
    valid: Optional[torch.Tensor] = None  # bool [rows, band]: cells that hold a component
    logits: Optional[torch.nn.Parameter] = None
    fingerprint: Optional[torch.Tensor] = None  # top singular values [rows, FINGERPRINT_VALUES]

    def initial_logits(self, init_rank_ratio: float) -> torch.Tensor:
        return initial_grid_logits(self.valid, self.origin.shape, init_rank_ratio)


def _encode(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> List[List[int]]:
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [ids for ids in encoded if ids]


def answer_entropy(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution after each (right-padded) prompt: [batch]."""
    last = logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1].float()
    return _entropy(last)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
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
    """Origins and task vectors streamed tensor by tensor from disk (one tensor of each
    model in memory at a time); matrices keep only their top-band SVD (U, V in
    ``options.factor_dtype``), a fingerprint and mask logits."""
    from tqdm.auto import tqdm

    storage = getattr(torch, options.factor_dtype)
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
            parts = matrix_components(
                vectors, options.variant, band=band_rank(first.shape, options.max_rank_ratio),
                svd=options.svd, common_space_fraction=options.common_space_fraction,
            )  # fmt: skip
            entry.fingerprint = parts.fingerprint
            entry.factors = (parts.left.to(storage), parts.sigma, parts.right.to(storage))
            entry.slots = (parts.rows.to(device), parts.positions.to(device))
            entry.valid = parts.valid()
            entry.logits = torch.nn.Parameter(entry.initial_logits(options.init_rank_ratio).to(device))
            del parts
        else:
            entry.vectors = other_vectors(options.variant, vectors).to(storage)
        entries.append(entry)
        del tensors, vectors
    if not any(entry.logits is not None for entry in entries):
        raise ValueError("adarank: no matrix tensors found (2-D weights inside transformer blocks)")
    return entries


def empty_architecture(reference_path: Path, names: Sequence[str], device):
    """The checkpoint's architecture with no weights of its own: parameters on the meta device
    (accelerate's ``init_empty_weights``), buffers such as rotary frequencies real, on ``device``.

    The learner passes every weight in at each forward (``functional_call``), so loading the
    checkpoint here would only add one transient float32 copy of the model to the peak.
    A parameter the checkpoint lacks (and no tied one covers) is refused by name.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(reference_path))
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    # Under init_empty_weights transformers leaves a tied output embedding untied (its own
    # meta tensor); tying it as loading does makes the checkpoint's embedding serve both, and
    # functional_call (tie_weights=True) passes the merged embedding to the head too.
    skeleton.tie_weights()
    present = set(names)
    missing = sorted(group[0] for group in tied_groups(skeleton) if not present.intersection(group))
    if missing:
        known = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)} | {name for name, _ in skeleton.named_buffers()}
        unused = sorted(present - known)
        # transformers 5 fuses some layouts when loading (e.g. MoE experts into one 3-D tensor):
        # the learner runs the checkpoint's tensors as stored, so say that is the reason.
        why = f" (it stores {unused[0]} and {len(unused) - 1} more that transformers converts when loading; not supported by the learner)" if unused else ""
        raise ValueError(f"adarank: {reference_path}: the architecture needs weights the checkpoint lacks: {', '.join(missing[:3])}{why}")
    for module in skeleton.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    for parameter in skeleton.parameters():
        parameter.requires_grad_(False)
    return skeleton.eval()


def tied_groups(module) -> List[Tuple[str, ...]]:
    """The module's parameter names grouped by the tensor they share (a tied embedding and
    head form one group, in registration order; an untied parameter is a group of one)."""
    groups: Dict[int, List[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [tuple(group) for group in groups.values()]


def tied_aliases(module, names: Sequence[str]) -> set:
    """Names in ``names`` that another name of the same tied group, earlier in the group, also
    covers: a checkpoint that stores a tied head beside its embedding merges the tensor once,
    as the embedding (``functional_call`` refuses two values for one tied tensor)."""
    present, aliases = set(names), set()
    for group in tied_groups(module):
        stored = [name for name in group if name in present]
        aliases.update(stored[1:])
    return aliases


class MergedModel:
    """The merged weights as a differentiable function of masks and coefficients, run through one
    float32 copy of the architecture (``torch.func.functional_call``).

    With ``gradient_checkpointing`` (and gradients on), each decoder layer builds its own merged
    weights inside ``torch.utils.checkpoint`` (non-reentrant): neither those weights, the
    products that build them, nor the layer's activations are kept for the backward pass,
    which rebuilds them one layer at a time. The loss and gradients are the same.
    """

    def __init__(self, skeleton, entries: List[_Entry], coefficients: torch.nn.Parameter, *, coefficients_only: bool = False, gradient_checkpointing: bool = False):
        self.skeleton = skeleton
        self.entries = entries
        self.coefficients = coefficients
        self.coefficients_only = coefficients_only
        self.gradient_checkpointing = gradient_checkpointing
        self.layer_builds = 0  # decoder layers whose weights were built under checkpointing (tests)
        self._module_keys = set(skeleton.state_dict().keys()) - tied_aliases(skeleton, [entry.name for entry in entries])

    def parameters(self) -> List[torch.nn.Parameter]:
        if self.coefficients_only:
            return [self.coefficients]
        return [self.coefficients] + [entry.logits for entry in self.entries if entry.logits is not None]

    def _weight(self, entry: _Entry) -> torch.Tensor:
        column = self.coefficients[:, entry.column]
        if entry.factors is not None:
            left, sigma, right = entry.factors
            logits = entry.logits.detach() if self.coefficients_only else entry.logits
            mask = straight_through_mask(logits, MASK_TEMPERATURE)
            return merge_components(entry.origin, left.to(sigma.dtype), sigma, right.to(sigma.dtype), *entry.slots, mask, column)
        tasks = entry.vectors.shape[0]  # iso_cts' common row has no part in non-matrix tensors
        return merge_other(entry.origin, entry.vectors.to(entry.origin.dtype), column[:tasks])

    def weights(self, skip=frozenset()) -> Dict[str, torch.Tensor]:
        # A tensor in the checkpoint but not in the module keeps its prior coefficient.
        return {entry.name: self._weight(entry) for entry in self.entries if entry.name in self._module_keys and entry.name not in skip}

    def _decoder_layers(self) -> Dict[str, List[_Entry]]:
        """The entries of each decoder layer (a child of the model's largest ModuleList), by the layer's module name."""
        lists = [(name, module) for name, module in self.skeleton.named_modules() if isinstance(module, torch.nn.ModuleList)]
        if not lists:
            return {}
        prefix, blocks = max(lists, key=lambda item: len(item[1]))
        layers: Dict[str, List[_Entry]] = {f"{prefix}.{index}": [] for index in range(len(blocks))}
        for entry in self.entries:
            if entry.name in self._module_keys:
                head = entry.name[len(prefix) + 1 :].split(".", 1)[0] if entry.name.startswith(prefix + ".") else None
                if head is not None and f"{prefix}.{head}" in layers:
                    layers[f"{prefix}.{head}"].append(entry)
        return layers

    def _checkpointed_logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.stateless import _reparametrize_module
        from torch.utils.checkpoint import checkpoint

        layers = self._decoder_layers()
        inside = {entry.name for entries in layers.values() for entry in entries}
        installed = []
        for layer_name, entries in layers.items():
            layer = self.skeleton.get_submodule(layer_name)
            original = layer.forward
            local = [(entry.name[len(layer_name) + 1 :], entry) for entry in entries]

            def forward(*args, _layer=layer, _original=original, _local=local, **kwargs):
                def build_and_run():
                    # Runs again in the backward pass: the weights are rebuilt, not stored.
                    self.layer_builds += 1
                    weights = {name: self._weight(entry) for name, entry in _local}
                    with _reparametrize_module(_layer, weights):
                        return _original(*args, **kwargs)

                return checkpoint(build_and_run, use_reentrant=False)

            layer.forward = forward
            installed.append(layer)
        try:
            output = torch.func.functional_call(
                self.skeleton, self.weights(skip=inside), args=(),
                kwargs={"input_ids": ids, "attention_mask": attention, "use_cache": False},
            )  # fmt: skip
        finally:
            for layer in installed:
                del layer.forward  # back to the class's forward
        return output.logits

    def hard_weights(self) -> Dict[str, torch.Tensor]:
        """The merged weights now (hard masks), detached: what the learned file would give."""
        with torch.no_grad():
            return {name: tensor.detach() for name, tensor in self.weights().items()}

    def logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._checkpointed_logits(ids, attention)
        output = torch.func.functional_call(self.skeleton, self.weights(), args=(), kwargs={"input_ids": ids, "attention_mask": attention})
        return output.logits

    def forward_with(self, weights: Dict[str, torch.Tensor]):
        """``forward(ids, cache)`` for ``greedy_answers`` with fixed ``weights``."""
        keyword = cache_keyword(self.skeleton)
        return lambda ids, cache: torch.func.functional_call(
            self.skeleton, weights, args=(), kwargs={"input_ids": ids, keyword: cache, "use_cache": True}
        )

    def greedy(self, prompts: Sequence[Sequence[int]], stop_ids, max_new_tokens: int, device) -> List[Answered]:
        return greedy_answers(self.forward_with(self.hard_weights()), prompts, stop_ids, max_new_tokens, device)


def learner_bytes(model: MergedModel) -> Dict[str, int]:
    """What the learner holds between steps, by part (bytes): the float32 origin, the factors
    (U, s, V of the band), the non-matrix task vectors and the architecture it runs."""
    def size(tensor):
        return tensor.numel() * tensor.element_size()

    parts = {"origin": 0, "factors": 0, "other_task_vectors": 0}
    for entry in model.entries:
        parts["origin"] += size(entry.origin)
        if entry.factors is not None:
            parts["factors"] += sum(size(part) for part in entry.factors)
        if entry.vectors is not None:
            parts["other_task_vectors"] += size(entry.vectors)
    parts["architecture"] = sum(size(tensor) for tensor in model.skeleton.state_dict().values() if not tensor.is_meta)
    parts["model_float32"] = sum(entry.origin.numel() * 4 for entry in model.entries)
    return parts


def _per_task(values: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    per_task = torch.stack([chunk.mean() for chunk in values.split(list(sizes))])
    return per_task.sum(), per_task


class EntropyObjective:
    """Per task, the mean entropy of the next-token distribution right after each prompt (where a
    causal LM starts its answer); the loss is the sum over tasks. Items: prompt token ids."""

    name = "entropy"
    description = "sum over tasks of the mean entropy (nats) of the next-token distribution after each prompt"

    def __init__(self, pad_id: int, device):
        self.pad_id, self.device = pad_id, device

    def __call__(self, model: MergedModel, batches: Sequence[Sequence[Sequence[int]]]) -> Tuple[torch.Tensor, torch.Tensor]:
        sequences = [sequence for batch in batches for sequence in batch]
        ids, attention = pad_right(sequences, self.pad_id, self.device)
        entropy = answer_entropy(model.logits(ids, attention), attention.sum(dim=1))
        return _per_task(entropy, [len(batch) for batch in batches])


class AnswerEntropyObjective:
    """Per task, the mean entropy over every position of the merged model's own greedy answer
    (regenerated with the current hard masks at each step, no gradient through the choice of
    tokens); summed over tasks. Items: prompt token ids."""

    name = "entropy-answer"
    description = "sum over tasks of the mean entropy (nats per answer token) at the merged model's own greedy answer positions"

    def __init__(self, pad_id: int, device, stop_ids, max_new_tokens: int):
        self.pad_id, self.device, self.stop_ids, self.max_new_tokens = pad_id, device, stop_ids, max_new_tokens

    def __call__(self, model: MergedModel, batches) -> Tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompt for batch in batches for prompt in batch]
        answered = model.greedy(prompts, self.stop_ids, self.max_new_tokens, self.device)
        entropy = _entropy(answer_logits(model.logits, answered, self.pad_id, self.device))
        sizes, position = [], 0
        for batch in batches:
            sizes.append(sum(item.length for item in answered[position : position + len(batch)]))
            position += len(batch)
        return _per_task(entropy, sizes)


def distillation_kl(logits: torch.Tensor, teacher_log_probs: torch.Tensor, teacher_indices: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) [positions] over the teacher's top-k tokens plus one bucket for
    the rest of the vocabulary (the KL of the two distributions coarsened to k + 1 outcomes:
    a lower bound of the full KL, exact when the teacher's mass is in its top k)."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, teacher_indices)
    p_top = teacher_log_probs.exp()
    kl = (p_top * (teacher_log_probs - log_q_top)).sum(-1)
    if teacher_indices.shape[-1] >= logits.shape[-1]:
        return kl  # every token is in the top k: the full KL
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)
    log_q_rest = torch.logsumexp(log_q.scatter(-1, teacher_indices, float("-inf")), dim=-1)
    rest = torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    return kl + torch.where(p_rest > 0, rest, torch.zeros_like(rest))


class DistillObjective:
    """Per task, the mean KL(expert ‖ merged) over the answer positions of the expert's own greedy
    answers to that task's prompts (from the teacher cache); summed over tasks. Items: TeacherItem."""

    name = "distill"
    description = "sum over tasks of the mean KL(expert ‖ merged) (nats per answer token) at the expert's greedy answer positions"

    def __init__(self, pad_id: int, device):
        self.pad_id, self.device = pad_id, device

    def __call__(self, model: MergedModel, batches: Sequence[Sequence[TeacherItem]]) -> Tuple[torch.Tensor, torch.Tensor]:
        items = [item for batch in batches for item in batch]
        logits = answer_logits(model.logits, [item.sequence for item in items], self.pad_id, self.device)
        kl = distillation_kl(
            logits,
            torch.cat([item.log_probs for item in items]).to(self.device),
            torch.cat([item.indices for item in items]).to(self.device),
        )
        return _per_task(kl, [sum(item.sequence.length for item in batch) for batch in batches])


def _train(model: MergedModel, objective, pools, options: "LearnOptions", *, progress: bool, on_step=None) -> List[float]:
    """Adam on masks and coefficients (coefficients only with ``coefficients_only``), one batch
    of prompts per task per step; the loss per step. ``on_step(step)`` is called after each
    update (1-based) when given."""
    from tqdm.auto import tqdm

    rng = random.Random(options.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    scheduler = None
    if options.lr_schedule == "cosine":
        # lr · ½(1 + cos(π·step/steps)): full rate on the first step, ~0 on the last.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, options.steps))))
    history: List[float] = []
    bar = tqdm(range(options.steps), desc=f"adarank ({options.variant}, {objective.name})", disable=not progress)
    for step in bar:
        batches = [[pool[i] for i in rng.sample(range(len(pool)), min(options.batch_size, len(pool)))] for pool in pools]
        loss, _ = objective(model, batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history.append(loss.item())
        if step % 10 == 0 or step == options.steps - 1:
            bar.set_postfix({objective.name: f"{history[-1]:.4f}"})
        if on_step is not None:
            on_step(step + 1)
    return history


def layer_type(name: str) -> str:
    """A tensor's kind without its layer number: ``model.layers.3.mlp.up_proj.weight`` → ``mlp.up_proj``."""
    parts = [part for part in name.split(".") if not part.isdigit() and part not in ("model", "layers", "weight", "h", "transformer")]
    return ".".join(parts) or name


def mask_row_names(variant: str, task_names: Sequence[str]) -> List[str]:
    """Names of the mask / coefficient rows: the tasks, and ``common`` for iso_cts."""
    return list(task_names) + ["common"] * (mask_rows(variant, len(task_names)) - len(task_names))


def _hard_masks(entries: List[_Entry], options: "LearnOptions", task_names: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The binary masks and how many components were kept at step 0 and now, of how many
    candidates: in total, per task and per layer type."""
    masks, kept = {}, {"before": 0, "after": 0, "band": 0}
    row_names = mask_row_names(options.variant, task_names)
    by_task = {name: {"before": 0, "after": 0, "band": 0} for name in row_names}
    by_type: Dict[str, Dict[str, int]] = {}
    for entry in entries:
        if entry.logits is None:
            continue
        # Cells that hold no component (tsv_m / iso_cts rows shorter than the grid) are off.
        hard = (torch.sigmoid(entry.logits.detach() / MASK_TEMPERATURE) > 0.5).cpu() & entry.valid
        masks[entry.name] = hard
        start = entry.initial_logits(options.init_rank_ratio) > 0
        kind = by_type.setdefault(layer_type(entry.name), {"before": 0, "after": 0, "band": 0})
        for target in (kept, kind):
            target["before"] += int(start.sum())
            target["after"] += int(hard.sum())
            target["band"] += int(entry.valid.sum())
        for task, row_start, row_hard, row_valid in zip(row_names, start, hard, entry.valid):
            by_task[task]["before"] += int(row_start.sum())
            by_task[task]["after"] += int(row_hard.sum())
            by_task[task]["band"] += int(row_valid.sum())
    kept["by_task"], kept["by_type"] = by_task, by_type
    return masks, kept


@dataclass
class Setup:
    """Everything the learner needs, built once (the benchmark reuses it for many runs)."""

    options: LearnOptions
    model: MergedModel
    objective: object
    train_pools: List[list]
    held_out_pools: List[list]
    task_names: List[str]
    model_paths: List[Path]
    base_path: Optional[Path]
    tokenizer: object
    stop_ids: List[int]
    device: torch.device
    seconds: Dict[str, float]

    def reset(self, options: Optional[LearnOptions] = None) -> None:
        """Back to step 0 (the base method): initial logits and coefficients at the prior."""
        options = (options or self.options).resolved()
        if options.chat_template is None:  # the prompts were encoded once, in prepare
            options = dataclasses.replace(options, chat_template=self.options.chat_template)
        self.options = options
        with torch.no_grad():
            self.model.coefficients.fill_(options.prior)
            for entry in self.model.entries:
                if entry.logits is not None:
                    entry.logits.copy_(entry.initial_logits(options.init_rank_ratio))
        self.model.coefficients_only = options.coefficients_only
        self.model.gradient_checkpointing = options.gradient_checkpointing

    def measure(self, pools=None) -> Tuple[float, List[float]]:
        with torch.no_grad():
            total, per_task = self.objective(self.model, pools if pools is not None else self.held_out_pools)
        return float(total), [float(value) for value in per_task]


def make_objective(options: LearnOptions, pad_id: int, device, stop_ids):
    if options.objective == "entropy":
        return EntropyObjective(pad_id, device)
    if options.objective == "entropy-answer":
        return AnswerEntropyObjective(pad_id, device, stop_ids, options.max_new_tokens)
    return DistillObjective(pad_id, device)


def held_out_count(pool_size: int, options: LearnOptions) -> int:
    if options.held_out is not None:
        return min(options.held_out, max(0, pool_size - 1))
    return min(options.batch_size, pool_size // 2)


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

    reference_path, reference, loaders = _open_inputs(model_paths, base_path)
    tokenizer = AutoTokenizer.from_pretrained(str(reference_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    has_template = chat_template_of(tokenizer) is not None
    if options.chat_template and not has_template:
        raise ValueError(f"adarank: --chat-template: the tokenizer of {reference_path} has no chat template")
    options = dataclasses.replace(options, chat_template=has_template if options.chat_template is None else options.chat_template)
    if options.chat_template:
        # A chat answer may span lines: it ends where the template closes the turn (or at EOS).
        stop_ids = sorted(set(stop_token_ids(tokenizer, None)) | set(end_of_turn_ids(tokenizer)))
    else:
        stop_ids = stop_token_ids(tokenizer, options.stop)
    encoded = []
    for name, pool in zip(task_names, prompts):
        pool = [prompt for prompt in pool if prompt]
        if options.chat_template:
            pool = chat_prompts(tokenizer, pool)
        ids = _encode(tokenizer, pool, options.add_special_tokens and not options.chat_template)
        if not ids:
            raise ValueError(f"adarank: no non-empty prompts for {name}")
        encoded.append(ids)

    if options.objective == "distill":
        # The teachers first, one expert at a time: the learner's state is built after.
        clock = time.perf_counter()
        from tqdm.auto import tqdm

        encoded = [
            teacher_cache(path, pool, stop_ids=stop_ids, options=options, pad_id=pad_id, device=device)
            for path, pool in tqdm(list(zip(model_paths, encoded)), desc="adarank: teacher answers", disable=not progress, leave=False)
        ]
        seconds["teacher"] = time.perf_counter() - clock
    held = [held_out_count(len(pool), options) for pool in encoded]
    held_out_pools = [pool[:k] if k else pool[: options.batch_size] for pool, k in zip(encoded, held)]
    train_pools = [pool[k:] for pool, k in zip(encoded, held)]

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
        objective=make_objective(options, pad_id, device, stop_ids),
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


def run(setup: Setup, *, progress: bool = False, started: Optional[float] = None, on_step=None) -> LearnResult:
    """Train from the setup's current state and collect the result (masks, coefficients, info)."""
    started = time.perf_counter() if started is None else started
    options, model, objective = setup.options, setup.model, setup.objective
    task_names, count = setup.task_names, len(setup.model_paths)
    pad_id = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0
    entropy = EntropyObjective(pad_id, setup.device)
    prompt_pools = [[item.sequence.ids[: item.sequence.start] for item in pool] if options.objective == "distill" else pool for pool in setup.held_out_pools]

    def measures() -> Tuple[Tuple[float, List[float]], Tuple[float, List[float]]]:
        with torch.no_grad():
            primary = setup.measure()
            total, per_task = entropy(model, prompt_pools)
        return primary, (float(total), [float(value) for value in per_task])

    before, entropy_before = measures()
    clock = time.perf_counter()
    history = _train(model, objective, setup.train_pools, options, progress=progress, on_step=on_step)
    seconds = {**setup.seconds, "train": time.perf_counter() - clock}
    after, entropy_after = measures()

    masks, kept = _hard_masks(model.entries, options, task_names)
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
        # The next-token entropy after each held-out prompt, for every objective (older files
        # have only this measure).
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


def _kept(counts: Dict) -> str:
    return f"{counts['before']} -> {counts['after']} of {counts['band']}"


def describe(info: Dict) -> List[str]:
    """Human-readable lines for a learned file's metadata (also files from earlier releases)."""
    kept = info["kept_components"]
    training = info["training"]
    objective = training.get("objective", "entropy")
    mode = "coefficients only (masks frozen)" if training.get("coefficients_only") else "masks and coefficients"
    lines = [
        f"variant {info['variant']}  prior {info['prior']}  init_rank_ratio {info['init_rank_ratio']}  "
        f"max_rank_ratio {info['max_rank_ratio']}"
        + (f"  common_space_fraction {info['common_space_fraction']}" if "common_space_fraction" in info else ""),
        f"training: objective {objective}, {mode}, {training['steps']} steps, lr {training['lr']} "
        f"({training.get('lr_schedule', 'constant')}), "
        f"batch {training['batch_size']} per task, seed {training['seed']}",
        f"kept singular components: {_kept(kept)} candidates",
    ]
    for label, key in (("task", "by_task"), ("layer type", "by_type")):
        for name, counts in (kept.get(key) or {}).items():
            lines.append(f"  {label} {name:<24} {_kept(counts)}")
    coefficients = info["coefficients"]
    lines.append("coefficients: mean {mean:.4g}, min {min:.4g}, max {max:.4g}".format(**coefficients))
    for name, row in (coefficients.get("by_task") or {}).items():
        lines.append(f"  task {name:<29} mean {row['mean']:.4g}, range {row['min']:.4g} .. {row['max']:.4g}")
    held = info.get("held_out_objective")
    if held is not None:
        before, after = held["before"], held["after"]
        count = training.get("held_out_per_task", ["?"])[0]
        lines.append(f"{held['name']} on held-out prompts ({count} per task; {held['measure']}): total {before['total']:.4f} -> {after['total']:.4f}")
    else:
        before, after = info["entropy_before"], info["entropy_after"]
        lines.append(f"answer entropy (nats, fixed prompts): total {before['total']:.4f} -> {after['total']:.4f}")
    for name in info["task_names"]:
        lines.append(f"  {name:<16} {before[name]:.4f} -> {after[name]:.4f}")
    held_bytes = info.get("learner_bytes")
    if held_bytes:
        parts = ", ".join(f"{key} {value / 2**20:.1f}" for key, value in held_bytes.items() if key != "model_float32")
        lines.append(f"learner state (MiB): {parts}; the model itself in float32 is {held_bytes['model_float32'] / 2**20:.1f}")
    seconds = info.get("seconds")
    if seconds:
        lines.append("time: " + ", ".join(f"{key} {value:.1f} s" for key, value in seconds.items()))
    return lines
