"""The one list of what this package adds, and the registration of its merge methods.

``PARTS`` names every folder of the package, in documentation order. A part's
``method.py`` (when it has one) exports ``METHODS``, the mergekit methods it
declares; its ``cli.py`` (when it has one) exports ``COMMANDS``, its click
commands. ``register_all`` (called by the startup hook and by ``import
mergekit_ext``) and ``cli.py`` both assemble from this list, and nothing here is
imported by the parts, so there is no import cycle.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import List, Optional, Tuple

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
    """Register our methods with mergekit; names already registered are left alone."""
    from mergekit.merge_methods import registry as mergekit_registry

    known = {method.spec.name for method in mergekit_registry.registered_methods()}
    for method in our_methods():
        if method.spec.name not in known:
            mergekit_registry.register(method)


def describe_default(parameter) -> Optional[str]:
    """A parameter's default as text, or None when it is required."""
    from mergekit.merge_methods.base import MISSING

    return None if parameter.default is MISSING else repr(parameter.default)
