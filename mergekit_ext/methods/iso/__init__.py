"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959).

Parts: ``kernel.py`` (``iso_c_merge``, ``iso_cts_merge`` over tensors), ``method.py``
(``merge_method: iso_c`` / ``iso_cts``). This module holds the defaults
and the evidence for them, and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2502.04959"
# One lambda serves iso_c and iso_cts, chosen for the best worst case over the
# `demo`, `demo-hard` and `hard` (seeds 0-2) zoos' validation splits
# (benchmarks/defaults_worst_case.py, results/defaults-worst-case.md; share of the
# fine-tuning gain kept): λ 2.0 keeps at least 0.46 (iso_cts) and 0.47 (iso_c) on
# every zoo. 3.0, the hard zoo's winner alone (iso_cts 0.699 ± 0.018), falls below the
# base on the multiple-choice demo zoo (iso_cts −0.15, iso_c −0.36). Iso flattens the
# spectrum of Σt τt keeping its nuclear norm and uses the MEAN of the task vectors
# outside the block matrices, so its λ is larger than task arithmetic's.
DEFAULT_LAMBDA = 2.0
# The official config (config/method/iso_cts.yaml): 80 % of the rank is common.
# Hard zoo (same sweep): 0.8 won at its best lambda (0.699 ± 0.018), 0.5-0.95 all
# within 1.4 points (0.685-0.692): kept.
DEFAULT_COMMON_SPACE_FRACTION = 0.8
# tensors.truncated_svd's "auto": LAPACK when k is a large share of the rank,
# Gram eigenvectors + Rayleigh–Ritz (~1e-5 from LAPACK) for small k.
SVD_METHOD = "auto"
