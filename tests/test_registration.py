"""Our methods reach mergekit through its public ``register``, in any import order.

Stock mergekit sees them with no import by the user (the startup hook), nothing of
mergekit is patched, and no import order makes one of our modules meet another
half-imported (a runtime import cycle, which reading the import statements cannot see).
"""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, mergekit_env

OUR_METHODS = ("consensus_ta", "consensus_ties")
CATALOG_NAMES = [m["name"] for m in json.loads((REPO_ROOT / "mergekit_ext" / "registry_catalog.json").read_text(encoding="utf-8"))["methods"]]


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mergekit_env())
    assert result.returncode == 0, result.stderr
    assert "mergekit-ext:" not in result.stderr, result.stderr
    return result.stdout.strip()


def test_stock_mergekit_sees_methods_without_importing_us():
    names = _python(
        "import mergekit.merge_methods as m; print(' '.join(x.spec.name for x in m.registered_methods()))"
    ).split()
    for name in OUR_METHODS:
        assert name in names
    assert set(CATALOG_NAMES) <= set(names)
    assert "task_arithmetic" in names  # mergekit's own registry is intact


@pytest.mark.slow  # two fresh interpreters that import torch and mergekit
@pytest.mark.parametrize("first", ["", "import mergekit_ext.methods.cart.method\n"])
def test_registration_patches_nothing_of_mergekit(first):
    # get / registered_methods are mergekit's own functions, whoever imported mergekit first
    out = _python(
        first + "import mergekit.merge_methods as m, mergekit.merge_methods.registry as r\n"
        "print(m.get is r.get, m.registered_methods is r.registered_methods, m.register is r.register,"
        " r.get.__module__, r.registered_methods.__module__, m.get('cart').spec.name)"
    )
    assert out == "True True True mergekit.merge_methods.registry mergekit.merge_methods.registry cart"


def test_startup_hook_is_lazy():
    # The hook is imported at start-up but must not pull in torch or mergekit.
    loaded = _python(
        "import sys; print(' '.join(str(m in sys.modules) for m in ('mergekit_ext_hook', 'torch', 'mergekit', 'mergekit_ext')))"
    )
    assert loaded == "True False False False"


def test_registering_twice_is_harmless():
    import mergekit.merge_methods as mm

    import mergekit_ext

    before = [m.spec.name for m in mm.registered_methods()]
    mergekit_ext.register_all()
    mergekit_ext.register_all()
    assert [m.spec.name for m in mm.registered_methods()] == before
    assert all(before.count(name) == 1 for name in OUR_METHODS)


# Each child imports one of our modules in a fresh state (forked from a parent that has
# loaded only what ORDERS names, none of it ours), then checks every method is registered
# and the hook reported nothing.
_CYCLE_DRIVER = r"""
import importlib, io, json, os, sys, traceback
preload, expected, modules = json.loads(sys.argv[1]), set(json.loads(sys.argv[2])), sys.argv[3:]
for name in preload:
    importlib.import_module(name)
if "mergekit.merge_methods" not in preload:
    assert not any(name.split(".")[0] == "mergekit_ext" for name in sys.modules), "the parent must not load our modules"
assert ("mergekit.merge_methods" in sys.modules) == ("mergekit.merge_methods" in preload), "preload loaded the registry"
failures = {}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        sys.stderr = captured = io.StringIO()
        try:
            importlib.import_module(module)
            if "mergekit.merge_methods" not in sys.modules:
                # registration will run later, with nothing of ours half-imported: the other orders' case
                os.write(write, b"")
                os._exit(0)
            import mergekit.merge_methods as mm
            missing = sorted(expected - {m.spec.name for m in mm.registered_methods()})
            problem = (f"not registered: {missing}\n" if missing else "") + "".join(
                line for line in captured.getvalue().splitlines(True) if "mergekit-ext" in line)
        except BaseException:
            problem = traceback.format_exc()
        os.write(write, problem.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as stream:
        problem = stream.read()
    _, status = os.waitpid(pid, 0)
    if problem or status:
        failures[module] = problem or f"exit status {status}"
print(json.dumps(failures))
"""

ORDERS = {
    # torch and transformers are neither ours nor mergekit's: loaded once, to keep the test short
    "ours first": ["torch", "transformers"],
    "mergekit first": ["torch", "transformers", "mergekit", "mergekit.io", "mergekit.sparsify", "mergekit.common"],
    "mergekit.merge_methods first": ["mergekit.merge_methods"],
}


def _our_modules():
    package = REPO_ROOT / "mergekit_ext"
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_no_import_order_meets_a_half_imported_module(order):
    modules = _our_modules()
    assert "mergekit_ext.methods.declaration" in modules and len(modules) > 40
    result = subprocess.run(
        [sys.executable, "-c", _CYCLE_DRIVER, json.dumps(ORDERS[order]), json.dumps(CATALOG_NAMES), *modules],
        capture_output=True, text=True, env=mergekit_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{module} imported first ({order}):\n{problem}" for module, problem in failures.items())


def test_only_method_modules_import_mergekit_merge_methods_at_module_level():
    # The rule that keeps registration free of cycles (see registry.py): registration imports every
    # method.py and what they import, and none of that may be what is half-imported when it runs.
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "mergekit_ext").rglob("*.py")):
        if path.name == "method.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only; imports inside functions run after registration
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "mergekit.merge_methods" or name.startswith("mergekit.merge_methods.") for name in names):
                offenders.append(str(path.relative_to(REPO_ROOT)))
    assert not offenders, offenders


@pytest.mark.slow
def test_methods_command_lists_parameters_and_papers():
    from mergekit_ext.cli import main

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    for text in (*OUR_METHODS, "tall_lambda", "density", "arxiv.org/abs/2405.07813"):
        assert text in result.output


@pytest.mark.slow
def test_every_subcommand_has_help():
    import click

    from mergekit_ext.cli import main

    def walk(command, path):
        yield path
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])

    for path in walk(main, []):
        result = CliRunner().invoke(main, path + ["--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
