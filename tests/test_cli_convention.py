"""One convention on every command (issue 31, item 5): -q and --quiet are one option, and under it no progress bar."""

from __future__ import annotations

import re
import subprocess
import sys

import click
import pytest
from conftest import invoke, mergekit_env, random_adapter

from mergekit_ext.cli import main


def _leaves(command, path=()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _leaves(sub, path + (name,))
    else:
        yield path, command


LEAVES = dict(_leaves(main))


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_quiet_and_q_are_one_option_on_every_command(path):
    quiet = [param for param in LEAVES[path].params if "--quiet" in param.opts or "-q" in param.opts]
    assert len(quiet) == 1, path
    assert {"-q", "--quiet"} <= set(quiet[0].opts), (path, quiet[0].opts)
    assert quiet[0].name == "quiet"


# A tqdm bar, in any of its forms ("3/8 [00:01<00:02, 2.9it/s]", "10%|█"); `-q` must leave none.
_BAR = re.compile(r"\d+/\d+ \[|it/s|s/it|%\|")


def _run(*args):
    env = mergekit_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-c", "from mergekit_ext.cli import main; main()", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("quiet")


def _commands(zoo, out):
    z = zoo.root
    reverse, dup = "reverse", "dup"
    config = out / "ta.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {z}/base\nparameters: {{lambda: 0.5, weight: 1.0}}\n"
        f"models: [{{model: {z}/experts/{reverse}}}, {{model: {z}/experts/{dup}}}]\ndtype: float32\n"
    )
    return {
        "merge": ["merge", config, out / "merged"],
        "tall compress": ["tall", "compress", "--base", z / "base", z / "experts" / reverse, z / "experts" / dup, out / "bundle"],
        "tall recover": ["tall", "recover", out / "bundle", reverse, out / "recovered"],
        "continual init": ["continual", "init", out / "state", "--base", z / "base", z / "experts" / reverse],
        "continual add": ["continual", "add", out / "state", z / "experts" / dup],
        "rmm build": ["rmm", "build", "--base", z / "base", z / "adapters" / reverse, z / "adapters" / dup, "-k", "1", out / "rmm"],
        "rmm revert": ["rmm", "revert", out / "rmm", reverse, out / "rmm-reverse"],
        "lora merge": ["lora", "merge", "--base", z / "base", "--method", "task_arithmetic", z / "adapters" / reverse, z / "adapters" / dup, "-r", "4", out / "lora"],
        "adarank learn": ["adarank", "learn", "--zoo", z, "--steps", "2", "--unlabeled", "0", "--out", out / "adarank.safetensors"],
        "eval": ["eval", out / "merged", "--zoo", z],
        "zoo": ["zoo", z, "--preset", "test"],
    }


# in order: later commands read what earlier ones wrote
QUIET_RUNS = ["merge", "tall compress", "tall recover", "continual init", "continual add", "rmm build", "rmm revert", "lora merge", "adarank learn", "eval", "zoo"]


@pytest.mark.slow
@pytest.mark.parametrize("name", QUIET_RUNS)
def test_quiet_commands_show_no_progress_bar(name, test_zoo, outputs):
    for flag in ("-q", "--quiet"):
        folder = outputs / flag.strip("-")
        folder.mkdir(exist_ok=True)
        result = _run(*_commands(test_zoo, folder)[name], flag)
        assert result.returncode == 0, result.stderr[-2000:]
        assert not _BAR.search(result.stderr + result.stdout), (name, flag, result.stderr[-2000:])
        if name == "zoo":
            assert (result.stdout + result.stderr).count("TA / expert") == 1  # the build summary, once


@pytest.mark.slow
def test_without_quiet_the_bars_show(test_zoo, tmp_path):
    """The check above can fail: the same command without -q draws its bar."""
    result = _run(*_commands(test_zoo, tmp_path)["rmm build"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert _BAR.search(result.stderr)


def test_lora_merge_suggests_a_parameter_and_a_method(tiny_family, tmp_path):
    base = tiny_family["base"]
    adapters = [random_adapter(base, tmp_path / f"a{seed}", seed=seed) for seed in (1, 2)]
    result = invoke("lora", "merge", "--base", base, "--method", "task_arithmetic", "--param", "lambdaa=0.5", *adapters, "-r", "4", tmp_path / "out")
    assert result.exit_code == 1 and "has no parameter 'lambdaa'; did you mean 'lambda'?" in result.output
    result = invoke("lora", "merge", "--base", base, "--method", "task_arithmetik", *adapters, "-r", "4", tmp_path / "out")
    assert result.exit_code == 1 and "did you mean 'task_arithmetic'?" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a fresh interpreter that imports torch and mergekit
def test_eval_checks_every_path_before_running_any(tiny_family, tmp_path):
    """The second model's typo is reported before lm-eval is even imported, not after the first model's run."""
    args = ["eval", str(tiny_family["base"]), str(tmp_path / "typo"), "--tasks", "x", "--include-path", str(tmp_path)]
    code = (
        "import sys, click\n"
        "from mergekit_ext.cli import main\n"
        f"try:\n    main({args!r}, standalone_mode=False)\nexcept click.ClickException as error:\n    print(error.format_message())\n"
        "print('lm_eval' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mergekit_env(), timeout=600)
    message, imported = result.stdout.strip().splitlines()[-2:]
    assert "typo does not exist" in message and imported == "False", result.stdout + result.stderr
