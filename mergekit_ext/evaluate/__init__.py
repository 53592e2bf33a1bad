"""Validation with the real lm-eval harness: ``harness.py`` (run lm-eval, cache, compare
against a zoo), ``report.py`` (table, Markdown, PNG), ``cli.py`` (``mergekit-ext eval``).

The public names below load their module on first use, so importing this package
(for the command line) costs nothing.
"""

from mergekit_ext.lazy import lazy_exports

_EXPORTS = {
    "METRIC": "harness",
    "EvaluationError": "harness",
    "ModelSpec": "harness",
    "lm_eval_results": "harness",
    "lm_eval_items": "harness",
    "compare_on_zoo": "harness",
    "report_on_models": "harness",
    "table_rows": "report",
    "format_table": "report",
    "format_markdown": "report",
    "write_chart": "report",
    "write_report": "report",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
