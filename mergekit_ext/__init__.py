"""mergekit-ext: recent model-merging methods for mergekit.

Our merge methods are registered with mergekit when mergekit's method registry
first loads (``registry`` says how). Stock ``mergekit-yaml`` needs no import by
the user: the installed startup hook (``startup/mergekit_ext_hook.py``) watches for
it from interpreter start. Importing this package installs the same hook, for
setups where ``.pth`` files are not processed (``python -S``, a checkout on
``PYTHONPATH``, an editable install); it imports neither mergekit nor torch, so
``mergekit-ext --help`` starts in a fraction of a second.
"""

__version__ = "0.1.0"


def register_all() -> None:
    """Register our methods with mergekit now (imports mergekit); see ``registry.register_all``."""
    from mergekit_ext.registry import register_all as _register_all

    _register_all()


def _install_hook() -> None:
    # A checkout uses its own copy of the hook, so that it always matches this
    # package's registry; the wheel installs it at site-packages root.
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "startup" / "mergekit_ext_hook.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location("mergekit_ext._startup_hook", path)
        hook = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = hook
        spec.loader.exec_module(hook)
    else:
        try:
            import mergekit_ext_hook as hook
        except ImportError:  # neither installed nor a checkout: register now
            register_all()
            return
    hook.install()


_install_hook()

__all__ = ["register_all", "__version__"]
