"""The evaluation protocol: pick a setting on validation, report it on test.

Parts: ``grids.py`` (every method's grids, one table: ``METHOD_GRIDS``),
``selection.py`` (``select``: the best setting by validation score, ties to the first,
with its evidence), ``stats.py`` (mean, sample std, standard error, paired differences
to a reference and the beyond-noise test), ``scorer.py`` (``Scorer``: the zoo's
in-process scorer, equal to lm-eval's ``acc`` / greedy ``exact_match``).

The public names below load their module on first use.
"""

from mergekit_ext.lazy import lazy_exports

_EXPORTS = {
    "METHOD_GRIDS": "grids",
    "QUALITY_GRIDS": "grids",
    "DEMO_GRIDS": "grids",
    "DEFAULT_SPACES": "grids",
    "SWEEP_GRIDS": "grids",
    "ADARANK_PRIOR_GRIDS": "grids",
    "quality_grid": "grids",
    "demo_grids": "grids",
    "axes_settings": "grids",
    "Selection": "selection",
    "SelectionError": "selection",
    "select": "selection",
    "Scorer": "scorer",
    "SCORER_NAMES": "scorer",
    "T_CRITICAL": "stats",
    "summary": "stats",
    "mean": "stats",
    "sample_std": "stats",
    "standard_error": "stats",
    "paired_differences": "stats",
    "paired_t": "stats",
    "t_critical": "stats",
    "beyond_noise": "stats",
    "difference_z": "stats",
    "versus_reference": "stats",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
