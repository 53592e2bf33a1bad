"""CONTRIBUTING.md's checklist, checked: every registered method has every part a method needs.

A failure names the method and the step of CONTRIBUTING.md it misses. The demo and tune
tables are read, never changed.
"""

from __future__ import annotations

import json
import re
from typing import List

from conftest import REPO_ROOT

STEPS = {
    "catalog": "step 2: regenerate mergekit_ext/registry_catalog.json with `python -m mergekit_ext.registry`",
    "learned file": "step 3: list it in registry.LEARNED_FILE_METHODS (it cannot run without a learned file)",
    "docs": "step 4: describe it in docs/methods.md (its name in backticks)",
    "README row": "step 4: add its row to the README's Methods table",
    "recipe": "step 5: add recipes/<method>.yml",
    "demo": "step 6: add an entry to DEMO_MERGES in mergekit_ext/demo/run.py",
    "multiple-choice demo": "step 6: add an entry to MULTIPLE_CHOICE_MERGES in mergekit_ext/demo/run.py",
    "tune space": "step 7: add a `tune` entry to its row of METHOD_GRIDS in mergekit_ext/evaluate/protocol/grids.py",
    "tests": "step 8: test it through the real engine in tests/test_<family>.py (run_mergekit_yaml / run_merge_in_process)",
}
# Files that mention every method's name for reasons of their own.
NOT_METHOD_TESTS = {"test_contributing.py", "test_registration.py", "test_newcomer.py"}


def missed_steps(name: str, required_parameters: List[str]) -> List[str]:
    """The CONTRIBUTING.md steps method ``name`` misses (empty when it has every part)."""
    from mergekit_ext import registry
    from mergekit_ext.demo.run import DEMO_MERGES, MULTIPLE_CHOICE_MERGES
    from mergekit_ext.tune.space import DEFAULT_SPACES

    catalog = {m["name"] for m in json.loads(registry.CATALOG_PATH.read_text(encoding="utf-8"))["methods"]}
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    methods_doc = (REPO_ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    quoted = re.compile(rf"""["']{re.escape(name)}["']""")
    engine_tests = [
        path
        for path in (REPO_ROOT / "tests").glob("test_*.py")
        if path.name not in NOT_METHOD_TESTS
        and quoted.search(text := path.read_text(encoding="utf-8"))
        and ("run_mergekit_yaml" in text or "run_merge_in_process" in text)
    ]
    learned = registry.needs_learned_file(name)
    missed = {
        "catalog": name not in catalog,
        "learned file": bool(required_parameters) and not learned,
        "docs": f"`{name}`" not in methods_doc,
        "README row": not re.search(rf"^\| `{re.escape(name)}` \|", readme, re.MULTILINE),
        "recipe": not (REPO_ROOT / "recipes" / f"{name}.yml").is_file(),
        "demo": name not in {method for _, method, _ in DEMO_MERGES},
        "multiple-choice demo": name not in {method for _, method, _ in MULTIPLE_CHOICE_MERGES},
        "tune space": not learned and name not in DEFAULT_SPACES,
        "tests": not engine_tests,
    }
    return [f"{name}: {STEPS[step]}" for step, missing in missed.items() if missing]


def _registered():
    from mergekit.merge_methods.base import MISSING

    from mergekit_ext.registry import our_methods

    return [(m.spec.name, [p.name for p in m.spec.parameters if p.default is MISSING]) for m in our_methods()]


def test_every_method_has_every_part():
    methods = _registered()
    assert len(methods) >= 9
    missed = [line for name, required in methods for line in missed_steps(name, required)]
    assert not missed, "CONTRIBUTING.md, missed:\n" + "\n".join(missed)


def test_the_checklist_can_fail():
    # A method with none of the parts misses every step (learned-file: it has a required parameter).
    assert len(missed_steps("no_such_method", ["file"])) == len(STEPS)


def test_catalog_lists_only_registered_methods():
    from mergekit_ext.registry import LEARNED_FILE_METHODS, catalog

    names = {name for name, _ in _registered()}
    assert {m["name"] for m in catalog()} == names, "step 2: regenerate with `python -m mergekit_ext.registry`"
    assert LEARNED_FILE_METHODS <= names


def test_contributing_has_the_steps_this_test_names():
    text = (REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for number in sorted({int(step.split(":")[0].split()[1]) for step in STEPS.values()}):
        assert re.search(rf"^{number}\. \*\*", text, re.MULTILINE), f"CONTRIBUTING.md has no step {number}"


def test_links_into_docs_methods_resolve():
    # Every docs/methods.md#anchor (and a "#anchor" later on the same line) is a heading there.
    headings = re.findall(r"^#+ (.+)$", (REPO_ROOT / "docs" / "methods.md").read_text(encoding="utf-8"), re.MULTILINE)
    anchors = {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}
    files = [REPO_ROOT / "README.md", REPO_ROOT / "CONTRIBUTING.md"]
    files += [path for folder in ("mergekit_ext", "benchmarks", "tests") for path in (REPO_ROOT / folder).rglob("*.py") if path.name != "test_contributing.py"]
    checked = 0
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            if "docs/methods.md#" in line:
                for anchor in re.findall(r"#([a-z][\w\-]*)", line.split("docs/methods.md", 1)[1]):
                    checked += 1
                    assert anchor in anchors, f"{file.relative_to(REPO_ROOT)}: #{anchor} is not a heading of docs/methods.md"
    assert checked >= 15
