"""TSV-M, Iso-C, Iso-CTS: identities, agreement with an independent float64 reference, engine, bad input.

The reference below is written from docs/methods.md#tsv-m and #iso-c-and-iso-cts with torch.linalg.svd in
float64 (zero-padded stacks and all), and decides which tensors are matrices by
its own per-architecture name patterns, not by mergekit_ext.tensors.
"""

import functools
import re

import pytest
import torch
from conftest import merge_config, run_merge_in_process, run_mergekit_yaml

from mergekit_ext.methods.iso.kernel import iso_c_merge, iso_cts_merge
from mergekit_ext.methods.tsv.kernel import tsv_merge
from mergekit_ext.modeling import (
    char_tokenizer,
    gpt2_config,
    llama_config,
    load_state_dict,
    perturbed,
    qwen2_config,
    random_model,
    save_model,
)
from mergekit_ext.methods.subspace import polar_factor

LLAMA_MATRICES = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
GPT2_MATRICES = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
METHODS = ("tsv_m", "iso_c", "iso_cts")
# The identities are stated at λ = 1 (the defaults come from the benchmark and may move).
KERNELS = {
    "tsv_m": functools.partial(tsv_merge, lam=1.0),
    "iso_c": functools.partial(iso_c_merge, lam=1.0),
    "iso_cts": functools.partial(iso_cts_merge, lam=1.0),
}


# ---------------------------------------------------------------- independent reference (float64)


def _polar(a):
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _reference(method, base, models, *, matrix, lam=1.0, weights=None, fraction=0.8):
    base = base.double()
    weights = weights or [1.0] * len(models)
    taus = [w * (m.double() - base) for w, m in zip(weights, models)]
    if not matrix:
        return base + lam * sum(taus) / len(taus)
    count, (rows, cols) = len(taus), base.shape
    r = min(rows, cols)
    if method == "tsv_m":
        k = int(r / count)
        assert k >= 1
        svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
        u_hat = torch.zeros(rows, r, dtype=torch.float64)
        s_hat = torch.zeros(r, dtype=torch.float64)
        vh_hat = torch.zeros(r, cols, dtype=torch.float64)
        for i, (u, s, vh) in enumerate(svds):
            u_hat[:, i * k : (i + 1) * k], s_hat[i * k : (i + 1) * k], vh_hat[i * k : (i + 1) * k] = u[:, :k], s[:k], vh[:k]
        delta = _polar(u_hat) @ torch.diag(s_hat) @ _polar(vh_hat)
    elif method == "iso_c":
        u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
        delta = s.mean() * u @ vh
    else:
        c0 = int(r * fraction)
        s_count = round((r - c0) / count)
        k = r - count * s_count
        assert s_count >= 1 and k >= 1
        u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
        uk = u[:, :k]
        parts = [torch.linalg.svd(t - uk @ uk.T @ t, full_matrices=False) for t in taus]
        u_hat = torch.cat([p[0][:, :s_count] for p in parts] + [uk], dim=1)
        s_hat = torch.cat([p[1][:s_count] for p in parts] + [s[:k]])
        vh_hat = torch.cat([p[2][:s_count] for p in parts] + [vh[:k]], dim=0)
        delta = s_hat.mean() * _polar(u_hat) @ _polar(vh_hat)
    return base + lam * delta


def _random_family(shape, count=3, seed=0, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=generator)
    return base, [base + scale * torch.randn(*shape, generator=generator) for _ in range(count)]


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("method", METHODS)
def test_kernels_match_reference_with_weights(method):
    base, models = _random_family((24, 40))
    weights = [1.0, 0.5, 2.0]
    options = {"common_space_fraction": 0.5} if method == "iso_cts" else {}
    out = KERNELS[method](base, models, lam=1.7, weights=weights, **options)
    expected = _reference(method, base, models, matrix=True, lam=1.7, weights=weights, fraction=0.5)
    update = expected - base.double()
    assert torch.linalg.norm(out.double() - expected) <= 1e-4 * torch.linalg.norm(update)
    # Non-matrices: θ0 + λ·mean_t wt τt.
    vector_base, vectors = _random_family((40,))
    out = KERNELS[method](vector_base, vectors, lam=1.7, weights=weights, **options)
    torch.testing.assert_close(out.double(), _reference(method, vector_base, vectors, matrix=False, lam=1.7, weights=weights))
    # Weights all equal to c are λ·c.
    torch.testing.assert_close(
        KERNELS[method](base, models, lam=1.0, weights=[2.0] * 3, **options),
        KERNELS[method](base, models, lam=2.0, **options),
    )


@pytest.mark.parametrize("shape", ((96, 96), (80, 150), (150, 80)))
@pytest.mark.parametrize("count,fraction", ((2, 0.8), (3, 0.5), (5, 0.8)))
def test_iso_cts_complement_path_matches_reference(shape, count, fraction, monkeypatch):
    """Square and wide matrices take the complement-subspace path (issue 15); tall ones the general one.
    Both use the block-wise left polar factor; the reference is a plain float64 implementation."""
    from mergekit_ext.methods.iso import kernel as iso_kernel

    base, models = _random_family(shape, count=count, seed=count)
    vectors = torch.stack([model - base for model in models])
    keep_common, specific = iso_kernel.iso_cts_split(min(shape), count, fraction)
    assert (iso_kernel._task_triplets_in_complement(vectors, keep_common, specific) is not None) == (shape[0] <= shape[1])
    out = iso_cts_merge(base, models, lam=1.0, common_space_fraction=fraction).double()
    monkeypatch.setattr(iso_kernel, "_task_triplets_in_complement", lambda *args: None)
    general = iso_cts_merge(base, models, lam=1.0, common_space_fraction=fraction).double()
    size = torch.linalg.norm(general - base.double())
    assert torch.linalg.norm(out - general) <= 1e-4 * size
    if (count, fraction) != (3, 0.5):
        # At 96 × 96, T = 3, f = 0.5 the stacked V̂ᵀ has σmin ≈ 1e-6 σmax: float32's numerical
        # rank drops that direction and float64 keeps it (10 % apart, for both paths alike).
        expected = _reference("iso_cts", base, models, matrix=True, fraction=fraction)
        assert torch.linalg.norm(out - expected) <= 1e-4 * size


def test_tsv_singular_values_are_the_kept_ones():
    base, models = _random_family((20, 30), count=3, seed=1)
    out = tsv_merge(base, models, lam=1.0)
    k = 20 // 3
    kept = torch.cat([torch.linalg.svdvals((m - base).double())[:k] for m in models])
    got = torch.linalg.svdvals((out - base).double())
    torch.testing.assert_close(got[: 3 * k], kept.sort(descending=True).values, rtol=1e-5, atol=1e-6)
    assert got[3 * k :].max() < 1e-5  # padded width: r − T·k zero singular values


@pytest.mark.parametrize("method", METHODS)
def test_kernels_are_order_invariant_and_deterministic(method):
    base, models = _random_family((16, 28), count=4, seed=2)
    weights = [1.0, 2.0, 0.5, 1.5]
    out = KERNELS[method](base, models, weights=weights)
    order = [2, 0, 3, 1]
    shuffled = KERNELS[method](base, [models[i] for i in order], weights=[weights[i] for i in order])
    torch.testing.assert_close(shuffled, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(KERNELS[method](base, models, weights=weights), out)


def test_iso_identities_on_kernel():
    base, models = _random_family((18, 26), count=3, seed=3)
    total = sum((m - base).double() for m in models)
    sigma_bar = torch.linalg.svdvals(total).mean()
    for out in (iso_c_merge(base, models, lam=1.0), iso_cts_merge(base, models, lam=1.0, common_space_fraction=0.6)):
        singular = torch.linalg.svdvals((out - base).double())
        assert torch.allclose(singular, singular[0].expand_as(singular), rtol=1e-4)  # isotropic, full rank
    iso_c = iso_c_merge(base, models, lam=1.0)
    # Iso-C: σ̄ = mean of Δ_TA's σ, so the nuclear norm is preserved.
    torch.testing.assert_close(torch.linalg.svdvals((iso_c - base).double()), sigma_bar.expand(18), rtol=1e-4, atol=0)
    torch.testing.assert_close(iso_cts_merge(base, models, lam=1.0, common_space_fraction=1.0), iso_c)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (2, 11), (3, 3)])
def test_odd_shapes_do_not_crash(method, shape):
    base, models = _random_family(shape, count=3, seed=4)
    out = KERNELS[method](base, models, is_matrix=True)
    assert out.shape == base.shape and bool(torch.isfinite(out).all())
    # Iso-C on a rank-1 matrix: Δ = Δ_TA (one σ, its own mean).
    if method != "tsv_m" and min(shape) == 1:
        torch.testing.assert_close(out, base + sum(m - base for m in models), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_and_zero_task_vectors(method):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(12, 16, generator=generator)
    rank_one = [base + torch.randn(12, 1, generator=generator) @ torch.randn(1, 16, generator=generator) for _ in range(3)]
    zero = [base.clone() for _ in range(3)]
    mixed = [base.clone(), rank_one[0], base.clone()]
    for models in (rank_one, zero, mixed):
        out = KERNELS[method](base, models, is_matrix=True)
        assert bool(torch.isfinite(out).all())
    assert torch.equal(KERNELS[method](base, zero, is_matrix=True), base)
    # One rank-1 task among zero ones: every method returns θ0 + that task vector
    # (TSV: its one triplet; Iso: Δ_TA has one σ, its own mean).
    torch.testing.assert_close(KERNELS[method](base, mixed, is_matrix=True), rank_one[0], rtol=1e-5, atol=1e-5)
    # Three rank-2 tasks: numerically zero directions are left out, so the Iso
    # updates are isotropic on the rank-6 range of Δ_TA with its nuclear norm.
    low_rank = [base + 0.01 * torch.randn(12, 2, generator=generator) @ torch.randn(2, 16, generator=generator) for _ in range(3)]
    if method != "tsv_m":
        nuclear = torch.linalg.svdvals(sum(m - base for m in low_rank).double()).sum()
        singular = torch.linalg.svdvals((KERNELS[method](base, low_rank, is_matrix=True) - base).double())
        torch.testing.assert_close(singular[:6], (nuclear / 6).expand(6), rtol=1e-4, atol=0)
        assert singular[6:].max() < 1e-5 * singular[0]
    # Half precision in, same dtype out.
    half = KERNELS[method](base.bfloat16(), [m.bfloat16() for m in rank_one], is_matrix=True)
    assert half.dtype == torch.bfloat16 and bool(torch.isfinite(half).all())


def test_polar_factor():
    generator = torch.Generator().manual_seed(6)
    tall = torch.randn(9, 4, generator=generator)
    polar = polar_factor(tall)
    torch.testing.assert_close(polar.T @ polar, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(polar.double(), _polar(tall.double()), atol=1e-5, rtol=0)
    torch.testing.assert_close(polar_factor(tall.T), polar.T)
    assert torch.equal(polar_factor(torch.zeros(3, 5)), torch.zeros(3, 5))


@pytest.mark.parametrize(
    "call",
    [
        lambda b, m: tsv_merge(b, m, lam=float("nan")),
        lambda b, m: iso_c_merge(b, m, lam=float("inf")),
        lambda b, m: tsv_merge(b, m, weights=[1.0, -1.0]),
        lambda b, m: iso_c_merge(b, m, weights=[1.0]),
        lambda b, m: iso_cts_merge(b, m, common_space_fraction=0.0),
        lambda b, m: iso_cts_merge(b, m, common_space_fraction=1.5),
        lambda b, m: iso_cts_merge(b, []),
    ],
)
def test_kernels_refuse_bad_arguments(call):
    base, models = _random_family((6, 8), count=2)
    with pytest.raises(ValueError):
        call(base, models)


# ---------------------------------------------------------------- engine


def _config(method, paths, names, *, parameters=None, weights=None, base=True):
    return merge_config(method, paths, names, parameters=parameters, weights=weights or {}, base=base)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Tiny base + 3 perturbed models per architecture (Llama, Qwen2 with biases, GPT-2 Conv1D)."""
    vocab = len(char_tokenizer())
    tokenizer = char_tokenizer()
    built = {}
    for name, config, matrices in (
        ("llama", llama_config(vocab), LLAMA_MATRICES),
        ("qwen2", qwen2_config(vocab), LLAMA_MATRICES),
        ("gpt2", gpt2_config(vocab), GPT2_MATRICES),
    ):
        root = tmp_path_factory.mktemp(name)
        base = random_model(config, seed=0)
        paths = {"base": save_model(base, root / "base", tokenizer)}
        for index in range(3):
            paths[f"m{index}"] = save_model(perturbed(base, seed=300 + index, scale=0.05), root / f"m{index}", tokenizer)
        built[name] = (paths, matrices)
    return built


WEIGHTS = {"m0": 1.0, "m1": 0.5, "m2": 2.0}
NAMES = ("m0", "m1", "m2")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_engine_matches_reference(families, tmp_path, architecture, method):
    paths, matrices = families[architecture]
    parameters = {"lambda": 1.3, **({"common_space_fraction": 0.6} if method == "iso_cts" else {})}
    out = tmp_path / "out"
    run_merge_in_process(_config(method, paths, NAMES, parameters=parameters, weights=WEIGHTS), out)
    merged = load_state_dict(out)
    base = load_state_dict(paths["base"])
    inputs = [load_state_dict(paths[n]) for n in NAMES]
    weights = [WEIGHTS[n] for n in NAMES]
    seen_matrices = 0
    assert merged.keys() == base.keys()
    for key, tensor in merged.items():
        matrix = bool(matrices.search(key))
        expected = _reference(
            method, base[key], [s[key] for s in inputs], matrix=matrix, lam=1.3, weights=weights, fraction=0.6
        )
        update = expected - base[key].double()
        error = torch.linalg.norm(tensor.double() - expected)
        assert error <= 1e-4 * torch.linalg.norm(update) + 1e-7, key
        if matrix:
            seen_matrices += 1
            if method != "tsv_m":
                # Isotropic: every nonzero singular value of the update equals σ̄.
                singular = torch.linalg.svdvals((tensor.double() - base[key].double()) / 1.3)
                if method == "iso_c":
                    total = sum(w * (s[key].double() - base[key].double()) for w, s in zip(weights, inputs))
                    sigma_bar = torch.linalg.svdvals(total).mean()
                else:
                    sigma_bar = torch.linalg.svdvals(update / 1.3).mean()  # the reference's mean(ŝ)
                nonzero = singular[singular > 1e-3 * singular.max()]
                assert nonzero.numel() == min(tensor.shape), key
                torch.testing.assert_close(nonzero, sigma_bar.expand_as(nonzero), rtol=1e-4, atol=0)
    assert seen_matrices == {"llama": 14, "qwen2": 14, "gpt2": 8}[architecture]
    if architecture != "llama":
        assert any(key.endswith(".bias") for key in merged)


@pytest.mark.slow
def test_stock_mergekit_yaml_tsv_one_model_gives_it(tiny_family, tmp_path):
    out = tmp_path / "one"
    run_mergekit_yaml(_config("tsv_m", tiny_family, ("ft1",), parameters={"lambda": 1.0}), out)
    merged, original = load_state_dict(out), load_state_dict(tiny_family["ft1"])
    assert merged.keys() == original.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], original[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_engine_iso_cts_fraction_one_is_iso_c_and_order_invariance(tiny_family, tmp_path):
    names = ("ft0", "ft1", "ft2")
    results = {}
    for label, method, order, parameters in (
        ("iso_c", "iso_c", names, {"lambda": 1.0}),
        ("iso_cts_1", "iso_cts", names, {"lambda": 1.0, "common_space_fraction": 1.0}),
        ("iso_c_reversed", "iso_c", names[::-1], {"lambda": 1.0}),
        ("tsv_m", "tsv_m", names, {"lambda": 1.0}),
        ("tsv_m_reversed", "tsv_m", names[::-1], {"lambda": 1.0}),
        ("iso_cts", "iso_cts", names, {"lambda": 1.0}),
        ("iso_cts_reversed", "iso_cts", names[::-1], {"lambda": 1.0}),
    ):
        out = tmp_path / label
        run_merge_in_process(_config(method, tiny_family, order, parameters=parameters), out)
        results[label] = load_state_dict(out)
    for first, second in (
        ("iso_cts_1", "iso_c"),
        ("iso_c_reversed", "iso_c"),
        ("tsv_m_reversed", "tsv_m"),
        ("iso_cts_reversed", "iso_cts"),
    ):
        for key, tensor in results[first].items():
            torch.testing.assert_close(tensor, results[second][key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, parameters, model_weight, base, word",
    [
        ("tsv_m", {"lambda": float("nan")}, 1.0, True, "lambda"),
        ("iso_c", {"lambda": float("inf")}, 1.0, True, "lambda"),
        ("iso_cts", {}, -1.0, True, "weight"),
        ("iso_cts", {"common_space_fraction": 0}, 1.0, True, "common_space_fraction"),
        ("iso_cts", {"common_space_fraction": 1.5}, 1.0, True, "common_space_fraction"),
        ("tsv_m", {}, 1.0, False, "base"),
        ("iso_c", {}, 1.0, False, "base"),
    ],
)
def test_bad_parameters_refused_before_any_output(tiny_family, tmp_path, method, parameters, model_weight, base, word):
    out = tmp_path / "refused"
    config = _config(method, tiny_family, ("ft0", "ft1"), parameters=parameters, weights={"ft0": model_weight}, base=base)
    with pytest.raises(Exception, match=word) as caught:
        run_merge_in_process(config, out)
    if word != "base":
        assert method in str(caught.value)
    assert not out.exists()
