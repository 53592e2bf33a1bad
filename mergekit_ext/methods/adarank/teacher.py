"""The distillation teachers: each expert's greedy answers to its own task's prompts and its
top-k log-probabilities at every answer position, computed once before learning, one expert
at a time, so no expert is in memory while the learner runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import torch

from mergekit_ext.methods.adarank.decoding import Answered, answer_logits, cache_keyword, greedy_answers
from mergekit_ext.methods.adarank.options import LearnOptions


@dataclass
class TeacherItem:
    """One prompt of the distillation cache: the expert's greedy answer and, at each answer
    position, the expert's top-k log-probabilities [length, k] and their token ids."""

    sequence: Answered
    log_probs: torch.Tensor
    indices: torch.Tensor


def teacher_cache(expert_path, prompts: Sequence[Sequence[int]], *, stop_ids, options: LearnOptions, pad_id: int, device, batch_size: int = 64) -> List[TeacherItem]:
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


def teacher_pools(expert_paths: Sequence[Path], pools: Sequence[Sequence[Sequence[int]]], *, stop_ids, options: LearnOptions, pad_id: int, device, progress: bool) -> List[List[TeacherItem]]:
    """One teacher cache per task: expert ``t`` answers pool ``t`` (prompt token ids)."""
    from tqdm.auto import tqdm

    return [
        teacher_cache(path, pool, stop_ids=stop_ids, options=options, pad_id=pad_id, device=device)
        for path, pool in tqdm(list(zip(expert_paths, pools)), desc="adarank: teacher answers", disable=not progress, leave=False)
    ]
