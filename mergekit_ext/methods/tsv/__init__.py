"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Parts: ``kernel.py`` (``tsv_merge`` over tensors), ``method.py`` (``merge_method: tsv_m``).
This module holds the defaults and the evidence for them, and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2412.00081"
# A default must not hurt on any zoo: chosen for the best worst case over the
# `demo`, `demo-hard` and `hard` (seeds 0-2) zoos' validation splits
# (benchmarks/defaults_worst_case.py, results/defaults-worst-case.md; share of the
# fine-tuning gain kept, (merged − base) / (expert − base)): λ 1.5 keeps at least 0.53
# on every zoo. 2.0, the hard zoo's winner alone (0.699 ± 0.022 exact match), falls
# below the base on the multiple-choice demo zoo (−0.02); 1.0 (FusionBench's) keeps
# only 0.38 on demo-hard.
DEFAULT_LAMBDA = 1.5
# tensors.truncated_svd's "auto": LAPACK when k is a large share of the rank,
# Gram eigenvectors + Rayleigh–Ritz (~1e-5 from LAPACK) for small k.
SVD_METHOD = "auto"
