"""The one in-process scorer of a zoo split: lm-eval's metric exactly, without lm-eval.

``zoo.score`` is log-likelihood ``acc`` for a multiple-choice task and greedy
``exact_match`` for a generation task (tests/test_evaluate.py and tests/test_zoo.py
check both against lm-eval on the zoo's task YAMLs). ``Scorer`` keeps one model object
and swaps its weights, so a grid point costs one ``load_state_dict`` plus the scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

SCORER_NAMES = {
    "multiple_choice": "in-process (zoo.multiple_choice_accuracy, = lm-eval acc)",
    "generation": "in-process (zoo.exact_match: greedy generation until the stop, = lm-eval exact_match)",
}


class Scorer:
    """Per-task score and the mean over tasks of merged weights on one split of ``zoo``."""

    def __init__(self, zoo, split: str, device: str = "cpu"):
        from transformers import AutoTokenizer

        from mergekit_ext.zoo import load_causal_lm

        self.zoo, self.split, self.device = zoo, split, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
        self.documents = {task: zoo.documents(task, split) for task in zoo.tasks}
        self.model = load_causal_lm(zoo.base, device)

    @property
    def name(self) -> str:
        return SCORER_NAMES[self.zoo.task_kind]

    def __call__(self, state: Optional[Dict[str, Any]] = None, path: Optional[Path] = None) -> Dict[str, Any]:
        """{"accuracy": {task: score}, "mean_accuracy": mean over tasks} of a state dict or a model folder."""
        import torch

        from mergekit_ext.modeling import load_state_dict
        from mergekit_ext.zoo import score

        if state is None:
            state = load_state_dict(path)
        self.model.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state.items()}, strict=True)
        with torch.no_grad():
            values = {task: score(self.model, self.tokenizer, self.documents[task], kind=self.zoo.kind(task), device=self.device) for task in self.zoo.tasks}
        return {"accuracy": values, "mean_accuracy": sum(values.values()) / len(values)}
