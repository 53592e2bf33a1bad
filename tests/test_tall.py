"""TALL-mask compression bundles and `mergekit-ext merge` preflight."""

import pytest
import torch
from conftest import invoke
from transformers import AutoModelForCausalLM

from mergekit_ext.methods.consensus.format import pack_mask, unpack_mask
from mergekit_ext.methods.consensus.kernel import tall_masks
from mergekit_ext.modeling import load_state_dict


def test_pack_unpack_round_trip():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (13, 5), (3, 4, 5)]:
        mask = torch.rand(shape, generator=generator) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.slow
def test_compress_recover_round_trip(tiny_family, tmp_path):
    bundle = tmp_path / "bundle"
    result = invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tiny_family["ft1"], tiny_family["ft2"], bundle)
    assert result.exit_code == 0, result.output
    assert "% of the inputs" in result.output and "ft1" in result.output

    result = invoke("tall", "recover", bundle, "ft1", tmp_path / "ft1")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ft1", dtype=torch.float32)
    assert model is not None
    recovered = load_state_dict(tmp_path / "ft1")
    base = load_state_dict(tiny_family["base"])
    models = [load_state_dict(tiny_family[n]) for n in ("ft0", "ft1", "ft2")]
    for name, tensor in base.items():
        vectors = torch.stack([m[name] - tensor for m in models])
        multitask = vectors.sum(0)
        expected = tensor + tall_masks(vectors, multitask, [0.4] * 3)[1] * multitask
        torch.testing.assert_close(recovered[name], expected, msg=name)


@pytest.mark.slow
def test_single_model_bundle_recovers_exactly(tiny_family, tmp_path):
    bundle = tmp_path / "one"
    assert invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft2"], bundle).exit_code == 0
    assert invoke("tall", "recover", bundle, "ft2", tmp_path / "out").exit_code == 0
    recovered, original = load_state_dict(tmp_path / "out"), load_state_dict(tiny_family["ft2"])
    for name in original:
        torch.testing.assert_close(recovered[name], original[name], msg=name)


@pytest.mark.slow
def test_bundle_without_content_hashes_is_refused_in_one_line(tiny_family, tmp_path):
    # recover checks the base by its content hash: a manifest without one is refused, nothing written
    import json

    bundle = tmp_path / "bundle"
    assert invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tiny_family["ft1"], bundle).exit_code == 0
    manifest = json.loads((bundle / "bundle.json").read_text())
    for entry in [manifest["base"], *manifest["tasks"]]:
        entry["hash"] = entry.pop("content_hash")
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    result = invoke("tall", "recover", bundle, "ft1", tmp_path / "new")
    assert result.exit_code != 0 and "no content_hash" in result.output and "bundle.json" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


@pytest.mark.slow
def test_recover_against_another_base_is_refused(tiny_family, tmp_path):
    bundle = tmp_path / "bundle"
    assert invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tiny_family["ft1"], bundle).exit_code == 0
    result = invoke("tall", "recover", bundle, "ft0", tmp_path / "out", "--base", tiny_family["ft2"])
    assert result.exit_code != 0
    assert "not the model this bundle was compressed against" in result.output
    assert not (tmp_path / "out").exists()
    result = invoke("tall", "recover", bundle, "nope", tmp_path / "out")
    assert result.exit_code != 0 and "not in bundle" in result.output


@pytest.mark.slow
def test_compress_refuses_missing_path_and_leaves_nothing(tiny_family, tmp_path):
    result = invoke("tall", "compress", "--base", tiny_family["base"], tiny_family["ft0"], tmp_path / "missing", tmp_path / "b")
    assert result.exit_code != 0
    assert "does not exist" in result.output
    assert not (tmp_path / "b").exists()
    assert not any(p.name.startswith(".b.partial") for p in tmp_path.iterdir())


def _write_yaml(path, config):
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_merge_command_preflight_refuses_shape_mismatch(tiny_family, tmp_path):
    from mergekit_ext.modeling import (
        char_tokenizer,
        llama_config,
        random_model,
        save_model,
    )

    tokenizer = char_tokenizer()
    wide = save_model(random_model(llama_config(len(tokenizer), hidden_size=48)), tmp_path / "wide", tokenizer)
    config = _write_yaml(
        tmp_path / "c.yml",
        {"merge_method": "consensus_ta", "base_model": str(tiny_family["base"]),
         "models": [{"model": str(tiny_family["ft0"])}, {"model": str(wide)}]},
    )
    result = invoke("merge", config, tmp_path / "out", "--no-write-model-card", "--quiet")
    assert result.exit_code != 0
    assert "do not share an architecture" in result.output and "wide" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merge_command_writes_atomically(tiny_family, tmp_path):
    config = _write_yaml(
        tmp_path / "c.yml",
        {"merge_method": "consensus_ta", "base_model": str(tiny_family["base"]), "dtype": "float32",
         "models": [{"model": str(tiny_family[n])} for n in ("ft0", "ft1", "ft2")]},
    )
    result = invoke("merge", config, tmp_path / "out", "--no-write-model-card", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()
    result = invoke("merge", config, tmp_path / "out", "--no-write-model-card", "--quiet")
    assert result.exit_code != 0 and "already exists" in result.output
