"""Reversible model merging of low-rank weights (RMM), closed form.

Alipour & Mohammadi Amiri, "Towards Reversible Model Merging For Low-rank
Weights", arXiv 2510.14163. No public code; this is docs/methods.md#rmm: per adapted
module, stack the n tasks' vectors along a task axis, eigendecompose their
n×n Gram matrix in float64, keep the top-K eigenvectors ``Q``; the basis is
``Qᵀ Y`` and task i's coefficients are row i of ``Q`` (Eckart–Young on the
task axis, so K = n is lossless).

Variants (what is stacked):
- ``factor``: the whole A factor and the whole B factor of each task (two bases);
- ``position``: each row of A and each column of B separately (a basis per position);
- ``product``: the dense updates ``Bi Ai`` themselves; the K dense basis updates
  are re-factorised by truncated SVD to ``basis_rank``.

Kernels take tensors and return tensors; ``build_basis`` / ``reconstruct`` work
on in-memory adapters (``mergekit_ext.adapters.peft_io.LoraAdapter``) and do no file I/O.
The mergekit method ``rmm`` (``method.py``) is the dense product-space form for ``mergekit-yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ext.methods.rmm import VARIANTS
from mergekit_ext.tensors import fix_signs, split_singular_values, task_vectors

# ---------------------------------------------------------------------------
# kernels


def task_basis(vectors: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` basis of the rows of ``vectors`` [..., n, d] along the task axis.

    Returns ``basis`` [..., k, d] and ``coefficients`` [..., n, k] (float32) with
    ``coefficients @ basis`` the best rank-k fit of ``vectors``. The Gram matrix
    and its eigendecomposition are float64; each eigenvector's largest entry is
    made positive so the result is deterministic.
    """
    n = vectors.shape[-2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of tasks ({n}), got {k}")
    stacked = vectors.to(torch.float64)
    gram = stacked @ stacked.mT
    _, eigenvectors = torch.linalg.eigh(gram)
    top = fix_signs(eigenvectors[..., :, -k:].flip(-1))  # eigh sorts ascending
    basis = top.mT @ stacked
    return basis.to(torch.float32), top.to(torch.float32)


def factor_basis(a: torch.Tensor, b: torch.Tensor, k: int, *, per_position: bool = False) -> Dict[str, torch.Tensor]:
    """Bases of one module's stacked factors A [n, r, in] and B [n, out, r].

    Returns ``a`` [k, r, in], ``b`` [k, out, r] (basis factors) and ``a_coef``,
    ``b_coef``: [n, k] for the factor variant, [n, k, r] per position.
    """
    n, rank, _ = a.shape
    if per_position:
        basis_a, coef_a = task_basis(a.permute(1, 0, 2), k)  # [r, k, in], [r, n, k]
        basis_b, coef_b = task_basis(b.permute(2, 0, 1), k)  # [r, k, out], [r, n, k]
        return {
            "a": basis_a.permute(1, 0, 2).contiguous(),
            "b": basis_b.permute(1, 2, 0).contiguous(),
            "a_coef": coef_a.permute(1, 2, 0).contiguous(),
            "b_coef": coef_b.permute(1, 2, 0).contiguous(),
        }
    basis_a, coef_a = task_basis(a.reshape(n, -1), k)
    basis_b, coef_b = task_basis(b.reshape(n, -1), k)
    return {
        "a": basis_a.reshape(k, rank, a.shape[2]),
        "b": basis_b.reshape(k, b.shape[1], rank),
        "a_coef": coef_a,
        "b_coef": coef_b,
    }


def factor_reconstruct(basis: Dict[str, torch.Tensor], task: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s factors (A [r, in], B [out, r]) from a factor or position basis."""
    coef_a, coef_b = basis["a_coef"][task], basis["b_coef"][task]  # [k] or [k, r]
    if coef_a.dim() == 1:
        a = torch.einsum("k,kri->ri", coef_a, basis["a"])
        b = torch.einsum("k,kor->or", coef_b, basis["b"])
    else:
        a = torch.einsum("kr,kri->ri", coef_a, basis["a"])
        b = torch.einsum("kr,kor->or", coef_b, basis["b"])
    return a, b


def product_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``<Bi Ai, Bj Aj>_F`` [n, n] in float64, without forming the products."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    left = torch.einsum("nor,mos->nmrs", b64, b64)  # Biᵀ Bj
    right = torch.einsum("nri,msi->nmrs", a64, a64)  # Ai Ajᵀ
    return (left * right).sum(dim=(-2, -1))


def product_basis(a: torch.Tensor, b: torch.Tensor, k: int, basis_rank: int) -> Dict[str, torch.Tensor]:
    """Product-space basis of one module: K dense updates ``Σi Q[i,k] Bi Ai``, each SVD-truncated.

    Returns ``a`` [k, basis_rank, in], ``b`` [k, out, basis_rank] and ``coef`` [n, k].
    """
    n, r, in_features = a.shape
    out_features = b.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of tasks ({n}), got {k}")
    _, eigenvectors = torch.linalg.eigh(product_gram(a, b))
    top = fix_signs(eigenvectors[:, -k:].flip(-1))
    rank = min(basis_rank, in_features, out_features)
    # Σi Q[i,k] Bi Ai = [Q[1,k] B1 … Q[n,k] Bn] @ [A1; …; An]. The stacked A is the
    # same for every k: one QR of it, then one thin SVD per k of [Q·B] @ R_Aᵀ
    # (out × n·r), never the dense out × in update.
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).reshape(n * r, in_features).T)
    stacked_b = b.to(torch.float64).permute(1, 0, 2).reshape(out_features, n * r)  # block i = Bi
    weights = top.repeat_interleave(r, dim=0).T  # [k, n·r]: Q[i,k] on block i
    u, s, vh = torch.linalg.svd((stacked_b * weights[:, None, :]) @ r_a.T, full_matrices=False)
    keep = min(rank, s.shape[-1])
    basis_a, basis_b = split_singular_values(u[:, :, :keep], s[:, :keep], vh[:, :keep] @ q_a.T)
    if keep < rank:  # the updates have lower rank than asked: pad so the basis stacks
        basis_b = torch.cat([basis_b, basis_b.new_zeros(k, out_features, rank - keep)], dim=2)
        basis_a = torch.cat([basis_a, basis_a.new_zeros(k, rank - keep, in_features)], dim=1)
    basis_a, basis_b = basis_a.to(torch.float32), basis_b.to(torch.float32)
    return {"a": basis_a.contiguous(), "b": basis_b.contiguous(), "coef": top.to(torch.float32)}


def product_reconstruct(basis: Dict[str, torch.Tensor], task: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s update ``Σk Q[i,k] B̄k Āk`` as one LoRA pair of rank k·basis_rank."""
    coef = basis["coef"][task]
    k = coef.shape[0]
    a = basis["a"].reshape(k * basis["a"].shape[1], -1)
    b = torch.cat([coef[index] * basis["b"][index] for index in range(k)], dim=1)
    return a, b


def lowrank_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """Frobenius inner product ``<B1 A1, B2 A2>`` in float64 from the factors."""
    left = b1.to(torch.float64).mT @ b2.to(torch.float64)
    right = a1.to(torch.float64) @ a2.to(torch.float64).mT
    return float((left * right).sum())


def product_space_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    k: int,
    weights: Sequence[float],
) -> torch.Tensor:
    """Dense RMM of full tensors: ``θ0 + Σi wi τ̂i`` with ``τ̂`` the rank-k (task axis) fit of the τ's.

    One-hot weights give one task's reversible reconstruction; k ≥ T makes
    ``τ̂ = τ`` (task arithmetic with these weights).
    """
    vectors = task_vectors(base, models)
    count = vectors.shape[0]
    flat = vectors.reshape(count, -1)
    rank = min(k, count)
    _, eigenvectors = torch.linalg.eigh(float64_gram(flat))
    top = eigenvectors[:, -rank:]
    projector = top @ top.T  # τ̂ = P τ
    weight = torch.tensor(list(weights), dtype=torch.float64, device=flat.device)
    mixing = (weight @ projector).to(flat.dtype)
    merged = (mixing @ flat).reshape(base.shape)
    del vectors, flat
    return merged.add_(base).to(base.dtype)


def float64_gram(rows: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``rows @ rows.T`` accumulated in float64 over column chunks.

    A float64 copy of all T rows would be twice the task vectors themselves;
    chunks keep the extra memory at T × ``chunk`` doubles.
    """
    gram = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], chunk):
        block = rows[:, start : start + chunk].to(torch.float64)
        gram += block @ block.T
    return gram


# ---------------------------------------------------------------------------
# adapters in memory


@dataclass
class RmmBasis:
    """An RMM basis over n adapters: per module, basis factors and per-task coefficients."""

    variant: str
    k: int
    tasks: List[str]
    modules: Dict[str, Dict[str, torch.Tensor]]
    fan_in_fan_out: Dict[str, bool] = field(default_factory=dict)

    def basis_adapters(self) -> List[Dict[str, "LoraFactors"]]:  # noqa: F821
        """The K basis adapters as module → LoraFactors (what the bundle stores as peft adapters)."""
        from mergekit_ext.adapters.peft_io import LoraFactors

        return [
            {module: LoraFactors(data["a"][index], data["b"][index], self.fan_in_fan_out.get(module, False)) for module, data in self.modules.items()}
            for index in range(self.k)
        ]

    def coefficients(self) -> Dict[str, torch.Tensor]:
        """Every coefficient tensor, keyed ``<module>.<a_coef|b_coef|coef>``."""
        return {f"{module}.{key}": value for module, data in self.modules.items() for key, value in data.items() if key.endswith("coef")}

    @classmethod
    def from_parts(cls, variant: str, tasks: Sequence[str], basis: Sequence[Dict[str, "LoraFactors"]], coefficients: Dict[str, torch.Tensor]) -> "RmmBasis":  # noqa: F821
        """Reassemble a basis from its stored parts (the inverse of the two methods above)."""
        modules: Dict[str, Dict[str, torch.Tensor]] = {}
        fan: Dict[str, bool] = {}
        for module in basis[0]:
            data = {"a": torch.stack([adapter[module].a for adapter in basis]), "b": torch.stack([adapter[module].b for adapter in basis])}
            for key in ("coef",) if variant == "product" else ("a_coef", "b_coef"):
                name = f"{module}.{key}"
                if name not in coefficients:
                    raise ValueError(f"coefficients for module '{module}' ({key}) are missing")
                data[key] = coefficients[name]
            modules[module] = data
            fan[module] = basis[0][module].fan_in_fan_out
        return cls(variant=variant, k=len(basis), tasks=list(tasks), modules=modules, fan_in_fan_out=fan)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise KeyError(f"task '{task}' is not in this RMM basis; it has {self.tasks}")
        return self.tasks.index(task)

    def reconstruct(self, task: str) -> Dict[str, "LoraFactors"]:  # noqa: F821
        """Task ``task`` as LoRA factors per module (an ordinary adapter once written)."""
        from mergekit_ext.adapters.peft_io import LoraFactors

        index = self.task_index(task)
        result = {}
        for module, data in self.modules.items():
            if self.variant == "product":
                a, b = product_reconstruct(data, index)
            else:
                a, b = factor_reconstruct(data, index)
            result[module] = LoraFactors(a, b, self.fan_in_fan_out.get(module, False))
        return result

    def parameter_count(self) -> int:
        """Numbers stored: basis factors plus coefficients."""
        return sum(value.numel() for data in self.modules.values() for value in data.values())


def build_basis(adapters: Sequence["LoraAdapter"], k: int, variant: str = "factor", *, basis_rank: Optional[int] = None, progress: bool = False) -> RmmBasis:  # noqa: F821
    """The RMM basis of ``adapters`` (same base model) with K = ``k``.

    Ranks are aligned per module by zero padding and a module an adapter lacks
    is a zero update (``adapters.peft_io.aligned_factors``). ``basis_rank`` (product variant
    only) defaults to the largest adapter rank of the module.
    """
    from tqdm import tqdm

    from mergekit_ext.adapters.peft_io import aligned_factors, module_union

    if variant not in VARIANTS:
        raise ValueError(f"unknown RMM variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    if not 1 <= k <= len(adapters):
        raise ValueError(f"k must be between 1 and the number of adapters ({len(adapters)}), got {k}")
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    fan: Dict[str, bool] = {}
    for module in tqdm(module_union(adapters), desc=f"RMM basis ({variant}, K={k})", disable=not progress):
        a, b, fan[module] = aligned_factors(adapters, module)
        if variant == "product":
            modules[module] = product_basis(a, b, k, basis_rank or a.shape[1])
        else:
            modules[module] = factor_basis(a, b, k, per_position=variant == "position")
    return RmmBasis(variant=variant, k=k, tasks=names, modules=modules, fan_in_fan_out=fan)


def reconstruction_errors(basis: RmmBasis, adapters: Sequence["LoraAdapter"]) -> Dict[str, float]:  # noqa: F821
    """Relative Frobenius error of each task's whole update, ``‖ΔŴ − ΔW‖ / ‖ΔW‖`` over all modules."""
    errors = {}
    for task, adapter in zip(basis.tasks, adapters):
        recovered = basis.reconstruct(task)
        residual = reference = 0.0
        for module, approx in recovered.items():
            original = adapter.modules.get(module)
            approx_sq = lowrank_inner(approx.b, approx.a, approx.b, approx.a)
            if original is None:
                residual += approx_sq
                continue
            original_sq = lowrank_inner(original.b, original.a, original.b, original.a)
            cross = lowrank_inner(approx.b, approx.a, original.b, original.a)
            residual += max(approx_sq + original_sq - 2 * cross, 0.0)
            reference += original_sq
        errors[task] = (residual ** 0.5) / max(reference ** 0.5, 1e-30)
    return errors


def adapter_parameter_count(adapters: Sequence["LoraAdapter"]) -> int:  # noqa: F821
    """Numbers stored when every adapter is kept."""
    return sum(factors.a.numel() + factors.b.numel() for adapter in adapters for factors in adapter.modules.values())
