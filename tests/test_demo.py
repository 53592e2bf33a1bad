"""`mergekit-ext demo`: every method on a hard-regime (generation) zoo, settings chosen with the zoo's own scorer."""

from __future__ import annotations

import pytest

from mergekit_ext.demo.run import (
    DEMO_GRIDS,
    DEMO_MERGES,
    DEMO_PRESET,
    MULTIPLE_CHOICE_MERGES,
    merges_for,
)
from mergekit_ext.zoo import PRESETS, build_zoo


@pytest.fixture(scope="module")
def hard_zoo(tmp_path_factory):
    # the same folder as test_zoo.py's fixture: built once per session
    return build_zoo(tmp_path_factory.getbasetemp() / "zoo-hard-test", preset="hard-test", progress=False)


def test_demo_runs_every_method_on_a_generation_zoo():
    from mergekit_ext.registry import catalog

    ours = {spec["name"] for spec in catalog()}
    for merges in (DEMO_MERGES, MULTIPLE_CHOICE_MERGES):
        methods = {method for _, method, _ in merges}
        assert ours | {"task_arithmetic", "ties"} <= methods, sorted(ours - methods)
    assert PRESETS[DEMO_PRESET].kind == "generation"
    assert merges_for("generation") is DEMO_MERGES and merges_for("multiple_choice") is MULTIPLE_CHOICE_MERGES
    labels = {label for label, _, _ in DEMO_MERGES}
    assert set(DEMO_GRIDS) <= labels
    # the grids search around the settings the demo runs
    for label, method, parameters in DEMO_MERGES:
        for name, values in DEMO_GRIDS.get(label, {}).items():
            assert parameters[name] in values, (label, name)


@pytest.mark.slow
def test_tune_chooses_on_validation_exact_match(hard_zoo):
    """`demo --tune` scores candidates with the zoo's own scorer: generation exact match here."""
    import torch
    from transformers import AutoTokenizer

    from mergekit_ext.demo.run import tune
    from mergekit_ext.modeling import load_state_dict
    from mergekit_ext.zoo import exact_match, load_causal_lm, merge_in_memory

    merges = [("task_arithmetic", "task_arithmetic", {"weight": 1.0, "lambda": 0.5})]
    grid = (0.4, 1.0)
    winners = tune(hard_zoo.root, merges=merges, grids={"task_arithmetic": {"lambda": grid}}, progress=False)
    chosen = winners["task_arithmetic"]
    assert chosen["metric"] == "exact_match"

    tokenizer = AutoTokenizer.from_pretrained(str(hard_zoo.base))
    base = load_state_dict(hard_zoo.base)
    experts = {t: load_state_dict(hard_zoo.expert(t)) for t in hard_zoo.tasks}
    model = load_causal_lm(hard_zoo.base, "cpu")
    scores = {}
    for scale in grid:
        with torch.no_grad():
            model.load_state_dict(merge_in_memory(base, experts, "task_arithmetic", {"weight": 1.0, "lambda": scale}))
        scores[scale] = sum(exact_match(model, tokenizer, hard_zoo.documents(t, "validation")) for t in hard_zoo.tasks) / len(hard_zoo.tasks)
    best = max(grid, key=lambda s: scores[s])  # first best, as tune keeps the first of equals
    assert chosen["parameters"]["lambda"] == best
    assert chosen["validation_score"] == pytest.approx(scores[best])
    assert [row["parameters"]["lambda"] for row in chosen["grid"]] == list(grid)
    assert [row["validation_score"] for row in chosen["grid"]] == pytest.approx([scores[scale] for scale in grid])


@pytest.mark.slow
def test_demo_on_a_generation_zoo_reports_exact_match(hard_zoo, tmp_path):
    from mergekit_ext.demo.run import run_demo

    merges = [entry for entry in DEMO_MERGES if entry[0] in ("task_arithmetic", "tsv_m")]
    notes = []
    report = run_demo(hard_zoo.root, tmp_path / "out", merges=merges, preset="hard-test", progress=False, echo=notes.append)
    assert report["metric"] == "exact_match,none" and report["chance"] is None
    assert set(report["models"]) == {"base", "expert", "task_arithmetic", "tsv_m"}
    for label in ("task_arithmetic", "tsv_m"):
        for task in hard_zoo.tasks:
            lm = report["models"][label]["lm_eval"][report["lm_eval_tasks"][task]]
            assert report["models"][label]["accuracy"][task] == lm["exact_match,none"]
    assert set(report["demo"]["phase_seconds"]) == {"merge", "evaluate"}
    assert any("demo finished in" in note for note in notes)
    assert (tmp_path / "out" / "report.md").is_file()


def test_demo_summary_fits_100_columns_with_methods_as_rows():
    """Issue 31 item 7: a dozen merges of 8 tasks, the worst case of tasks below the base, fit 100 columns."""
    from mergekit_ext.evaluate.report import BELOW_BASE, format_summary, summary_rows

    tasks = list(PRESETS[DEMO_PRESET].tasks)

    def entry(score, below=0):
        accuracy = {task: (0.1 if index < below else score) for index, task in enumerate(tasks)}
        stderr = {task: 0.035 for task in tasks}
        mean = sum(accuracy.values()) / len(tasks)
        return {"accuracy": accuracy, "stderr": stderr, "mean_accuracy": mean, "mean_stderr": 0.0123,
                "normalized_accuracy": {t: a / 0.9 for t, a in accuracy.items()}, "mean_normalized_accuracy": mean / 0.9}

    models = {"base": entry(0.4), "expert": entry(0.9)}
    for index, (label, _, _) in enumerate(DEMO_MERGES):
        models[label] = entry(0.7, below=index % 9)  # 0 … 8 tasks below the base
    report = {"split": "test", "metric": "exact_match,none", "chance": None, "tasks": tasks, "models": models}
    text = format_summary(report)
    assert max(len(line) for line in text.splitlines()) <= 100, text
    rows = {row[0]: row for row in summary_rows(report)}
    assert list(rows) == list(models)  # methods as rows, in the report's order
    assert rows["task_arithmetic"][1:] == ["0.700 ± 0.012", "0.78", "none"]
    assert rows["ties"][3] == f"1 of 8: {tasks[0]}"
    assert rows["rmm"][3] == "5 of 8" and rows["rmm"][1].endswith(BELOW_BASE)  # mean below the base too
