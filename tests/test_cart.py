"""CART: identities, agreement with an independent SVD, architectures, bad input.

The reference below is written from the paper's formulas with torch.linalg.svd
directly, and decides which tensors are low-ranked by its own per-architecture
name patterns (not by mergekit_ext.tensors.is_block_matrix), so a wrong
matrix classification in the package shows up here.
"""

import re

import pytest
import torch
from conftest import (
    low_rank_approximation,
    merge_config,
    run_merge_in_process,
    run_mergekit_yaml,
)
from mergekit.merge_methods import merge_tensors

from mergekit_ext.methods.cart.kernel import cart_merge
from mergekit_ext.modeling import (
    char_tokenizer,
    gpt2_config,
    load_state_dict,
    perturbed,
    qwen2_config,
    random_model,
    save_model,
)
from mergekit_ext.tensors import truncated_svd

# 2-D weights inside the transformer blocks, by architecture (GPT-2's Conv1D
# weights are stored [in, out]; the SVD does not care).
LLAMA_MATRICES = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
GPT2_MATRICES = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _reference(tensors, *, low_rank, rank_ratio, scale, weights=None):
    """θavg + λ·T·Σ pt LR_k(θt − θavg), pt = wt/Σw, with a full torch.linalg.svd."""
    stack = torch.stack([t.double() for t in tensors])
    count = len(tensors)
    weights = torch.ones(count, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    share = weights / weights.sum()
    average = (share.reshape(-1, *[1] * (stack.dim() - 1)) * stack).sum(0)
    if not low_rank:
        return average
    k = max(1, int(rank_ratio * min(average.shape)))
    total = torch.zeros_like(average)
    for tensor, p in zip(stack, share):
        u, s, vh = torch.linalg.svd(tensor - average, full_matrices=False)
        total += count * p * (u[:, :k] * s[:k]) @ vh[:k]
    return average + scale * total


def _decaying_matrix(rows, cols, decay, seed=0):
    """A matrix with singular values i^-decay and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    size = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, size, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(cols, size, generator=generator)).Q
    s = torch.arange(1, size + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


# ---------------------------------------------------------------- kernel


def test_kernel_matches_independent_svd_with_weights():
    torch.manual_seed(0)
    models = [torch.randn(24, 40) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]
    out = cart_merge(models, rank_ratio=0.25, scale=1.7, weights=weights, svd="full")
    expected = _reference(models, low_rank=True, rank_ratio=0.25, scale=1.7, weights=weights)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    # It is a real change from the average (the test can fail).
    assert (out.double() - _reference(models, low_rank=False, rank_ratio=1, scale=0, weights=weights)).abs().max() > 0.1
    # Equal weights of any size are the paper's unweighted formula.
    torch.testing.assert_close(
        cart_merge(models, rank_ratio=0.25, scale=1.7, weights=[3.0] * 3, svd="full"),
        cart_merge(models, rank_ratio=0.25, scale=1.7, svd="full"),
    )


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, 13.0])
def test_kernel_full_rank_and_non_matrix_are_the_average(scale):
    torch.manual_seed(1)
    models = [torch.randn(12, 20) for _ in range(4)]
    weights = [1.0, 3.0, 2.0, 0.25]
    average = _reference(models, low_rank=False, rank_ratio=1, scale=0, weights=weights)
    full = cart_merge(models, rank_ratio=1.0, scale=scale, weights=weights)
    torch.testing.assert_close(full.double(), average, atol=1e-5, rtol=1e-5)
    not_matrix = cart_merge(models, rank_ratio=0.1, scale=scale, weights=weights, low_rank=False)
    torch.testing.assert_close(not_matrix.double(), average, atol=1e-6, rtol=1e-6)
    vectors = [torch.randn(20) for _ in range(3)]
    torch.testing.assert_close(cart_merge(vectors, rank_ratio=0.1, scale=scale), torch.stack(vectors).mean(0))


def test_kernel_one_model_gives_itself_and_dtype_round_trip():
    torch.manual_seed(2)
    model = torch.randn(16, 16).bfloat16()
    assert torch.equal(cart_merge([model], rank_ratio=0.1, scale=2.0), model)
    models = [torch.randn(16, 32).bfloat16() for _ in range(3)]
    out = merge_tensors(models, "cart", parameters={"rank_ratio": 0.25, "lambda": 2.0}, name="model.layers.0.mlp.up_proj.weight")
    assert out.dtype == torch.bfloat16
    expected = _reference([m.float() for m in models], low_rank=True, rank_ratio=0.25, scale=2.0)
    torch.testing.assert_close(out, expected.to(torch.bfloat16), atol=0.02, rtol=0.02)


def test_fast_paths_against_full_svd():
    # A 256x512 matrix with a decaying spectrum; k = 3 % and 10 % of the rank.
    matrix = _decaying_matrix(256, 512, decay=1.0)
    for rank in (8, 25):
        best = low_rank_approximation(matrix, rank, method="full")
        best_residual = torch.linalg.norm(matrix - best)
        randomized = low_rank_approximation(matrix, rank, method="randomized")
        # Near-optimal residual (Eckart–Young optimum within 0.1 %).
        assert torch.linalg.norm(matrix - randomized) <= best_residual * (1 + 1e-3)
        # The Gram path reproduces the SVD's own truncation closely; 'auto' takes it for small k.
        gram = low_rank_approximation(matrix, rank, method="gram")
        assert torch.equal(low_rank_approximation(matrix, rank), gram)
        assert torch.linalg.norm(gram - best) <= 1e-4 * torch.linalg.norm(best)
        # Factors have the requested shapes and sorted singular values.
        u, s, vh = truncated_svd(matrix.T, rank, method="gram")
        assert u.shape == (512, rank) and vh.shape == (rank, 256)
        assert bool((s[:-1] >= s[1:]).all())
    # Large k falls back to the exact SVD.
    assert torch.equal(low_rank_approximation(matrix, 100), low_rank_approximation(matrix, 100, method="full"))
    with pytest.raises(ValueError, match="unknown SVD method"):
        truncated_svd(matrix, 4, method="lanczos")


def test_default_svd_matches_full_svd_on_realistic_spectrum():
    # Centred vectors with decaying spectra (k = 12 % of 192): the default
    # (Gram) path must give the same merge as an exact SVD, not just a near-optimal one.
    center = torch.randn(192, 384, generator=torch.Generator().manual_seed(3))
    models = [center + 0.05 * _decaying_matrix(192, 384, decay=0.7, seed=10 + t) for t in range(4)]
    expected = _reference(models, low_rank=True, rank_ratio=0.12, scale=2.0)
    out = cart_merge(models, rank_ratio=0.12, scale=2.0).double()
    exact = cart_merge(models, rank_ratio=0.12, scale=2.0, svd="full").double()
    average = _reference(models, low_rank=False, rank_ratio=1, scale=0)
    low_rank_part = torch.linalg.norm(expected - average)
    # float32 output rounding alone is ~3e-4 of the low-rank part here.
    assert torch.linalg.norm(exact - expected) <= 1e-3 * low_rank_part
    assert torch.linalg.norm(out - exact) <= 1e-4 * low_rank_part
    # A 2-D tensor named like an embedding is not low-ranked.
    named = merge_tensors(models, "cart", name="model.embed_tokens.weight", parameters={"rank_ratio": 0.12})
    torch.testing.assert_close(named.double(), average, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- engine


def _config(paths, names, *, parameters=None, weights=None, base=True, dtype="float32"):
    return merge_config("cart", paths, names, parameters=parameters, weights=weights or {}, base=base, dtype=dtype)


def _check_against_reference(out_dir, paths, names, matrices, *, rank_ratio, scale, weights=None):
    """Every output tensor equals the independent computation; returns how many were low-ranked."""
    merged = load_state_dict(out_dir)
    inputs = [load_state_dict(paths[name]) for name in names]
    weight_list = None if weights is None else [weights[name] for name in names]
    low_ranked = 0
    assert merged, "no tensors written"
    for key, tensor in merged.items():
        is_matrix = bool(matrices.search(key))
        expected = _reference(
            [state[key] for state in inputs], low_rank=is_matrix, rank_ratio=rank_ratio, scale=scale, weights=weight_list
        )
        torch.testing.assert_close(tensor.double(), expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
        if is_matrix:
            average = _reference([state[key] for state in inputs], low_rank=False, rank_ratio=1, scale=0, weights=weight_list)
            low_ranked += int((tensor.double() - average).abs().max() > 1e-3)
    return low_ranked


@pytest.mark.slow
def test_stock_mergekit_yaml_matches_independent_cart(tiny_family, tmp_path):
    # A base model is configured, and must NOT enter the average.
    names = ("ft0", "ft1", "ft2")
    out = tmp_path / "cart"
    run_mergekit_yaml(_config(tiny_family, names, parameters={"rank_ratio": 0.25, "lambda": 1.5}), out)
    assert _check_against_reference(out, tiny_family, names, LLAMA_MATRICES, rank_ratio=0.25, scale=1.5) == 14


@pytest.mark.slow
def test_full_rank_through_engine_is_weighted_average(tiny_family, tmp_path):
    names = ("ft0", "ft1", "ft2")
    weights = {"ft0": 1.0, "ft1": 2.0, "ft2": 3.0}
    out = tmp_path / "full"
    run_merge_in_process(
        _config(tiny_family, names, parameters={"rank_ratio": 1.0, "lambda": 3.7}, weights=weights, base=False), out
    )
    merged = load_state_dict(out)
    inputs = [load_state_dict(tiny_family[name]) for name in names]
    total = sum(weights.values())
    for key, tensor in merged.items():
        average = sum(weights[name] * state[key].double() for name, state in zip(names, inputs)) / total
        torch.testing.assert_close(tensor.double(), average, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_one_model_through_engine_gives_itself(tiny_family, tmp_path):
    out = tmp_path / "one"
    run_merge_in_process(_config(tiny_family, ("ft1",), parameters={"rank_ratio": 0.1, "lambda": 2.0}), out)
    merged, original = load_state_dict(out), load_state_dict(tiny_family["ft1"])
    assert merged.keys() == original.keys()
    for key in merged:
        assert torch.equal(merged[key], original[key]), key


def _family(root, config, count=3):
    tokenizer = char_tokenizer()
    base = random_model(config, seed=0)
    paths = {"base": save_model(base, root / "base", tokenizer)}
    for index in range(count):
        # Larger perturbations than a fine-tune so the low-rank part is visible.
        paths[f"m{index}"] = save_model(perturbed(base, seed=200 + index, scale=0.05), root / f"m{index}", tokenizer)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_architectures_through_engine(architecture, tmp_path):
    vocab = len(char_tokenizer())
    if architecture == "gpt2":
        # Conv1D c_attn fused and stored [in, out]; wpe has no vocabulary axis.
        config, matrices, expected_low_ranked = gpt2_config(vocab), GPT2_MATRICES, 8
    else:
        config, matrices, expected_low_ranked = qwen2_config(vocab), LLAMA_MATRICES, 14
    paths = _family(tmp_path / "models", config)
    names = ("m0", "m1", "m2")
    weights = {"m0": 1.0, "m1": 1.0, "m2": 2.0}
    out = tmp_path / "out"
    run_merge_in_process(
        _config(paths, names, parameters={"rank_ratio": 0.3, "lambda": 1.3}, weights=weights), out
    )
    low_ranked = _check_against_reference(out, paths, names, matrices, rank_ratio=0.3, scale=1.3, weights=weights)
    assert low_ranked == expected_low_ranked
    merged = load_state_dict(out)
    biases = [key for key in merged if key.endswith(".bias") and merged[key].dim() == 1]
    assert biases, "the architecture under test should have biases"
    if architecture == "gpt2":
        assert any(key.endswith("wpe.weight") for key in merged)


@pytest.mark.slow
@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "abc"])
def test_bad_rank_ratio_refused_before_any_output(tiny_family, tmp_path, bad):
    out = tmp_path / "refused"
    with pytest.raises(Exception, match="rank_ratio") as caught:
        run_merge_in_process(_config(tiny_family, ("ft0", "ft1"), parameters={"rank_ratio": bad}), out)
    assert "cart" in str(caught.value)
    assert not out.exists() or not any(out.iterdir())
