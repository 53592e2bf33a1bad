"""Fast exact factorizations (issue 15) against LAPACK, on random and structured matrices.

``tensors.all_singular_triplets`` (Gram eigendecomposition with a scale-by-scale
refinement of small singular values) replaces LAPACK's SVD wherever a method
needs every singular triplet: OPCM's projection, AdaRank's apply, TSV-M's and
Iso's polar factors and wide truncations. Each fast path is checked here by the
relative error of what it produces (reconstruction, polar factor, merged tensor)
against the LAPACK path, with the tolerance stated beside each check. The
``lapack`` fixture swaps LAPACK in for the fast factorization everywhere, so the
kernels themselves are compared end to end.
"""

from __future__ import annotations

import pytest
import torch

import mergekit_ext.tensors as tensors
from mergekit_ext.methods.adarank import kernel as adarank_kernel
from mergekit_ext.methods.cart.kernel import cart_merge
from mergekit_ext.methods.iso import kernel as iso_kernel
from mergekit_ext.methods.opcm import kernel as opcm_kernel
from mergekit_ext.methods.tsv import kernel as tsv_kernel
from mergekit_ext.methods.subspace import polar_factor
from mergekit_ext.tensors import singular_value_tolerance


@pytest.fixture(autouse=True)
def gram_path_everywhere(monkeypatch):
    """Small matrices normally go to LAPACK (tensors.LAPACK_BELOW): test the Gram path on every shape."""
    monkeypatch.setattr(tensors, "LAPACK_BELOW", 0)
    original = tensors.all_singular_triplets.__wrapped__ if hasattr(tensors.all_singular_triplets, "__wrapped__") else tensors.all_singular_triplets

    def gram_only(matrix, *, lapack_below=0, needed=None):
        return original(matrix, lapack_below=lapack_below, needed=needed)

    for module in (tensors, adarank_kernel, opcm_kernel, tsv_kernel):
        monkeypatch.setattr(module, "all_singular_triplets", gram_only)


def all_singular_triplets(matrix):
    return tensors.all_singular_triplets(matrix)


# Relative (Frobenius) error allowed against LAPACK, float32 throughout. LAPACK's
# own float32 SVD is ~1.5e-6 from float64 on these sizes; the fast path measured
# 0.7e-6 to 5e-6 (reconstructions, polar factors, merged tensors).
TOLERANCE = 2e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = float(b.norm())
    return float((a - b).norm()) / scale if scale > 0 else float(a.norm())


def with_spectrum(rows: int, cols: int, spectrum, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.as_tensor(spectrum, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(rows, len(spectrum), generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, len(spectrum), generator=generator, dtype=torch.float64)).Q
    return ((left * spectrum) @ right.T).float()


def random(rows: int, cols: int, seed: int = 0, scale: float = 0.002) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def structured() -> dict:
    geometric = lambda count, low: torch.logspace(0, low, count, dtype=torch.float64)  # noqa: E731
    return {
        "random square": random(256, 256),
        "random tall": random(300, 120, seed=1),
        "random wide": random(120, 300, seed=2),
        "low rank 8": with_spectrum(200, 160, torch.linspace(1, 0.5, 8), seed=3),
        "rank deficient": with_spectrum(160, 160, torch.cat([torch.linspace(1, 0.1, 100), torch.zeros(60)]), seed=4),
        "ill-conditioned 1e-3": with_spectrum(200, 200, geometric(200, -3), seed=5),
        "ill-conditioned 1e-6": with_spectrum(220, 180, geometric(180, -6), seed=6),
        "low rank + noise": with_spectrum(200, 200, torch.linspace(1, 0.5, 8), seed=7) + random(200, 200, seed=8, scale=1e-5),
        "zero": torch.zeros(64, 48),
        "1 x n": random(1, 77, seed=9),
        "n x 1": random(77, 1, seed=10),
        "2 x n": random(2, 50, seed=11),
    }


MATRICES = structured()


def lapack_triplets(matrix: torch.Tensor, needed=None):
    """The reference: LAPACK's SVD, with the same numerical-rank convention (σ ≤ tolerance → zero triplet)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    largest = s.amax(dim=-1, keepdim=True)
    tolerance = max(matrix.shape[-2:]) * torch.finfo(torch.float32).eps * largest
    keep = s > tolerance
    width = s.shape[-1] if needed is None else needed
    return (u * keep[..., None, :])[..., :width], (s * keep)[..., :width], (vh * keep[..., :, None])[..., :width, :]


@pytest.fixture
def lapack(monkeypatch):
    """Every kernel's fast factorization replaced by LAPACK's."""
    for module in (tensors, adarank_kernel, opcm_kernel, tsv_kernel):
        monkeypatch.setattr(module, "all_singular_triplets", lapack_triplets)


@pytest.mark.parametrize("name", list(MATRICES))
def test_triplets_match_lapack(name):
    matrix = MATRICES[name]
    u, s, vh = all_singular_triplets(matrix)
    k = min(matrix.shape)
    assert u.shape == (matrix.shape[0], k) and s.shape == (k,) and vh.shape == (k, matrix.shape[1])
    exact = torch.linalg.svd(matrix.double(), full_matrices=False)
    lapack_u, lapack_s, lapack_vh = torch.linalg.svd(matrix, full_matrices=False)
    # Reconstruction: the fast path drops σ at or below the numerical-rank
    # tolerance (max(m, n)·ε·σ1); LAPACK keeps them, so allow that much more.
    tolerance = singular_value_tolerance(matrix.shape, float(exact.S[0]) if exact.S.numel() else 0.0, torch.float32)
    dropped = float(exact.S[exact.S <= tolerance].square().sum().sqrt())
    reference = matrix.double()
    allowed = TOLERANCE + (dropped / float(reference.norm()) if reference.norm() > 0 else 0.0)
    assert relative((u * s) @ vh, reference) <= allowed
    assert relative((lapack_u * lapack_s) @ lapack_vh, reference) <= allowed  # the same bar holds for LAPACK
    # Singular values, descending, to LAPACK's precision above the tolerance.
    kept = s > 0
    assert torch.all(s[:-1] >= s[1:])
    assert torch.equal(kept, exact.S.float() > tolerance) or int(kept.sum()) == int((exact.S > tolerance).sum())
    if kept.any():
        assert relative(s[kept], exact.S[kept]) <= TOLERANCE
        # Orthonormal singular vectors where they are defined.
        eye = torch.eye(int(kept.sum()))
        assert (u[:, kept].mT @ u[:, kept] - eye).abs().max() <= 1e-4
        assert (vh[kept] @ vh[kept].mT - eye).abs().max() <= 1e-4
    assert torch.all(u[:, ~kept] == 0) and torch.all(vh[~kept] == 0)


@pytest.mark.slow  # seconds per case: kept out of the quick subset
@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("share", (0.25, 0.5, 0.9))
def test_needed_triplets_match_the_full_call(name, share):
    """``needed=k`` stops refining once the top k are resolved: the same top k, to LAPACK's precision."""
    matrix = MATRICES[name]
    k = max(1, int(share * min(matrix.shape)))
    u, s, vh = tensors.all_singular_triplets(matrix, needed=k)
    assert u.shape == (matrix.shape[0], k) and s.shape == (k,) and vh.shape == (k, matrix.shape[1])
    full_u, full_s, full_vh = tensors.all_singular_triplets(matrix)
    exact = torch.linalg.svd(matrix.double(), full_matrices=False)
    reference = (exact.U[:, :k] * exact.S[:k]) @ exact.Vh[:k]
    if float(reference.norm()) > 0:
        assert relative((u * s) @ vh, reference) <= max(TOLERANCE, 2 * relative((full_u[:, :k] * full_s[:k]) @ full_vh[:k], reference))
    assert relative(s, full_s[:k]) <= TOLERANCE or float(full_s[:k].norm()) == 0


@pytest.mark.parametrize("shape", ((40, 70), (96, 96), (120, 300)))
def test_top_triplets_with_complement(shape):
    """Iso-CTS's split: the top k triplets (as all_singular_triplets gives them) and an
    orthonormal basis of the rest of the left space, also past the numerical rank."""
    low_rank = random(shape[0], 30, seed=3) @ random(30, shape[1], seed=4)  # rank 30 < m
    for matrix in (random(*shape, seed=2), low_rank):
        k = shape[0] // 3
        u, s, vh, complement = tensors.top_triplets_with_complement(matrix, k)
        assert u.shape == (shape[0], k) and complement.shape == (shape[0], shape[0] - k)
        reference = tensors.all_singular_triplets(matrix, needed=k)
        assert relative((u * s) @ vh, (reference[0] * reference[1]) @ reference[2]) <= TOLERANCE
        basis = torch.cat([u[:, s > 0], complement], dim=1)
        assert (basis.mT @ basis - torch.eye(basis.shape[1])).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="needs m <= n"):
        tensors.top_triplets_with_complement(random(70, 40), 5)


def test_triplets_batched_and_deterministic():
    batch = torch.stack([random(90, 60, seed=seed) for seed in range(3)])
    u, s, vh = all_singular_triplets(batch)
    for index in range(3):
        single = all_singular_triplets(batch[index])
        assert torch.equal(single[1], s[index])
        assert torch.equal((single[0] * single[1]) @ single[2], (u[index] * s[index]) @ vh[index])
    again = all_singular_triplets(batch)
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))


def test_float64_stays_float64():
    u, s, vh = all_singular_triplets(random(40, 30).double())
    assert u.dtype == s.dtype == vh.dtype == torch.float64


def exact_polar(matrix: torch.Tensor) -> torch.Tensor:
    """float64 LAPACK polar factor with float32's numerical-rank cut (the same directions kept)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    largest = float(s[0]) if s.numel() else 0.0
    kept = int((s > singular_value_tolerance(matrix.shape, largest, torch.float32)).sum())
    return u[:, :kept] @ vh[:kept]


@pytest.mark.parametrize("name", list(MATRICES))
def test_polar_factor_matches_lapack(name):
    matrix = MATRICES[name]
    fast = polar_factor(matrix)
    lapack = polar_factor(matrix, method="full")
    exact = exact_polar(matrix)
    # The polar factor weights every direction equally, so directions with σ
    # just above the cut (the noise of "low rank + noise", the tail of the 1e-6
    # matrix) are ill-determined in any float32 SVD: the bar is 1e-4, or twice
    # LAPACK float32's own distance from float64 where that is larger
    # (measured: fast 2.5e-3 vs LAPACK 2.5e-3 on "low rank + noise").
    allowed = max(1e-4, 2 * relative(lapack, exact))
    assert relative(fast, exact) <= allowed
    assert relative(fast, lapack) <= max(1e-4, 2 * allowed)


def test_truncated_eigh_method_and_auto():
    matrix = random(120, 80)
    for rank in (1, 20, 80):
        u, s, vh = tensors.truncated_svd(matrix, rank, method="eigh")
        lu, ls, lvh = tensors.truncated_svd(matrix, rank, method="full")
        assert relative((u * s) @ vh, (lu * ls) @ lvh) <= TOLERANCE
    u, s, vh = tensors.truncated_svd(matrix, 70, method="fast")  # wide cut → eigh ("auto" keeps LAPACK)
    lu, ls, lvh = tensors.truncated_svd(matrix, 70, method="full")
    assert relative((u * s) @ vh, (lu * ls) @ lvh) <= TOLERANCE


@pytest.mark.slow  # seconds per case: kept out of the quick subset
@pytest.mark.parametrize("share", (0.1, 0.3, 1.0))
@pytest.mark.parametrize("name", [name for name in MATRICES if min(MATRICES[name].shape) >= 48])
def test_cpu_gram_eigensolvers_match_torch(name, share, monkeypatch):
    """tensors.gram_eigenvectors's CPU path (scipy's ?syrk, then ?syevd, or ?syevr for only the
    top eigenvectors) spans what torch.linalg.eigh's tail spans, in eigh's ascending order, and
    the "gram" truncated SVD built on it still matches LAPACK. The size threshold is lowered so
    that these small matrices take the CPU path."""
    monkeypatch.setattr(tensors, "CPU_GRAM_FROM", 0)
    matrix = MATRICES[name]
    short = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.mT
    for rows in (short, short.contiguous(), short.mT.contiguous().mT):  # C, F and strided layouts
        size = rows.shape[0]
        count = max(1, int(share * size))
        vectors = tensors.gram_eigenvectors(rows, count)
        gram = rows.double() @ rows.double().mT
        values, exact = torch.linalg.eigh(gram)
        exact = exact[:, -count:]
        assert vectors.shape == (size, count) and vectors.dtype == rows.dtype
        assert (vectors.mT @ vectors - torch.eye(count)).abs().max() <= 1e-4
        # The same invariant subspace where the cut falls in a gap (vectors inside a cluster may rotate).
        if count == size or float(values[-count] - values[-count - 1]) > 1e-3 * float(values[-1]):
            assert relative(vectors.double() @ vectors.double().mT, exact @ exact.mT) <= 1e-3
        # Ascending, like eigh's tail: the Rayleigh quotients increase.
        quotients = ((vectors.double().mT @ gram) * vectors.double().mT).sum(dim=1)
        assert torch.all(quotients[1:] >= quotients[:-1] - 1e-5 * float(values[-1]))
    # The truncated SVD on top matches float64 LAPACK where the cut is well defined (a gap of
    # at least 2 % between σk and σk+1; the random matrices' spectra are too dense for that,
    # and any float32 truncation there is as ill-conditioned as the gap is small).
    exact = torch.linalg.svd(matrix.double(), full_matrices=False)
    for rank in (1, max(1, int(share * min(matrix.shape)) - 10)):
        if rank >= len(exact.S) or float(exact.S[rank - 1] - exact.S[rank]) < 0.02 * float(exact.S[rank - 1]):
            continue
        reference = (exact.U[:, :rank] * exact.S[:rank]) @ exact.Vh[:rank]
        u, s, vh = tensors.truncated_svd(matrix, rank, method="gram")
        assert relative((u * s) @ vh, reference) <= 1e-4


@pytest.mark.slow  # seconds per case: kept out of the quick subset
def test_cpu_gram_eigensolver_choice(monkeypatch):
    """?syevr for a narrow cut, ?syevd otherwise, torch below CPU_GRAM_FROM; batches solve each matrix."""
    import scipy.linalg

    calls = []
    original = scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh", lambda *a, **k: calls.append((k["driver"], k["subset_by_index"])) or original(*a, **k))
    rows = random(300, 700)
    tensors.gram_eigenvectors(rows[:100], 10)  # below CPU_GRAM_FROM: torch
    assert calls == []
    tensors.gram_eigenvectors(rows, 300)
    tensors.gram_eigenvectors(rows, 90)
    tensors.gram_eigenvectors(rows, 91)
    assert calls == [("evd", None), ("evr", [210, 299]), ("evd", None)]
    batch = torch.stack([rows, random(300, 700, seed=5)])
    stacked = tensors.gram_eigenvectors(batch, 40)
    assert stacked.shape == (2, 300, 40)
    for matrix, vectors in zip(batch, stacked):
        exact = torch.linalg.eigh(matrix.double() @ matrix.double().mT)[1][:, -40:]
        assert relative(vectors.double() @ vectors.double().mT, exact @ exact.mT) <= 1e-3


@pytest.mark.slow  # 3 BLAS threads on a 2-core machine spin for seconds
def test_cpu_gram_path_uses_torchs_thread_count(monkeypatch):
    """scipy's BLAS runs on as many threads as torch while the Gram path uses it (no
    oversubscription beside a merge limited with --threads / OMP_NUM_THREADS)."""
    import threadpoolctl

    seen = []
    original = tensors._cpu_gram_eigenvectors

    def spy(rows, count):
        seen.extend(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")
        return original(rows, count)

    monkeypatch.setattr(tensors, "_cpu_gram_eigenvectors", spy)
    threads = torch.get_num_threads()
    try:
        for wanted in (1, 3):
            torch.set_num_threads(wanted)
            seen.clear()
            tensors.gram_eigenvectors(random(300, 400), 300)
            assert seen and set(seen) == {wanted}
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------
# Kernels end to end: fast path against the LAPACK path (the `lapack` fixture)

DIRECTIONS = {
    "random square": (random(192, 192), random(192, 192, seed=20)),
    "random tall": (random(300, 128), random(300, 128, seed=21)),
    "random wide": (random(128, 300), random(128, 300, seed=22)),
    "low-rank merged (LoRA-like)": (with_spectrum(160, 160, torch.linspace(1e-2, 5e-3, 8), seed=23), random(160, 160, seed=24)),
    "ill-conditioned merged": (with_spectrum(160, 160, torch.logspace(-2, -7, 160), seed=25), random(160, 160, seed=26)),
    "zero merged": (torch.zeros(64, 64), random(64, 64, seed=27)),
    "1 x n": (random(1, 64, seed=28), random(1, 64, seed=29)),
    "n x 1": (random(64, 1, seed=30), random(64, 1, seed=31)),
}


@pytest.mark.parametrize("zero_diagonal", [True, False])
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_opcm_projection_matches_lapack(name, zero_diagonal):
    merged, update = DIRECTIONS[name]
    fast = opcm_kernel.project_task_vector(merged, update, alpha=0.5, zero_diagonal=zero_diagonal)
    lapack = opcm_kernel.project_task_vector(merged, update, alpha=0.5, zero_diagonal=zero_diagonal, svd="full")
    # The merged tensor is θ0 + acc + D' (θ0 of scale 0.02 as in the benchmark's models).
    base = random(*merged.shape, seed=99, scale=0.02)
    assert relative(base + merged + fast, base + merged + lapack) <= TOLERANCE
    # The projected update itself, relative to its own size: 1e-4, or twice LAPACK
    # float32's own distance from float64 (the ill-conditioned D̄: fast 6.8e-5,
    # LAPACK 1.3e-4 from float64).
    exact = opcm_kernel.project_task_vector(merged.double(), update.double(), alpha=0.5, zero_diagonal=zero_diagonal, svd="full")
    assert relative(fast, exact) <= max(1e-4, 2 * relative(lapack, exact))
    if merged.any() and zero_diagonal:
        assert abs(float((fast.double() * merged.double()).sum())) <= 1e-4 * float(fast.norm() * merged.norm())


def test_opcm_small_singular_directions_do_not_matter():
    """Directions just above and below the numerical rank of D̄ change D' by less than the tolerance."""
    spectrum = torch.cat([torch.linspace(1, 0.2, 40), torch.logspace(-3, -4.5, 40), torch.zeros(48)])
    merged = with_spectrum(128, 128, spectrum * 1e-2, seed=40)
    update = random(128, 128, seed=41)
    fast = opcm_kernel.project_task_vector(merged, update)
    lapack = opcm_kernel.project_task_vector(merged, update, svd="full")
    exact = opcm_kernel.project_task_vector(merged.double(), update.double(), svd="full")
    lapack_error = relative(lapack, exact)
    assert relative(fast, exact) <= max(1e-4, 4 * lapack_error)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_opcm_merge_matches_lapack(count, lapack, monkeypatch):
    base = random(96, 160, seed=50, scale=0.02)
    models = [base + random(96, 160, seed=51 + t) for t in range(count)]
    monkeypatch.undo()
    fast = opcm_kernel.opcm_merge(base, models, project=True)
    for module in (tensors, opcm_kernel):
        monkeypatch.setattr(module, "all_singular_triplets", lapack_triplets)
    reference = opcm_kernel.opcm_merge(base, models, project=True)
    assert relative(fast, reference) <= TOLERANCE


def _kernel_outputs(models, base):
    vectors = torch.stack([m - base for m in models])
    mask = (torch.rand(len(models), min(base.shape), generator=torch.Generator().manual_seed(3)) > 0.4).float()
    return {
        "adarank ta": adarank_kernel.apply_masks(base, models, variant="ta", coefficients=torch.tensor([0.4] * len(models)), mask=mask),
        "adarank cart": adarank_kernel.apply_masks(base, models, variant="cart", coefficients=torch.tensor([1.3] * len(models)), mask=mask),
        "tsv_m": base + tsv_kernel.tsv_update(vectors),
        "iso_c": base + iso_kernel.iso_c_update(vectors),
        "iso_cts": base + iso_kernel.iso_cts_update(vectors, 0.8),
    }


@pytest.mark.slow  # seconds per case: kept out of the quick subset
@pytest.mark.parametrize("count", [2, 4, 8])
@pytest.mark.parametrize("shape", [(96, 96), (160, 64), (64, 160)])
def test_subspace_and_adarank_kernels_match_lapack(count, shape, monkeypatch):
    base = random(*shape, seed=60, scale=0.02)
    models = [base + random(*shape, seed=61 + t) for t in range(count)]
    fast = _kernel_outputs(models, base)
    for module in (tensors, adarank_kernel, opcm_kernel, tsv_kernel):
        monkeypatch.setattr(module, "all_singular_triplets", lapack_triplets)
    # polar_factor (TSV-M's and Iso's) reads tensors.all_singular_triplets: patched above.
    reference = _kernel_outputs(models, base)
    for name in fast:
        assert relative(fast[name], reference[name]) <= TOLERANCE, name


def test_adarank_rank_deficient_task_vectors():
    """Task vectors of low rank (LoRA fine-tunes): masked triplets past the rank contribute nothing."""
    base = random(80, 80, seed=70, scale=0.02)
    models = [base + with_spectrum(80, 80, torch.linspace(2e-3, 1e-3, 4), seed=71 + t) for t in range(3)]
    mask = torch.ones(3, 80)
    out = adarank_kernel.apply_masks(base, models, variant="ta", coefficients=torch.ones(3), mask=mask)
    expected = base + sum(m - base for m in models)
    assert relative(out, expected) <= TOLERANCE


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_cart_two_models_is_the_weighted_average(weights):
    """T = 2: c2 = −(p1/p2)·c1, so Σ pt LR_k(ct) = 0 and CART is the weighted average exactly."""
    models = [random(120, 90, seed=80, scale=0.02), random(120, 90, seed=81, scale=0.02)]
    share = torch.tensor([1.0, 1.0] if weights is None else weights)
    share = share / share.sum()
    average = share[0] * models[0] + share[1] * models[1]
    fast = cart_merge(models, rank_ratio=0.15, scale=1.3, weights=weights)
    assert torch.equal(fast, average)
    # The SVD route gives the same up to its round-off.
    third = random(120, 90, seed=82, scale=1e-12)  # a third, negligible model forces the SVD path
    with_svd = cart_merge(models + [models[1] + third], rank_ratio=0.15, scale=1.3, svd="full")
    assert with_svd.shape == fast.shape
    pieces = []
    for model, p in zip(models, share):
        u, s, vh = torch.linalg.svd((model - average).double(), full_matrices=False)
        pieces.append(p * 2 * (u[:, :13] * s[:13]) @ vh[:13])
    assert relative(average.double() + 1.3 * sum(pieces), average) <= 1e-6


def test_randomized_svd_stated_error():
    """The one approximation offered (truncated_svd method="randomized", 4 power iterations, oversample 10):
    its rank-k residual is within 1 % of the optimal one on a decaying spectrum (measured: < 0.1 %)."""
    matrix = with_spectrum(300, 200, torch.logspace(0, -2, 200), seed=90)
    exact = torch.linalg.svdvals(matrix.double())
    for rank in (5, 20, 40):
        u, s, vh = tensors.truncated_svd(matrix, rank, method="randomized")
        residual = float((matrix.double() - ((u * s) @ vh).double()).norm())
        optimal = float(exact[rank:].square().sum().sqrt())
        assert residual <= 1.01 * optimal
