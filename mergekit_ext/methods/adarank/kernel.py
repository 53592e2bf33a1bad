"""AdaRank kernels: factorise task vectors, straight-through masks, apply masks (tensors in, tensors out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from mergekit_ext.methods.adarank import (
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_SVD,
    FINGERPRINT_VALUES,
    INITIAL_LOGIT,
    MASK_TEMPERATURE,
    SUBSPACE_VARIANTS,
    VARIANTS,
)
from mergekit_ext.tensors import (
    all_singular_triplets,
    compute_dtype,
    rank_from_ratio,
    task_vectors,
    truncated_svd,
)


def origin_and_vectors(
    base: Optional[torch.Tensor], models: Sequence[torch.Tensor], variant: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The origin ``o`` and stacked task vectors ``vt = θt − o`` [T, *shape], compute dtype.

    ``ta``, ``tsv_m``, ``iso_cts``: o = θ0 (``base`` required); ``cart``: o = θavg, the
    plain mean of ``models``.
    """
    if not models:
        raise ValueError("adarank needs at least one model")
    if variant in ("ta", *SUBSPACE_VARIANTS):
        if base is None:
            raise ValueError(f"adarank variant {variant!r} needs the base model θ0")
        origin = base.to(compute_dtype(base))
    elif variant == "cart":
        dtype = compute_dtype(models[0])
        origin = torch.zeros(models[0].shape, dtype=dtype, device=models[0].device)
        for model in models:
            origin.add_(model.to(dtype))
        origin.div_(len(models))
    else:
        raise ValueError(f"unknown adarank variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return origin, task_vectors(origin, models)


def band_rank(shape: Sequence[int], max_rank_ratio: float) -> int:
    """How many singular triplets per task vector are candidates: max(1, int(ratio · min(m, n)))."""
    if not 0 < max_rank_ratio <= 1:
        raise ValueError(f"adarank: max_rank_ratio must be in (0, 1], got {max_rank_ratio!r}")
    return rank_from_ratio(shape, max_rank_ratio)


def factorize(vectors: torch.Tensor, band: int, *, svd: str = DEFAULT_SVD) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``band`` SVD of each task vector in ``vectors`` [T, m, n]: U [T, m, b], s [T, b], Vh [T, b, n].

    Deterministic for the same input (LAPACK / eigh); signs of a triplet do not
    matter because only ``U diag(s) Vᵀ`` products are used. A wide band (the
    default, every triplet) goes through ``tensors.all_singular_triplets`` for
    all tasks at once; triplets past a task vector's numerical rank come back
    with s = 0 and zero vectors (their product is zero either way).
    """
    if svd == "eigh" or (svd in ("auto", "fast") and band + 10 >= 0.25 * min(vectors.shape[-2:])):
        # Every task at once (batched Gram eigensolver): the same triplets as
        # truncated_svd's "eigh", which "auto" picks for a band this wide.
        u, s, vh = all_singular_triplets(vectors, needed=band)
        return u[..., :band], s[..., :band], vh[..., :band, :]
    factors = [truncated_svd(vector, band, method=svd) for vector in vectors]
    return tuple(torch.stack(part) for part in zip(*factors))  # type: ignore[return-value]


def initial_logits(count: int, shape: Sequence[int], band: int, init_rank_ratio: float) -> torch.Tensor:
    """Logits [count, band]: +0.1 for the top ``max(1, int(init_rank_ratio · min(m, n)))``, −0.1 below.

    So step 0 is the base method: every component for TA (ratio 1), CART's
    rank-k truncation for CART. (The official code uses int(), without the
    max(1, ·) that this project's CART uses; they differ only when ratio·min < 1.)
    """
    if not 0 < init_rank_ratio <= 1:
        raise ValueError(f"adarank: init_rank_ratio must be in (0, 1], got {init_rank_ratio!r}")
    kept = min(band, rank_from_ratio(shape, init_rank_ratio))
    logits = torch.full((count, band), -INITIAL_LOGIT, dtype=torch.float32)
    logits[:, :kept] = INITIAL_LOGIT
    return logits


def straight_through_mask(logits: torch.Tensor, temperature: float = MASK_TEMPERATURE) -> torch.Tensor:
    """Binary mask ``(p > 0.5)`` in the forward pass, gradient of ``p = sigmoid(logit / temperature)``.

    The paper's ``p·s + ((hard − p)·s).detach()`` has the same gradient with
    respect to ``p`` (``s``); written as ``hard + (p − p.detach())`` the forward
    value is exactly the hard mask (no ``p + (1 − p)`` rounding).
    """
    p = torch.sigmoid(logits / temperature)
    hard = (p > 0.5).to(p.dtype)
    return hard + (p - p.detach())


def merge_matrix(
    origin: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    mask: torch.Tensor,
    coefficients: torch.Tensor,
) -> torch.Tensor:
    """``o + Σt coef[t] · Ut diag(mask[t] ⊙ st) Vtᵀ`` as one [m, T·b] @ [T·b, n] product.

    Differentiable in ``mask`` (a float or straight-through mask [T, b]) and
    ``coefficients`` [T].
    """
    count, rows, band = u.shape
    scaled = u * (s * mask.to(s.dtype) * coefficients.to(s.dtype)[:, None])[:, None, :]
    left = scaled.permute(1, 0, 2).reshape(rows, count * band)
    right = vh.reshape(count * band, vh.shape[-1])
    return origin + left @ right


def merge_other(origin: torch.Tensor, vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``o + Σt coef[t] · vt`` for a tensor that is not a matrix (never masked)."""
    return origin + torch.tensordot(coefficients.to(vectors.dtype), vectors, dims=1)


def mask_rows(variant: str, count: int) -> int:
    """Rows of a matrix's mask (and of every tensor's coefficients): one per task, plus the
    common subspace's row for ``iso_cts``."""
    return count + 1 if variant == "iso_cts" else count


def other_vectors(variant: str, vectors: torch.Tensor) -> torch.Tensor:
    """What ``coef`` multiplies on a non-matrix tensor: vt (TA, CART), or vt / T for TSV-M and
    Iso, whose base methods use θ0 + λ·mean_t τt there (coefficients λ give that exactly)."""
    return vectors / vectors.shape[0] if variant in SUBSPACE_VARIANTS else vectors


@dataclass
class Components:
    """A matrix's candidate components, flat: ``left`` [m, K], ``sigma`` [K], ``right`` [K, n];
    component i is cell (``rows[i]``, ``positions[i]``) of the mask grid ``grid`` = (rows, band)
    and is scaled by coefficient row ``rows[i]``. ``fingerprint`` [rows, FINGERPRINT_VALUES]:
    each row's top singular values (zeros where a row has fewer)."""

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    grid: Tuple[int, int]
    fingerprint: torch.Tensor

    def valid(self) -> torch.Tensor:
        """bool [rows, band]: the grid cells that hold a component (the others are never used)."""
        valid = torch.zeros(self.grid, dtype=torch.bool)
        valid[self.rows, self.positions] = True
        return valid


def _grid_values(values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    table = torch.zeros(grid, dtype=torch.float32)
    table[rows, positions] = values.detach().to("cpu", torch.float32)
    return table[:, :FINGERPRINT_VALUES].clone()


def matrix_components(
    vectors: torch.Tensor,
    variant: str,
    *,
    band: Optional[int] = None,
    svd: str = DEFAULT_SVD,
    common_space_fraction: float = DEFAULT_COMMON_SPACE_FRACTION,
) -> Components:
    """The candidate components of one matrix's task vectors [T, m, n] (compute dtype).

    ``ta``, ``cart``: the top-``band`` SVD triplets of each task vector, grid [T, band].
    ``tsv_m``: the columns of TSV-M's orthogonalized stack U⊥ diag(ŝ) V⊥ᵀ, task t's
    k = max(1, r // T) in row t (``tsv.kernel.tsv_components``), grid [T, k]; all on and
    coefficients λ is θ0 + λ·Δ_TSV.
    ``iso_cts``: the columns of Iso-CTS's stack, task blocks in rows 0…T−1 and the common
    block in row T, every singular value σ̄ = mean(ŝ) of the unmasked stack (fixed: a
    mask removes a direction, it does not re-flatten the rest), grid [T + 1, max(s, k)]
    (``iso.kernel.iso_cts_components``; ``common_space_fraction`` 1 is Iso-C, every
    component in the common row).
    """
    count, rows, cols = vectors.shape
    if variant in ("ta", "cart"):
        u, s, vh = factorize(vectors, band, svd=svd)
        width = u.shape[-1]
        left = u.permute(1, 0, 2).reshape(rows, count * width)
        task = torch.arange(count, dtype=torch.long).repeat_interleave(width)
        position = torch.arange(width, dtype=torch.long).repeat(count)
        return Components(
            left, s.reshape(-1), vh.reshape(count * width, cols), task, position, (count, width),
            s[:, :FINGERPRINT_VALUES].detach().to("cpu", torch.float32).clone(),
        )  # fmt: skip
    if variant == "tsv_m":
        from mergekit_ext.methods.tsv.kernel import tsv_components

        left, sigma, right, task, position = tsv_components(vectors)
        grid = (count, max(1, min(rows, cols) // count))
        return Components(left, sigma, right, task, position, grid, _grid_values(sigma, task, position, grid))
    if variant == "iso_cts":
        from mergekit_ext.methods.iso.kernel import iso_cts_components, iso_cts_split

        left, sigma, right, block, position = iso_cts_components(vectors, common_space_fraction)
        keep_common, specific = iso_cts_split(min(rows, cols), count, common_space_fraction)
        grid = (count + 1, max(keep_common, specific))
        fingerprint = _grid_values(sigma, block, position, grid)
        flat = sigma.mean().expand(sigma.shape).clone() if sigma.numel() else sigma
        return Components(left, flat, right, block, position, grid, fingerprint)
    raise ValueError(f"unknown adarank variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def merge_components(
    origin: torch.Tensor,
    left: torch.Tensor,
    sigma: torch.Tensor,
    right: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    coefficients: torch.Tensor,
) -> torch.Tensor:
    """``o + Σi coef[rows[i]] · mask[rows[i], positions[i]] · σi · left[:, i] right[i]`` as one
    [m, K] @ [K, n] product; differentiable in ``mask`` [rows, band] and ``coefficients`` [rows]."""
    scale = sigma * mask.to(sigma.dtype)[rows, positions] * coefficients.to(sigma.dtype)[rows]
    return origin + (left * scale) @ right


def initial_grid_logits(valid: torch.Tensor, shape: Sequence[int], init_rank_ratio: float) -> torch.Tensor:
    """Logits [rows, band]: +0.1 on the cells of ``valid`` whose position is below
    ``max(1, int(init_rank_ratio · min(m, n)))``, −0.1 elsewhere (``initial_logits`` when
    every cell holds a component)."""
    if not 0 < init_rank_ratio <= 1:
        raise ValueError(f"adarank: init_rank_ratio must be in (0, 1], got {init_rank_ratio!r}")
    on = valid.clone()
    on[:, rank_from_ratio(shape, init_rank_ratio):] = False
    return torch.where(on, torch.tensor(INITIAL_LOGIT), torch.tensor(-INITIAL_LOGIT)).to(torch.float32)


def apply_masks(
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    *,
    variant: str,
    coefficients: torch.Tensor,
    mask: Optional[torch.Tensor],
    band: Optional[int] = None,
    svd: str = DEFAULT_SVD,
    common_space_fraction: float = DEFAULT_COMMON_SPACE_FRACTION,
    check: Optional[Callable[[Components], None]] = None,
) -> torch.Tensor:
    """One tensor of the final merge from a hard ``mask`` [rows, band] (None: not a matrix) and
    ``coefficients`` [rows] (``mask_rows``). Returns a tensor in the dtype of ``models[0]``.

    ``check`` sees a matrix's recomputed components before they are used (the mergekit
    method compares their fingerprint with the learned file's) and may raise."""
    out_dtype = models[0].dtype
    origin, vectors = origin_and_vectors(base, models, variant)
    # The learned file's masks and coefficients are read on the host: move them
    # to the tensors' device (a no-op on the CPU), never the tensors to the host.
    coefficients = coefficients.to(device=origin.device, dtype=origin.dtype)
    if mask is None:
        return merge_other(origin, other_vectors(variant, vectors), coefficients[: vectors.shape[0]]).to(out_dtype)
    if band is None:
        band = mask.shape[-1]
    parts = matrix_components(vectors, variant, band=band, svd=svd, common_space_fraction=common_space_fraction)
    if check is not None:
        check(parts)
    # TA and CART with every triplet (the full band): row t's components sum to vt itself.
    whole = vectors if variant in ("ta", "cart") and parts.grid[1] == min(vectors.shape[-2:]) else None
    merged = merge_parts(origin, parts, mask, coefficients, whole=whole)
    del vectors
    return merged.to(out_dtype)


def merge_parts(
    origin: torch.Tensor,
    parts: Components,
    mask: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    whole: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``merge_components`` of ``parts`` with a hard mask grid and coefficient rows (moved to ``origin``'s device).

    ``whole`` [rows, m, n]: what each row's components sum to when all are on (TA's and
    CART's task vectors with the full band). A row whose mask drops fewer components than
    it keeps is then added as ``coef · (whole − dropped)``, so the product costs
    m·n·min(kept, dropped) per row instead of m·n·band; the same matrix to float32
    round-off (the singular vectors are a complete orthonormal basis).
    """
    device = origin.device
    mask = mask.to(device=device, dtype=origin.dtype)
    coefficients = coefficients.to(device=device, dtype=origin.dtype)
    rows, positions = parts.rows.to(device), parts.positions.to(device)
    if whole is None or not bool(((mask == 0) | (mask == 1)).all()):
        return merge_components(origin, parts.left, parts.sigma, parts.right, rows, positions, mask, coefficients)
    on = mask[rows, positions] > 0
    # With the full band every grid cell holds a component, so a row's kept count is its mask's sum.
    subtract = mask.sum(dim=1) > mask.shape[1] / 2  # rows cheaper as "whole minus the dropped"
    chosen = torch.where(subtract[rows], ~on, on)
    sign = torch.where(subtract[rows], -1.0, 1.0).to(origin.dtype)
    scale = (parts.sigma * sign * coefficients[rows])[chosen]
    merged = origin + torch.tensordot(coefficients * subtract, whole, dims=1)
    return merged.add_((parts.left[:, chosen] * scale) @ parts.right[chosen])
