"""A stored copy of mergekit's merge options (``mergekit.options.MergeOptions``), read without importing mergekit.

``mergekit-ext merge`` declares its options from ``mergekit_options.json`` so that
``merge --help`` and argument errors do not wait for torch. The file is generated
from mergekit's own table by ``python -m mergekit_ext.merge.options``;
tests/test_newcomer.py fails with that command when mergekit's options change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

OPTIONS_PATH = Path(__file__).with_name("mergekit_options.json")


def live_options() -> List[Dict]:
    """mergekit's merge options as mergekit declares them (imports mergekit and torch)."""
    import typing

    from mergekit.options import OPTION_HELP, MergeOptions

    entries = []
    for name, info in MergeOptions.model_fields.items():
        annotation = info.annotation
        if typing.get_origin(annotation) is typing.Union:
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        kind = "size" if name == "out_shard_size" else annotation.__name__
        entries.append({"name": name, "type": kind, "default": info.default, "help": OPTION_HELP.get(name)})
    return entries


def write_options() -> Path:
    text = json.dumps({"generated_by": "python -m mergekit_ext.merge.options", "options": live_options()}, indent=1)
    OPTIONS_PATH.write_text(text + "\n", encoding="utf-8")
    return OPTIONS_PATH


def stored_options() -> List[Dict]:
    return json.loads(OPTIONS_PATH.read_text(encoding="utf-8"))["options"]


if __name__ == "__main__":
    print(f"wrote {write_options()}")
