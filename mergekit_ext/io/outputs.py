"""Outputs: never over an input, replace only what we wrote, swap atomically, leave nothing half-written.

Every output folder gets a marker, so ``--overwrite`` can tell a result of
ours from anything else; folders and files are written beside their target
and renamed into place; staging leftovers of killed runs are recognised by the
PID in their name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

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
