"""The offline model zoo: a small, seeded model family that can tell merge methods apart.

Parts: ``tasks.py`` (seeded task generators: multiple choice and generation), ``presets.py`` (sizes and schedules),
``train.py`` (training and the in-process scorer), ``build.py`` (``build_zoo``: base,
experts, LoRA adapters, data, task YAMLs, manifest), ``format.py`` (the built zoo on
disk: ``Zoo``, ``load_zoo``), ``cli.py`` (``mergekit-ext zoo``).

The public names below load their module on first use, so importing this package
(for the command line) costs nothing.
"""

from mergekit_ext.lazy import lazy_exports

_EXPORTS = {
    "build_zoo": "build",
    "format_build_report": "build",
    "build_report_rows": "build",
    "Zoo": "format",
    "ZooError": "format",
    "load_zoo": "format",
    "ZOO_FORMAT": "format",
    "PRESETS": "presets",
    "Preset": "presets",
    "TASKS": "tasks",
    "make_document": "tasks",
    "GENERATION_TASKS": "tasks",
    "make_item": "tasks",
    "multiple_choice_accuracy": "train",
    "exact_match": "train",
    "greedy_generate": "train",
    "score": "train",
    "merge_in_memory": "train",
    "load_causal_lm": "train",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
