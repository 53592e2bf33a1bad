"""Checkpoint I/O shared by every command: open models, write atomically, hash.

Reading and writing go through mergekit's own lazy loader and sharded writer,
so commands stream one tensor at a time exactly like ``mergekit-yaml``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

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


def open_model(path: str | os.PathLike) -> LazyTensorLoader:
    """A lazy tensor loader over a Hugging Face model folder, with a clear error."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"model path does not exist: {folder}")
    if not folder.is_dir():
        raise ModelFolderError(f"model path is not a folder: {folder}")
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
        raise ModelFolderError(f"no .safetensors or .bin weights in model folder: {folder}")
    return LazyTensorLoader.from_disk(str(folder), lazy_unpickle=False)


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


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over a model folder's weight files (names and bytes), for provenance checks."""
    folder = Path(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def copy_side_files(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy config, tokenizer and generation files (never weights) from a model folder."""
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILE_NAMES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh folder in ``parent`` (same filesystem, so it can be renamed into place),
    removed again if the block fails."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; a result should look like any new folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``path`` only if the block succeeds.

    On any error the temporary folder is removed and ``path`` is untouched; on
    success an existing ``path`` is replaced only when ``overwrite`` is set.
    """
    target = Path(path).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"output already exists (pass --overwrite to replace it): {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target.parent, f".{target.name}.partial-") as staging:
        yield staging
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def read_json_object(path: str | os.PathLike, *, error: type = ValueError, missing: Optional[str] = None) -> Dict:
    """Read a JSON file that must hold an object; every failure raises ``error`` naming the file.

    ``missing`` is the message for an absent file (default: which file is missing where).
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing or f"no {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not valid JSON: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data


def write_json(path: str | os.PathLike, data: Dict, *, indent: Optional[int] = 2) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def tensor_writer(folder: str | os.PathLike, *, max_shard_size: int = 2 * 1000**3) -> TensorWriter:
    """mergekit's sharded safetensors writer: ``model.safetensors`` (+ index when sharded),
    the layout mergekit's loader and transformers read back."""
    return TensorWriter(str(folder), max_shard_size=max_shard_size, safe_serialization=True)
