"""The learner's factorisation: origins, task vectors and candidate components of every tensor,
streamed from disk one tensor of each model at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from mergekit_ext import io
from mergekit_ext.methods.adarank.kernel import (
    band_rank,
    initial_grid_logits,
    matrix_components,
    origin_and_vectors,
    other_vectors,
)
from mergekit_ext.methods.adarank.options import LearnOptions
from mergekit_ext.tensors import is_block_matrix


@dataclass
class Entry:
    """One tensor of the merge: its origin and either its task vectors or its candidate components."""

    name: str
    column: int
    origin: torch.Tensor
    vectors: Optional[torch.Tensor] = None  # non-matrix tensors (what the coefficients multiply)
    factors: Optional[tuple] = None  # matrices: (left [m, K], sigma [K], right [K, n]), kernel.Components
    slots: Optional[tuple] = None  # (rows [K], positions [K]): each component's mask cell
    valid: Optional[torch.Tensor] = None  # bool [rows, band]: cells that hold a component
    logits: Optional[torch.nn.Parameter] = None
    fingerprint: Optional[torch.Tensor] = None  # top singular values [rows, FINGERPRINT_VALUES]

    def initial_logits(self, init_rank_ratio: float) -> torch.Tensor:
        return initial_grid_logits(self.valid, self.origin.shape, init_rank_ratio)



def open_inputs(model_paths: Sequence[Path], base_path: Optional[Path]):
    """Loaders for the models (and base), checked to hold the same tensors."""
    reference_path = base_path or model_paths[0]
    reference = io.open_model(reference_path)
    loaders = [io.open_model(path) for path in model_paths]
    for path, loader in zip(model_paths, loaders):
        io.check_same_tensors(reference, loader, reference_label=str(reference_path), other_label=str(path))
    return reference_path, reference, loaders


def factorise(reference, loaders, model_paths, base_loader, options: LearnOptions, device, *, progress: bool) -> List[Entry]:
    """Origins and task vectors streamed tensor by tensor from disk (one tensor of each
    model in memory at a time); matrices keep only their top-band SVD (U, V in
    ``options.factor_dtype``), a fingerprint and mask logits."""
    from tqdm.auto import tqdm

    storage = getattr(torch, options.factor_dtype)
    entries: List[Entry] = []
    for name in tqdm(io.tensor_names(reference), desc="adarank: factorise task vectors", disable=not progress, leave=False):
        first = reference.get_tensor(name)
        if not first.is_floating_point():
            continue
        tensors = [loader.get_tensor(name) for loader in loaders]
        for path, tensor in zip(model_paths, tensors):
            io.check_shape(name, tensor, first, label=str(path), reference_label="the first input")
        base_tensor = base_loader.get_tensor(name).to(device, torch.float32) if base_loader is not None else None
        origin, vectors = origin_and_vectors(base_tensor, [t.to(device, torch.float32) for t in tensors], options.variant)
        entry = Entry(name=name, column=len(entries), origin=origin)
        if is_block_matrix(name, first.shape):
            parts = matrix_components(
                vectors, options.variant, band=band_rank(first.shape, options.max_rank_ratio),
                svd=options.svd, common_space_fraction=options.common_space_fraction,
            )  # fmt: skip
            entry.fingerprint = parts.fingerprint
            entry.factors = (parts.left.to(storage), parts.sigma, parts.right.to(storage))
            entry.slots = (parts.rows.to(device), parts.positions.to(device))
            entry.valid = parts.valid()
            entry.logits = torch.nn.Parameter(entry.initial_logits(options.init_rank_ratio).to(device))
            del parts
        else:
            entry.vectors = other_vectors(options.variant, vectors).to(storage)
        entries.append(entry)
        del tensors, vectors
    if not any(entry.logits is not None for entry in entries):
        raise ValueError("adarank: no matrix tensors found (2-D weights inside transformer blocks)")
    return entries

