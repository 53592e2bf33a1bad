"""The learner's label-free objectives, all measured where a causal LM answers.

Each objective is one ``Objective``: it says what one training item is (a prompt's token ids,
or a teacher's cached answer), builds its items once from the tasks' prompts, and scores a
batch (one list of items per task) as the sum over tasks of a per-task mean. ``OBJECTIVE_TYPES``
maps the ``--objective`` names to them; the learner picks one with ``make_objective`` and never
looks at the name again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from mergekit_ext.methods.adarank.decoding import answer_logits
from mergekit_ext.methods.adarank.options import LearnOptions
from mergekit_ext.methods.adarank.teacher import TeacherItem, teacher_pools
from mergekit_ext.modeling import pad_right


def answer_entropy(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution after each (right-padded) prompt: [batch]."""
    last = logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1].float()
    return _entropy(last)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


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


def _per_task(values: torch.Tensor, sizes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    per_task = torch.stack([chunk.mean() for chunk in values.split(list(sizes))])
    return per_task.sum(), per_task


class Objective(ABC):
    """A label-free objective over per-task batches of items.

    ``model`` in ``__call__`` is a ``merged.MergedModel`` or any object with its
    ``logits(ids, attention)`` (and ``greedy`` for objectives that decode).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    # The step that builds the items before learning, timed under this name in the learned
    # file's ``seconds``; None: the items are the prompts' token ids as they are.
    preparation: ClassVar[Optional[str]] = None

    def __init__(self, pad_id: int, device, stop_ids: Sequence[int] = (), max_new_tokens: int = 1):
        self.pad_id, self.device = pad_id, device
        self.stop_ids, self.max_new_tokens = list(stop_ids), max_new_tokens

    def items(self, pools: Sequence[List[List[int]]], *, experts: Sequence[Path], options: LearnOptions, progress: bool) -> List[list]:
        """This objective's items, one pool per task, from each task's prompt token ids."""
        return list(pools)

    def prompt(self, item) -> List[int]:
        """The prompt token ids of one of this objective's items."""
        return item

    def adopt(self, pools: Sequence[list], source: "Objective") -> List[list]:
        """This objective's items from the items ``source`` prepared (switching the objective of
        a prepared learner without tokenising or asking the experts again)."""
        return [[source.prompt(item) for item in pool] for pool in pools]

    @abstractmethod
    def __call__(self, model, batches: Sequence[Sequence]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-task means [tasks]): the loss is the sum of the per-task means."""


class EntropyObjective(Objective):
    """Per task, the mean entropy of the next-token distribution right after each prompt (where a
    causal LM starts its answer); the loss is the sum over tasks. Items: prompt token ids."""

    name = "entropy"
    description = "sum over tasks of the mean entropy (nats) of the next-token distribution after each prompt"

    def __call__(self, model, batches: Sequence[Sequence[Sequence[int]]]) -> Tuple[torch.Tensor, torch.Tensor]:
        sequences = [sequence for batch in batches for sequence in batch]
        ids, attention = pad_right(sequences, self.pad_id, self.device)
        entropy = answer_entropy(model.logits(ids, attention), attention.sum(dim=1))
        return _per_task(entropy, [len(batch) for batch in batches])


class AnswerEntropyObjective(Objective):
    """Per task, the mean entropy over every position of the merged model's own greedy answer
    (regenerated with the current hard masks at each step, no gradient through the choice of
    tokens); summed over tasks. Items: prompt token ids."""

    name = "entropy-answer"
    description = "sum over tasks of the mean entropy (nats per answer token) at the merged model's own greedy answer positions"

    def __call__(self, model, batches) -> Tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompt for batch in batches for prompt in batch]
        answered = model.greedy(prompts, self.stop_ids, self.max_new_tokens, self.device)
        entropy = _entropy(answer_logits(model.logits, answered, self.pad_id, self.device))
        sizes, position = [], 0
        for batch in batches:
            sizes.append(sum(item.length for item in answered[position : position + len(batch)]))
            position += len(batch)
        return _per_task(entropy, sizes)


class DistillObjective(Objective):
    """Per task, the mean KL(expert ‖ merged) over the answer positions of the expert's own greedy
    answers to that task's prompts (from the teacher cache); summed over tasks. Items: TeacherItem."""

    name = "distill"
    description = "sum over tasks of the mean KL(expert ‖ merged) (nats per answer token) at the expert's greedy answer positions"
    preparation = "teacher"

    def items(self, pools, *, experts, options, progress) -> List[List[TeacherItem]]:
        # The teachers first, one expert at a time: the learner's state is built after.
        return teacher_pools(experts, pools, stop_ids=self.stop_ids, options=options, pad_id=self.pad_id, device=self.device, progress=progress)

    def prompt(self, item: TeacherItem) -> List[int]:
        return item.sequence.ids[: item.sequence.start]

    def adopt(self, pools, source: Objective) -> List[list]:
        if isinstance(source, DistillObjective):
            return list(pools)
        raise ValueError(f"adarank: objective {self.name} needs the experts' answers: prepare the learner with objective {self.name}, not {source.name}")

    def __call__(self, model, batches: Sequence[Sequence[TeacherItem]]) -> Tuple[torch.Tensor, torch.Tensor]:
        items = [item for batch in batches for item in batch]
        logits = answer_logits(model.logits, [item.sequence for item in items], self.pad_id, self.device)
        kl = distillation_kl(
            logits,
            torch.cat([item.log_probs for item in items]).to(self.device),
            torch.cat([item.indices for item in items]).to(self.device),
        )
        return _per_task(kl, [sum(item.sequence.length for item in batch) for batch in batches])


OBJECTIVE_TYPES: Dict[str, Type[Objective]] = {kind.name: kind for kind in (EntropyObjective, AnswerEntropyObjective, DistillObjective)}


def make_objective(options: LearnOptions, pad_id: int, device, stop_ids: Sequence[int]) -> Objective:
    """The objective ``options.objective`` names, for a tokenizer's pad id and answer stops."""
    kind = OBJECTIVE_TYPES.get(options.objective)
    if kind is None:
        raise ValueError(f"adarank: unknown objective {options.objective!r}; expected one of {', '.join(OBJECTIVE_TYPES)}")
    return kind(pad_id, device, stop_ids, options.max_new_tokens)
