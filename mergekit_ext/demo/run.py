"""The main job: build the demo zoo, merge it with every method, evaluate with lm-eval.

``DEMO_MERGES`` is the one list of merges the demo runs; a new method adds one
entry. Each entry is (label, mergekit merge_method, parameters); the parameters
go in the YAML's top-level ``parameters:`` block, which mergekit also reads as
the per-model default, so per-model values such as ``weight`` or ``density``
can be written there once for every expert. Methods that are not registered
with mergekit are skipped with a note.

How the parameters were chosen: on the demo zoo (preset ``demo``, seed 0),
each method's ``lambda`` (and TIES density / consensus ``k``) is the best of the
small grid in ``DEMO_GRIDS`` by mean validation accuracy, scored with the zoo's
in-process scorer; ``mergekit-ext demo --tune`` re-runs that search and prints
the winners.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

DemoMerge = Tuple[str, str, Dict[str, object]]
RECIPE_ZOO_ROOT = "./zoo"

DEMO_MERGES: List[DemoMerge] = [
    ("task_arithmetic", "task_arithmetic", {"weight": 1.0, "lambda": 0.4}),
    ("ties", "ties", {"weight": 1.0, "density": 0.5, "lambda": 0.8}),
    # k = 1 (drop only weights no task claims) beat the paper's k = 2 on this 4-task zoo
    ("consensus_ta", "consensus_ta", {"weight": 1.0, "k": 1, "tall_lambda": 0.4, "lambda": 0.6}),
    ("consensus_ties", "consensus_ties", {"weight": 1.0, "density": 0.2, "k": 1, "tall_lambda": 0.4, "lambda": 0.8}),
    ("opcm", "opcm", {"alpha": 0.5, "zero_diagonal": True, "scaling": "tensor"}),
    # RMM's dense form: task arithmetic on the rank-K fit of the task vectors (the
    # per-task reversible use is `mergekit-ext rmm build/revert` on the zoo's adapters)
    ("rmm", "rmm", {"k": 2, "weight": 0.6}),
    # CART needs no base: θavg of the experts plus λ·Σ rank-k centred vectors (its defaults)
    ("cart", "cart", {"weight": 1.0, "rank_ratio": 0.15, "lambda": 1.3}),
    # demo zoo validation (grid λ 0.5/0.75/1.0/1.5; task_arithmetic λ 0.4: 0.835): tsv_m 0.870 at 1.0,
    # iso_c 0.868 and iso_cts 0.857 at 1.5 (the grid's edge)
    ("tsv_m", "tsv_m", {"weight": 1.0, "lambda": 1.0}),
    ("iso_c", "iso_c", {"weight": 1.0, "lambda": 1.5}),
    ("iso_cts", "iso_cts", {"weight": 1.0, "lambda": 1.5, "common_space_fraction": 0.8}),
    # AdaRank learns its masks and coefficients first (``learn_adarank``), on the zoo's
    # unlabeled validation prompts; these are LearnOptions, a short schedule of the
    # defaults (distill on CART), 4 answer tokens for the multiple-choice zoo.
    ("adarank", "adarank", {"variant": "cart", "objective": "distill", "lr": 3e-3, "steps": 100, "batch_size": 8, "max_new_tokens": 4}),
]

# Small per-method grids for `demo --tune`; parameters not listed keep DEMO_MERGES' value.
DEMO_GRIDS: Dict[str, Dict[str, Sequence[object]]] = {
    "task_arithmetic": {"lambda": (0.2, 0.4, 0.6, 0.8, 1.0)},
    "ties": {"density": (0.2, 0.5), "lambda": (0.4, 0.6, 0.8, 1.0)},
    "consensus_ta": {"k": (1, 2), "lambda": (0.4, 0.6, 0.8, 1.0)},
    "consensus_ties": {"k": (1, 2), "density": (0.2, 0.5), "lambda": (0.6, 0.8, 1.0)},
    "rmm": {"k": (1, 2, 3), "weight": (0.4, 0.6, 0.8, 1.0)},
    "tsv_m": {"lambda": (0.5, 0.75, 1.0, 1.5)},
    "iso_c": {"lambda": (0.75, 1.0, 1.5, 2.0)},
    "iso_cts": {"lambda": (0.75, 1.0, 1.5, 2.0)},
}


def is_registered(method: str) -> bool:
    from mergekit.merge_methods import registry

    import mergekit_ext  # noqa: F401  (registers this package's methods)

    try:
        registry.get(method)
    except Exception:
        return False
    return True


def merge_config(zoo, method: str, parameters: Mapping[str, object], *, dtype: str = "float32") -> Dict:
    """A mergekit config merging every full expert of ``zoo`` onto its base (absolute paths)."""
    return recipe_config(method, parameters, zoo.tasks, root=str(zoo.root), dtype=dtype)


def recipe_config(method: str, parameters: Mapping[str, object], tasks: Sequence[str], *, root: str = RECIPE_ZOO_ROOT, dtype: str = "float32") -> Dict:
    """The same config with the zoo at ``root`` (the recipes use ``./zoo``, run from the repository root)."""
    return {
        "merge_method": method,
        "base_model": f"{root}/base",
        "models": [{"model": f"{root}/experts/{task}"} for task in tasks],
        "parameters": dict(parameters),
        "dtype": dtype,
    }


def learn_adarank(zoo, options: Mapping[str, object], file: Path, *, progress: bool = True) -> Dict[str, object]:
    """Learn an AdaRank file for every expert of ``zoo`` (validation prompts, no labels); the YAML parameters."""
    from mergekit_ext import io
    from mergekit_ext.methods.adarank import learn
    from mergekit_ext.methods.adarank.format import is_learned_file, write_learned_file

    experts = [zoo.expert(task) for task in zoo.tasks]
    pools = [learn.zoo_prompts(zoo, task) for task in zoo.tasks]
    result = learn.learn(experts, pools, base=zoo.base, options=learn.LearnOptions(**options), task_names=zoo.tasks, progress=progress)
    file.parent.mkdir(parents=True, exist_ok=True)
    io.check_replaceable(file, overwrite=True, ours=is_learned_file)
    write_learned_file(file, result.masks, result.coefficients, result.info, result.fingerprints)
    return {"file": str(file)}


def run_demo(
    zoo_dir: str | Path = "zoo",
    out_dir: str | Path = "demo-out",
    *,
    merges: Optional[Sequence[DemoMerge]] = None,
    preset: str = "demo",
    progress: bool = True,
    echo=print,
) -> Dict:
    """Build (or reuse) the zoo, merge with every registered demo method, evaluate, report."""
    from mergekit_ext.engine import run_merge_atomic
    from mergekit_ext.evaluate import compare_on_zoo, format_table, write_report
    from mergekit_ext.zoo import build_zoo

    started = time.perf_counter()
    zoo = build_zoo(zoo_dir, preset=preset, progress=progress)
    zoo_seconds = time.perf_counter() - started
    out_dir = Path(out_dir).absolute()
    merged: Dict[str, Path] = {}
    skipped: List[str] = []
    for label, method, parameters in merges if merges is not None else DEMO_MERGES:
        if not is_registered(method):
            skipped.append(label)
            echo(f"note: skipping {label}: merge method {method!r} is not registered with mergekit")
            continue
        if method == "adarank":
            parameters = learn_adarank(zoo, parameters, out_dir / "adarank.safetensors", progress=progress)
        merged[label] = run_merge_atomic(merge_config(zoo, method, parameters), out_dir / "merges" / label, overwrite=True)
    # One torch thread: the zoo's models are tiny, and extra threads only spin.
    report = compare_on_zoo(zoo.root, merged, threads=1 if preset in ("test", "demo") else None, progress=progress)
    report["demo"] = {
        "merges": [{"label": l, "merge_method": m, "parameters": p} for l, m, p in (merges if merges is not None else DEMO_MERGES)],
        "skipped": skipped,
        "zoo_seconds": round(zoo_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    paths = write_report(report, out_dir)
    echo(format_table(report))
    echo("wrote " + ", ".join(str(p) for p in paths.values()))
    echo(f"demo finished in {report['demo']['total_seconds']:.0f} s (zoo {zoo_seconds:.0f} s)")
    return report


def tune(zoo_dir: str | Path, *, merges: Optional[Sequence[DemoMerge]] = None, grids: Optional[Mapping[str, Mapping[str, Sequence[object]]]] = None, progress: bool = True) -> Dict[str, Dict]:
    """Best parameters per demo merge by mean validation accuracy (in memory, mergekit's engine)."""
    import torch
    from tqdm.auto import tqdm

    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import (
        load_causal_lm,
        load_zoo,
        merge_in_memory,
        multiple_choice_accuracy,
    )

    zoo = load_zoo(zoo_dir)
    grids = grids if grids is not None else DEMO_GRIDS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    base_state = load_state_dict(zoo.base)
    expert_states = {task: load_state_dict(zoo.expert(task)) for task in zoo.tasks}
    documents = {task: zoo.documents(task, "validation") for task in zoo.tasks}
    probe = load_causal_lm(zoo.base, "cpu")
    winners: Dict[str, Dict] = {}
    for label, method, parameters in merges if merges is not None else DEMO_MERGES:
        if not is_registered(method) or method == "adarank":  # adarank learns its settings
            continue
        grid = grids.get(label, {})
        names = list(grid)
        best_score, best_parameters = -1.0, dict(parameters)
        for values in tqdm(list(itertools.product(*(grid[n] for n in names))), desc=f"tune {label}", disable=not progress):
            candidate = {**parameters, **dict(zip(names, values))}
            with torch.no_grad():
                probe.load_state_dict(merge_in_memory(base_state, expert_states, method, candidate), strict=True)
            score = sum(multiple_choice_accuracy(probe, tokenizer, documents[t]) for t in zoo.tasks) / len(zoo.tasks)
            if score > best_score:
                best_score, best_parameters = score, candidate
        winners[label] = {"parameters": best_parameters, "validation_accuracy": best_score}
    return winners
