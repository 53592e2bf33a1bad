"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Parts: ``kernel.py`` (``tsv_merge`` over tensors), ``method.py`` (``merge_method: tsv_m``).
This module holds the defaults and the evidence for them, and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2412.00081"
# Chosen on the hard zoo's validation split, 3 seeds (benchmarks/quality.py,
# results/quality-hard.md and quality-hard-defaults-sweep.json; grid lambda {0.5, 1.0,
# 1.5, …, 6.0}): 2.0 won (mean exact match 0.699 ± 0.022; chosen on 2 of 3
# seeds, 1.5 on the third) just ahead of 1.5 (0.692 ± 0.010); 1.0, FusionBench's
# and mergekit PR #639's value (the paper sweeps 0.1-3.0), scored 0.604 ± 0.010,
# 9.5 points lower. Beyond 2.0 it falls fast (2.5: 0.578, 3.0: 0.423).
DEFAULT_LAMBDA = 2.0
# tensors.truncated_svd's "auto": LAPACK when k is a large share of the rank,
# Gram eigenvectors + Rayleigh–Ritz (~1e-5 from LAPACK) for small k.
SVD_METHOD = "auto"
