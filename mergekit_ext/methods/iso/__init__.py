"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959).

Parts: ``kernel.py`` (``iso_c_merge``, ``iso_cts_merge`` over tensors), ``method.py``
(``merge_method: iso_c`` / ``iso_cts``). This module holds the defaults
and the evidence for them, and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2502.04959"
# One lambda serves iso_c and iso_cts. Chosen on the hard zoo's validation split,
# 3 seeds (benchmarks/quality.py, results/quality-hard.md and
# quality-hard-defaults-sweep.json; iso_c lambda {0.5, …, 7.0}, iso_cts fraction {0.5, …,
# 0.95} x lambda {2.0, …, 5.0}): iso_c is best at 2.5 (0.676 ± 0.015) and 3.0
# (0.667 ± 0.041), iso_cts at 3.0 (0.699 ± 0.018 at fraction 0.8) and 3.5
# (0.696); 3.0 has the best mean of the two methods (0.683 against 0.677 at 2.5).
# 1.0, FusionBench's default (the paper sweeps 0.1-3.0), scored 0.538 for iso_c:
# 13 points lower (Iso flattens the spectrum of Σt τt keeping its nuclear norm,
# and uses the MEAN of the task vectors outside the block matrices, so its update
# is much smaller than task arithmetic's sum).
DEFAULT_LAMBDA = 3.0
# The official config (config/method/iso_cts.yaml): 80 % of the rank is common.
# Hard zoo (same sweep): 0.8 won at its best lambda (0.699 ± 0.018), 0.5-0.95 all
# within 1.4 points (0.685-0.692): kept.
DEFAULT_COMMON_SPACE_FRACTION = 0.8
# tensors.truncated_svd's "auto": LAPACK when k is a large share of the rank,
# Gram eigenvectors + Rayleigh–Ritz (~1e-5 from LAPACK) for small k.
SVD_METHOD = "auto"
