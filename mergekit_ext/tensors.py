"""Shared tensor helpers: dtypes, task vectors, which tensors are matrices, SVD.

Every method family uses these; none does file I/O.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

import torch
from mergekit.sparsify import magnitude

# A tensor inside a repeated transformer block carries its block index in its
# name (``model.layers.3.``, ``transformer.h.3.``, ``encoder.layer.3.``).
_BLOCK_INDEX = re.compile(r"\.\d+\.")
# T5's per-block relative_attention_bias is a position-bucket table, not a projection.
_EMBEDDING_WORDS = ("embed", "wte", "wpe", "lm_head", "relative_attention_bias")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def is_block_matrix(
    name: Optional[str], shape: Sequence[int], vocabulary_axis: Optional[int] = None
) -> bool:
    """True for a 2-D weight inside a repeated transformer block.

    Token and position embeddings and LM heads are never matrices here, even
    when mergekit's metadata does not mark them (GPT-2's ``wpe``).
    """
    if len(shape) != 2 or vocabulary_axis is not None or min(shape) < 2:
        return False
    if name is None:
        return True  # a bare tensor handed to a kernel: trust its shape
    lowered = name.lower()
    if any(word in lowered for word in _EMBEDDING_WORDS):
        return False
    return bool(_BLOCK_INDEX.search(name))


def task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``θt − θ0`` for every model, in the compute dtype: shape [T, *base]."""
    dtype = compute_dtype(base)
    vectors = torch.empty((len(models), *base.shape), dtype=dtype, device=base.device)
    for row, model in zip(vectors, models):
        # Filled row by row: no list of T temporaries beside the stacked result.
        row.copy_(model).sub_(base)
    return vectors


def rank_from_ratio(shape: Sequence[int], rank_ratio: float) -> int:
    """k = max(1, int(rank_ratio · min(m, n))), the papers' convention."""
    return max(1, int(rank_ratio * min(shape[-2], shape[-1])))


SVD_METHODS = ("auto", "full", "gram", "randomized", "eigh", "fast")


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    exact_above: float = 0.25,
    oversample: int = 10,
    power_iterations: int = 4,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets ``U[:, :k], S[:k], Vh[:k]`` in the compute dtype.

    ``method``:
      - ``full``: LAPACK SVD of the whole matrix, then truncate (the reference).
      - ``randomized``: range finder with power iterations (Halko et al. 2011).
        Its rank-k residual is near-optimal, but on a flat spectrum its factors
        can differ from the SVD's near the cut (measured in tests/test_cart.py).
      - ``gram``: eigenvectors of the smaller Gram matrix ``A Aᵀ`` plus a
        Rayleigh–Ritz step on ``A`` itself. Agrees with ``full`` to ~1e-5
        relative on typical spectra (worse, up to ~1e-3, when σk/σ1 < 1e-2,
        because the Gram matrix squares the condition number) and is several
        times faster than ``full`` at every k.
      - ``eigh``: every singular triplet from ``all_singular_triplets`` (Gram
        eigendecomposition with a scale-by-scale refinement of the small
        singular values), then truncated: exact, agreeing with ``full`` to the
        tolerances in tests/test_factorizations.py, and 1.5–2.5× faster than
        LAPACK's SVD on one CPU thread. Singular vectors past the numerical
        rank (``singular_value_tolerance``) come back as zero columns (their
        directions are arbitrary); every ``U diag(s) Vᴴ`` product is unchanged.
      - ``auto``: ``gram`` when ``rank + oversample`` is below
        ``exact_above · min(m, n)``, otherwise ``full``. Both give the exact
        truncation the papers define; ``randomized`` is only used on request.
      - ``fast``: as ``auto``, with ``eigh`` in place of ``full`` (what the
        kernels of issue 15 use when their setting is ``auto``).
    The sketch uses its own seeded generator, so results are deterministic and
    the global RNG is untouched.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; expected one of {', '.join(SVD_METHODS)}")
    dtype = compute_dtype(matrix)
    matrix = matrix.to(dtype)
    rows, cols = matrix.shape
    full_rank = min(rows, cols)
    rank = max(1, min(rank, full_rank))
    sketch_size = rank + oversample
    if method in ("auto", "fast"):
        wide_method = "eigh" if method == "fast" else "full"
        method = wide_method if sketch_size >= exact_above * full_rank else "gram"
    if method == "eigh":
        u, s, vh = all_singular_triplets(matrix, needed=rank)
        return u[:, :rank], s[:rank], vh[:rank]
    if method == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    if method == "gram":
        return _gram_svd(matrix, rank, oversample)
    sketch_size = min(sketch_size, full_rank)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    sketch = torch.randn(cols, sketch_size, generator=generator, device=matrix.device, dtype=dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return (basis @ u_small[:, :rank]), s[:rank], vh[:rank]


def _gram_svd(matrix: torch.Tensor, rank: int, oversample: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets from the eigenvectors of the smaller Gram matrix."""
    wide = matrix.shape[0] <= matrix.shape[1]
    short_side = matrix if wide else matrix.mT
    width = min(short_side.shape[0], rank + oversample)
    basis = gram_eigenvectors(short_side, width)
    # Rayleigh–Ritz on the matrix (not its square): singular values and the
    # rotation inside the basis come out at the matrix's own precision.
    u_small, s, vh = torch.linalg.svd(basis.mT @ short_side, full_matrices=False)
    u = basis @ u_small[:, :rank]
    s, vh = s[:rank], vh[:rank]
    return (u, s, vh) if wide else (vh.mT, s, u.mT)


# On the CPU, Gram eigenvectors go through scipy's LAPACK: ?syrk forms the Gram matrix at half
# a GEMM's cost (one triangle), and ?syevd / ?syevr solve it. Measured on one thread of this
# project's 2-core AMD EPYC (2026-12-02): the Gram of a 2048 × 5504 matrix 0.21 s against
# 0.47 s for torch's GEMM; a 2048² eigendecomposition 0.63 s against 0.73 s for
# torch.linalg.eigh, and 0.27 / 0.41 / 0.65 s for only its top 5 / 25 / 50 % (MRRR, ?syevr).
# Below CPU_GRAM_FROM rows torch is as fast and needs no hand-over.
CPU_GRAM_FROM = 256
# Only the top eigenvectors are computed when they are at most this share of them.
SUBSET_EIGH_SHARE = 0.3


def gram_eigenvectors(rows: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """Eigenvectors of the Gram matrix ``rows @ rows.mT`` of ``rows`` [..., p, q]: [..., p, p] in
    ascending order of eigenvalue, as ``torch.linalg.eigh``; with ``count``, only the top ``count``
    (that result's last ``count`` columns).

    On the CPU (p ≥ ``CPU_GRAM_FROM``): ``?syrk`` and ``?syevd``, or ``?syevr`` for only the top
    eigenvectors when ``count ≤ SUBSET_EIGH_SHARE · p``, through scipy on as many BLAS threads
    as torch uses; on every other device (and for small p) torch's GEMM and ``linalg.eigh``.
    All are exact eigensolvers and agree to their precision (tests/test_factorizations.py);
    the result is deterministic for the same input and thread count. Not differentiable.
    """
    size = rows.shape[-2]
    count = size if count is None else max(1, min(count, size))
    if rows.device.type != "cpu" or size < CPU_GRAM_FROM:
        return torch.linalg.eigh(rows @ rows.mT)[1][..., -count:]
    flat = rows.detach().reshape(-1, *rows.shape[-2:])
    with _blas_threads():
        vectors = [_cpu_gram_eigenvectors(matrix.numpy(), count) for matrix in flat]
    return torch.stack(vectors).reshape(*rows.shape[:-2], size, count)


def _cpu_gram_eigenvectors(rows, count: int) -> torch.Tensor:
    import scipy.linalg
    from scipy.linalg.blas import get_blas_funcs

    syrk = get_blas_funcs("syrk", (rows,))
    # syrk wants a Fortran-ordered operand: rows is one in Fortran order, or rowsᵀ is.
    gram = syrk(1.0, rows, trans=0) if rows.flags.f_contiguous else syrk(1.0, rows.T, trans=1)
    size = gram.shape[0]
    subset = [size - count, size - 1] if count <= SUBSET_EIGH_SHARE * size else None
    _, vectors = scipy.linalg.eigh(
        gram, lower=False, driver="evr" if subset else "evd", subset_by_index=subset, overwrite_a=True, check_finite=False
    )  # syrk filled the upper triangle
    if subset is None:
        vectors = vectors[:, size - count :]
    return torch.from_numpy(vectors)


_BLAS_CONTROLLER = None


def _blas_threads():
    """Limit scipy's BLAS to torch's thread count while it runs (one controller, built once)."""
    global _BLAS_CONTROLLER
    import scipy.linalg  # noqa: F401  (loads scipy's own BLAS before the controller looks for it)
    from threadpoolctl import ThreadpoolController

    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas")


# Directions whose singular value is below REFINE_RATIO · (the largest one still
# being resolved) are re-resolved on their own Gram matrix: a float32 Gram
# eigendecomposition resolves σi ≥ 0.1·σmax to within ~5× LAPACK's own error.
REFINE_RATIO = 0.1


# Below this many rows or columns LAPACK's SVD is as fast and a few ulps more
# accurate (tests/test_subspace.py's order-invariance check at 16 × 28 needs it).
LAPACK_BELOW = 64


def all_singular_triplets(
    matrix: torch.Tensor, *, lapack_below: int = LAPACK_BELOW, needed: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U [m, k], s [k], Vᴴ [k, n]`` (k = min(m, n)) of a matrix, or of a batch [..., m, n].

    ``needed``: only the top ``needed`` triplets are wanted (TSV-M's r/T per task,
    a truncation); k = min(needed, min(m, n)) and the refinement below stops once
    those are resolved, as the directions past them never reach the caller.

    Exact, not approximate: the eigendecomposition of the smaller Gram matrix
    (one GEMM and one symmetric eigensolver, batched over leading dimensions),
    ``W = A V``, ``s = ‖W‖`` column-wise (so singular values carry the matrix's
    own precision, not the square root of the Gram matrix's), ``U = W / s``.
    The Gram matrix squares the condition number: its eigenvectors for
    σi < 0.1·σ1 are only accurate to ``ε σ1² / (σi · gap)``. Those directions are
    resolved again on the Gram matrix of their own columns of ``W`` (scale-aware:
    its entries carry errors ``ε σi σj``), after a first-order decoupling from
    the resolved ones, and so on down to the numerical rank
    (``singular_value_tolerance``), one decade per level. Past the numerical
    rank, ``s`` is set to 0 and U's and V's columns to 0: those directions are
    arbitrary in any SVD (LAPACK completes them to a basis), and every
    ``U diag(s) Vᴴ`` product is unchanged. Singular values are sorted
    descending; deterministic for the same input and device.

    Cost (m ≥ n): m·n² for the Gram matrix, n³ for one eigensolver, 2·m·n² for
    ``W``, plus m·n·|S| for the refined directions S (none for a well-conditioned
    tall matrix, a few percent of n for a square random one). float32 in, float32
    math (float64 stays float64); the tensors stay on the input's device.
    Matrices with fewer than ``lapack_below`` rows or columns go to LAPACK
    (as fast there, and a few ulps more accurate), with the same zeroing.
    """
    dtype = compute_dtype(matrix)
    matrix = matrix.to(dtype)
    rows, cols = matrix.shape[-2], matrix.shape[-1]
    width = min(rows, cols) if needed is None else max(1, min(needed, rows, cols))
    if min(rows, cols) < lapack_below:
        # Small matrices: LAPACK, with the same numerical-rank convention.
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        largest = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s
        keep = s > max(rows, cols) * torch.finfo(dtype).eps * largest
        u, s, vh = u * keep[..., None, :], s * keep, vh * keep[..., :, None]
        return u[..., :width], s[..., :width], vh[..., :width, :]
    wide = rows < cols
    tall = matrix.mT if wide else matrix  # [..., M, N], M >= N
    vectors = gram_eigenvectors(tall.mT).flip(-1)  # eigh's order is ascending
    columns = tall @ vectors  # W = A V = U diag(s)
    batch_shape = tall.shape[:-2]
    flat_tall = tall.reshape(-1, *tall.shape[-2:])
    flat_v = vectors.reshape(-1, *vectors.shape[-2:])
    flat_w = columns.reshape(-1, *columns.shape[-2:])
    lefts, values, rights = [], [], []
    for a, v, w in zip(flat_tall, flat_v, flat_w):
        u, s, v, _ = _refine_triplets(a, v, w, width)
        lefts.append(u)
        values.append(s)
        rights.append(v)
    u = torch.stack(lefts).reshape(*batch_shape, columns.shape[-2], width)
    s = torch.stack(values).reshape(*batch_shape, width)
    v = torch.stack(rights).reshape(*batch_shape, vectors.shape[-2], width)
    # tall = U s Vᵀ; for a wide matrix, A = tallᵀ = V s Uᵀ.
    return (v, s, u.mT) if wide else (u, s, v.mT)


def _refine_triplets(
    tall: torch.Tensor, v: torch.Tensor, w: torch.Tensor, width: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``width`` of ``U, s, V`` of one tall matrix from its Gram eigenvectors ``v`` and
    ``w = tall @ v`` (see ``all_singular_triplets``), and the other columns of ``v``: an
    orthonormal basis of the complement of the top ``width`` right singular vectors
    (never zeroed; the refinement only rotates and decouples, which keeps them orthogonal)."""
    s = torch.linalg.vector_norm(w, dim=0)
    order = torch.argsort(s, descending=True, stable=True)
    v, w, s = v[:, order], w[:, order], s[order]
    count = s.shape[0]
    largest = float(s[0]) if count else 0.0
    tolerance = singular_value_tolerance(tall.shape, largest, s.dtype)
    start = 0
    while start < count and largest > 0:
        top = float(s[start])
        if top <= tolerance:
            break
        cut = start + int((s[start:] >= REFINE_RATIO * top).sum())
        if cut >= count or float(s[cut]) <= tolerance:
            break  # nothing left but numerical zeros: their directions are arbitrary anyway
        resolved, rest = slice(start, cut), slice(cut, count)
        # First-order decoupling of the resolved directions L from the rest S:
        # E = W_Lᵀ W_S / (s_L² − s_S²), v_S −= V_L E, v_L += V_S Eᵀ (and W alike).
        coupling = w[:, resolved].mT @ w[:, rest]
        gaps = s[resolved].square()[:, None] - s[rest].square()[None, :]
        step = coupling / gaps
        v_rest, w_rest = v[:, rest].clone(), w[:, rest].clone()
        v[:, rest] -= v[:, resolved] @ step
        w[:, rest] -= w[:, resolved] @ step
        v[:, resolved] += v_rest @ step.mT
        w[:, resolved] += w_rest @ step.mT
        if cut >= width:
            break  # the wanted directions are resolved; the rest is cut off below
        # Re-resolve S on the Gram matrix of its own columns (scale σ_S, not σ1).
        rotation = gram_eigenvectors(w[:, rest].mT).flip(-1)
        v[:, rest] = v[:, rest] @ rotation
        w[:, rest] = w[:, rest] @ rotation
        s[rest] = torch.linalg.vector_norm(w[:, rest], dim=0)
        order = torch.argsort(s[rest], descending=True, stable=True) + cut
        v[:, rest], w[:, rest], s[rest] = v[:, order], w[:, order], s[order]
        start = cut
    rest = v[:, width:]
    v, w, s = v[:, :width], w[:, :width], s[:width]
    significant = s > tolerance
    s = torch.where(significant, s, torch.zeros_like(s))
    safe = torch.where(significant, s, torch.ones_like(s))
    u = w / safe * significant
    v = v * significant
    return u, s, v, rest


def top_triplets_with_complement(
    matrix: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` triplets of a wide or square matrix [m, n] (m ≤ n), as
    ``all_singular_triplets(matrix, needed=rank)``, and an orthonormal basis [m, m − rank] of
    the orthogonal complement of their left singular vectors.

    The complement is the rest of the left Gram eigenbasis (LAPACK's completion below
    ``lapack_below``), orthonormal even past the numerical rank, where the singular
    vectors themselves are zeroed. Iso-CTS projects task vectors onto it.
    """
    dtype = compute_dtype(matrix)
    matrix = matrix.to(dtype)
    rows, cols = matrix.shape
    if rows > cols:
        raise ValueError(f"top_triplets_with_complement: needs m <= n, got shape {tuple(matrix.shape)}")
    rank = max(1, min(rank, rows))
    if rows < LAPACK_BELOW:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # U is square: a complete basis
        keep = s > singular_value_tolerance(matrix.shape, float(s[0]), dtype)
        return (u * keep)[:, :rank], (s * keep)[:rank], (vh * keep[:, None])[:rank], u[:, rank:]
    tall = matrix.mT
    vectors = gram_eigenvectors(matrix).flip(-1)  # eigh's order is ascending
    u, s, v, complement = _refine_triplets(tall, vectors, tall @ vectors, rank)
    return v, s, u.mT, complement


def factored_svd(left: torch.Tensor, right: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``left @ right`` ([m, p] @ [p, n], p small) without forming it.

    QR of both thin factors, SVD of the p×p core: exact, and O((m + n)·p²)
    instead of an SVD of the m×n product (LoRA-shaped updates, p = rank sum).
    """
    dtype = compute_dtype(left)
    q_left, r_left = torch.linalg.qr(left.to(dtype))
    q_right, r_right = torch.linalg.qr(right.to(dtype).mT)
    u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.mT, full_matrices=False)
    rank = max(1, min(rank, s.shape[0]))
    return q_left @ u_core[:, :rank], s[:rank], (q_right @ vh_core[:rank].mT).mT


def ties_multitask_vector(vectors: torch.Tensor, densities: Sequence[float]) -> torch.Tensor:
    """TIES flavour of τMTL: trim each row to its top ``density``, elect signs, disjoint SUM.

    Trimming is mergekit's own ``magnitude`` and the election is that of its
    ``get_mask(method="sum")``, so ``k = 0`` is exactly mergekit ``ties`` with
    ``normalize: false``. Only a boolean keep-mask per task is stored beside
    the task vectors (which the TALL masks still need untrimmed), and sums run
    one task at a time.
    """
    keep = torch.empty(vectors.shape, dtype=torch.bool, device=vectors.device)
    for keep_row, row, density in zip(keep, vectors, densities):
        torch.ne(magnitude(row, density), 0, out=keep_row)
    elected = torch.zeros_like(vectors[0])
    for row, keep_row in zip(vectors, keep):
        elected += row * keep_row
    majority = torch.where(elected >= 0, 1.0, -1.0).to(vectors.dtype)
    multitask = elected.zero_()
    for row, keep_row in zip(vectors, keep):
        multitask += torch.where(keep_row & (row.sign() == majority), row, 0.0)
    return multitask


def fix_signs(vectors: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Flip each eigen/singular vector (a slice along ``dim``) so its largest-magnitude entry is positive.

    Eigenvectors are defined up to sign; fixing it makes bases deterministic
    across LAPACK drivers and runs.
    """
    pivot = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.gather(vectors, dim, pivot).sign()
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def split_singular_values(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA-shaped factors ``(A, B)`` of ``U diag(s) Vᴴ``: ``B = U √s``, ``A = √s Vᴴ``.

    Splitting the singular values evenly keeps either factor from carrying all
    the magnitude (works batched: ``u`` [..., m, k], ``s`` [..., k], ``vh`` [..., k, n]).
    """
    root = s.sqrt()
    return (root.unsqueeze(-1) * vh).contiguous(), (u * root.unsqueeze(-2)).contiguous()


def singular_value_tolerance(shape: Sequence[int], largest: float, dtype: torch.dtype) -> float:
    """Singular values at or below this are numerically zero: max(m, n) · ε · σmax (numpy's matrix_rank rule)."""
    return max(shape[-2], shape[-1]) * torch.finfo(dtype).eps * float(largest)
