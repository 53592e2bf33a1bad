"""AdaRank kernels: factorise task vectors, straight-through masks, apply masks (tensors in, tensors out)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from mergekit_ext.methods.adarank import (
    DEFAULT_SVD,
    INITIAL_LOGIT,
    MASK_TEMPERATURE,
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

    ``ta``: o = θ0 (``base`` required); ``cart``: o = θavg, the plain mean of ``models``.
    """
    if not models:
        raise ValueError("adarank needs at least one model")
    if variant == "ta":
        if base is None:
            raise ValueError("adarank variant 'ta' needs the base model θ0")
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
        u, s, vh = all_singular_triplets(vectors)
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


def apply_masks(
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    *,
    variant: str,
    coefficients: torch.Tensor,
    mask: Optional[torch.Tensor],
    band: Optional[int] = None,
    svd: str = DEFAULT_SVD,
) -> torch.Tensor:
    """One tensor of the final merge from hard ``mask`` [T, band] (None: not a matrix) and ``coefficients`` [T].

    Returns a tensor in the dtype of ``models[0]``.
    """
    out_dtype = models[0].dtype
    origin, vectors = origin_and_vectors(base, models, variant)
    # The learned file's masks and coefficients are read on the host: move them
    # to the tensors' device (a no-op on the CPU), never the tensors to the host.
    coefficients = coefficients.to(device=origin.device, dtype=origin.dtype)
    if mask is None:
        return merge_other(origin, vectors, coefficients).to(out_dtype)
    if band is None:
        band = mask.shape[-1]
    u, s, vh = factorize(vectors, band, svd=svd)
    del vectors
    return merge_matrix(origin, u, s, vh, mask.to(device=origin.device, dtype=origin.dtype), coefficients).to(out_dtype)
