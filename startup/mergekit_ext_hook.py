"""Startup hook that makes mergekit-ext's methods visible to stock mergekit.

Installed at site-packages root and run at interpreter start by
``mergekit_ext.pth`` (and ``mergekit_ext.start`` on Python >= 3.15, PEP 829).
It imports nothing heavy: it only watches for ``mergekit.merge_methods`` and
registers this package's methods right after mergekit's own registry exists.
"""

import sys

_WATCHED = "mergekit.merge_methods"


def _register() -> None:
    try:
        from mergekit_ext.registry import register_all

        register_all()
    except Exception as error:  # never break mergekit itself over a plugin
        print(f"mergekit-ext: could not register merge methods: {error}", file=sys.stderr)


class _RegisterAfterImport:
    """Meta-path finder that wraps the loader of ``mergekit.merge_methods``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        for finder in sys.meta_path:
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
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if mergekit's methods are loaded, else when they are."""
    if _WATCHED in sys.modules:
        _register()
    elif _RegisterAfterImport not in sys.meta_path:
        sys.meta_path.insert(0, _RegisterAfterImport)
