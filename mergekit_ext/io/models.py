"""Model folders: open a checkpoint's weights lazily (mergekit's loader), check and hash them, write new ones.

Reading and writing go through mergekit's own lazy loader and sharded writer,
so commands stream one tensor at a time exactly like ``mergekit-yaml``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from mergekit.io import LazyTensorLoader, TensorWriter

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Everything in a model folder that is not weights: config, tokenizer, templates.
SIDE_FILE_NAMES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class ModelFolderError(ValueError):
    """A path given as a model is missing or holds no weights."""


# Opting in to pickle checkpoints where torch.load could run their code (``mergekit-ext --allow-pickle-code``).
ALLOW_PICKLE_ENV = "MERGEKIT_EXT_ALLOW_PICKLE_CODE"


def pickle_loading_is_safe() -> bool:
    """Whether this torch's ``torch.load`` defaults to ``weights_only`` (2.6 and later, unless forced off)."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    forced_off = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").lower() in ("1", "true", "yes", "on")
    return (major, minor) >= (2, 6) and not forced_off


def check_pickle_checkpoints(folder: str | os.PathLike) -> None:
    """Refuse a ``.bin`` (pickle) checkpoint that this torch would unpickle with code execution
    allowed (mergekit's loader does not pass ``weights_only``), unless the user opted in."""
    pickles = sorted(f.name for f in Path(folder).iterdir() if f.name.endswith(".bin"))
    if not pickles or pickle_loading_is_safe() or os.environ.get(ALLOW_PICKLE_ENV) == "1":
        return
    raise ModelFolderError(
        f"{Path(folder) / pickles[0]} is a pickle checkpoint, and this torch's torch.load can run code inside it; "
        "convert it to .safetensors, use torch >= 2.6, or pass `mergekit-ext --allow-pickle-code` if you trust its source"
    )


def open_model(path: str | os.PathLike) -> LazyTensorLoader:
    """A lazy tensor loader over a Hugging Face model folder, with a clear error."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"model path does not exist: {folder}")
    if not folder.is_dir():
        raise ModelFolderError(f"model path is not a folder: {folder}")
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
        raise ModelFolderError(f"no .safetensors or .bin weights in model folder: {folder}")
    check_pickle_checkpoints(folder)
    try:
        return LazyTensorLoader.from_disk(str(folder), lazy_unpickle=False)
    except Exception as error:  # truncated or corrupt shards, bad index: one line naming the folder
        raise ModelFolderError(f"cannot read the weights of model folder {folder} (truncated or corrupt?): {error}") from None


def tensor_names(loader: LazyTensorLoader) -> List[str]:
    return sorted(loader.index.tensor_paths)


def check_same_tensors(reference: LazyTensorLoader, other: LazyTensorLoader, *, reference_label: str, other_label: str) -> None:
    """Refuse two checkpoints whose tensor names differ (shapes are checked while streaming)."""
    ours, theirs = set(reference.index.tensor_paths), set(other.index.tensor_paths)
    if ours != theirs:
        missing = sorted(ours - theirs)[:5]
        extra = sorted(theirs - ours)[:5]
        raise ModelFolderError(
            f"{other_label} does not have the same tensors as {reference_label}: "
            f"missing {missing}, unexpected {extra}"
        )


def content_hash(path: str | os.PathLike, names: Optional[Sequence[str]] = None) -> str:
    """sha256 over a folder's files (names and bytes, streamed), for provenance checks.

    By default the weight files of a model folder; ``names`` lists the files to
    hash instead (absent ones are skipped), e.g. an adapter's config and weights.
    A plain file hashes its own bytes.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif names is None:
        files = sorted(f for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    else:
        files = [path / name for name in names if (path / name).is_file()]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the files below ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_bytes(path: str | os.PathLike) -> int:
    """Size of a model folder's weight files."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def check_shape(tensor_name: str, tensor, reference, *, label: str, reference_label: str) -> None:
    """Refuse a tensor whose shape differs from the reference's (the base, usually), naming both."""
    if tuple(tensor.shape) != tuple(reference.shape):
        raise ModelFolderError(
            f"tensor {tensor_name}: shape {tuple(tensor.shape)} in {label} "
            f"does not match {tuple(reference.shape)} in {reference_label}"
        )


def copy_side_files(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy config, tokenizer and generation files (never weights) from a model folder."""
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILE_NAMES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def tensor_writer(folder: str | os.PathLike, *, max_shard_size: int = 2 * 1000**3) -> TensorWriter:
    """mergekit's sharded safetensors writer: ``model.safetensors`` (+ index when sharded),
    the layout mergekit's loader and transformers read back."""
    return TensorWriter(str(folder), max_shard_size=max_shard_size, safe_serialization=True)
