"""The installed package is visible to stock mergekit with no import by the user."""

import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import mergekit_env

OUR_METHODS = ("consensus_ta", "consensus_ties")


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mergekit_env())
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_stock_mergekit_sees_methods_without_importing_us():
    names = _python(
        "import mergekit.merge_methods as m; print(' '.join(x.spec.name for x in m.registered_methods()))"
    ).split()
    for name in OUR_METHODS:
        assert name in names
    assert "task_arithmetic" in names  # mergekit's own registry is intact


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
