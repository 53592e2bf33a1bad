"""The main job: build the demo zoo, merge it with every method, evaluate with lm-eval.

The demo runs on the ``demo-hard`` zoo (issue 11): the ``hard`` regime (eight
generation tasks scored by exact match, a base that half-knows every skill,
light fine-tunes) at a size whose build, merges and evaluation fit the demo's
budget, so that a newcomer's first table shows methods that differ. ``--preset
demo`` runs the older 4-task multiple-choice zoo (where every merge sits within
a few points) with ``MULTIPLE_CHOICE_MERGES``. The recipes in recipes/ are
``DEMO_MERGES``' configs on the zoo the demo leaves (``./demo-zoo``).

``DEMO_MERGES`` is the one list of merges the demo runs; a new method adds one
entry. Each entry is (label, mergekit merge_method, parameters); the parameters
go in the YAML's top-level ``parameters:`` block, which mergekit also reads as
the per-model default, so per-model values such as ``weight`` or ``density``
can be written there once for every expert. Methods that are not registered
with mergekit are skipped with a note.

How the parameters were chosen: each method's setting is the best of its grid
in ``DEMO_GRIDS`` (``MULTIPLE_CHOICE_GRIDS``) by mean validation score on the
zoo built with seed 0, scored with the zoo's own in-process scorer (``zoo.score``:
exact match for generation zoos, accuracy for multiple-choice ones);
``mergekit-ext demo --tune`` re-runs that search and prints the winners.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_ext.evaluate.protocol import grids as protocol_grids

DemoMerge = Tuple[str, str, Dict[str, object]]
RECIPE_ZOO_ROOT = "./demo-zoo"  # what `mergekit-ext demo` builds: the recipes merge it
DEMO_PRESET = "demo-hard"

# The demo-hard zoo (seed 0): each setting is its grid's best validation exact match
# (`demo --tune`, DEMO_GRIDS; 50 validation items per task). Validation means are noted.
DEMO_MERGES: List[DemoMerge] = [
    ("task_arithmetic", "task_arithmetic", {"weight": 1.0, "lambda": 0.5}),  # 0.712
    ("ties", "ties", {"weight": 1.0, "density": 0.5, "lambda": 0.8}),  # 0.652 (the grid's edge)
    ("consensus_ta", "consensus_ta", {"weight": 1.0, "k": 1, "tall_lambda": 0.4, "lambda": 0.6}),  # 0.730
    ("consensus_ties", "consensus_ties", {"weight": 1.0, "density": 0.2, "k": 1, "tall_lambda": 0.4, "lambda": 0.7}),  # 0.715
    ("opcm", "opcm", {"alpha": 0.4, "zero_diagonal": True, "scaling": "tensor"}),  # 0.675
    # RMM's dense form: task arithmetic on the rank-K fit of the task vectors (the
    # per-task reversible use is `mergekit-ext rmm build/revert` on the zoo's adapters)
    ("rmm", "rmm", {"k": 4, "weight": 0.6}),  # 0.698
    # CART needs no base: θavg of the experts plus λ·Σ rank-k centred vectors
    ("cart", "cart", {"weight": 1.0, "rank_ratio": 0.05, "lambda": 1.5}),  # 0.763
    ("tsv_m", "tsv_m", {"weight": 1.0, "lambda": 2.0}),  # 0.785
    ("iso_c", "iso_c", {"weight": 1.0, "lambda": 2.5}),  # 0.773
    ("iso_cts", "iso_cts", {"weight": 1.0, "lambda": 3.0, "common_space_fraction": 0.8}),  # 0.790
    # AdaRank learns its masks and coefficients first (``learn_adarank``), on the zoo's
    # unlabeled validation prompts; these are LearnOptions: the default objective (distill)
    # on CART at its setting above, a short schedule (100 of the default 600 steps).
    ("adarank", "adarank", {"variant": "cart", "prior": 1.5, "init_rank_ratio": 0.05, "objective": "distill", "steps": 100, "batch_size": 8}),
]

# Per-method grids for `demo --tune` (the protocol's one table, ``demo`` entries);
# parameters not listed keep DEMO_MERGES' value.
DEMO_GRIDS: Dict[str, Dict[str, Sequence[object]]] = protocol_grids.DEMO_GRIDS[protocol_grids.GENERATION]

# The multiple-choice `demo` zoo (4 tasks): `demo --preset demo` (and recipes/consensus_ta_lora.yml).
MULTIPLE_CHOICE_MERGES: List[DemoMerge] = [
    ("task_arithmetic", "task_arithmetic", {"weight": 1.0, "lambda": 0.4}),
    ("ties", "ties", {"weight": 1.0, "density": 0.5, "lambda": 0.8}),
    # k = 1 (drop only weights no task claims) beat the paper's k = 2 on this 4-task zoo
    ("consensus_ta", "consensus_ta", {"weight": 1.0, "k": 1, "tall_lambda": 0.4, "lambda": 0.6}),
    ("consensus_ties", "consensus_ties", {"weight": 1.0, "density": 0.2, "k": 1, "tall_lambda": 0.4, "lambda": 0.8}),
    ("opcm", "opcm", {"alpha": 0.5, "zero_diagonal": True, "scaling": "tensor"}),
    ("rmm", "rmm", {"k": 2, "weight": 0.6}),
    ("cart", "cart", {"weight": 1.0, "rank_ratio": 0.15, "lambda": 1.3}),
    # demo zoo validation (grid λ 0.5/0.75/1.0/1.5; task_arithmetic λ 0.4: 0.835): tsv_m 0.870 at 1.0,
    # iso_c 0.868 and iso_cts 0.857 at 1.5 (the grid's edge)
    ("tsv_m", "tsv_m", {"weight": 1.0, "lambda": 1.0}),
    ("iso_c", "iso_c", {"weight": 1.0, "lambda": 1.5}),
    ("iso_cts", "iso_cts", {"weight": 1.0, "lambda": 1.5, "common_space_fraction": 0.8}),
    # on CART at its setting above (AdaRank's cart defaults are now the hard zoo's 2.0 / 0.1);
    # 4 answer tokens: a multiple-choice answer is a few characters
    ("adarank", "adarank", {"variant": "cart", "prior": 1.3, "init_rank_ratio": 0.15, "objective": "distill", "steps": 100, "batch_size": 8, "max_new_tokens": 4}),
]

MULTIPLE_CHOICE_GRIDS: Dict[str, Dict[str, Sequence[object]]] = protocol_grids.DEMO_GRIDS[protocol_grids.MULTIPLE_CHOICE]


def merges_for(kind: str) -> List[DemoMerge]:
    """The demo's merges for a zoo whose tasks are of ``kind`` (generation or multiple_choice)."""
    from mergekit_ext.zoo.tasks import GENERATION

    return DEMO_MERGES if kind == GENERATION else MULTIPLE_CHOICE_MERGES


def grids_for(kind: str) -> Dict[str, Dict[str, Sequence[object]]]:
    from mergekit_ext.zoo.tasks import GENERATION

    return DEMO_GRIDS if kind == GENERATION else MULTIPLE_CHOICE_GRIDS


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
    """The same config with the zoo at ``root`` (the recipes use ``./demo-zoo``, run from the repository root)."""
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
    zoo_dir: str | Path = "demo-zoo",
    out_dir: str | Path = "demo-out",
    *,
    merges: Optional[Sequence[DemoMerge]] = None,
    preset: str = DEMO_PRESET,
    progress: bool = True,
    overwrite: bool = False,
    echo=print,
) -> Dict:
    """Build (or reuse) the zoo, merge with every registered demo method, evaluate, report.

    ``merges`` defaults to the list for the zoo's task kind (``merges_for``).
    ``out_dir`` must be new, or an earlier demo's output and ``overwrite`` given.
    """
    from mergekit_ext import io
    from mergekit_ext.engine import run_merge_atomic
    from mergekit_ext.evaluate import compare_on_zoo, write_report
    from mergekit_ext.evaluate.report import format_summary
    from mergekit_ext.zoo import build_zoo

    io.check_output_not_input(out_dir, [zoo_dir])
    if Path(out_dir).exists():
        io.check_replaceable(out_dir, overwrite=overwrite)  # before the zoo is built, not after
    started = time.perf_counter()
    cpu_started = time.process_time()
    zoo = build_zoo(zoo_dir, preset=preset, progress=progress)
    zoo_seconds = time.perf_counter() - started
    merges = list(merges if merges is not None else merges_for(zoo.task_kind))
    out_dir = io.claim_output_dir(out_dir, kind="demo", overwrite=overwrite, inputs=[zoo.root])
    merged: Dict[str, Path] = {}
    skipped: List[str] = []
    phase_seconds: Dict[str, float] = {}
    from tqdm.auto import tqdm

    runnable = []
    for label, method, parameters in merges:
        if not is_registered(method):
            skipped.append(label)
            echo(f"note: skipping {label}: merge method {method!r} is not registered with mergekit")
            continue
        if method == "adarank":  # its own stage (with its own bars) before the merges
            learn_started = time.perf_counter()
            parameters = learn_adarank(zoo, parameters, out_dir / "adarank.safetensors", progress=progress)
            phase_seconds["adarank_learn"] = round(time.perf_counter() - learn_started, 1)
        runnable.append((label, method, parameters))
    merge_started = time.perf_counter()
    # One bar for the merge phase (each merge is one mergekit run of a few seconds).
    for label, method, parameters in tqdm(runnable, desc="merge", unit="merge", disable=not progress):
        merged[label] = run_merge_atomic(merge_config(zoo, method, parameters), out_dir / "merges" / label, overwrite=True)
    phase_seconds["merge"] = round(time.perf_counter() - merge_started, 1)
    eval_started = time.perf_counter()
    # One torch thread: the zoo's models are tiny, and extra threads only spin.
    small = preset in ("test", "demo", "hard-test", "demo-hard", "hard")
    report = compare_on_zoo(zoo.root, merged, threads=1 if small else None, progress=progress)
    phase_seconds["evaluate"] = round(time.perf_counter() - eval_started, 1)
    report["demo"] = {
        "preset": preset,
        "merges": [{"label": l, "merge_method": m, "parameters": p} for l, m, p in merges],
        "skipped": skipped,
        "zoo_seconds": round(zoo_seconds, 1),
        "phase_seconds": phase_seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    paths = write_report(report, out_dir)
    echo(format_summary(report))
    echo(f"per task (and how far below the base, in stderr): {paths['markdown']}, {paths['chart']}")
    echo(
        f"demo finished in {report['demo']['total_seconds']:.0f} s (zoo {zoo_seconds:.0f} s, merges "
        f"{phase_seconds['merge']:.0f} s, lm-eval {phase_seconds['evaluate']:.0f} s)"
    )
    return report


def tune(
    zoo_dir: str | Path,
    *,
    merges: Optional[Sequence[DemoMerge]] = None,
    grids: Optional[Mapping[str, Mapping[str, Sequence[object]]]] = None,
    progress: bool = True,
) -> Dict[str, Dict]:
    """Best parameters per demo merge by mean validation score (in memory, mergekit's engine),
    with every grid setting's score (``grid``).

    The score is the protocol's in-process scorer (``zoo.score``: exact match of
    greedy generation for a generation zoo, log-likelihood accuracy for a
    multiple-choice one), which equals lm-eval's metric for the zoo's task YAMLs;
    ties go to the first setting of the grid.
    """
    import torch
    from tqdm.auto import tqdm

    from mergekit_ext.evaluate.protocol.scorer import Scorer
    from mergekit_ext.evaluate.protocol.selection import select
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import load_zoo, merge_in_memory

    zoo = load_zoo(zoo_dir)
    kind = zoo.task_kind
    merges = merges if merges is not None else merges_for(kind)
    grids = grids if grids is not None else grids_for(kind)
    base_state = load_state_dict(zoo.base)
    expert_states = {task: load_state_dict(zoo.expert(task)) for task in zoo.tasks}
    scorer = Scorer(zoo, "validation", "cpu")
    winners: Dict[str, Dict] = {}
    for label, method, parameters in merges:
        if not is_registered(method) or method == "adarank":  # adarank learns its settings
            continue
        candidates = protocol_grids.axes_settings(dict(grids.get(label, {})), dict(parameters))
        scores = []
        for candidate in tqdm(candidates, desc=f"tune {label}", disable=not progress):
            with torch.no_grad():
                merged = merge_in_memory(base_state, expert_states, method, candidate)
            scores.append(scorer(state=merged)["mean_accuracy"])
        chosen = select(candidates, scores)
        winners[label] = {
            "parameters": chosen.setting,
            "validation_score": chosen.score,
            "metric": zoo.metric.split(",")[0],
            "grid": [{"parameters": setting, "validation_score": value} for setting, value in zip(candidates, scores)],  # the evidence
        }
    return winners
