"""Evaluation with the real lm-eval harness, the reports, and the demo's merges through mergekit."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_model

from mergekit_ext.evaluate import (
    EvaluationError,
    ModelSpec,
    compare_on_zoo,
    lm_eval_results,
)
from mergekit_ext.zoo import multiple_choice_accuracy


def _tokenizer(zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(zoo.base))


@pytest.mark.slow
def test_lm_eval_agrees_with_in_process_scorer(test_zoo):
    """lm-eval's acc on a model folder equals the zoo's scorer (same requests, same argmax)."""
    tasks = [test_zoo.lm_eval_task(t) for t in test_zoo.tasks[:2]]
    results = lm_eval_results(test_zoo.base, tasks, test_zoo.task_dir)
    model = load_model(test_zoo.base)
    for task, lm_task in zip(test_zoo.tasks[:2], tasks):
        assert results[lm_task]["n-samples"]["effective"] == len(test_zoo.documents(task, "test"))
        expected = multiple_choice_accuracy(model, _tokenizer(test_zoo), test_zoo.documents(task, "test"))
        assert results[lm_task]["acc,none"] == pytest.approx(expected)


@pytest.mark.slow
def test_base_plus_peft_adapter_evaluation(test_zoo):
    """`BASE+ADAPTER` runs lm-eval with peft=...; the score is the adapted model's, not the base's."""
    from peft import PeftModel

    task = max(test_zoo.tasks, key=lambda t: test_zoo.manifest["metrics"]["adapters"][t]["test"] - test_zoo.manifest["metrics"]["base"][t]["test"])
    spec = ModelSpec.parse(f"{test_zoo.base}+{test_zoo.adapter(task)}")
    assert spec.adapter == test_zoo.adapter(task)
    lm_task = test_zoo.lm_eval_task(task)
    result = lm_eval_results(spec, [lm_task], test_zoo.task_dir)[lm_task]["acc,none"]
    adapted = PeftModel.from_pretrained(load_model(test_zoo.base), str(test_zoo.adapter(task))).eval()
    assert result == pytest.approx(multiple_choice_accuracy(adapted, _tokenizer(test_zoo), test_zoo.documents(task, "test")))
    assert result != pytest.approx(test_zoo.manifest["metrics"]["base"][task]["test"])


@pytest.mark.slow
def test_bad_inputs_are_named(test_zoo, tmp_path):
    with pytest.raises(EvaluationError, match="not a model folder"):
        lm_eval_results(tmp_path, ["zoo_next"], test_zoo.task_dir)
    with pytest.raises(EvaluationError, match="no_such_task"):
        lm_eval_results(test_zoo.base, ["no_such_task"], test_zoo.task_dir)
    with pytest.raises(EvaluationError, match="reserved"):
        compare_on_zoo(test_zoo.root, {"base": test_zoo.base})


@pytest.mark.slow
def test_demo_merges_run_through_mergekit_and_report(test_zoo, tmp_path):
    """The demo's merge list through mergekit's engine, evaluated with lm-eval, all reports written."""
    from mergekit_ext.demo.run import MULTIPLE_CHOICE_MERGES, run_demo
    from mergekit_ext.modeling import load_state_dict

    merges = [entry for entry in MULTIPLE_CHOICE_MERGES if entry[0] == "task_arithmetic"] + [("missing", "no_such_method", {})]
    notes = []
    report = run_demo(test_zoo.root, tmp_path / "out", merges=merges, preset="test", progress=False, echo=notes.append)
    assert report["demo"]["skipped"] == ["missing"] and any("no_such_method" in n for n in notes)

    # The merged model is task arithmetic: base + lambda * sum of task vectors.
    scale = merges[0][2]["lambda"]
    base = load_state_dict(test_zoo.base)
    experts = [load_state_dict(test_zoo.expert(t)) for t in test_zoo.tasks]
    merged = load_state_dict(tmp_path / "out" / "merges" / "task_arithmetic")
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        expected = base[name] + scale * sum(e[name] - base[name] for e in experts)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)

    models = report["models"]
    assert set(models) == {"base", "expert", "task_arithmetic"}
    for task in test_zoo.tasks:
        lm_task = report["lm_eval_tasks"][task]
        # lm-eval's numbers kept as they come, ours beside them.
        accuracy = models["task_arithmetic"]["lm_eval"][lm_task]["acc,none"]
        assert models["task_arithmetic"]["accuracy"][task] == accuracy
        expert = models["expert"]["accuracy"][task]
        assert models["task_arithmetic"]["normalized_accuracy"][task] == pytest.approx(accuracy / expert)
        assert expert == pytest.approx(test_zoo.manifest["metrics"]["experts"][task][task]["test"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["models"]["task_arithmetic"]["accuracy"] == models["task_arithmetic"]["accuracy"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| task |" in markdown and "task_arithmetic" in markdown and "mean" in markdown
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Base and experts are cached in the zoo: one file per (model, task).
    assert len(list((test_zoo.root / "evals").glob("*.json"))) >= 2 * len(test_zoo.tasks)


@pytest.mark.slow
def test_eval_command_uses_cache_and_writes_files(test_zoo, tmp_path):
    from mergekit_ext.cli import main

    expert = test_zoo.expert(test_zoo.tasks[0])
    result = CliRunner().invoke(main, ["eval", f"first={expert}", "--zoo", str(test_zoo.root), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "first" in result.output and "base" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # The first expert, evaluated as a "merged" model, scores exactly the expert on its own task.
    assert report["models"]["first"]["normalized_accuracy"][test_zoo.tasks[0]] == pytest.approx(1.0)
    for name in ("report.md", "report.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    bad = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--zoo", str(test_zoo.root)])
    assert bad.exit_code != 0 and "not a model folder" in bad.output


@pytest.mark.slow
def test_recipes_match_demo_merges_and_run_in_stock_mergekit_yaml(test_zoo, tmp_path):
    """recipes/<method>.yml is DEMO_MERGES' config on ./demo-zoo (what `mergekit-ext demo` leaves), and runs as its header says."""
    import shutil
    import subprocess

    import yaml
    from conftest import REPO_ROOT, mergekit_env

    from mergekit_ext.demo.run import DEMO_MERGES, DEMO_PRESET, recipe_config
    from mergekit_ext.zoo import PRESETS

    ours = {"task_arithmetic", "ties", "consensus_ta", "consensus_ties", "opcm"}
    for label, method, parameters in DEMO_MERGES:
        if label in ours:
            recipe = yaml.safe_load((REPO_ROOT / "recipes" / f"{label}.yml").read_text())
            assert recipe == recipe_config(method, parameters, PRESETS[DEMO_PRESET].tasks), label
    # The test zoo's models stand in for the demo zoo's (same architecture); the LoRA recipe uses ./zoo.
    assert PRESETS["test"].tasks == PRESETS["demo"].tasks
    (tmp_path / "zoo").symlink_to(test_zoo.root)
    demo_zoo = tmp_path / "demo-zoo"
    (demo_zoo / "experts").mkdir(parents=True)
    (demo_zoo / "base").symlink_to(test_zoo.base)
    for index, task in enumerate(PRESETS[DEMO_PRESET].tasks):
        (demo_zoo / "experts" / task).symlink_to(test_zoo.expert(test_zoo.tasks[index % len(test_zoo.tasks)]))
    shutil.copytree(REPO_ROOT / "recipes", tmp_path / "recipes")
    # Every recipe names only models and adapters that the zoo has.
    for recipe_path in sorted((tmp_path / "recipes").glob("*.yml")):
        recipe = yaml.safe_load(recipe_path.read_text())
        references = [recipe.get("base_model")] + [entry["model"] for entry in recipe.get("models", [])]
        for reference in filter(None, references):
            for part in reference.split("+"):
                assert (tmp_path / part).is_dir(), f"{recipe_path.name}: {part} is not in the zoo"
    result = subprocess.run(
        [shutil.which("mergekit-yaml") or "mergekit-yaml", "recipes/consensus_ta.yml", "out/consensus_ta", "--no-write-model-card", "--quiet"],
        cwd=tmp_path, env=mergekit_env(), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "consensus_ta" / "config.json").is_file()


@pytest.mark.slow
def test_a_model_holding_nan_is_refused_not_scored_at_chance(test_zoo, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(test_zoo.base, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    task = test_zoo.lm_eval_task(test_zoo.tasks[0])
    with pytest.raises(EvaluationError, match=f"tensor {name} holds NaN or Inf"):
        lm_eval_results(broken, [task], test_zoo.task_dir, limit=4)


@pytest.mark.slow
def test_eval_outside_a_git_checkout_prints_no_git_error(test_zoo, tmp_path):
    """lm-eval asks git for a commit hash; outside a repository that must not reach the user's stderr."""
    import subprocess
    import sys

    from conftest import mergekit_env

    task = test_zoo.tasks[0]
    command = [
        sys.executable, "-c", "from mergekit_ext.cli import main; main()", "eval", str(test_zoo.expert(task)),
        "--tasks", f"zoo_{task}_val", "--include-path", str(test_zoo.task_dir),  # no zoo cache: lm-eval really runs
    ]
    result = subprocess.run(command, cwd=tmp_path, env=mergekit_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"zoo_{task}_val" in result.stdout
    assert "fatal:" not in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
