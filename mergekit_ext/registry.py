"""The one list of what this package adds, and the registration of its merge methods.

``PARTS`` names every folder of the package, in documentation order. A part's
``method.py`` (when it has one) exports ``METHODS``, the mergekit methods it
declares, and registers them with mergekit's public ``register`` as its last
statement; its ``cli.py`` (when it has one) exports ``COMMANDS``, its click
commands. ``cli.py`` assembles from this list, and nothing here is imported by
the parts.

Registration happens on first use of mergekit's method registry: the startup hook
(``startup/mergekit_ext_hook.py``) calls ``register_all`` right after
``mergekit.merge_methods`` has loaded, and that imports every ``method.py``.
When one of ours was what imported mergekit, that module is still half-imported
at that moment; ``register_all`` does not need it (it registers itself when it
finishes). So only ``method.py`` modules may import ``mergekit.merge_methods`` at
module level, and none of them imports another (tests/test_registration.py
imports every module first, in a fresh interpreter, to check).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PARTS = (
    "merge",
    "methods.consensus",
    "methods.cart",
    "methods.tsv",
    "methods.iso",
    "methods.adarank",
    "methods.opcm",
    "methods.rmm",
    "adapters",
    "zoo",
    "evaluate",
    "demo",
    "tune",
)


def _part_modules(suffix: str) -> List:
    modules = []
    for part in PARTS:
        name = f"mergekit_ext.{part}.{suffix}"
        if importlib.util.find_spec(f"mergekit_ext.{part}") is not None and importlib.util.find_spec(name) is not None:
            modules.append(importlib.import_module(name))
    return modules


def our_methods() -> Tuple:
    """Every method this package adds to mergekit, in documentation order."""
    return tuple(method for module in _part_modules("method") for method in module.METHODS)


def our_commands() -> Tuple:
    """Every ``mergekit-ext`` command group or command, in documentation order."""
    return tuple(command for module in _part_modules("cli") for command in module.COMMANDS)


# Methods that only apply a file learned beforehand by a `mergekit-ext` command
# (they cannot run with defaults alone, so benchmarks that run every method skip them).
LEARNED_FILE_METHODS = frozenset({"adarank"})


def needs_learned_file(name: str) -> bool:
    """True for a method that needs a learned file (e.g. ``adarank``'s masks) to run."""
    return name in LEARNED_FILE_METHODS


def register_all() -> None:
    """Register our methods with mergekit (importing each ``method.py`` registers its methods); harmless twice."""
    _part_modules("method")


def describe_default(parameter) -> Optional[str]:
    """A parameter's default as text, or None when it is required."""
    from mergekit.merge_methods.base import MISSING

    return None if parameter.default is MISSING else repr(parameter.default)


# ``mergekit-ext methods`` prints this file instead of importing the methods
# (their declarations import torch and mergekit: ~10 s and ~400 MB). It is
# generated from the live declarations by ``python -m mergekit_ext.registry``;
# tests/test_newcomer.py fails with that command when it is out of date.
CATALOG_PATH = Path(__file__).with_name("registry_catalog.json")


def live_catalog() -> List[Dict]:
    """Name, paper, base policy and parameters of every method, from the declarations (imports mergekit)."""
    entries = []
    for method in our_methods():
        spec = method.spec
        entries.append(
            {
                "name": spec.name,
                "pretty_name": spec.pretty_name,
                "reference_url": spec.reference_url,
                "base": spec.contract.base.value,
                "parameters": [
                    {
                        "name": parameter.name,
                        "scope": "global" if parameter.scope.value == "shared" else "per model",
                        "default": describe_default(parameter),
                        "description": parameter.description or "",
                    }
                    for parameter in spec.parameters
                ],
            }
        )
    return entries


def catalog() -> List[Dict]:
    """The stored catalog (cheap: no torch), or the live one when the file is missing."""
    try:
        return json.loads(CATALOG_PATH.read_text(encoding="utf-8"))["methods"]
    except (OSError, ValueError, KeyError):
        return live_catalog()


def write_catalog() -> Path:
    """Regenerate ``registry_catalog.json`` from the declarations."""
    text = json.dumps({"generated_by": "python -m mergekit_ext.registry", "methods": live_catalog()}, indent=1, ensure_ascii=False)
    CATALOG_PATH.write_text(text + "\n", encoding="utf-8")
    return CATALOG_PATH


if __name__ == "__main__":
    print(f"wrote {write_catalog()}")
