"""How well a TALL bundle recovers its models: each recovered model against the model itself, with the zoo's scorer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence, Tuple

from mergekit_ext.methods.consensus.format import recover


def zoo_tasks_of(zoo, models: Sequence[str | os.PathLike], names: Sequence[str]) -> Dict[str, str]:
    """The zoo task of each model: the task whose expert folder it is, else the task it is named after."""
    by_folder = {zoo.expert(task).resolve(): task for task in zoo.tasks}
    tasks = {}
    for name, model in zip(names, models):
        task = by_folder.get(Path(model).resolve()) or (name if name in zoo.tasks else None)
        if task is None:
            raise ValueError(
                f"--zoo: model {model} (task name {name!r}) is neither an expert of zoo {zoo.root} nor named like one of its tasks {zoo.tasks}"
            )
        tasks[name] = task
    return tasks


def score_recovered(
    bundle: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    names: Sequence[str],
    zoo_dir: str | os.PathLike,
    *,
    split: str = "test",
) -> Tuple[Dict[str, Dict], str]:
    """Each model recovered from ``bundle`` against the model itself, on its zoo task.

    A model is matched to a zoo task by being that task's expert folder, or by
    its task name; both are scored with the zoo's in-process scorer (exact match
    or accuracy, equal to lm-eval's on the zoo's task YAMLs) on ``split``.
    Returns ({name: {"task", "recovered", "expert"}}, the metric's name).
    """
    import tempfile

    from transformers import AutoTokenizer

    from mergekit_ext.zoo import load_causal_lm, load_zoo, score

    if split not in ("test", "validation"):
        raise ValueError(f"--split must be test or validation, not {split!r}")
    zoo = load_zoo(zoo_dir)
    tasks = zoo_tasks_of(zoo, models, names)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    kind = zoo.task_kind
    results: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="tall-recovered-") as scratch:
        for name, model in zip(names, models):
            documents = zoo.documents(tasks[name], split)
            recovered = recover(bundle, name, Path(scratch) / name, progress=False)
            results[name] = {
                "task": tasks[name],
                "recovered": score(load_causal_lm(recovered, "cpu"), tokenizer, documents, kind=kind),
                "expert": score(load_causal_lm(model, "cpu"), tokenizer, documents, kind=kind),
            }
    return results, f"{zoo.metric.split(',')[0]}, {split} split"
