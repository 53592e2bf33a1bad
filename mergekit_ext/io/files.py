"""Small JSON, JSONL and text files: read with a clear error naming the file, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from mergekit_ext.io.outputs import atomic_file


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
