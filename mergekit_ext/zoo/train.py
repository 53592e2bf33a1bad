"""Training the zoo's models and scoring them in process.

``multiple_choice_accuracy`` gives the same numbers as lm-eval's ``acc`` on the
multiple-choice presets, ``exact_match`` the same as lm-eval's ``exact_match``
with ``generate_until`` on the generation presets (``hard``); ``score`` picks
the one for a task's kind.
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence

import torch

from mergekit_ext.decoding import cache_argument, greedy_tokens
from mergekit_ext.modeling import pad_right
from mergekit_ext.zoo.tasks import GENERATION, GENERATION_STOP, MAX_ANSWER, training_pair

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]):
    """Token ids of context+continuation and where the continuation starts (lm-eval's split).

    As lm-eval does, whitespace that ends a context (a chat prompt's newline after
    the assistant header) is moved to the front of the continuation.
    """
    moved = [len(c) - len(c.rstrip()) for c in contexts]
    continuations = [c[len(c) - n :] + d if n else d for c, d, n in zip(contexts, continuations, moved)]
    contexts = [c[: len(c) - n] if n else c for c, n in zip(contexts, moved)]
    context_ids = tokenizer(list(contexts), add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer([c + d for c, d in zip(contexts, continuations)], add_special_tokens=False)["input_ids"]
    return whole_ids, [len(ids) for ids in context_ids]


def _training_batch(tokenizer, tasks: Sequence, rng: random.Random, size: int, held_out: set, device, weights=None, pair=training_pair):
    contexts, continuations = [], []
    while len(contexts) < size:
        task = rng.choices(tasks, weights=weights)[0] if weights else tasks[rng.randrange(len(tasks))]
        context, continuation = pair(task, rng)
        if context in held_out:
            continue
        contexts.append(context)
        continuations.append(continuation)
    sequences, starts = _encode_pairs(tokenizer, contexts, continuations)
    ids, mask = pad_right(sequences, tokenizer.pad_token_id, device)
    labels = torch.full_like(ids, -100)
    for row, (sequence, start) in enumerate(zip(sequences, starts)):
        # Loss on the answer only: the inputs are random strings, not worth modelling.
        labels[row, start : len(sequence)] = ids[row, start : len(sequence)]
    return ids, mask, labels


def train(model, tokenizer, tasks, *, steps, lr, batch_size, seed, held_out, device, description, progress, warmup=True, weights=None, check=None, check_every=20, pair=training_pair):
    """AdamW with warmup and cosine decay on answer-token loss.

    ``pair(task, rng)`` draws one (context, continuation) training sequence.
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
        ids, mask, labels = _training_batch(tokenizer, tasks, rng, batch_size, held_out, device, weights, pair)
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


def multiple_choice_accuracy(model, tokenizer, documents: Sequence[Dict], *, batch_size: int = 256, device="cpu", delimiter: str = " ") -> float:
    """lm-eval's ``acc`` for the zoo's multiple-choice documents, computed in process."""
    correct = multiple_choice_correct(model, tokenizer, documents, batch_size=batch_size, device=device, delimiter=delimiter)
    return sum(correct) / max(1, len(documents))


@torch.no_grad()
def multiple_choice_correct(model, tokenizer, documents: Sequence[Dict], *, batch_size: int = 256, device="cpu", delimiter: str = " ") -> List[int]:
    """1 or 0 per document: lm-eval's ``acc`` item by item.

    Same requests as lm-eval: context = query, continuation = ``delimiter`` + choice
    (the task's ``target_delimiter``), score = sum of the continuation's token
    log-probs, prediction = argmax.
    """
    contexts, continuations, owners = [], [], []
    for index, document in enumerate(documents):
        for choice in document["choices"]:
            contexts.append(document["query"])
            continuations.append(delimiter + choice)
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
    correct: List[int] = []
    offset = 0
    for document in documents:
        count = len(document["choices"])
        prediction = int(torch.argmax(scores[offset : offset + count]))
        correct.append(int(prediction == document["label"]))
        offset += count
    return correct


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = MAX_ANSWER + 1,
    stop: str = GENERATION_STOP,
    batch_size: int = 512,
    device="cpu",
    decode: bool = False,
) -> List[str]:
    """Greedy continuation of each prompt, cut before the first ``stop`` (lm-eval's ``generate_until``).

    Prompts are tokenized without special tokens (as lm-eval does for these
    models) and grouped by token length, so no padding is ever needed and every
    result equals unbatched greedy decoding; a KV cache makes each new token one
    cheap forward step. A continuation without ``stop`` within ``max_new_tokens``
    is returned whole: it cannot match an answer of at most ``max_new_tokens - 1``
    characters, as in lm-eval with its larger budget. ``decode``: the text is the
    tokenizer's decoding (a BPE tokenizer) rather than the tokens joined (the
    zoo's character tokenizer).
    """
    from transformers import DynamicCache

    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    outputs: List[str] = [""] * len(encoded)
    groups: Dict[int, List[int]] = {}
    for index, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(index)
    model.eval()
    cache_name = cache_argument(model)
    for length in sorted(groups):
        members = groups[length]
        for first in range(0, len(members), batch_size):
            chunk = members[first : first + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            cache = DynamicCache()
            out = model(input_ids=ids, use_cache=True, **{cache_name: cache})
            tokens = greedy_tokens(
                out.logits, lambda token: model(input_ids=token[:, None], use_cache=True, **{cache_name: cache}).logits,
                stop_ids=[stop_id], max_new_tokens=max_new_tokens,
            )
            for row, index in enumerate(chunk):
                sequence = tokens[row]
                if stop_id in sequence:
                    sequence = sequence[: sequence.index(stop_id)]
                outputs[index] = tokenizer.decode(sequence) if decode else "".join(tokenizer.convert_ids_to_tokens(sequence))
    return outputs


def exact_match(model, tokenizer, documents: Sequence[Dict], *, device="cpu", batch_size: int = 512) -> float:
    """lm-eval's ``exact_match`` for the zoo's generation documents, computed in process.

    Greedy generation up to the stop string, compared with the answer
    character for character (case- and whitespace-exact, as the task YAMLs
    configure lm-eval: ``ignore_case: false``, ``ignore_punctuation: false``).
    """
    predictions = greedy_generate(model, tokenizer, [d["prompt"] for d in documents], device=device, batch_size=batch_size)
    return sum(p == d["answer"] for p, d in zip(predictions, documents)) / max(1, len(documents))


def score(model, tokenizer, documents: Sequence[Dict], *, kind: str, device="cpu") -> float:
    """The in-process score of a task of ``kind``: lm-eval's ``exact_match`` or ``acc``, exactly."""
    if kind == GENERATION:
        return exact_match(model, tokenizer, documents, device=device)
    return multiple_choice_accuracy(model, tokenizer, documents, device=device)


def load_causal_lm(path, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()


def merge_in_memory(
    base: Dict[str, torch.Tensor],
    experts: Dict[str, Dict[str, torch.Tensor]],
    method: str,
    parameters: Dict[str, object],
    *,
    use_base: bool = True,
) -> Dict[str, torch.Tensor]:
    """A merge of all experts onto the base by mergekit's own engine, in memory (for grids).

    ``use_base=False`` merges the experts alone (e.g. ``linear``, a plain average).
    """
    from mergekit.merge_methods import merge_state_dicts

    import mergekit_ext  # noqa: F401  (registers this package's methods too)

    experts_only = {f"expert_{name}": state for name, state in experts.items()}
    if not use_base:
        return merge_state_dicts(experts_only, method, parameters=dict(parameters), dtype=torch.float32)
    models = {"base": base, **experts_only}
    return merge_state_dicts(models, method, base="base", parameters=dict(parameters), dtype=torch.float32)
