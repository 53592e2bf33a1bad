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
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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


def header_shapes(path: str | os.PathLike, names: Optional[Iterable[str]] = None) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes of a model folder (or one safetensors file) from the headers, no weights read.

    ``names`` limits the result to those tensors. ``.bin`` checkpoints have no
    header, so their tensors are loaded to read the shapes.
    """
    from safetensors import safe_open

    path = Path(path)
    wanted = None if names is None else set(names)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if wanted is None or key in wanted:
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as error:
            raise ModelFolderError(f"cannot read safetensors file {file}: {error}") from None
    if not files and path.is_dir():
        loader = open_model(path)
        for key in loader.index.tensor_paths:
            if wanted is None or key in wanted:
                shapes[key] = tuple(loader.get_tensor(key).shape)
    return shapes


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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path that becomes ``path`` (by rename) only if the block succeeds."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        if temporary.exists():
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: str | os.PathLike, data: Dict, *, indent: Optional[int] = 2) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    with atomic_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=indent, sort_keys=False)
            handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file and rename."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def read_jsonl(path: str | os.PathLike) -> List[Dict]:
    """One JSON object per non-empty line; a bad line is reported with the file and line number."""
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as problem:
                raise ValueError(f"{path}:{number}: not valid JSON: {problem}") from None
    return items


def tensor_writer(folder: str | os.PathLike, *, max_shard_size: int = 2 * 1000**3) -> TensorWriter:
    """mergekit's sharded safetensors writer: ``model.safetensors`` (+ index when sharded),
    the layout mergekit's loader and transformers read back."""
    return TensorWriter(str(folder), max_shard_size=max_shard_size, safe_serialization=True)
