"""The learned masks: hard masks from the learner's logits, and how many components each keeps."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from mergekit_ext.methods.adarank import MASK_TEMPERATURE
from mergekit_ext.methods.adarank.factorise import Entry
from mergekit_ext.methods.adarank.kernel import mask_rows
from mergekit_ext.methods.adarank.options import LearnOptions


def layer_type(name: str) -> str:
    """A tensor's kind without its layer number: ``model.layers.3.mlp.up_proj.weight`` → ``mlp.up_proj``."""
    parts = [part for part in name.split(".") if not part.isdigit() and part not in ("model", "layers", "weight", "h", "transformer")]
    return ".".join(parts) or name


def mask_row_names(variant: str, task_names: Sequence[str]) -> List[str]:
    """Names of the mask / coefficient rows: the tasks, and ``common`` for iso_cts."""
    return list(task_names) + ["common"] * (mask_rows(variant, len(task_names)) - len(task_names))


def hard_masks(entries: List[Entry], options: LearnOptions, task_names: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], Dict]:
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

