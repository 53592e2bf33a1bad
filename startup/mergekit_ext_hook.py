"""Startup hook that makes mergekit-ext's methods visible to stock mergekit.

Installed at site-packages root and run at interpreter start by
``mergekit_ext.pth`` (and ``mergekit_ext.start`` on Python >= 3.15, PEP 829).
It imports nothing heavy: it only watches for ``mergekit.merge_methods`` and
registers this package's methods right after mergekit's own registry exists.
"""

import sys

_WATCHED = "mergekit.merge_methods"


def _register() -> bool:
    """Register now; True when done (False: one of our method modules is mid-import)."""
    try:
        from mergekit_ext.registry import PartiallyImported, register_all
    except Exception as error:  # never break mergekit itself over a plugin
        print(f"mergekit-ext: could not register merge methods: {error}", file=sys.stderr)
        return True
    try:
        register_all()
    except PartiallyImported:
        return False
    except Exception as error:
        print(f"mergekit-ext: could not register merge methods: {error}", file=sys.stderr)
    return True


def _register_on_first_use() -> None:
    """When one of our method modules imported mergekit, finish registering when mergekit's
    registry is first asked (``get`` / ``registered_methods``), by then every import is done."""
    registry = sys.modules["mergekit.merge_methods.registry"]
    package = sys.modules[_WATCHED]
    originals = {name: getattr(registry, name) for name in ("get", "registered_methods")}
    busy = []

    def wrap(name):
        original = originals[name]

        def first_use(*args, **kwargs):
            if not busy:  # register_all itself asks the registry
                busy.append(True)
                try:
                    if _register():
                        for module in (registry, package):
                            for attribute, function in originals.items():
                                if getattr(module, attribute, None) in wrappers.values():
                                    setattr(module, attribute, function)
                finally:
                    busy.clear()
            return original(*args, **kwargs)

        return first_use

    wrappers = {name: wrap(name) for name in originals}
    for module in (registry, package):
        for name, function in wrappers.items():
            if getattr(module, name, None) is originals[name]:
                setattr(module, name, function)


class _RegisterAfterImport:
    """Meta-path finder that wraps the loader of ``mergekit.merge_methods``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        for finder in list(sys.meta_path):
            if getattr(finder, "__name__", None) == cls.__name__ and finder is not cls:
                sys.meta_path.remove(finder)  # an older copy of this hook (a stale install): this one wins
                continue
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        sys.meta_path.remove(cls)
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            if not _register():
                _register_on_first_use()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if mergekit's methods are loaded, else when they are."""
    if _WATCHED in sys.modules:
        if not _register():
            _register_on_first_use()
    elif _RegisterAfterImport not in sys.meta_path:
        sys.meta_path.insert(0, _RegisterAfterImport)
