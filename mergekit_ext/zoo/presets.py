"""Zoo presets: model size, training schedule and data sizes per named family."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

from mergekit_ext.zoo.tasks import GENERATION, GENERATION_TASKS, HARD_ALPHABET, MULTIPLE_CHOICE, TASKS, TASKS_BY_KIND


@dataclass(frozen=True)
class Preset:
    name: str
    tasks: Tuple[str, ...]
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    lora_steps: int
    lora_lr: float
    lora_rank: int
    batch_size: int
    validation_items: int
    test_items: int
    lambda_grid: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    # Pretraining stops feeding a task (down to ``mixture_floor`` of its share, so
    # it is not forgotten) once the base reaches ``base_target`` accuracy on it,
    # measured every ``probe_every`` steps on probe items drawn like training
    # data; it stops when every task is there or after ``pretrain_steps``. The
    # tasks learn at very different speeds, and this makes the base about
    # equally (half) competent on all of them: the regime where merges can win.
    base_target: Optional[float] = None
    mixture_floor: float = 0.1
    probe_every: int = 20
    probe_items: int = 48
    # ``multiple_choice`` (4-way, log-likelihood, lm-eval ``acc``) or ``generation``
    # (greedy generation up to a stop string, lm-eval ``exact_match``).
    kind: str = MULTIPLE_CHOICE
    # The character vocabulary; None is modeling.DEFAULT_ALPHABET.
    alphabet: Optional[str] = None

    @property
    def task_objects(self):
        """The preset's task generators, in order."""
        return [TASKS_BY_KIND[self.kind][name] for name in self.tasks]


# Fields added after zoos were first built: a manifest without one of them
# recorded the default (build.py compares presets with this in mind).
LATER_FIELDS = {"kind": MULTIPLE_CHOICE, "alphabet": None}


PRESETS: Dict[str, Preset] = {
    "test": Preset(
        name="test",
        tasks=("reverse", "dup", "next", "count"),
        hidden_size=32,
        layers=2,
        heads=2,
        intermediate_size=64,
        pretrain_steps=300,
        pretrain_lr=3e-3,
        finetune_steps=80,
        finetune_lr=2e-3,
        lora_steps=40,
        lora_lr=3e-3,
        lora_rank=2,
        batch_size=32,
        validation_items=40,
        test_items=60,
        lambda_grid=(0.5, 1.0),
        base_target=0.6,
    ),
    "demo": Preset(
        name="demo",
        tasks=("reverse", "dup", "next", "count"),
        hidden_size=64,
        layers=3,
        heads=4,
        intermediate_size=128,
        pretrain_steps=400,
        pretrain_lr=3e-3,
        finetune_steps=100,
        finetune_lr=7e-4,
        lora_steps=100,
        lora_lr=3e-3,
        lora_rank=4,
        batch_size=64,
        validation_items=100,
        test_items=200,
        base_target=0.5,
        probe_every=10,
    ),
    "bench": Preset(
        name="bench",
        tasks=tuple(TASKS),
        hidden_size=256,
        layers=6,
        heads=8,
        intermediate_size=704,
        pretrain_steps=3000,
        pretrain_lr=1e-3,
        finetune_steps=200,
        finetune_lr=2e-4,
        lora_steps=200,
        lora_lr=1e-3,
        lora_rank=8,
        batch_size=64,
        validation_items=200,
        test_items=500,
        lambda_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
        base_target=0.6,
        probe_every=50,
        probe_items=64,
    ),
    # The benchmark's main instrument (issue 11): generation tasks scored by exact
    # match, a base stopped as soon as every task reaches 0.15 greedy exact match
    # on probe items (so it half-knows every skill), then light fine-tunes. Every
    # value is the prototype's final design (REPORT.md of the hard-zoo prototype:
    # base 0.34-0.41, experts 0.86-0.91, task arithmetic 0.65-0.77 of the experts
    # over seeds 0-2). 877,696 parameters; 200 test + 100 validation items per
    # task (1,600 + 800 per zoo).
    "hard": Preset(
        name="hard",
        tasks=tuple(GENERATION_TASKS),
        hidden_size=128,
        layers=4,
        heads=4,
        intermediate_size=384,
        pretrain_steps=1500,  # an upper bound: the base_target rule stops it at 250-325 steps
        pretrain_lr=3e-3,
        finetune_steps=60,
        finetune_lr=3e-4,
        lora_steps=60,
        lora_lr=3e-3,
        lora_rank=4,
        batch_size=64,
        validation_items=100,
        test_items=200,
        lambda_grid=(0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
        base_target=0.15,
        mixture_floor=0.1,
        probe_every=25,
        probe_items=64,
        kind=GENERATION,
        alphabet=HARD_ALPHABET,
    ),
    # The hard preset's shape at test size, for the tests only: about 10 s of CPU (measured: base
    # 0.13, experts 0.27, TA 0.19 mean exact match on 40 items per task: weak, but not zero).
    "hard-test": Preset(
        name="hard-test",
        tasks=("count", "caps", "next", "dup"),
        hidden_size=64,
        layers=2,
        heads=4,
        intermediate_size=128,
        pretrain_steps=200,
        pretrain_lr=5e-3,
        finetune_steps=30,
        finetune_lr=2e-3,
        lora_steps=20,
        lora_lr=3e-3,
        lora_rank=2,
        batch_size=32,
        validation_items=20,
        test_items=40,
        lambda_grid=(0.5, 1.0),
        base_target=0.15,
        probe_every=20,
        probe_items=24,
        kind=GENERATION,
        alphabet=HARD_ALPHABET,
    ),
}

# The `hard` regime at the demo's budget (issue 11: zoo build, every merge and lm-eval in
# <= 10 minutes on 2 cores): the hard preset's model, tasks and training, with half its
# validation and test items (50 + 100 per task: 400 + 800) and LoRA adapters trained for
# half the steps (the demo merges the full fine-tunes only; the adapters stay for
# `lora merge` and the recipes). Measured numbers: benchmarks/results/demo.md.
PRESETS["demo-hard"] = replace(PRESETS["hard"], name="demo-hard", lora_steps=30, validation_items=50, test_items=100, lambda_grid=(0.3, 0.5, 0.7))
