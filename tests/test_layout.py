"""The package's shape: no import cycles, and every method family has the same parts."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_ext"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """Our modules that ``path`` imports at module level or inside functions (absolute or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("mergekit_ext") and importlib.util.find_spec(name.rsplit(".", 1)[0] if "." in name else name) is not None:
                found.add(name)
    return found


def _graph() -> dict:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from pkg import sub` names a submodule when one exists; else the package itself
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _ancestors(name: str) -> set:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_import_graph_has_no_cycle():
    graph = _graph()
    # Importing a module imports its parent packages first; an edge to an ancestor is not a cycle.
    edges = {name: {t for t in targets if t not in _ancestors(name)} for name, targets in graph.items()}
    visiting, done, cycle = set(), set(), []

    def visit(node, stack):
        if node in done:
            return
        if node in visiting:
            cycle.extend(stack[stack.index(node):] + [node])
            return
        visiting.add(node)
        for target in sorted(edges.get(node, ())):
            visit(target, stack + [node])
            if cycle:
                return
        visiting.discard(node)
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
        assert not cycle, f"import cycle: {' -> '.join(cycle)}"


FAMILIES = sorted(p.name for p in (PACKAGE / "methods").iterdir() if p.is_dir() and (p / "__init__.py").is_file())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_family_has_kernel_and_declaration(family):
    folder = PACKAGE / "methods" / family
    assert (folder / "kernel.py").is_file() and (folder / "method.py").is_file()
    # kernels are pure: tensors in, tensors out; no mergekit engine, no click, no files
    kernel = ast.parse((folder / "kernel.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(kernel) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(kernel) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.startswith(("click", "mergekit.merge_methods", "mergekit_ext.io", "safetensors")) for name in imported), imported


def test_registry_lists_every_family_and_feature():
    from mergekit_ext.registry import PARTS

    folders = {f"methods.{family}" for family in FAMILIES}
    folders |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "methods" and (p / "__init__.py").is_file() and ((p / "cli.py").is_file() or (p / "method.py").is_file())}
    assert folders <= set(PARTS), sorted(folders - set(PARTS))
