"""Continual merging with a persisted state: add model 9 next month without models 1 to 8.

A state is a folder that is, first of all, the merged model as a normal Hugging
Face model folder (transformers and lm-eval load it directly):

    STATE/
      config.json, tokenizer files     copied from the base
      model.safetensors (+ index)      merged weights, in the base's dtypes
      continual/state.json             method, options, base hash, history
      continual/model.safetensors      the running accumulator acc_t (float32)

``add`` reads only the base, the state and the new model, one tensor at a time,
in two passes: the first computes the new accumulator and its global norm
(written to a staging folder), the second writes ``θ0 + scale · acc`` with the
one global scale (docs/methods.md#opcm). Memory does not depend on how many models
were merged before. The new state is built whole in a staging folder beside
STATE and swapped in at the end (an atomic directory exchange where the OS has
one), so a kill or a full disk at any point leaves the previous state intact.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from mergekit_ext import io
from mergekit_ext.methods.opcm.kernel import (
    ContinualOptions,
    continual_scale,
    continual_step,
)
from mergekit_ext.tensors import is_block_matrix

STATE_FORMAT = "mergekit-ext/continual-state/1"
CONTINUAL_DIR = "continual"
STATE_FILE = "state.json"


class ContinualStateError(ValueError):
    """A state, base or model that cannot be used for a continual merge."""


# --------------------------------------------------------------------------
# Reading and checking inputs


def _state_json_path(state: Path) -> Path:
    return state / CONTINUAL_DIR / STATE_FILE


def read_state(state: str | os.PathLike) -> dict:
    """The state's metadata (``continual/state.json``), with a clear error for a non-state."""
    state = Path(state)
    path = _state_json_path(state)
    data = io.read_json_object(path, error=ContinualStateError, missing=f"not a continual state (no {CONTINUAL_DIR}/{STATE_FILE}): {state}")
    if data.get("format") != STATE_FORMAT:
        raise ContinualStateError(f"{path}: unknown state format {data.get('format')!r} (expected {STATE_FORMAT})")
    if not isinstance(data.get("options"), dict):
        raise ContinualStateError(f"{path}: 'options' must be an object (edited or corrupt state?)")
    try:
        ContinualOptions(**data["options"])
    except (TypeError, ValueError) as error:
        raise ContinualStateError(f"{path}: bad options: {error}") from None
    _check_history(path, data)
    return data


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    return io.read_json_object(path, error=ContinualStateError) if path.is_file() else {}


def _check_compatible(base_path: Path, base_loader, model_path: Path, model_loader) -> None:
    """Refuse a model of another architecture, other tensors or other shapes than the base."""
    base_config, model_config = _config(base_path), _config(model_path)
    for key in ("model_type", "architectures"):
        if key in base_config and key in model_config and base_config[key] != model_config[key]:
            raise ContinualStateError(
                f"{model_path} is a different architecture from the base {base_path}: "
                f"{key} {model_config[key]!r} vs {base_config[key]!r}"
            )
    io.check_same_tensors(base_loader, model_loader, reference_label=f"base {base_path}", other_label=str(model_path))
    base_shapes, model_shapes = io.header_shapes(base_path), io.header_shapes(model_path)
    for name, shape in base_shapes.items():
        if name in model_shapes and model_shapes[name] != shape:
            raise ContinualStateError(
                f"{model_path}: tensor {name} has shape {list(model_shapes[name])}, the base {base_path} has {list(shape)}"
            )


def _check_base(state_data: dict, state: Path, base_path: Path) -> str:
    """The base's content hash, refused if it is not the base the state was made from."""
    digest = io.content_hash(base_path)
    recorded = state_data["base"]["content_hash"]
    if digest != recorded:
        raise ContinualStateError(
            f"state {state} was made from another base: it records base {state_data['base']['path']} "
            f"with content hash {recorded[:16]}…, but {base_path} has {digest[:16]}…"
        )
    return digest


# --------------------------------------------------------------------------
# Building a state in a staging folder


def _build(
    staging: Path,
    *,
    base_path: Path,
    model_path: Path,
    previous_accumulator: Optional[Path],
    options: ContinualOptions,
    norms_before: Sequence[float],
    device: str,
    progress: bool,
) -> Dict[str, float]:
    """Write the new accumulator and merged model into ``staging``; return the norms and scale."""
    from tqdm import tqdm

    base_loader = io.open_model(base_path)
    model_loader = io.open_model(model_path)
    previous_loader = io.open_model(previous_accumulator) if previous_accumulator is not None else None
    names = io.tensor_names(base_loader)
    step = len(norms_before) + 1

    # Pass 1: acc_t = step(acc_{t−1}, τt), tensor by tensor; accumulate ‖τt‖² and ‖acc_t‖².
    accumulator_dir = staging / CONTINUAL_DIR
    task_square = 0.0
    accumulator_square = 0.0
    writer = io.tensor_writer(accumulator_dir)
    for name in tqdm(names, desc=f"continual {options.method} step {step}: accumulate", disable=not progress):
        base_tensor = base_loader.get_tensor(name)
        if not base_tensor.is_floating_point():
            continue
        model_tensor = model_loader.get_tensor(name)
        if model_tensor.shape != base_tensor.shape:
            raise ContinualStateError(
                f"{model_path}: tensor {name} has shape {list(model_tensor.shape)}, "
                f"the base has {list(base_tensor.shape)}"
            )
        # A NaN merged in would poison the state for every later add.
        io.check_finite_tensor(base_tensor, tensor_name=name, source=f"base {base_path}")
        io.check_finite_tensor(model_tensor, tensor_name=name, source=f"model {model_path}")
        task_delta = model_tensor.to(device, torch.float32) - base_tensor.to(device, torch.float32)
        task_square += float(task_delta.double().square().sum())
        previous = None
        if previous_loader is not None:
            previous = _stored_accumulator(previous_loader, previous_accumulator, name, base_tensor.shape).to(device)
        accumulator = continual_step(
            options,
            previous,
            task_delta,
            project=is_block_matrix(name, base_tensor.shape),
        )
        io.check_finite_tensor(accumulator, tensor_name=name, source=f"the new accumulator (step {step})")
        accumulator_square += float(accumulator.double().square().sum())
        writer.save_tensor(name, accumulator.to("cpu", torch.float32).contiguous())
        del task_delta, previous, accumulator
    writer.finalize()

    norms = [*norms_before, math.sqrt(task_square)]
    accumulator_norm = math.sqrt(accumulator_square)
    scale = continual_scale(options, norms=norms, accumulator_norm=accumulator_norm)
    if not math.isfinite(scale) or not math.isfinite(accumulator_norm):
        raise ContinualStateError(f"continual step {step}: the merged task vector is not finite (scale {scale}); state left unchanged")
    # With one model OPCM and the average are that model: copy it bit for bit.
    copy_model = step == 1 and options.method in ("opcm", "average")

    # Pass 2: merged = θ0 + scale · acc_t, in the base's dtype.
    accumulator_loader = io.open_model(accumulator_dir)
    writer = io.tensor_writer(staging)
    for name in tqdm(names, desc=f"continual {options.method} step {step}: write model", disable=not progress):
        base_tensor = base_loader.get_tensor(name)
        if not base_tensor.is_floating_point():
            merged = base_tensor
        elif copy_model:
            merged = model_loader.get_tensor(name).to(base_tensor.dtype)
        else:
            accumulator = accumulator_loader.get_tensor(name)
            merged = (base_tensor.to(torch.float32) + scale * accumulator).to(base_tensor.dtype)
        io.check_finite_tensor(merged, tensor_name=name, source=f"the merged model (step {step}; overflow in {base_tensor.dtype}?)")
        writer.save_tensor(name, merged.contiguous())
        del merged
    writer.finalize()
    io.copy_side_files(base_path, staging)
    io.write_marker(staging, "continual-state")
    return {
        "task_vector_norm": norms[-1],
        "accumulator_norm": accumulator_norm,
        "scale": scale,
        "merged_task_vector_norm": scale * accumulator_norm,
    }


def _stored_accumulator(loader, folder: Path, name: str, shape) -> torch.Tensor:
    """One tensor of a state's accumulator as this package writes it: float32, the base's shape, finite."""
    if name not in loader.index.tensor_paths:
        raise ContinualStateError(f"{folder}: the accumulator has no tensor {name} (edited or corrupt state?)")
    tensor = loader.get_tensor(name)
    if tensor.dtype != torch.float32 or tuple(tensor.shape) != tuple(shape):
        raise ContinualStateError(
            f"{folder}: accumulator tensor {name} is {tensor.dtype} {list(tensor.shape)}, expected float32 {list(shape)} (edited or corrupt state?)"
        )
    io.check_finite_tensor(tensor, tensor_name=name, source=f"the accumulator in {folder}")
    return tensor


def _check_history(path: Path, data: dict) -> None:
    """Refuse a state.json whose base or history an edit has broken (norms feed every later scale)."""
    base, models = data.get("base"), data.get("models")
    if not isinstance(base, dict) or not isinstance(base.get("content_hash"), str) or not isinstance(base.get("path"), str):
        raise ContinualStateError(f"{path}: 'base' must record a path and a content_hash (edited or corrupt state?)")
    if not isinstance(models, list) or not models:
        raise ContinualStateError(f"{path}: 'models' must be a non-empty list (edited or corrupt state?)")
    for index, entry in enumerate(models):
        norm = entry.get("task_vector_norm") if isinstance(entry, dict) else None
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            raise ContinualStateError(f"{path}: models[{index}].task_vector_norm must be a finite number >= 0, got {norm!r}")
        if not isinstance(entry.get("content_hash"), str):
            raise ContinualStateError(f"{path}: models[{index}] has no content_hash (edited or corrupt state?)")


def _history_entry(order: int, model_path: Path, digest: str, numbers: Dict[str, float]) -> dict:
    return {
        "order": order,
        "path": str(model_path),
        "content_hash": digest,
        "task_vector_norm": numbers["task_vector_norm"],
        "scale": numbers["scale"],
        "accumulator_norm": numbers["accumulator_norm"],
        "merged_task_vector_norm": numbers["merged_task_vector_norm"],
        "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_state_json(staging: Path, data: dict) -> None:
    io.write_json(staging / CONTINUAL_DIR / STATE_FILE, data)
    io.default_permissions(staging)  # safetensors writes 0600; a state is an ordinary model folder


# --------------------------------------------------------------------------
# One writer at a time (the swap itself is io.swap_into_place)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """One writer per state at a time: an exclusive lock on the state folder itself.

    No lock file is created (nothing appears beside a user's folder). A second
    writer fails at once with a clear message rather than waiting.
    """
    import fcntl

    try:
        descriptor = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise ContinualStateError(f"not a continual state (no such folder): {state}") from None
    except NotADirectoryError:
        raise ContinualStateError(f"not a continual state (not a folder): {state}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ContinualStateError(
                f"another process is writing the state {state}; run this again when it has finished"
            ) from None
        # A writer that finished between our open and our lock swapped a new folder in:
        # this lock would then guard the old one.
        if os.stat(state).st_ino != os.fstat(descriptor).st_ino:
            raise ContinualStateError(f"the state {state} was just updated by another process; run this again")
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _staging_prefix(state: Path) -> str:
    return f".{state.name}.staging-"


@contextlib.contextmanager
def _staging_folder(state: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``state``, removed on any error.

    Staging folders left by killed earlier runs (their PID is gone) are removed first.
    """
    io.remove_stale(state.parent, _staging_prefix(state))
    with io.staging_dir(state.parent, _staging_prefix(state)) as staging:
        yield staging


# --------------------------------------------------------------------------
# The library API behind the commands


def init_state(
    state: str | os.PathLike,
    base: str | os.PathLike,
    model: str | os.PathLike,
    *,
    options: ContinualOptions = ContinualOptions(),
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Start a continual state from ``base`` and a first model; returns the state's metadata."""
    state, base_path, model_path = Path(state).absolute(), Path(base).absolute(), Path(model).absolute()
    io.check_output_not_input(state, [base_path, model_path])
    io.check_replaceable(state, overwrite=overwrite)
    _check_compatible(base_path, io.open_model(base_path), model_path, io.open_model(model_path))
    base_digest, model_digest = io.content_hash(base_path), io.content_hash(model_path)
    state.parent.mkdir(parents=True, exist_ok=True)
    replacing = state.exists()
    with (_locked(state) if replacing else contextlib.nullcontext()), _staging_folder(state) as staging:
        numbers = _build(
            staging,
            base_path=base_path,
            model_path=model_path,
            previous_accumulator=None,
            options=options,
            norms_before=[],
            device=device,
            progress=progress,
        )
        data = {
            "format": STATE_FORMAT,
            "options": options.as_dict(),
            "base": {"path": str(base_path), "content_hash": base_digest},
            "models": [_history_entry(1, model_path, model_digest, numbers)],
        }
        _write_state_json(staging, data)
        if replacing:
            io.swap_into_place(staging, state)
        else:
            io.move_into_place(staging, state)  # a concurrent init that won is never replaced
    return data


def add_model(
    state: str | os.PathLike,
    model: str | os.PathLike,
    *,
    base: Optional[str | os.PathLike] = None,
    device: str = "cpu",
    allow_repeat: bool = False,
    progress: bool = True,
) -> dict:
    """Merge one more model into ``state`` (base: the recorded one unless given); returns the new metadata."""
    state, model_path = Path(state).absolute(), Path(model).absolute()
    io.recover_retired(state)
    read_state(state)  # a clear error (and no lock taken) for a folder that is not a state
    # The state merged into itself, or a new state swapped in over the model being read.
    io.check_output_not_input(state, [model_path, base])
    with _locked(state):
        data = read_state(state)
        options = ContinualOptions(**data["options"])
        base_path = Path(base).absolute() if base is not None else Path(data["base"]["path"])
        if not base_path.exists():
            raise ContinualStateError(
                f"the base recorded in {state} is gone: {base_path} (pass --base with its new location)"
            )
        _check_base(data, state, base_path)
        _check_compatible(base_path, io.open_model(base_path), model_path, io.open_model(model_path))
        model_digest = io.content_hash(model_path)
        repeats = [entry["order"] for entry in data["models"] if entry["content_hash"] == model_digest]
        if repeats and not allow_repeat:
            raise ContinualStateError(
                f"{model_path} is already in the state {state} (step {repeats[0]}, same content hash); "
                "pass --allow-repeat to add it again"
            )
        norms_before = [entry["task_vector_norm"] for entry in data["models"]]
        with _staging_folder(state) as staging:
            numbers = _build(
                staging,
                base_path=base_path,
                model_path=model_path,
                previous_accumulator=state / CONTINUAL_DIR,
                options=options,
                norms_before=norms_before,
                device=device,
                progress=progress,
            )
            new_data = dict(data)
            new_data["base"] = {"path": str(base_path), "content_hash": data["base"]["content_hash"]}
            new_data["models"] = [
                *data["models"],
                _history_entry(len(data["models"]) + 1, model_path, model_digest, numbers),
            ]
            _write_state_json(staging, new_data)
            io.swap_into_place(staging, state)
    return new_data


def describe_state(data: dict) -> List[str]:
    """Human-readable lines for ``show``."""
    options = data["options"]
    method = options["method"]
    settings = {
        "opcm": f"alpha={options['alpha']} zero_diagonal={options['zero_diagonal']}",
        "ta": f"coefficient={options['coefficient']}",
        "ties": f"coefficient={options['coefficient']} density={options['density']}",
        "average": "",
    }[method]
    lines = [
        f"method: {method} {settings}".rstrip(),
        f"base:   {data['base']['path']}  (sha256 {data['base']['content_hash'][:16]})",
        f"models: {len(data['models'])}",
        f"{'step':>4}  {'sha256':<16}  {'‖τ‖':>10}  {'scale':>9}  {'‖merged−θ0‖':>12}  path",
    ]
    for entry in data["models"]:
        lines.append(
            f"{entry['order']:>4}  {entry['content_hash'][:16]:<16}  {entry['task_vector_norm']:>10.4g}  "
            f"{entry['scale']:>9.4g}  {entry['merged_task_vector_norm']:>12.4g}  {entry['path']}"
        )
    return lines
