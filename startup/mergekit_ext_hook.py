"""Startup hook that makes mergekit-ext's methods visible to stock mergekit.

mergekit 0.1.5 has a public ``register()`` but no plugin discovery. The wheel
installs this module at site-packages root, and ``mergekit_ext.pth`` (or
``mergekit_ext.start`` on Python >= 3.15, PEP 829) calls ``install()`` at
interpreter start. That imports nothing heavy: it adds a finder that, when
``mergekit.merge_methods`` is first imported, lets mergekit's own loader run and
then calls ``mergekit_ext.registry.register_all``. Nothing of mergekit is patched.
"""

import sys

_WATCHED = "mergekit.merge_methods"


def _register() -> None:
    try:
        from mergekit_ext.registry import register_all

        register_all()
    except Exception as error:  # a broken plugin must not break mergekit itself
        print(f"mergekit-ext: could not register merge methods: {error}", file=sys.stderr)


class _LoadThenRegister:
    """The loader of ``mergekit.merge_methods``, followed by our registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # everything else (resources, source) is the original loader's
        return getattr(self._loader, name)


class _Finder:
    """Meta-path finder that hands ``mergekit.merge_methods`` to ``_LoadThenRegister``, once."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(cls)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoadThenRegister(spec.loader)
        return spec


def install() -> None:
    """Register now if mergekit's method registry is loaded, else right after it loads."""
    if _WATCHED in sys.modules:
        _register()
    elif _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)
