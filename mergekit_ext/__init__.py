"""mergekit-ext: recent model-merging methods for mergekit.

Importing the package makes its merge methods visible to mergekit (registering
twice is harmless): at once when mergekit's method registry is already loaded,
otherwise the moment mergekit loads it. Importing the package does not import
mergekit or torch, so ``mergekit-ext --help`` starts in a fraction of a second.
Stock ``mergekit-yaml`` needs no import at all: the installed startup hook
(``startup/mergekit_ext_hook.py``, the one home of the registration logic) does
the same at interpreter start.
"""

__version__ = "0.1.0"


def register_all() -> None:
    """Register our methods with mergekit now (imports mergekit); see ``registry.register_all``."""
    from mergekit_ext.registry import register_all as _register_all

    _register_all()


def _install_hook() -> None:
    # The hook's one home is startup/mergekit_ext_hook.py. The wheel installs it at
    # site-packages root; a checkout (PYTHONPATH, `python -S`, editable) uses its own
    # copy, so that the hook always matches this package's registry.
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
