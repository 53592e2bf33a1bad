"""The learner's loop: Adam on masks and coefficients, one batch of items per task per step."""

from __future__ import annotations

import math
import random
from typing import Callable, List, Optional, Sequence

import torch

from mergekit_ext.methods.adarank.objectives import Objective
from mergekit_ext.methods.adarank.options import LearnOptions


def train(model, objective: Objective, pools: Sequence[list], options: LearnOptions, *, progress: bool = False, on_step: Optional[Callable[[int], None]] = None) -> List[float]:
    """Adam on ``model.parameters()`` (a ``MergedModel``'s: masks and coefficients, or the
    coefficients only with ``coefficients_only``), one batch of items per task per step; the
    loss per step. ``on_step(step)`` is called after each update (1-based) when given, e.g. to
    score the model at chosen steps."""
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
