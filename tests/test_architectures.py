"""Every method and command on every layout of ``modeling.ARCHITECTURES`` (tiny random models
built here, no hub): each cell works (the input's tensor names, a model transformers loads,
finite logits, the method's identity where benchmarks/architectures.py checks one) or refuses
with one line. The committed benchmarks/results/architectures.json, and the README table
rendered from it (docs/architectures.md), must say what this run sees."""

from __future__ import annotations

import json

import pytest

from benchmarks import architectures as matrix
from mergekit_ext.modeling import ARCHITECTURES

RESULTS = json.loads(matrix.RESULTS.with_suffix(".json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    built = {}

    def family(architecture):
        if architecture not in built:
            built[architecture] = matrix.Family(architecture, root / architecture)
        return built[architecture]

    return family


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("cell", list(matrix.CELLS))
def test_cell(families, architecture, cell):
    verdict = families(architecture).cell(cell)
    assert verdict.status in ("works", "refuses"), f"{cell} on {architecture}: {verdict.status}: {verdict.detail}"
    if verdict.status == "refuses":
        assert verdict.detail and "\n" not in verdict.detail
    assert verdict.as_dict() == RESULTS["results"][architecture][cell], (
        f"{cell} on {architecture} now {verdict.as_dict()}; rerun `python -m benchmarks.architectures --readme`"
    )


def test_results_file_covers_the_matrix():
    assert RESULTS["architectures"] == ARCHITECTURES
    assert RESULTS["cells"] == list(matrix.CELLS)
    assert set(RESULTS["results"]) == set(ARCHITECTURES)
    assert all(set(row) == set(matrix.CELLS) for row in RESULTS["results"].values())


def test_readme_table_is_the_results_file():
    from benchmarks import render_readme

    page = render_readme.table_file("architectures")
    assert page is not None, "neither README.md nor docs/*.md has the architectures table markers"
    text = page.read_text(encoding="utf-8")
    assert "architectures" not in render_readme.stale_tables(text), f"{page.name}'s table differs: run `python -m benchmarks.render_readme`"


def test_a_failed_check_is_not_a_pass(tmp_path):
    """The checks can fail: a model with a dropped tensor, or other weights, is caught."""
    from safetensors.torch import load_file, save_file

    from mergekit_ext.modeling import char_tokenizer, llama_config, save_family

    paths = save_family(tmp_path, llama_config(len(char_tokenizer()), layers=1), char_tokenizer(), count=1)
    matrix.check_model(paths["ft0"], paths["base"])
    with pytest.raises(matrix.CheckFailed, match="is not the base"):
        matrix.check_equal(paths["ft0"], matrix._state(paths["base"]), "the base")
    file = paths["ft0"] / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.norm.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(matrix.CheckFailed, match="missing .*model.norm.weight"):
        matrix.check_model(paths["ft0"], paths["base"])
