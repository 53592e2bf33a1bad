"""RMM: closed-form basis kernels, bundles of peft adapters, reverting, the dense mergekit form."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import model_logits, random_adapter

from mergekit_ext.adapters import peft_io as lora
from mergekit_ext.cli import main
from mergekit_ext.methods.rmm import kernel as rmm
from mergekit_ext.modeling import (
    char_tokenizer,
    llama_config,
    load_state_dict,
    random_model,
    save_model,
)

TASKS = ("reverse", "sort", "shift")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base and three adapters; two share a LoRA init (a common frame), one has rank 2."""
    root = tmp_path_factory.mktemp("rmm_family")
    tokenizer = char_tokenizer()
    base = save_model(random_model(llama_config(len(tokenizer)), seed=0), root / "base", tokenizer)
    paths = {
        "reverse": random_adapter(base, root / "reverse", seed=11, init_seed=7, rank=4, alpha=8.0),
        "sort": random_adapter(base, root / "sort", seed=12, init_seed=7, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "up_proj")),
        "shift": random_adapter(base, root / "shift", seed=13, rank=2, alpha=16.0, use_rslora=True),
    }
    return {"base": base, **paths}


def logits(base, adapter=None, *, model_path=None):
    return model_logits(model_path or base, adapter)


def test_task_basis_is_the_best_rank_k_fit():
    torch.manual_seed(0)
    vectors = torch.randn(5, 40)
    for k in range(1, 6):
        basis, coefficients = rmm.task_basis(vectors, k)
        assert basis.shape == (k, 40) and coefficients.shape == (5, k)
        torch.testing.assert_close(coefficients.T @ coefficients, torch.eye(k), atol=1e-5, rtol=0)
        # Eckart–Young on the task axis: same as the rank-k SVD truncation
        u, s, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close((coefficients @ basis).double(), best, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="k must be between 1 and the number of tasks"):
        rmm.task_basis(vectors, 6)


def test_position_variant_fits_at_least_as_well_as_factor():
    torch.manual_seed(1)
    a, b = torch.randn(4, 3, 10), torch.randn(4, 12, 3)
    for k in (1, 2, 3):
        per_factor = rmm.factor_basis(a, b, k)
        per_position = rmm.factor_basis(a, b, k, per_position=True)
        assert per_position["a_coef"].shape == (4, k, 3) and per_factor["a_coef"].shape == (4, k)
        error_factor = sum((rmm.factor_reconstruct(per_factor, t)[0] - a[t]).norm() ** 2 for t in range(4))
        error_position = sum((rmm.factor_reconstruct(per_position, t)[0] - a[t]).norm() ** 2 for t in range(4))
        assert error_position <= error_factor + 1e-4


def test_product_gram_matches_dense_inner_products():
    torch.manual_seed(2)
    a, b = torch.randn(3, 2, 7), torch.randn(3, 5, 2)
    dense = torch.stack([(b[i] @ a[i]).flatten() for i in range(3)]).double()
    torch.testing.assert_close(rmm.product_gram(a, b), dense @ dense.T)


@pytest.mark.slow
@pytest.mark.parametrize("variant,basis_rank", [("factor", None), ("position", None), ("product", 12)])
def test_k_equal_to_n_reconstructs_every_adapter(family, variant, basis_rank):
    adapters = [lora.read_adapter(family[name]) for name in TASKS]
    basis = rmm.build_basis(adapters, len(adapters), variant, basis_rank=basis_rank)
    errors = rmm.reconstruction_errors(basis, adapters)
    assert max(errors.values()) < 1e-5, errors
    for adapter in adapters:
        recovered = basis.reconstruct(adapter.name)
        for module in recovered:
            expected = adapter.delta(module) if module in adapter.modules else torch.zeros_like(recovered[module].delta())
            torch.testing.assert_close(recovered[module].delta(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_error_shrinks_as_k_grows_and_k1_is_one_scaled_adapter(family):
    adapters = [lora.read_adapter(family[name]) for name in TASKS]
    for variant in ("factor", "position", "product"):
        totals = [sum(rmm.reconstruction_errors(rmm.build_basis(adapters, k, variant), adapters).values()) for k in (1, 2, 3)]
        assert totals[0] > 0.1 and totals[0] >= totals[1] - 1e-6
    # K = 1, factor variant: every task is the same adapter times a per-task scale
    basis = rmm.build_basis(adapters, 1, "factor")
    module = "model.layers.0.self_attn.q_proj"
    first, second = (basis.reconstruct(name)[module].delta() for name in TASKS[:2])
    ratio = (first * second).sum() / (second * second).sum()
    torch.testing.assert_close(first, ratio * second, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_build_and_revert_give_the_original_logits_in_peft(family, tmp_path):
    runner = CliRunner()
    bundle = tmp_path / "bundle"
    adapters = [str(family[name]) for name in TASKS]
    result = runner.invoke(main, ["rmm", "build", "--base", str(family["base"]), *adapters, "-k", "3", str(bundle), "--all-variants"])
    assert result.exit_code == 0, result.output
    assert "storage:" in result.output and "factor" in result.output and "product" in result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["variant"] == "factor" and manifest["k"] == 3
    assert [task["name"] for task in manifest["tasks"]] == list(TASKS)
    assert manifest["tasks"][0]["content_hash"] == lora.adapter_hash(family["reverse"])
    assert max(manifest["reconstruction_error"].values()) < 1e-5
    assert sorted(p.name for p in bundle.iterdir()) == [".mergekit-ext", "basis_00", "basis_01", "basis_02", "coefficients.safetensors", "manifest.json"]

    for task in ("reverse", "shift"):
        out = tmp_path / f"reverted-{task}"
        result = runner.invoke(main, ["rmm", "revert", str(bundle), task, str(out)])
        assert result.exit_code == 0, result.output
        torch.testing.assert_close(logits(family["base"], out), logits(family["base"], family[task]), atol=1e-5, rtol=1e-5)
    # a full model folder: base + update, loads without peft
    merged = tmp_path / "merged-sort"
    result = runner.invoke(main, ["rmm", "revert", str(bundle), "sort", str(merged), "--merged"])
    assert result.exit_code == 0, result.output
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    torch.testing.assert_close(logits(None, model_path=merged), logits(family["base"], family["sort"]), atol=1e-5, rtol=1e-5)
    # inputs untouched
    assert manifest["tasks"][1]["content_hash"] == lora.adapter_hash(family["sort"])


@pytest.mark.slow
def test_named_tasks_lossy_k_and_refusals(family, tmp_path):
    runner = CliRunner()
    bundle = tmp_path / "bundle"
    adapters = [str(family[name]) for name in TASKS]
    result = runner.invoke(main, ["rmm", "build", "--base", str(family["base"]), *adapters, "-k", "1", str(bundle), "--variant", "position", "--names", "a,b,c"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [task["name"] for task in manifest["tasks"]] == ["a", "b", "c"]
    assert manifest["storage"]["ratio"] < 0.6 and min(manifest["reconstruction_error"].values()) > 0
    # the reverted adapter is the reconstruction, not the original
    out = tmp_path / "b"
    assert runner.invoke(main, ["rmm", "revert", str(bundle), "b", str(out)]).exit_code == 0
    _, basis = __import__("mergekit_ext.methods.rmm.format", fromlist=["read_bundle"]).read_bundle(bundle)
    reverted = lora.read_adapter(out)
    for module, factors in basis.reconstruct("b").items():
        torch.testing.assert_close(reverted.delta(module), factors.delta(), atol=1e-6, rtol=1e-5)

    result = runner.invoke(main, ["rmm", "revert", str(bundle), "sort", str(tmp_path / "x")])
    assert result.exit_code != 0 and "'sort' is not in" in result.output
    result = runner.invoke(main, ["rmm", "build", "--base", str(family["base"]), *adapters, "-k", "4", str(tmp_path / "y")])
    assert result.exit_code != 0 and "exceeds the number of adapters" in result.output
    # reverting onto another base model is refused before anything is written
    tokenizer = char_tokenizer()
    wider = save_model(random_model(llama_config(len(tokenizer), hidden_size=48), seed=1), tmp_path / "wider", tokenizer)
    result = runner.invoke(main, ["rmm", "revert", str(bundle), "a", str(tmp_path / "w"), "--merged", "--base", str(wider)])
    assert result.exit_code == 1 and "wider" in result.output and "weights differ" in result.output
    assert not (tmp_path / "w").exists()
    same_shapes = save_model(random_model(llama_config(len(tokenizer)), seed=1), tmp_path / "other", tokenizer)
    result = runner.invoke(main, ["rmm", "revert", str(bundle), "a", str(tmp_path / "w"), "--merged", "--base", str(same_shapes)])
    assert result.exit_code == 1 and "not the one this bundle was built on" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    coefficients = broken / "coefficients.safetensors"
    coefficients.write_bytes(coefficients.read_bytes()[:100])
    result = runner.invoke(main, ["rmm", "revert", str(broken), "a", str(tmp_path / "z")])
    assert result.exit_code == 1 and "coefficients.safetensors" in result.output
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_dense_rmm_method_in_mergekit(tiny_family, tmp_path):
    """mergekit-yaml `rmm`: one-hot weights with K = T recover that model; K < T is the rank-K fit."""
    from conftest import run_merge_in_process

    base = str(tiny_family["base"])
    models = [str(tiny_family[f"ft{i}"]) for i in range(3)]

    def merge(k, weights, name):
        config = {
            "merge_method": "rmm",
            "base_model": base,
            "models": [{"model": path, "parameters": {"weight": w}} for path, w in zip(models, weights)],
            "parameters": {"k": k},
            "dtype": "float32",
        }
        run_merge_in_process(config, tmp_path / name)
        return load_state_dict(tmp_path / name)

    recovered = merge(3, [0.0, 1.0, 0.0], "recover")
    target = load_state_dict(models[1])
    for name, tensor in target.items():
        torch.testing.assert_close(recovered[name], tensor, atol=1e-5, rtol=1e-5)

    fitted = merge(1, [1.0, 1.0, 1.0], "fit")
    base_state = load_state_dict(base)
    name = "model.layers.0.mlp.up_proj.weight"
    states = [load_state_dict(path)[name] for path in models]
    expected = rmm.product_space_merge(base_state[name], states, k=1, weights=[1.0, 1.0, 1.0])
    torch.testing.assert_close(fitted[name], expected)
    vectors = torch.stack([s - base_state[name] for s in states]).reshape(3, -1).double()
    u, s, vh = torch.linalg.svd(vectors, full_matrices=False)
    rank_one = ((u[:, :1] * s[:1]) @ vh[:1]).sum(0).reshape(expected.shape)
    torch.testing.assert_close((expected - base_state[name]).double(), rank_one, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_factored_svd_and_revert_rank(family, tmp_path):
    from conftest import low_rank_approximation

    from mergekit_ext.methods.rmm.format import read_bundle
    from mergekit_ext.tensors import factored_svd

    torch.manual_seed(3)
    left, right = torch.randn(30, 6, dtype=torch.float64), torch.randn(6, 20, dtype=torch.float64)
    u, s, vh = factored_svd(left, right, 4)
    torch.testing.assert_close((u * s) @ vh, low_rank_approximation(left @ right, 4, method="full"))

    runner = CliRunner()
    bundle = tmp_path / "bundle"
    adapters = [str(family[name]) for name in TASKS]
    assert runner.invoke(main, ["rmm", "build", "--base", str(family["base"]), *adapters, "-k", "2", str(bundle), "--variant", "product"]).exit_code == 0
    out = tmp_path / "reverse-r2"
    result = runner.invoke(main, ["rmm", "revert", str(bundle), "reverse", str(out), "--rank", "2"])
    assert result.exit_code == 0, result.output
    reverted = lora.read_adapter(out)
    _, basis = read_bundle(bundle)
    for module, factors in basis.reconstruct("reverse").items():
        assert factors.rank == 8 and reverted.modules[module].rank == 2  # K · basis rank, then truncated
        torch.testing.assert_close(reverted.delta(module), low_rank_approximation(factors.delta(), 2, method="full"), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_manifest_in_another_format_is_refused(family, tmp_path):
    # a manifest with another format string (here an unversioned one) is refused, naming the expected format
    runner = CliRunner()
    bundle = tmp_path / "bundle"
    adapters = [str(family[name]) for name in TASKS]
    assert runner.invoke(main, ["rmm", "build", "--base", str(family["base"]), *adapters, "-k", "3", str(bundle)]).exit_code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update({"format": "mergekit-ext/rmm-bundle", "version": 1})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "reverted"
    result = runner.invoke(main, ["rmm", "revert", str(bundle), "reverse", str(out)])
    assert result.exit_code != 0 and "expected 'mergekit-ext/rmm-bundle/1'" in result.output
    assert not out.exists()
    manifest.update({"format": "mergekit-ext/rmm-bundle/1", "base": {"path": manifest["base"]["path"]}})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(main, ["rmm", "revert", str(bundle), "reverse", str(out)])
    assert result.exit_code != 0 and "content_hash" in result.output and not out.exists()
