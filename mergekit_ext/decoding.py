"""Greedy decoding with a KV cache: the one loop the zoos' scorers and the AdaRank learner share."""

from __future__ import annotations

import inspect
from typing import Callable, List, Sequence

import torch


def greedy_tokens(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], *, stop_ids: Sequence[int], max_new_tokens: int) -> List[List[int]]:
    """Greedy decoding from the prompt's ``logits`` ([rows, positions, vocab]): ``step(tokens)``
    feeds one new token per row (through the caller's KV cache) and returns its logits.
    Stops when every row has produced one of ``stop_ids`` or after ``max_new_tokens``; rows
    keep whatever follows their stop (the caller cuts there)."""
    stops = torch.tensor(list(stop_ids) or [-1], device=logits.device)
    generated = []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for index in range(max_new_tokens):
        token = logits[:, -1, :].argmax(dim=-1)
        generated.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or index == max_new_tokens - 1:
            break
        logits = step(token)
    return torch.stack(generated, dim=1).tolist()


def cache_argument(model) -> str:
    """The name of forward's KV-cache argument: transformers renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
