"""Every method's grids, in one table (``METHOD_GRIDS``): one entry per method.

An entry names the grid each user of the protocol searches:

- ``quality``: ``benchmarks/quality.py``'s grid per zoo kind, a list of full settings
  (4 settings on the multiple-choice zoos, 9 on the generation zoo ``hard``; the same
  size for every method with a free hyperparameter);
- ``demo``: ``mergekit-ext demo --tune``'s axes per zoo kind, laid over the demo's own
  setting of that method (``demo/run.py``'s ``DEMO_MERGES``);
- ``tune``: ``mergekit-ext tune``'s default space (a SPACE ``methods:`` entry: a list is
  searched, a scalar is fixed);
- ``sweep``: the wider validation-only sweep of ``quality.py --defaults-sweep`` (the
  evidence for the defaults in ``methods/<family>/__init__.py``);
- ``smol``: ``benchmarks/smol_quality.py``'s settings on the real-LLM zoo (task
  arithmetic's λ grid; one shipped setting for every other method);
- ``adarank_prior``: the λ grid ``benchmarks/adarank_bench.py`` chooses a base method's
  setting from before AdaRank learns on top of it.

The grids differ between users because each was chosen for its own budget and zoo
(and the committed results were made with them); they live here so that a method is
added, and its grids read, in one place. The views below (``QUALITY_GRIDS``,
``DEMO_GRIDS``, ``DEFAULT_SPACES``...) are what the users import.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"

Setting = Dict[str, Any]


def product(**axes: Sequence[Any]) -> List[Setting]:
    """Every combination of the axes, the first axis slowest."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[name] for name in names))]


def paired(first: str, pairs: Sequence[Any], **fixed: Any) -> List[Setting]:
    """Settings from (first parameter value, its lambdas) pairs."""
    return [dict(fixed, **{first: value, "lambda": scale}) for value, scales in pairs for scale in scales]


# Multiple-choice zoos (demo, bench): 4 settings per method.
LAMBDAS = (0.25, 0.5, 0.75, 1.0)
GRID_SIZE = 4
# TIES family: disjoint SUM (normalize: false) scaled by lambda, as in the TIES paper.
TIES_GRID = [dict(setting, weight=1.0, normalize=False) for setting in product(density=(0.2, 0.5), **{"lambda": (0.5, 1.0)})]

# The generation zoo (`hard`): 9 settings per method. Two-parameter grids pair each
# value of the first parameter with the scales that suit it (a TALL mask that keeps
# fewer weights, a larger CART rank or a larger consensus k want a different λ):
# a first run on seed 0's VALIDATION split (benchmarks/results/quality-hard.md,
# "Grid design") found the TIES family, consensus, CART at rank 0.05 and RMM
# best at an edge of plain 3 x 3 grids, and these grids move those edges outward.
HARD_GRID_SIZE = 9
HARD_TIES_GRID = [dict(setting, weight=1.0, normalize=False) for setting in product(density=(0.2, 0.5, 0.8), **{"lambda": (0.3, 0.45, 0.6)})]
# TSV-M and Iso: their update is much smaller than the task-vector sum (Iso keeps the
# nuclear norm with a flat spectrum, and both use the MEAN of the task vectors outside
# the block matrices), so their best lambda is large (seed 0: Iso-C still rising at
# 2.5 on a grid ending there).
WIDE_LAMBDAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)

# adarank_bench's base grids: the hard zoo's default of each method in the middle.
_TSV_PRIOR = [1.0, 1.5, 2.0, 2.5, 3.0]

# tune's default spaces: one small grid per method (2 to 4 settings), around what won on
# the `hard` zoo's validation split over 3 seeds (benchmarks/results/quality-hard-defaults-sweep.md
# and the validation grids in quality-hard.md): TA λ 0.5-0.6, TIES density 0.5 λ 0.45,
# CART rank 0.1 λ 2.0 (rank 0.05 λ 1.3 on one seed), TSV-M λ 2.0, Iso-C λ 2.5,
# Iso-CTS λ 3.0-3.5, OPCM α 0.2-0.4, RMM k 6 (of 8) weight 0.45-0.6. Each grid brackets the
# winner with a neighbour on the side other models are likely to need (real LLM
# task vectors are larger than the zoo's, so smaller scales are kept in reach). Fitted on
# hard zoo seeds 0-2 and kept as fitted; on seeds 3-5, which it never saw, tune with this
# space chose the hand grid's configuration on every seed (benchmarks/results/tune-hard-unseen.md).

METHOD_GRIDS: Dict[str, Dict[str, Any]] = {
    # No free hyperparameter: the plain average of the experts, and Model Stock's closed form.
    "linear": {"quality": {MULTIPLE_CHOICE: [dict(weight=1.0, normalize=True)], GENERATION: [dict(weight=1.0, normalize=True)]}},
    "model_stock": {"quality": {MULTIPLE_CHOICE: [dict()], GENERATION: [dict()]}},
    "task_arithmetic": {
        "quality": {
            MULTIPLE_CHOICE: [{"weight": 1.0, "lambda": value} for value in LAMBDAS],
            GENERATION: [{"weight": 1.0, "lambda": value} for value in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)],
        },
        "demo": {GENERATION: {"lambda": (0.3, 0.4, 0.5, 0.6, 0.8)}, MULTIPLE_CHOICE: {"lambda": (0.2, 0.4, 0.6, 0.8, 1.0)}},
        "tune": {"lambda": [0.3, 0.5, 0.7, 1.0]},
        "adarank_prior": [0.3, 0.4, 0.5, 0.6, 0.8],
    },
    "ties": {
        "quality": {MULTIPLE_CHOICE: TIES_GRID, GENERATION: HARD_TIES_GRID},
        "demo": {GENERATION: {"density": (0.5, 0.8), "lambda": (0.45, 0.6, 0.8)}, MULTIPLE_CHOICE: {"density": (0.2, 0.5), "lambda": (0.4, 0.6, 0.8, 1.0)}},
        # normalize false, as in the quality grid: mergekit's default (true) divides the
        # elected sum by the agreeing weights, which at density 0.5, λ 0.45 scored 0.476
        # validation exact match on hard zoo seed 0 against 0.583 without it (the first run of
        # benchmarks/tune_bench.py, one seed; its file was replaced when this space changed).
        "tune": {"density": [0.5, 0.8], "lambda": [0.45, 0.7], "normalize": False},
    },
    "dare_ties": {"quality": {MULTIPLE_CHOICE: TIES_GRID, GENERATION: HARD_TIES_GRID}},
    "breadcrumbs_ties": {
        "quality": {
            MULTIPLE_CHOICE: [dict(setting, gamma=0.01) for setting in TIES_GRID],
            GENERATION: [dict(setting, gamma=0.01) for setting in HARD_TIES_GRID],
        }
    },
    "della": {
        "quality": {
            MULTIPLE_CHOICE: [dict(setting, epsilon=0.1) for setting in TIES_GRID],
            GENERATION: [dict(setting, epsilon=0.1) for setting in HARD_TIES_GRID],
        }
    },
    # Ours. Consensus keeps the paper's mask defaults (λt 0.4, k 2) on the multiple-choice
    # zoos and tunes the final scale like task arithmetic / TIES; on `hard`, consensus_ta
    # answers tall_lambda (at k 2), consensus_ties answers k (at λt 0.4, top 20 %).
    "consensus_ta": {
        "quality": {
            MULTIPLE_CHOICE: [{"k": 2, "tall_lambda": 0.4, "lambda": value} for value in LAMBDAS],
            GENERATION: paired("tall_lambda", [(0.2, (0.4, 0.55, 0.7)), (0.4, (0.8, 1.0, 1.2)), (0.6, (1.0, 1.3, 1.6))], k=2),
        },
        "demo": {GENERATION: {"k": (1, 2), "lambda": (0.4, 0.6, 0.8)}, MULTIPLE_CHOICE: {"k": (1, 2), "lambda": (0.4, 0.6, 0.8, 1.0)}},
        "tune": {"k": [1, 2], "lambda": [0.55, 0.8]},
        "sweep": product(k=(1, 2, 3), tall_lambda=(0.2, 0.3, 0.4, 0.5, 0.6), **{"lambda": (0.5, 0.7, 0.9, 1.1)}),
    },
    "consensus_ties": {
        "quality": {
            MULTIPLE_CHOICE: [dict(k=2, tall_lambda=0.4, **setting) for setting in product(density=(0.2, 0.5), **{"lambda": (0.5, 1.0)})],
            GENERATION: paired("k", [(1, (0.5, 0.7, 0.9)), (2, (0.6, 0.8, 1.0)), (3, (0.9, 1.2, 1.5))], tall_lambda=0.4, density=0.2),
        },
        "demo": {GENERATION: {"k": (1, 2), "lambda": (0.5, 0.7, 0.9)}, MULTIPLE_CHOICE: {"k": (1, 2), "density": (0.2, 0.5), "lambda": (0.6, 0.8, 1.0)}},
        "tune": {"k": [1, 2], "density": 0.5, "lambda": [0.7, 0.9]},
    },
    # CART: around the paper's starting points (2.0 / 0.12 vision, 1.3 / 0.01 GPT-2).
    "cart": {
        "quality": {
            MULTIPLE_CHOICE: product(rank_ratio=(0.05, 0.15), **{"lambda": (1.3, 2.0)}),
            GENERATION: paired("rank_ratio", [(0.05, (1.0, 1.3)), (0.1, (1.5, 2.0, 2.5)), (0.15, (1.5, 2.0, 2.5)), (0.2, (2.5,))]),
        },
        "demo": {GENERATION: {"rank_ratio": (0.05, 0.1), "lambda": (1.0, 1.5, 2.0)}},
        "tune": {"rank_ratio": [0.05, 0.1], "lambda": [1.3, 2.0]},
        "sweep": product(rank_ratio=(0.02, 0.05, 0.1, 0.15, 0.2, 0.3), **{"lambda": (1.0, 1.3, 1.5, 2.0, 2.5, 3.0)}),
        "adarank_prior": [1.0, 1.5, 2.0, 2.5, 3.0],
    },
    "tsv_m": {
        "quality": {GENERATION: [{"lambda": value} for value in WIDE_LAMBDAS]},
        "demo": {GENERATION: {"lambda": (1.5, 2.0, 2.5)}, MULTIPLE_CHOICE: {"lambda": (0.5, 0.75, 1.0, 1.5)}},
        "tune": {"lambda": [1.0, 2.0]},
        "sweep": [{"lambda": value} for value in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)],
        "adarank_prior": _TSV_PRIOR,
    },
    "iso_c": {
        "quality": {GENERATION: [{"lambda": value} for value in WIDE_LAMBDAS]},
        "demo": {GENERATION: {"lambda": (2.0, 2.5, 3.0)}, MULTIPLE_CHOICE: {"lambda": (0.75, 1.0, 1.5, 2.0)}},
        "tune": {"lambda": [1.5, 2.5]},
        "sweep": [{"lambda": value} for value in (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0)],
    },
    "iso_cts": {
        "quality": {GENERATION: product(common_space_fraction=(0.6, 0.8, 0.95), **{"lambda": (2.5, 3.5, 4.5)})},
        "demo": {GENERATION: {"lambda": (2.5, 3.0, 3.5)}, MULTIPLE_CHOICE: {"lambda": (0.75, 1.0, 1.5, 2.0)}},
        "tune": {"lambda": [2.0, 3.0]},
        "sweep": product(common_space_fraction=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), **{"lambda": (2.0, 2.5, 3.0, 3.5, 4.0, 5.0)}),
        "adarank_prior": [2.0, 2.5, 3.0, 3.5, 4.0],
    },
    # OPCM in mergekit-yaml (per-tensor norm matching): its one free parameter.
    "opcm": {
        "quality": {MULTIPLE_CHOICE: [{"alpha": value} for value in (0.3, 0.5, 0.7, 0.9)], GENERATION: [{"alpha": value} for value in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]},
        "demo": {GENERATION: {"alpha": (0.2, 0.4, 0.6)}},
        "tune": {"alpha": [0.2, 0.4]},
    },
    # RMM product space: basis size K and the weight of each reconstructed delta
    # (k = n with weight w is task arithmetic with lambda w: the rank-n fit is exact).
    "rmm": {
        "quality": {MULTIPLE_CHOICE: product(k=(1, 2), weight=(0.5, 1.0)), GENERATION: product(k=(2, 4, 6), weight=(0.3, 0.45, 0.6))},
        "demo": {GENERATION: {"k": (4, 6), "weight": (0.45, 0.6, 0.8)}, MULTIPLE_CHOICE: {"k": (1, 2, 3), "weight": (0.4, 0.6, 0.8, 1.0)}},
        "tune": {"k": [2, 6], "weight": [0.45, 0.6]},  # k above the number of models is that number
    },
}


def _view(use: str, kind: Optional[str] = None, order: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    names = order if order is not None else list(METHOD_GRIDS)
    out: Dict[str, Any] = {}
    for name in names:
        grids = METHOD_GRIDS[name].get(use)
        if grids is not None and (kind is None or kind in grids):
            out[name] = grids if kind is None else grids[kind]
    return out


# The views each user imports (their method order is the order each was first written in).
QUALITY_GRIDS: Dict[str, Dict[str, List[Setting]]] = {kind: _view("quality", kind) for kind in (MULTIPLE_CHOICE, GENERATION)}
DEMO_GRIDS: Dict[str, Dict[str, Dict[str, Sequence[Any]]]] = {kind: _view("demo", kind) for kind in (GENERATION, MULTIPLE_CHOICE)}
DEFAULT_SPACES: Dict[str, Dict[str, Any]] = _view(
    "tune", order=("task_arithmetic", "ties", "consensus_ta", "consensus_ties", "cart", "opcm", "rmm", "tsv_m", "iso_c", "iso_cts")
)
# The real-LLM benchmark (benchmarks/smol_quality.py): task arithmetic's λ is chosen on
# validation; every other method runs once, at what a user gets without tuning (our
# methods' documented defaults; mergekit's TIES family as recipes/ties.yml sets it).
_RECIPE_TIES = {"weight": 1.0, "density": 0.5, "lambda": 0.8}
SMOL_GRIDS: Dict[str, List[Setting]] = {
    "task_arithmetic": [{"weight": 1.0, "lambda": value} for value in (0.2, 0.4, 0.6, 0.8, 1.0)],
    "linear": [{"weight": 1.0, "normalize": True}],
    "model_stock": [{}],
    "ties": [_RECIPE_TIES],
    "dare_ties": [_RECIPE_TIES],
    "breadcrumbs_ties": [dict(_RECIPE_TIES, gamma=0.01)],
    "della": [dict(_RECIPE_TIES, epsilon=0.1)],
    **{method: [{}] for method in ("consensus_ta", "consensus_ties", "cart", "tsv_m", "iso_c", "iso_cts", "opcm", "rmm")},
}
for _method, _grid in SMOL_GRIDS.items():
    METHOD_GRIDS[_method]["smol"] = _grid
SWEEP_GRIDS: Dict[str, List[Setting]] = _view("sweep", order=("consensus_ta", "cart", "iso_cts", "iso_c", "tsv_m"))
# adarank_bench's variants and the methods whose grids they start from.
ADARANK_BASES = {"ta": "task_arithmetic", "cart": "cart", "tsv_m": "tsv_m", "iso_cts": "iso_cts"}
ADARANK_PRIOR_GRIDS: Dict[str, List[float]] = {variant: METHOD_GRIDS[method]["adarank_prior"] for variant, method in ADARANK_BASES.items()}


def quality_grid(method: str, kind: str = MULTIPLE_CHOICE, parameter_names: Sequence[str] = ()) -> List[Setting]:
    """``method``'s quality grid on a zoo of ``kind``. A method without an entry (registered after
    the table was written) tunes its ``lambda`` if ``parameter_names`` has one, else runs once with defaults."""
    grids = QUALITY_GRIDS[GENERATION if kind == GENERATION else MULTIPLE_CHOICE]
    if method in grids:
        return grids[method]
    if "lambda" in parameter_names:
        return [{"lambda": value} for value in (LAMBDAS if kind != GENERATION else WIDE_LAMBDAS)]
    return [dict()]


def demo_grids(kind: str) -> Dict[str, Dict[str, Sequence[Any]]]:
    """``demo --tune``'s axes per method for a zoo of ``kind``."""
    return DEMO_GRIDS[GENERATION if kind == GENERATION else MULTIPLE_CHOICE]


def axes_settings(axes: Dict[str, Sequence[Any]], fixed: Optional[Dict[str, Any]] = None) -> List[Setting]:
    """Every setting of ``axes`` laid over ``fixed`` (the first axis slowest)."""
    return [{**(fixed or {}), **setting} for setting in product(**axes)]
