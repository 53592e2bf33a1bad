"""Greedy answers of a causal LM to tokenised prompts, and its logits at the answer positions.

``mergekit_ext.zoo.train.greedy_generate`` decodes the same way (prompts grouped by length,
no padding, a KV cache) from text to text for the zoo's scorer; this one works on token ids
and keeps the positions the objectives read. Unifying the two belongs to the shared
evaluation protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext.modeling import pad_right


@dataclass
class Answered:
    """A prompt and a greedy answer: ``ids`` = prompt + answer[:-1] (the model's input);
    answer token j is predicted at position ``start - 1 + j``, j < ``length``."""

    ids: List[int]
    start: int
    length: int
    answer: List[int]


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

