"""Property-based tests (hypothesis) of the kernel identities in docs/methods.md, on random small
tensors including odd shapes: 1×n, n×1, 1-D, 3-D, rank-deficient and all-zero task vectors.
Every result must also be finite (a kernel must not turn zeros into NaN)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_ext.methods.adarank.kernel import apply_masks, band_rank
from mergekit_ext.methods.cart.kernel import cart_merge
from mergekit_ext.methods.consensus.kernel import consensus_merge
from mergekit_ext.methods.iso.kernel import iso_c_merge, iso_cts_merge
from mergekit_ext.methods.rmm.kernel import product_space_merge
from mergekit_ext.methods.tsv.kernel import tsv_merge

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = st.sampled_from([(1, 7), (7, 1), (5,), (4, 6), (6, 4), (3, 3), (2, 3, 4), (1, 1)])
MATRIX_SHAPES = st.sampled_from([(1, 7), (7, 1), (4, 6), (6, 4), (3, 3), (5, 2)])
KINDS = st.sampled_from(["random", "rank1", "zero"])


def _family(seed: int, shape, count: int, kind: str):
    """A base and ``count`` models whose task vectors are random, rank-1 (rank-deficient) or zero."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    models = []
    for _ in range(count):
        if kind == "zero":
            tau = torch.zeros(shape)
        elif kind == "rank1" and len(shape) == 2:
            tau = torch.randn(shape[0], 1, generator=generator) @ torch.randn(1, shape[1], generator=generator)
        else:
            tau = torch.randn(shape, generator=generator)
        models.append(base + tau)
    return base, models


def _close(actual, expected, tolerance=1e-4):
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


@FEW
@given(seed=st.integers(0, 10_000), shape=SHAPES, count=st.integers(1, 4), kind=KINDS, scale=st.floats(0.1, 2.0))
def test_consensus_k0_is_task_arithmetic_and_k_above_t_is_the_base(seed, shape, count, kind, scale):
    base, models = _family(seed, shape, count, kind)
    weights = [1.0] * count
    lambdas = [0.4] * count
    ta = base + scale * sum(model - base for model in models)
    _close(consensus_merge(base, models, weights=weights, tall_lambdas=lambdas, k=0, scale=scale), ta)
    _close(consensus_merge(base, models, weights=weights, tall_lambdas=lambdas, k=count + 1, scale=scale), base, 0)
    ties = consensus_merge(base, models, weights=weights, tall_lambdas=lambdas, k=count + 1, scale=scale, densities=[0.5] * count)
    _close(ties, base, 0)


@FEW
@given(seed=st.integers(0, 10_000), shape=SHAPES, count=st.integers(1, 4), kind=KINDS, scale=st.floats(0.0, 3.0))
def test_cart_full_rank_and_non_matrix_give_the_average(seed, shape, count, kind, scale):
    _, models = _family(seed, shape, count, kind)
    average = torch.stack(models).mean(0)
    _close(cart_merge(models, rank_ratio=1.0, scale=scale, svd="full", low_rank=len(shape) == 2), average, 1e-4)
    _close(cart_merge(models, rank_ratio=0.3, scale=scale, low_rank=False), average, 1e-5)
    _close(cart_merge(models[:1], rank_ratio=0.3, scale=scale, low_rank=len(shape) == 2), models[0], 1e-5)


@FEW
@given(seed=st.integers(0, 10_000), shape=MATRIX_SHAPES, kind=KINDS)
def test_tsv_single_task_is_that_task(seed, shape, kind):
    base, models = _family(seed, shape, 1, kind)
    _close(tsv_merge(base, models, lam=1.0, is_matrix=True), models[0], 1e-4)


@FEW
@given(seed=st.integers(0, 10_000), shape=SHAPES, count=st.integers(1, 4), kind=KINDS, lam=st.floats(0.0, 2.0))
def test_subspace_methods_on_non_matrices_use_the_mean(seed, shape, count, kind, lam):
    base, models = _family(seed, shape, count, kind)
    expected = base + lam * torch.stack([model - base for model in models]).mean(0)
    for merge in (tsv_merge, iso_c_merge, iso_cts_merge):
        _close(merge(base, models, lam=lam, is_matrix=False), expected, 1e-5)


@FEW
@given(seed=st.integers(0, 10_000), shape=MATRIX_SHAPES, count=st.integers(1, 4), kind=KINDS)
def test_subspace_methods_are_order_invariant(seed, shape, count, kind):
    base, models = _family(seed, shape, count, kind)
    for merge in (tsv_merge, iso_c_merge, iso_cts_merge):
        _close(merge(base, models, is_matrix=True), merge(base, models[::-1], is_matrix=True), 1e-4)


@FEW
@given(seed=st.integers(0, 10_000), shape=MATRIX_SHAPES, count=st.integers(1, 4), kind=KINDS, c=st.floats(0.1, 5.0))
def test_iso_c_flattens_the_spectrum_keeps_the_nuclear_norm_and_is_homogeneous(seed, shape, count, kind, c):
    base, models = _family(seed, shape, count, kind)
    zero = torch.zeros(shape)
    delta_ta = sum(model - base for model in models)
    delta = iso_c_merge(zero, [model - base for model in models], lam=1.0, is_matrix=True)
    sigma = torch.linalg.svdvals(delta)
    sigma_ta = torch.linalg.svdvals(delta_ta)
    # Every singular value of the numerical rank equals σ̄ (iso/kernel.py: directions with
    # σ ≈ 0 are arbitrary and left out, so rank-deficient Δ_TA keep their rank).
    kept = sigma[sigma > 1e-4 * max(float(sigma_ta.max()), 1.0)]
    if kept.numel():
        _close(kept, torch.full_like(kept, float(kept.mean())), 1e-3)
    _close(sigma.sum(), sigma_ta.sum(), 1e-3)
    scaled = iso_c_merge(zero, [c * (model - base) for model in models], lam=1.0, is_matrix=True)
    _close(scaled, c * delta, 1e-3)
    _close(iso_cts_merge(base, models, common_space_fraction=1.0, is_matrix=True), iso_c_merge(base, models, is_matrix=True), 1e-4)


@FEW
@given(seed=st.integers(0, 10_000), shape=SHAPES, count=st.integers(1, 4), kind=KINDS, data=st.data())
def test_rmm_full_basis_is_task_arithmetic_and_one_hot_recovers_a_task(seed, shape, count, kind, data):
    base, models = _family(seed, shape, count, kind)
    weights = data.draw(st.lists(st.floats(-2, 2), min_size=count, max_size=count))
    expected = base + sum(w * (model - base) for w, model in zip(weights, models))
    _close(product_space_merge(base, models, k=count, weights=weights), expected, 1e-4)
    task = data.draw(st.integers(0, count - 1))
    one_hot = [1.0 if index == task else 0.0 for index in range(count)]
    _close(product_space_merge(base, models, k=count, weights=one_hot), models[task], 1e-4)


@FEW
@given(seed=st.integers(0, 10_000), shape=MATRIX_SHAPES, count=st.integers(1, 3), kind=KINDS, prior=st.floats(0.1, 1.5))
def test_adarank_all_kept_at_prior_is_task_arithmetic(seed, shape, count, kind, prior):
    base, models = _family(seed, shape, count, kind)
    band = band_rank(shape, 1.0)
    mask = torch.ones(count, band, dtype=torch.bool)
    coefficients = torch.full((count,), prior)
    merged = apply_masks(base, models, variant="ta", coefficients=coefficients, mask=mask, band=band, svd="full")
    _close(merged, base + prior * sum(model - base for model in models), 1e-4)
    flat_base, flat_models = base.reshape(-1), [model.reshape(-1) for model in models]
    other = apply_masks(flat_base, flat_models, variant="ta", coefficients=coefficients, mask=None)
    _close(other, flat_base + prior * sum(model - flat_base for model in flat_models), 1e-5)
