"""TALL-mask compression: keep θ0, τMTL and one bit-packed mask per task.

Task t is recovered as ``θ̂t = θ0 + m_t ⊙ τMTL`` (Wang et al. 2024, §5 of
docs/methods.md#consensus-masks). The bundle is a folder:

    bundle.json              format, base reference + content hash, tasks, sizes
    multitask/               τMTL as sharded safetensors (the base's dtype)
    masks/<task>/            that task's masks, 8 weights per byte
    configs/<task>/          that task's config and tokenizer files

Compression and recovery stream one tensor at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_ext import io
from mergekit_ext.methods.consensus import DEFAULT_TALL_LAMBDA
from mergekit_ext.methods.consensus.kernel import tall_masks
from mergekit_ext.tensors import task_vectors

BUNDLE_FORMAT = "mergekit-ext/tall-bundle/1"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor → uint8 vector holding 8 entries per byte (row-major, MSB first)."""
    flat = mask.reshape(-1).to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_mask``."""
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[: math.prod(shape)].reshape(tuple(shape))


# What a good bundle looks like, in one line (the paper keeps ~99 % of every expert).
GOOD_RECOVERY = 0.95


@dataclass
class CompressionReport:
    bundle_bytes: int
    base_bytes: int
    models_bytes: int
    relative_errors: Dict[str, float]  # ‖θ̂t − θt‖ / ‖τt‖ over the whole model
    # per model: fraction of the task vector's weights its mask keeps, the share of
    # ‖τt‖² on them, and the relative error on that support ‖(τMTL − τt)⊙mt‖ / ‖τt⊙mt‖
    kept_fraction: Dict[str, float] = field(default_factory=dict)
    kept_energy: Dict[str, float] = field(default_factory=dict)
    support_errors: Dict[str, float] = field(default_factory=dict)
    # with a zoo (``recovery.score_recovered``): per model {"task", "recovered", "expert"} and the metric's name
    scores: Dict[str, Dict] = field(default_factory=dict)
    metric: str = ""

    def lines(self) -> List[str]:
        kept = self.base_bytes + self.bundle_bytes
        total = self.base_bytes + self.models_bytes
        out = [
            f"inputs: base {self.base_bytes / 1e6:.2f} MB + {len(self.relative_errors)} models "
            f"{self.models_bytes / 1e6:.2f} MB = {total / 1e6:.2f} MB",
            f"kept:   base {self.base_bytes / 1e6:.2f} MB + bundle {self.bundle_bytes / 1e6:.2f} MB = "
            f"{kept / 1e6:.2f} MB ({100 * kept / max(total, 1):.1f} % of the inputs)",
        ]
        if not self.kept_fraction:  # a report built from a bundle's manifest: only the overall error is known
            out.append("relative error per model (‖θ̂t − θt‖ / ‖τt‖; near 1 is normal, see `tall compress`):")
            out += [f"  {name:<24} {error:.4f}" for name, error in self.relative_errors.items()]
            return out
        header = f"  {'model':<20} {'weights kept':>12} {'of ‖τ‖²':>8} {'error on kept':>13} {'error overall':>13}"
        if self.scores:
            header += f" {'recovered':>9} {'expert':>7} {'rec/exp':>7}"
        out.append(header)
        for name, error in self.relative_errors.items():
            row = (
                f"  {name:<20} {100 * self.kept_fraction[name]:>11.1f}% {100 * self.kept_energy[name]:>7.1f}% "
                f"{self.support_errors[name]:>13.3f} {error:>13.3f}"
            )
            if name in self.scores:
                score = self.scores[name]
                ratio = score["recovered"] / score["expert"] if score["expert"] > 0 else float("nan")
                flag = "" if ratio >= GOOD_RECOVERY else "  !"
                row += f" {score['recovered']:>9.3f} {score['expert']:>7.3f} {100 * ratio:>6.1f}%{flag}"
            out.append(row)
        out += [
            "weights kept: where the model's mask is on (τMTL is recovered there, the base elsewhere); of ‖τ‖²: the",
            "share of the task vector's energy on them; errors ‖θ̂t − θt‖/‖τt‖ on the kept weights (other tasks leak in)",
            "and overall (near or above 1 is normal: TALL keeps a few percent of τ). They are not a verdict:",
        ]
        if self.scores:
            out.append(
                f"recovered / expert ({self.metric}, each model on its own task) is. Good: >= {100 * GOOD_RECOVERY:.0f} % "
                "(the paper keeps ~99 %); below it (marked !) try --tall-lambda 0.2-0.6."
            )
        else:
            out.append(
                f"the recovered model's score against its expert is. Good: >= {100 * GOOD_RECOVERY:.0f} % (the paper keeps ~99 %); "
                "measure it with --zoo ZOO, or `tall recover` then `mergekit-ext eval`."
            )
        return out


def compress(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    names: Optional[Sequence[str]] = None,
    tall_lambdas: Optional[Sequence[float]] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressionReport:
    """Write a TALL-mask bundle for ``models`` fine-tuned from ``base``."""
    from tqdm import tqdm

    names = list(names or [Path(m).name for m in models])
    if len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} models")
    for name in names:  # each becomes masks/<name>/ and configs/<name>/ inside the bundle
        io.check_name(name, what="task name (from --names or the model folder name)")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}; pass --names")
    if tall_lambdas is None:
        tall_lambdas = [DEFAULT_TALL_LAMBDA] * len(models)
    if len(tall_lambdas) == 1:
        tall_lambdas = list(tall_lambdas) * len(models)
    if len(tall_lambdas) != len(models):
        raise ValueError(f"--tall-lambda: got {len(tall_lambdas)} values for {len(models)} models")
    for lam in tall_lambdas:
        io.check_finite_number(lam, label="--tall-lambda")
        if lam < 0:
            raise ValueError(f"--tall-lambda must be >= 0, got {lam}")
    io.check_output_not_input(out, [base, *models])
    io.check_replaceable(out, overwrite=overwrite)

    base_loader = io.open_model(base)
    loaders = [io.open_model(model) for model in models]
    for model, loader in zip(models, loaders):
        io.check_same_tensors(base_loader, loader, reference_label=f"base {base}", other_label=f"model {model}")
    error_squares = torch.zeros(len(models), dtype=torch.float64)
    vector_squares = torch.zeros(len(models), dtype=torch.float64)
    support_error_squares = torch.zeros(len(models), dtype=torch.float64)
    support_vector_squares = torch.zeros(len(models), dtype=torch.float64)
    kept_count = torch.zeros(len(models), dtype=torch.float64)
    total_count = 0

    with io.atomic_output_dir(out, overwrite=overwrite, inputs=[base, *models], kind="tall-bundle") as staging:
        multitask_writer = io.tensor_writer(staging / "multitask")
        mask_writers = [io.tensor_writer(staging / "masks" / name) for name in names]
        tensors_meta = {}
        for tensor_name in tqdm(io.tensor_names(base_loader), desc="TALL compress", disable=not progress):
            base_tensor = base_loader.get_tensor(tensor_name)
            model_tensors = [loader.get_tensor(tensor_name) for loader in loaders]
            for model, tensor in zip(models, model_tensors):
                io.check_shape(tensor_name, tensor, base_tensor, label=str(model), reference_label=f"base {base}")
                io.check_finite_tensor(tensor, tensor_name=tensor_name, source=f"model {model}")
            io.check_finite_tensor(base_tensor, tensor_name=tensor_name, source=f"base {base}")
            if not base_tensor.is_floating_point():
                continue  # integer buffers are recovered from the base
            vectors = task_vectors(base_tensor, model_tensors)
            multitask = vectors.sum(dim=0).to(base_tensor.dtype)
            io.check_finite_tensor(multitask, tensor_name=tensor_name, source=f"the multi-task vector (overflow in {base_tensor.dtype}?)")
            # Masks against the τMTL actually stored, so recovery reproduces them.
            masks = tall_masks(vectors, multitask.to(vectors.dtype), tall_lambdas)
            recovered = masks * multitask.to(vectors.dtype)
            error_squares += ((recovered - vectors) ** 2).flatten(1).sum(1).double()
            vector_squares += (vectors**2).flatten(1).sum(1).double()
            on = masks.to(vectors.dtype)
            support_error_squares += (((recovered - vectors) * on) ** 2).flatten(1).sum(1).double()
            support_vector_squares += ((vectors * on) ** 2).flatten(1).sum(1).double()
            kept_count += on.flatten(1).sum(1).double()
            total_count += base_tensor.numel()
            multitask_writer.save_tensor(tensor_name, multitask)
            for writer, mask in zip(mask_writers, masks):
                writer.save_tensor(tensor_name, pack_mask(mask))
            tensors_meta[tensor_name] = list(base_tensor.shape)
        multitask_writer.finalize()
        for writer in mask_writers:
            writer.finalize()
        for name, model in zip(names, models):
            io.copy_side_files(model, staging / "configs" / name)
        relative = (error_squares / vector_squares.clamp_min(1e-30)).sqrt()
        io.write_json(
            staging / "bundle.json",
            {
                "format": BUNDLE_FORMAT,
                "base": {"path": str(Path(base).absolute()), "content_hash": io.content_hash(base)},
                "multitask": "sum of task vectors (task arithmetic, unscaled)",
                "tasks": [
                    {
                        "name": name,
                        "source": str(Path(model).absolute()),
                        "content_hash": io.content_hash(model),
                        "tall_lambda": float(lam),
                        "relative_error": float(err),
                    }
                    for name, model, lam, err in zip(names, models, tall_lambdas, relative)
                ],
                "shapes": tensors_meta,
            },
        )
        bundle_bytes = io.folder_bytes(staging)
    return CompressionReport(
        bundle_bytes=bundle_bytes,
        base_bytes=io.weight_bytes(base),
        models_bytes=sum(io.weight_bytes(m) for m in models),
        relative_errors={name: float(err) for name, err in zip(names, relative)},
        kept_fraction={name: float(k) / max(total_count, 1) for name, k in zip(names, kept_count)},
        kept_energy={name: float(e) for name, e in zip(names, support_vector_squares / vector_squares.clamp_min(1e-30))},
        support_errors={name: float(e) for name, e in zip(names, (support_error_squares / support_vector_squares.clamp_min(1e-30)).sqrt())},
    )


def read_bundle(bundle: str | os.PathLike) -> dict:
    """The bundle's manifest, checked for the keys ``recover`` needs."""
    path = Path(bundle) / "bundle.json"
    manifest = io.read_json_object(path, missing=f"not a TALL-mask bundle (no bundle.json): {bundle}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: unknown bundle format {manifest.get('format')!r}")
    for key in ("base", "tasks", "shapes"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r} (corrupt bundle?)")
    shapes = manifest["shapes"]
    if not isinstance(shapes, dict) or not all(
        isinstance(shape, list) and all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape)
        for shape in shapes.values()
    ):
        raise ValueError(f"{path}: 'shapes' must map tensor names to lists of sizes (corrupt bundle?)")
    if not isinstance(manifest["tasks"], list):
        raise ValueError(f"{path}: 'tasks' must be a list (corrupt bundle?)")
    for entry in manifest["tasks"]:
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: a task entry has no name (corrupt bundle?)")
        io.check_name(str(entry["name"]), what=f"task name in {path}")
    if not isinstance(manifest["base"], dict) or "content_hash" not in manifest["base"]:
        raise ValueError(f"{path}: the base entry has no content_hash (corrupt bundle?)")
    return manifest


def recover(
    bundle: str | os.PathLike,
    task: str,
    out: str | os.PathLike,
    *,
    base: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write task ``task`` of a bundle as a Hugging Face model folder."""
    from tqdm import tqdm

    bundle = Path(bundle)
    manifest = read_bundle(bundle)
    tasks = [entry["name"] for entry in manifest["tasks"]]
    if task not in tasks:
        raise KeyError(f"task {task!r} is not in bundle {bundle}; it holds {tasks}")
    base = Path(base or manifest["base"]["path"])
    io.check_output_not_input(out, [bundle, base])
    io.check_replaceable(out, overwrite=overwrite)
    base_loader = io.open_model(base)
    if io.content_hash(base) != manifest["base"]["content_hash"]:
        raise ValueError(
            f"base {base} is not the model this bundle was compressed against "
            f"(content hash differs from {manifest['base']['content_hash'][:12]}…); pass the original with --base"
        )
    multitask = io.open_model(bundle / "multitask")  # a missing or truncated part: one line naming it
    masks = io.open_model(bundle / "masks" / task)
    shapes = manifest["shapes"]
    with io.atomic_output_dir(out, overwrite=overwrite, inputs=[bundle, base], kind="model") as staging:
        writer = io.tensor_writer(staging)
        for tensor_name in tqdm(io.tensor_names(base_loader), desc=f"TALL recover {task}", disable=not progress):
            base_tensor = base_loader.get_tensor(tensor_name)
            if tensor_name in shapes:
                for part, loader in ((f"masks/{task}", masks), ("multitask", multitask)):
                    if tensor_name not in loader.index.tensor_paths:
                        raise ValueError(f"{bundle}/{part} has no tensor {tensor_name} (edited or corrupt bundle?)")
                packed, vector = masks.get_tensor(tensor_name), multitask.get_tensor(tensor_name)
                _check_bundle_tensors(bundle, task, tensor_name, shapes[tensor_name], base_tensor, packed, vector)
                mask = unpack_mask(packed, shapes[tensor_name])
                base_tensor = (base_tensor.float() + mask * vector.float()).to(base_tensor.dtype)
                io.check_finite_tensor(base_tensor, tensor_name=tensor_name, source=f"task {task} recovered from {bundle} (overflow in {base_tensor.dtype}?)")
            writer.save_tensor(tensor_name, base_tensor)
        writer.finalize()
        io.copy_side_files(bundle / "configs" / task, staging)
    return Path(out)


def _check_bundle_tensors(bundle: Path, task: str, tensor_name: str, shape, base_tensor, packed, vector) -> None:
    """Refuse bundle tensors this package would not have written: wrong dtype or shape, non-finite τMTL."""
    if list(shape) != list(base_tensor.shape):
        raise ValueError(f"{bundle}/bundle.json: tensor {tensor_name} is recorded with shape {shape}, the base has {list(base_tensor.shape)}")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != ((math.prod(shape) + 7) // 8,):
        raise ValueError(
            f"{bundle}/masks/{task}: tensor {tensor_name} is {packed.dtype} {list(packed.shape)}, "
            f"expected uint8 [{(math.prod(shape) + 7) // 8}] (edited or corrupt bundle?)"
        )
    if not vector.is_floating_point() or list(vector.shape) != list(shape):
        raise ValueError(
            f"{bundle}/multitask: tensor {tensor_name} is {vector.dtype} {list(vector.shape)}, expected floating point {list(shape)} (edited or corrupt bundle?)"
        )
    io.check_finite_tensor(vector, tensor_name=tensor_name, source=f"{bundle}/multitask")
