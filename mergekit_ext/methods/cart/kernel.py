"""Centered low-rank merging, CART (Choi, Kim, Lee, Hong, arXiv 2412.12153).

Official code: github.com/JH-GEECS/CART. Per tensor:

    θavg = Σt pt θt                          (pt = wt / Σ w; plain mean by default)
    ct   = θt − θavg                         (centred task vectors)
    θ    = θavg + λ · T · Σt pt LR_k(ct)     on matrices inside transformer blocks
    θ    = θavg                              everywhere else

With equal weights ``T·pt = 1``, so this is the paper's ``θavg + λ Σt LR_k(ct)``.
Weights are relative (only their ratios matter), and because ``Σt pt ct = 0``
a full-rank merge is exactly the weighted average for any λ. A base model in
the config is accepted and ignored: CART needs none, and the base is never
part of the average. Fused projections (GPT-2's Conv1D ``c_attn``, stored
[in, out]) are low-ranked as one matrix, as the official code does with ViT's
fused ``in_proj_weight``; the SVD does not depend on the orientation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergekit_ext.methods.cart import DEFAULT_LAMBDA, DEFAULT_RANK_RATIO, DEFAULT_SVD
from mergekit_ext.tensors import compute_dtype, rank_from_ratio, truncated_svd


def cart_merge(
    models: Sequence[torch.Tensor],
    *,
    rank_ratio: float = DEFAULT_RANK_RATIO,
    scale: float = DEFAULT_LAMBDA,
    weights: Optional[Sequence[float]] = None,
    low_rank: Optional[bool] = None,
    svd: str = DEFAULT_SVD,
) -> torch.Tensor:
    """CART for one tensor; returns a tensor in the dtype of ``models[0]``.

    ``low_rank`` says whether this tensor is a matrix to low-rank (default: any
    2-D tensor); ``svd`` picks the truncated-SVD algorithm (tensors.truncated_svd).
    """
    if not models:
        raise ValueError("cart needs at least one model")
    if not 0 < rank_ratio <= 1:
        raise ValueError(f"cart: rank_ratio must be in (0, 1], got {rank_ratio!r}")
    out_dtype = models[0].dtype
    dtype = compute_dtype(models[0])
    stacked = torch.stack([model.to(dtype) for model in models])
    count = stacked.shape[0]
    weight = torch.tensor([1.0] * count if weights is None else list(weights), dtype=dtype, device=stacked.device)
    if weight.numel() != count or not bool((weight > 0).all()):
        raise ValueError(f"cart: need one positive weight per model, got {list(weight.tolist())}")
    share = weight / weight.sum()
    average = torch.tensordot(share, stacked, dims=1)
    if low_rank is None:
        low_rank = stacked.dim() == 3
    rows_cols = stacked.shape[1:]
    if not low_rank or count == 1:
        return average.to(out_dtype)
    rank = rank_from_ratio(rows_cols, rank_ratio)
    if rank >= min(rows_cols):
        # LR_k(ct) = ct at full rank and Σ pt ct = 0: the average, without SVD round-off.
        return average.to(out_dtype)
    if count == 2:
        # Two models: c2 = −(p1/p2)·c1, and LR_k is positively homogeneous and odd,
        # so p1·LR_k(c1) + p2·LR_k(c2) = 0 and CART is exactly the weighted average
        # (the SVDs would only add their round-off; tests/test_factorizations.py).
        return average.to(out_dtype)
    left, right = [], []
    for model, model_share in zip(stacked, share):
        centred = model - average  # one at a time: T centred copies would double peak memory
        if not bool(centred.any()):
            continue  # this model equals the average here: nothing to add
        u, s, vh = truncated_svd(centred, rank, method=svd)
        left.append(u * (s * (count * model_share)))
        right.append(vh)
    if not left:
        return average.to(out_dtype)
    # One matmul for Σt (T·pt) Ut St Vtᵀ: [m, T·k] @ [T·k, n].
    low_rank_sum = torch.cat(left, dim=1) @ torch.cat(right, dim=0)
    return average.add_(low_rank_sum, alpha=scale).to(out_dtype)
