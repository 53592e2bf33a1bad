"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Parts: ``kernel.py`` (``tsv_merge`` over tensors), ``method.py`` (``merge_method: tsv_m``).
This module holds the defaults; ``METHODS`` is loaded on first use, so importing
the package imports nothing heavy.
"""

from mergekit_ext.lazy import lazy_exports

PAPER_URL = "https://arxiv.org/abs/2412.00081"
# The paper sweeps α in {0.1, …, 3.0} on validation data; FusionBench and
# mergekit PR #639 use 1.0. Placeholder until the hard-zoo benchmark sets it.
DEFAULT_LAMBDA = 1.0
# tensors.truncated_svd's "auto": LAPACK when k is a large share of the rank,
# Gram eigenvectors + Rayleigh–Ritz (~1e-5 from LAPACK) for small k.
SVD_METHOD = "auto"


__getattr__ = lazy_exports(__name__, {"METHODS": "method"})
