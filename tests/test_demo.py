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
