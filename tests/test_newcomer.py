"""Issue 14, a newcomer's first hour: what a first run trips over.

Start-up time is measured by ``benchmarks/startup.py`` (a subprocess benchmark),
not here; here only what must hold: the cheap commands import no torch.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import mergekit_env

# ---------------------------------------------------------------------------
# item 3: the cheap commands import neither torch nor mergekit


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["methods"], ["eval", "--help"], ["adarank", "--help"], ["merge", "--help"], ["merge", "missing.yml", "out"]]
)
def test_cheap_commands_import_no_torch(args):
    code = (
        "import sys, click\n"
        "from mergekit_ext.cli import main\n"
        f"try:\n    main({args!r}, standalone_mode=False)\nexcept (SystemExit, click.ClickException):\n    pass\n"
        "print(sorted(m for m in ('torch', 'mergekit', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mergekit_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_import_mergekit_ext_is_light_and_still_registers():
    code = (
        "import sys, mergekit_ext\n"
        "print('torch' in sys.modules, 'mergekit' in sys.modules)\n"
        "import mergekit.merge_methods as m\n"
        "print(' '.join(x.spec.name for x in m.registered_methods()))"
    )
    # -S: no .pth processing, so only `import mergekit_ext` can register
    env = mergekit_env()
    site = [p for p in sys.path if p.endswith("site-packages")]
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *site])
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    first, names = result.stdout.strip().splitlines()[-2:]
    assert first == "False False"
    assert {"consensus_ta", "cart", "adarank", "opcm", "rmm"} <= set(names.split())


def test_merge_declares_mergekit_options_as_mergekit_does():
    """`merge` reads mergekit's options from a stored table; it must equal mergekit's own (plus -q)."""
    import click
    from mergekit.options import add_merge_options

    from mergekit_ext.merge.cli import merge_command
    from mergekit_ext.merge.options import OPTIONS_PATH, live_options

    assert json.loads(OPTIONS_PATH.read_text(encoding="utf-8"))["options"] == live_options(), "regenerate it: python -m mergekit_ext.merge.options"

    def described(param):
        kind = "size" if param.name == "out_shard_size" else param.type.name
        return (param.opts, param.secondary_opts, kind, param.count, param.is_flag, param.help)

    theirs = {p.name: described(p) for p in click.command()(add_merge_options(lambda **_: None)).params}
    ours = {p.name: described(p) for p in merge_command.params if p.name in theirs}
    assert ours.pop("quiet")[0] == ["-q", "--quiet"] and theirs.pop("quiet")[0] == ["--quiet"]
    assert ours == theirs


def test_merge_reports_a_missing_config_file_before_importing_mergekit(tmp_path):
    from mergekit_ext.cli import main

    result = CliRunner().invoke(main, ["merge", str(tmp_path / "missing.yml"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "missing.yml' does not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_methods_catalog_is_up_to_date():
    from mergekit_ext.registry import CATALOG_PATH, live_catalog

    stored = json.loads(CATALOG_PATH.read_text(encoding="utf-8"))["methods"]
    assert stored == live_catalog(), "regenerate it: python -m mergekit_ext.registry"


# ---------------------------------------------------------------------------
# item 4: parameter names the method does not have are refused


def _config(method, parameters=None, model_parameters=None, base=True):
    config = {
        "merge_method": method,
        "models": [{"model": "./a", "parameters": dict(model_parameters or {})}, {"model": "./b"}],
        "parameters": dict(parameters or {}),
        "dtype": "float32",
    }
    if base:
        config["base_model"] = "./base"
    return config


@pytest.mark.parametrize(
    "method, parameters, model_parameters, message",
    [
        ("consensus_ta", {"lambdaa": 1.3}, None, "consensus_ta has no parameter 'lambdaa'; did you mean 'lambda'?"),
        ("cart", {"rank_ration": 0.1}, None, "did you mean 'rank_ratio'?"),
        ("opcm", {"alpah": 0.5}, None, "did you mean 'alpha'?"),
        ("ties", {"densty": 0.5}, None, "ties has no parameter 'densty'; did you mean 'density'?"),  # mergekit's own
        ("task_arithmetic", None, {"wieght": 1.0}, "models[0] (./a): task_arithmetic has no parameter 'wieght'; did you mean 'weight'?"),
        ("consensus_ta", None, {"k": 1}, "'k' is a global parameter of consensus_ta"),
        ("linear", {"foo": 1}, None, "linear has no parameter 'foo' (its parameters: weight, normalize)"),
    ],
)
def test_unknown_parameter_names_are_refused(method, parameters, model_parameters, message):
    from mergekit_ext.engine import validate_config
    from mergekit_ext.merge.preflight import check_parameter_names

    config = validate_config(_config(method, parameters, model_parameters))
    with pytest.raises(ValueError) as error:
        check_parameter_names(config)
    assert message in str(error.value)


def test_known_parameter_names_pass_and_globals_may_set_per_model_defaults():
    from mergekit_ext.engine import validate_config
    from mergekit_ext.merge.preflight import check_parameter_names

    check_parameter_names(validate_config(_config("consensus_ta", {"k": 2, "lambda": 0.5, "weight": 1.0}, {"tall_lambda": 0.4})))
    check_parameter_names(validate_config(_config("ties", {"density": 0.5, "lambda": 1.0, "normalize": True}, {"weight": 0.5})))


def test_unknown_method_gets_a_suggestion():
    from mergekit_ext.engine import validate_config
    from mergekit_ext.merge.preflight import check_parameter_names

    with pytest.raises(ValueError, match="unknown merge_method 'consensus_tx'; did you mean 'consensus_ta'"):
        check_parameter_names(validate_config(_config("consensus_tx")))


@pytest.mark.slow
def test_merge_command_refuses_a_misspelled_parameter_before_writing(tmp_path):
    import yaml

    from mergekit_ext.cli import main

    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config("consensus_ta", {"lambdaa": 1.3})))
    result = CliRunner().invoke(main, ["merge", str(config), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "did you mean 'lambda'?" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_mistyped_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    from mergekit_ext.merge.preflight import _looks_local

    (tmp_path / "zoo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _looks_local("zoo/bsae")  # "zoo" is a local folder: a typo, not org/name on the Hub
    assert not _looks_local("meta-llama/Llama-3.2-1B")


# ---------------------------------------------------------------------------
# items 1 and 5: the report shows stderr and marks models below the base


def _report():
    def entry(accuracy, stderr):
        mean = sum(accuracy.values()) / len(accuracy)
        return {
            "model": "m",
            "accuracy": accuracy,
            "stderr": stderr,
            "normalized_accuracy": {t: a / 0.9 for t, a in accuracy.items()},
            "mean_accuracy": mean,
            "mean_stderr": 0.02,
            "mean_normalized_accuracy": mean / 0.9,
        }

    se = {"a": 0.03, "b": 0.03}
    return {
        "split": "test",
        "metric": "acc,none",
        "chance": 0.25,
        "tasks": ["a", "b"],
        "models": {
            "base": entry({"a": 0.70, "b": 0.60}, se),
            "expert": entry({"a": 0.90, "b": 0.90}, se),
            "good": entry({"a": 0.80, "b": 0.75}, se),
            "worse": entry({"a": 0.55, "b": 0.65}, se),
        },
    }


def test_table_shows_stderr_and_marks_below_base():
    from mergekit_ext.evaluate.report import (
        BELOW_BASE,
        below_base,
        format_markdown,
        format_table,
        table_rows,
    )

    report = _report()
    header, rows = table_rows(report)
    assert header == ["task", "base", "expert", "good", "worse"]
    by_task = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_task["a"]["base"] == "0.700±0.030"
    assert by_task["a"]["good"] == "0.800±0.030 (0.89)"
    assert by_task["a"]["worse"].endswith(BELOW_BASE) and by_task["a"]["worse"].startswith("0.550±0.030")
    assert not by_task["b"]["worse"].endswith(BELOW_BASE)  # 0.65 > base 0.60
    assert by_task["mean"]["worse"].endswith(BELOW_BASE)  # mean 0.60 < the base's 0.65
    assert [(m, t) for m, t, *_ in below_base(report)] == [("worse", "a")]
    text = format_table(report)
    assert "± standard error" in text and "acc,none" not in text.splitlines()[0]
    assert "worse scores below the base" in text and "a 0.550 < 0.700, 3.5 stderr" in text
    assert "good scores below" not in text
    assert "below the base" in format_markdown(report)


def test_chart_is_zoomed_with_chance_note(tmp_path):
    from mergekit_ext.evaluate.report import chart_limits, palette, write_chart

    report = _report()
    bottom, top = chart_limits(report)
    assert 0.4 <= bottom <= 0.5 and top == 1.0
    assert len(set(palette(12))) == 12
    path = write_chart(report, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# item 9: files other users can read, clear messages


def test_written_weights_are_readable_like_config(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mergekit_ext import io

    umask = os.umask(0o022)
    try:
        with io.atomic_output_dir(tmp_path / "out") as staging:
            save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))  # safetensors writes 0600
            io.write_json(staging / "config.json", {})
        with io.atomic_file(tmp_path / "single.safetensors") as temporary:
            save_file({"w": torch.zeros(2)}, str(temporary))
    finally:
        os.umask(umask)
    for path in (tmp_path / "out" / "model.safetensors", tmp_path / "out" / "config.json", tmp_path / "single.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_written_adapter_has_card_and_relative_base(tmp_path):
    import torch

    from mergekit_ext import io
    from mergekit_ext.adapters import peft_io

    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    factors = {"model.layers.0.self_attn.q_proj": peft_io.LoraFactors(a=torch.ones(2, 4), b=torch.ones(4, 2))}
    with io.atomic_output_dir(tmp_path / "adapters" / "merged") as staging:
        peft_io.write_adapter(staging, factors, base_model=str(base))
    folder = tmp_path / "adapters" / "merged"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.join("..", "..", "models", "base")
    assert (folder / config["base_model_name_or_path"]).resolve() == base.resolve()
    card = (folder / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "add_special_tokens=False" in card


@pytest.mark.slow
def test_eval_names_a_missing_folder(tmp_path):
    from mergekit_ext.cli import main

    result = CliRunner().invoke(main, ["eval", str(tmp_path / "nonexistent"), "--tasks", "x", "--include-path", str(tmp_path)])
    assert result.exit_code != 0
    assert "does not exist" in result.output


@pytest.mark.slow
def test_every_command_has_quiet_and_verbose():
    import click

    from mergekit_ext.cli import main

    def leaves(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from leaves(sub, path + [name])
        else:
            yield path

    for path in leaves(main, []):
        result = CliRunner().invoke(main, path + ["--help"])
        assert "--quiet" in result.output and "-v" in result.output, path
