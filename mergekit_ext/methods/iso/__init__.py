"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959).

Parts: ``kernel.py`` (``iso_c_merge``, ``iso_cts_merge`` over tensors), ``method.py``
(``merge_method: iso_c`` / ``iso_cts``). This module holds the defaults; ``METHODS``
is loaded on first use, so importing the package imports nothing heavy.
"""

from mergekit_ext.lazy import lazy_exports

PAPER_URL = "https://arxiv.org/abs/2502.04959"
# The paper sweeps α in {0.1, …, 3.0} on validation data; FusionBench's default
# is 1.0 (its docs use 1.5). Placeholder until the hard-zoo benchmark sets it.
DEFAULT_LAMBDA = 1.0
# The official config (config/method/iso_cts.yaml): 80 % of the rank is common.
DEFAULT_COMMON_SPACE_FRACTION = 0.8
# tensors.truncated_svd's "auto": LAPACK when k is a large share of the rank,
# Gram eigenvectors + Rayleigh–Ritz (~1e-5 from LAPACK) for small k.
SVD_METHOD = "auto"


__getattr__ = lazy_exports(__name__, {"METHODS": "method"})
