"""Checkpoint I/O shared by every command: open models, write atomically, hash.

Reading and writing go through mergekit's own lazy loader and sharded writer,
so commands stream one tensor at a time exactly like ``mergekit-yaml``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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


def header_dtypes(path: str | os.PathLike) -> Dict[str, str]:
    """Each tensor's stored dtype (safetensors codes: F32, BF16, F16, …) from a model folder's
    headers, no weights read (``.bin`` checkpoints: none)."""
    from safetensors import safe_open

    dtypes: Dict[str, str] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    dtypes[key] = handle.get_slice(key).get_dtype()
        except Exception as error:
            raise ModelFolderError(f"cannot read safetensors file {file}: {error}") from None
    return dtypes


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


# ---------------------------------------------------------------------------
# Outputs: never over an input, replace only what we wrote, swap atomically

# Written into every output folder this package produces, so ``--overwrite`` can
# tell a result of ours (which it may replace) from anything else (which it never deletes).
MARKER_NAME = ".mergekit-ext"
MARKER_FORMAT = "mergekit-ext/output/1"
# Folders written before the marker existed, recognised by their manifest.
_LEGACY_MANIFESTS = {
    "bundle.json": "mergekit-ext/tall-bundle/",
    "manifest.json": "mergekit-ext/rmm-bundle",
    "continual/state.json": "mergekit-ext/continual-state/",
}


class OutputError(ValueError):
    """An output path that would overlap an input or replace something this package did not write."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def check_output_not_input(out: str | os.PathLike, inputs: Iterable[Optional[str | os.PathLike]], *, may_contain: bool = False) -> None:
    """Refuse an output that is, contains or is contained in an input (symlinks followed).

    ``may_contain``: an output folder that only gains files (never replaced) may hold the inputs.
    """
    target = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        source = _resolved(item)
        if target == source:
            raise OutputError(f"the output {out} is one of the inputs ({item}); choose another output path")
        if source in target.parents:
            raise OutputError(f"the output {out} is inside the input {item}; choose a path outside it")
        if target in source.parents and not may_contain:
            raise OutputError(f"the output {out} contains the input {item}; choose another output path")


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` as an output of this package (no timestamp: outputs stay reproducible)."""
    data = json.dumps({"format": MARKER_FORMAT, "kind": kind}, sort_keys=True)
    Path(folder, MARKER_NAME).write_text(data + "\n", encoding="utf-8")


def is_ours(folder: str | os.PathLike) -> bool:
    """True for a folder this package wrote (marker, or a manifest of an earlier release)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    if (folder / MARKER_NAME).is_file():
        try:
            return json.loads((folder / MARKER_NAME).read_text(encoding="utf-8")).get("format") == MARKER_FORMAT
        except (ValueError, OSError, AttributeError):
            return False
    # Only what the folder itself holds counts, never where it is: a user's folder
    # inside a zoo is still the user's.
    for name, prefix in _LEGACY_MANIFESTS.items():
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if isinstance(data, dict) and str(data.get("format", "")).startswith(prefix):
            return True
    return False


def marker_kind(folder: str | os.PathLike) -> Optional[str]:
    """The ``kind`` in a folder's marker, or None where there is no valid marker."""
    try:
        data = json.loads(Path(folder, MARKER_NAME).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    if isinstance(data, dict) and data.get("format") == MARKER_FORMAT:
        return str(data.get("kind"))
    return None


def check_replaceable(path: str | os.PathLike, *, overwrite: bool, ours: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` is set and it is something we wrote.

    ``ours`` decides for plain files (e.g. a learned file whose header says so);
    folders need our marker (or are empty: nothing to lose).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"output already exists (pass --overwrite to replace it): {path.absolute()}")
    if path.is_symlink():
        raise OutputError(f"refusing to overwrite {path}: it is a symbolic link, not an output of mergekit-ext")
    if path.is_dir():
        if is_ours(path) or not any(path.iterdir()):
            return
        raise OutputError(
            f"refusing to overwrite {path}: it was not written by mergekit-ext (no {MARKER_NAME} marker); "
            "remove it yourself or choose another output path"
        )
    if ours is None or not ours(path):
        raise OutputError(f"refusing to overwrite {path}: it is a file that mergekit-ext did not write")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this machine (a zombie, killed but not reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_pid(name: str, prefix: str) -> Optional[int]:
    """The PID embedded in a staging name ``<prefix><pid>-<random>``, or None."""
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale(parent: str | os.PathLike, prefix: str) -> List[Path]:
    """Remove our staging leftovers ``<prefix><pid>-…`` in ``parent`` whose process is gone."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for item in parent.iterdir():
        if not item.name.startswith(prefix):
            continue
        pid = _owner_pid(item.name, prefix)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh folder ``<prefix><pid>-<random>`` in ``parent`` (same filesystem, so it can be
    renamed into place), removed again if the block fails; the PID lets a later run
    recognise it as stale once this process is gone."""
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; a result should look like any new folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(first: Path, second: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the OS or filesystem has no such call (caller falls back)."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot rename {first} to {second}: {os.strerror(code)}")


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    return _renameat2(Path(first), Path(second), _RENAME_EXCHANGE)


def move_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` to a ``target`` that must not exist (never replaces a concurrent result)."""
    source, target = Path(source), Path(target)
    try:
        if _renameat2(source, target, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise FileExistsError(f"output appeared while this run was writing it: {target}") from None
    if target.exists():
        raise FileExistsError(f"output appeared while this run was writing it: {target}")
    os.rename(source, target)


def retired_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def swap_into_place(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``staging`` the new ``target`` and delete the old one; at every instant
    ``target`` is the old or the new folder (exchange rename), or, where the OS
    has no exchange, the old folder is kept as ``.NAME.old-PID-…`` and put back
    by ``recover_retired`` if the process dies between the two renames."""
    staging, target = Path(staging), Path(target)
    if exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)
        return
    retired = target.with_name(f"{retired_prefix(target)}{os.getpid()}-{staging.name[-8:]}")
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def recover_retired(target: Path) -> None:
    """Put back an old output retired by a two-rename swap whose process died halfway."""
    if target.exists():
        return
    prefix = retired_prefix(target)
    for item in sorted(target.parent.glob(prefix + "*")):
        pid = _owner_pid(item.name, prefix)
        if pid is not None and not pid_alive(pid) and item.is_dir():
            os.replace(item, target)
            return


def clean_stale_outputs(target: str | os.PathLike) -> None:
    """Before writing ``target``: restore an interrupted swap, drop dead runs' staging folders."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    recover_retired(target)
    remove_stale(target.parent, f".{target.name}.partial-")
    remove_stale(target.parent, retired_prefix(target))
    remove_stale(target.parent, f".{target.name}.tmp-")


def default_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file in a folder tree) the mode of a new file under the umask.

    safetensors writes its files 0600 (through a private temporary file), so a
    merged model's weights were unreadable to other users while its config.json
    was 0644. Files this process writes are made ``0666 & ~umask``, like any other.
    """
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    path = Path(path)
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file() and not item.is_symlink()]
    for item in files:
        if item.stat().st_mode & 0o777 != mode:
            os.chmod(item, mode)


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[Optional[str | os.PathLike]] = (),
    kind: str = "model",
) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``path`` only if the block succeeds.

    Refused before anything is written: an output that is, contains or is inside
    one of ``inputs``; an existing ``path`` without ``overwrite``; and, even with
    ``overwrite``, an existing ``path`` this package did not write. The result
    gets the marker (``kind``) and replaces an old one by an atomic exchange. On
    any error the temporary folder is removed and ``path`` is untouched; stale
    staging folders of killed runs are removed first.
    """
    target = Path(path).absolute()
    check_output_not_input(target, inputs)
    clean_stale_outputs(target)
    check_replaceable(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target.parent, f".{target.name}.partial-") as staging:
        yield staging
        write_marker(staging, kind)
        default_permissions(staging)
        if target.exists():
            check_replaceable(target, overwrite=overwrite)  # it may have appeared meanwhile
            swap_into_place(staging, target)
        else:
            move_into_place(staging, target)


def claim_output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[Optional[str | os.PathLike]] = (),
    resume: bool = False,
) -> Path:
    """The OUT rule for an output folder written in place (a study, a demo's folder); returns it.

    OUT must not be, contain or lie inside an input. It is new, or one this package
    wrote (its marker) and ``overwrite`` is given; with ``resume``, our own output of
    the same ``kind`` is taken up again without ``overwrite`` (a resumable study).
    The folder is created and marked before anything else is written into it.
    """
    target = Path(path).absolute()
    check_output_not_input(target, inputs)
    if resume and (target.exists() or target.is_symlink()):
        empty = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
        if not (empty or (not target.is_symlink() and marker_kind(target) == kind)):
            raise OutputError(
                f"{target} exists and is not an earlier {kind} output of mergekit-ext (which would be resumed); "
                "choose a new folder"
            )
    elif target.exists() or target.is_symlink():
        check_replaceable(target, overwrite=overwrite)
    target.mkdir(parents=True, exist_ok=True)
    write_marker(target, kind)
    return target


def check_sqlite_url(url: Optional[str], inputs: Iterable[Optional[str | os.PathLike]]) -> None:
    """Refuse a ``sqlite:///PATH`` storage whose database file would be written inside an input."""
    if not url or not url.startswith("sqlite:///"):
        return
    database = url[len("sqlite:///"):].split("?", 1)[0]
    if database and database != ":memory:":
        check_output_not_input(database, inputs)


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
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    remove_stale(path.parent, f".{path.name}.tmp-")  # left by killed runs
    try:
        yield temporary
        if temporary.exists():
            default_permissions(temporary)
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


# ---------------------------------------------------------------------------
# Values and names that come from users


class NonFiniteError(ValueError):
    """A NaN or infinite number where a finite one is required."""


def check_finite_tensor(tensor, *, tensor_name: str, source: str) -> None:
    """Refuse a floating-point tensor holding NaN or ±Inf, naming the tensor and where it came from."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    raise NonFiniteError(f"tensor {tensor_name} in {source} holds {bad} non-finite value(s) ({kind}); refusing to use it")


def check_finite_number(value: float, *, label: str) -> float:
    """Refuse a NaN or infinite option value, naming the option."""
    import math

    if value is not None and not math.isfinite(float(value)):
        raise NonFiniteError(f"{label} must be a finite number, got {value}")
    return value


_FORBIDDEN_NAME_CHARS = set('/\\\0:*?"<>|')


def check_name(name: str, *, what: str = "name") -> str:
    """A name that becomes a file or folder name: no separators, no ``..``, not hidden, not empty."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must not be empty")
    bad = sorted(_FORBIDDEN_NAME_CHARS & set(name))
    if bad or name in (".", "..") or name.startswith(".") or len(name.encode()) > 200 or any(ord(c) < 32 for c in name):
        raise ValueError(
            f"{what} {name!r} cannot be used as a file name (no path separators, '..', leading '.', "
            "control or reserved characters, at most 200 bytes)"
        )
    return name


def check_dtype_name(name: Optional[str], *, label: str = "--dtype") -> Optional[str]:
    """Refuse a dtype mergekit cannot write, before any work."""
    allowed = ("float32", "float16", "bfloat16", "float64")
    if name is None:
        return None
    stripped = name[len("torch."):] if name.startswith("torch.") else name
    if stripped not in allowed:
        raise ValueError(f"{label}: unknown dtype {name!r}; choose one of {', '.join(allowed)}")
    return name
