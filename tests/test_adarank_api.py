"""The AdaRank learner's shape: one objective interface, a thin ``learn`` module of public
names, and a benchmark that uses the public API only (no models needed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mergekit_ext" / "methods" / "adarank"
BENCHMARK = ROOT / "benchmarks" / "adarank_bench.py"
ADARANK = "mergekit_ext.methods.adarank"
# Objects of the benchmark's own whose attributes it may set (its argparse namespace, its classes).
OWN_OBJECTS = {"self", "args"}


def private_uses(source: str) -> list:
    """Where ``source`` reaches into the AdaRank learner: a ``_``-prefixed name imported from the
    package or read off a module of it, or an attribute set on an object that is not its own."""
    tree = ast.parse(source)
    modules = set()  # local names bound to the package or one of its modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(ADARANK):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: imports {alias.name} from {node.module}")
                if node.module == ADARANK or alias.name[:1].islower():
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name for alias in node.names if alias.name.startswith(ADARANK))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner in modules or owner.startswith(ADARANK):
                found.append(f"line {node.lineno}: uses {owner}.{node.attr}")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute):
                    owner = element.value
                    while isinstance(owner, ast.Attribute):
                        owner = owner.value
                    if not (isinstance(owner, ast.Name) and owner.id in OWN_OBJECTS):
                        found.append(f"line {node.lineno}: sets {ast.unparse(element)}")
    return found


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from mergekit_ext.methods.adarank.learn import _train", "imports _train"),
        ("from mergekit_ext.methods.adarank import learn as L\nL._train(1)", "uses L._train"),
        ("import mergekit_ext.methods.adarank.learn\nmergekit_ext.methods.adarank.learn._encode([])", "uses mergekit_ext.methods.adarank.learn._encode"),
        ("setup.objective = 1", "sets setup.objective"),
        ("setup.train_pools, setup.held_out_pools = 1, 2", "sets setup.train_pools"),
        ("setup.model.coefficients_only = True", "sets setup.model.coefficients_only"),
    ],
)
def test_the_private_use_check_finds_what_it_looks_for(source, expected):
    uses = private_uses(source)
    assert any(expected in use for use in uses), uses


def test_the_private_use_check_allows_public_use():
    source = (
        "from mergekit_ext.methods.adarank import learn as L\n"
        "setup = L.prepare([], [])\nsetup.reset(L.LearnOptions())\nL.run(setup, on_step=print)\n"
        "args.bases = 1\nself.weights = 2\n"
    )
    assert private_uses(source) == []


def test_the_benchmark_uses_the_learners_public_api_only():
    uses = private_uses(BENCHMARK.read_text(encoding="utf-8"))
    assert uses == [], f"benchmarks/adarank_bench.py reaches into the learner: {uses}"


def test_learn_is_a_thin_module_of_public_names():
    """``learn.py`` defines nothing itself: every name it offers lives in the module of its job."""
    from mergekit_ext.methods.adarank import learn

    tree = ast.parse((PACKAGE / "learn.py").read_text(encoding="utf-8"))
    defined = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert defined == []
    for name in learn.__all__:
        value = getattr(learn, name)
        home = getattr(value, "__module__", None)
        assert home is None or (home.startswith(ADARANK + ".") and home != learn.__name__), (name, home)
    # What users, the CLI, the demo and the tests import from it.
    for name in ("LearnOptions", "learn", "prepare", "run", "zoo_prompts", "read_prompts", "describe", "write_merged_model", "Setup", "train"):
        assert name in learn.__all__


def test_one_objective_interface_chosen_by_name_once():
    from mergekit_ext.methods.adarank import OBJECTIVES
    from mergekit_ext.methods.adarank.objectives import OBJECTIVE_TYPES, Objective, make_objective
    from mergekit_ext.methods.adarank.options import LearnOptions

    assert tuple(OBJECTIVE_TYPES) == OBJECTIVES  # the CLI's choices
    for name, kind in OBJECTIVE_TYPES.items():
        assert issubclass(kind, Objective) and kind.name == name
        objective = make_objective(LearnOptions(objective=name, max_new_tokens=5), 0, "cpu", [7])
        assert type(objective) is kind and objective.max_new_tokens == 5 and objective.stop_ids == [7]
    with pytest.raises(ValueError, match="unknown objective 'kl'"):
        make_objective(LearnOptions(objective="kl"), 0, "cpu", [])


def test_no_learner_module_switches_on_an_objective_name():
    """Only ``objectives.py`` (the registry) and ``__init__.py`` (the names) spell an objective's
    name; the learner asks the chosen ``Objective`` instead of comparing names."""
    from mergekit_ext.methods.adarank import OBJECTIVES

    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("__init__.py", "objectives.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                for part in [node.left, *node.comparators]:
                    if isinstance(part, ast.Constant) and part.value in OBJECTIVES:
                        offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
