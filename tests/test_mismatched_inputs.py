"""Inputs that do not quite match, through ``mergekit-ext merge`` and the package's commands:

* a different vocabulary (added tokens): refused before anything is written unless the config
  sets ``tokenizer_source`` (or ``tokenizer``), with which mergekit aligns embeddings by token;
* a different number of layers in a ``models:`` merge: refused before anything is written;
* bfloat16 experts on a float32 base: merged in float32, exactly as their float32 copies,
  written in the config's ``dtype`` (else the base model's), with a note;
* sharded inputs with an index file: the same merge as unsharded ones; an index that names a
  missing shard is refused before anything is written.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from conftest import invoke, load_model, model_logits

from mergekit_ext.modeling import (
    char_tokenizer,
    chat_tokenizer,
    llama_config,
    load_state_dict,
    perturbed,
    random_model,
    save_family,
    save_model,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatched")
    tokenizer = char_tokenizer()
    config = llama_config(len(tokenizer))
    paths = save_family(root, config, tokenizer, count=1)
    base = random_model(config, seed=0)
    expert = perturbed(base, seed=7)
    paths["expert"] = save_model(expert, root / "expert", tokenizer)
    paths["bf16"] = save_model(perturbed(base, seed=7).to(torch.bfloat16), root / "bf16", tokenizer)
    paths["bf16-as-f32"] = save_model(perturbed(base, seed=7).to(torch.bfloat16).float(), root / "bf16-as-f32", tokenizer)
    expert.save_pretrained(root / "sharded", max_shard_size="20KB")
    tokenizer.save_pretrained(root / "sharded")
    paths["sharded"] = root / "sharded"
    added = chat_tokenizer()  # two more tokens
    grown = perturbed(base, seed=8)
    grown.resize_token_embeddings(len(added), mean_resizing=False)
    paths["added"] = save_model(grown, root / "added", added)
    paths["deep"] = save_model(random_model(llama_config(len(tokenizer), layers=3), seed=0), root / "deep", tokenizer)
    return paths


def _merge(models, tmp_path, other, *, name="out", method="task_arithmetic", parameters=None, **settings):
    config = {
        "merge_method": method, "base_model": str(models["base"]),
        "models": [{"model": str(models["ft0"]), "parameters": {"weight": 1.0}}, {"model": str(models[other]), "parameters": {"weight": 1.0}}],
        "parameters": parameters or {}, **settings,
    }  # fmt: skip
    file = tmp_path / f"{name}.yml"
    file.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    return invoke("merge", file, out), out


def _refused(result, out, *words):
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists()


def test_a_different_vocabulary_is_refused_without_a_tokenizer_setting(models, tmp_path):
    result, out = _merge(models, tmp_path, "added", dtype="float32")
    _refused(result, out, "vocabulary size 87", "85", "tokenizer_source")


@pytest.mark.parametrize("source, size", [("union", 87), ("base", 85)])
def test_tokenizer_source_keeps_working_through_merge(models, tmp_path, source, size):
    from transformers import AutoTokenizer

    for method, parameters in (("task_arithmetic", {}), ("consensus_ta", {"k": 0})):
        result, out = _merge(models, tmp_path, "added", name=f"{method}-{source}", method=method, parameters=parameters, tokenizer_source=source, dtype="float32")
        assert result.exit_code == 0, result.output
        assert load_state_dict(out)["model.embed_tokens.weight"].shape[0] == size
        assert len(AutoTokenizer.from_pretrained(str(out))) == size
        assert load_model(out).config.vocab_size == size
        assert torch.isfinite(model_logits(out)).all()


def test_a_different_number_of_layers_is_refused(models, tmp_path):
    result, out = _merge(models, tmp_path, "deep", dtype="float32")
    _refused(result, out, "has 3 layers", "has 2", "slices:")


@pytest.mark.parametrize("dtype, written", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_bf16_experts_on_a_float32_base_merge_as_their_float32_copies(models, tmp_path, dtype, written):
    settings = {"dtype": dtype} if dtype else {}
    result, out = _merge(models, tmp_path, "bf16", name="bf16", method="consensus_ta", parameters={"k": 0}, **settings)
    assert result.exit_code == 0, result.output
    assert "models store different dtypes" in result.output and "merged in float32" in result.output
    reference_result, reference = _merge(models, tmp_path, "bf16-as-f32", name="f32", method="consensus_ta", parameters={"k": 0}, **settings)
    assert reference_result.exit_code == 0 and "different dtypes" not in reference_result.output
    merged, expected = load_state_dict(out), load_state_dict(reference)
    assert merged.keys() == expected.keys()
    for name in merged:
        assert merged[name].dtype == written
        assert torch.equal(merged[name], expected[name]), name


def test_sharded_inputs_merge_as_unsharded_ones(models, tmp_path):
    assert len(list(models["sharded"].glob("*.safetensors"))) > 1
    result, sharded = _merge(models, tmp_path, "sharded", name="sharded", method="cart", dtype="float32")
    assert result.exit_code == 0, result.output
    result, single = _merge(models, tmp_path, "expert", name="single", method="cart", dtype="float32")
    assert result.exit_code == 0, result.output
    merged, expected = load_state_dict(sharded), load_state_dict(single)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[name], expected[name]) for name in merged)
    # The package's own commands read the index too.
    for model, state in (("sharded", tmp_path / "state-sharded"), ("expert", tmp_path / "state-single")):
        assert invoke("continual", "init", state, models[model], "--base", models["base"]).exit_code == 0
    first, second = load_state_dict(tmp_path / "state-sharded"), load_state_dict(tmp_path / "state-single")
    assert all(torch.equal(first[name], second[name]) for name in second)


def test_an_index_naming_a_missing_shard_is_refused(models, tmp_path):
    broken = shutil.copytree(models["sharded"], tmp_path / "broken")
    missing = sorted(broken.glob("model-*.safetensors"))[1]
    missing.unlink()
    models = {**models, "broken": broken}
    result, out = _merge(models, tmp_path, "broken", dtype="float32")
    _refused(result, out, "names shard", missing.name)


def test_the_packages_commands_refuse_a_different_vocabulary(models, tmp_path):
    result = invoke("tall", "compress", "--base", models["base"], models["ft0"], models["added"], tmp_path / "bundle")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "(87, 32)" in result.output and "does not match (85, 32)" in result.output
    assert not (tmp_path / "bundle").exists()
