"""Greedy answers of a causal LM to tokenised prompts, and its logits at the answer positions.

The decoding loop is the package's one (``mergekit_ext.decoding.greedy_tokens``, which the
zoos' scorers use too); this module keeps the token ids and the positions the objectives read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext.decoding import cache_argument, greedy_tokens
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
    with torch.no_grad():
        for length in sorted(groups):
            members = groups[length]
            for first in range(0, len(members), batch_size):
                chunk = members[first : first + batch_size]
                ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
                cache = DynamicCache()
                rows = greedy_tokens(
                    forward(ids, cache).logits, lambda token: forward(token[:, None], cache).logits,  # the cache is updated in place
                    stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                )
                for row, index in zip(rows, chunk):
                    cut = next((j + 1 for j, token in enumerate(row) if token in stop_ids), len(row))
                    answer = row[:cut]
                    prompt = list(prompts[index])
                    results[index] = Answered(prompt + answer[:-1], len(prompt), len(answer), answer)
    return results  # type: ignore[return-value]


def cache_keyword(model) -> str:
    """The keyword a causal LM's forward takes its KV cache by (``cache`` since transformers 5.x)."""
    return cache_argument(model)


def _answer_positions(sequences: Sequence[Answered], device) -> Tuple[torch.Tensor, torch.Tensor]:
    rows = torch.cat([torch.full((item.length,), row, dtype=torch.long) for row, item in enumerate(sequences)])
    columns = torch.cat([torch.arange(item.start - 1, item.start - 1 + item.length) for item in sequences])
    return rows.to(device), columns.to(device)


def answer_logits(logits_fn, sequences: Sequence[Answered], pad_id: int, device) -> torch.Tensor:
    """float32 logits [Σ lengths, vocab] at every answer position of ``sequences`` (in order)."""
    ids, attention = pad_right([item.ids for item in sequences], pad_id, device)
    rows, columns = _answer_positions(sequences, device)
    return logits_fn(ids, attention)[rows, columns].float()

