"""CART: centered low-rank merging (Choi, Kim, Lee, Hong, arXiv 2412.12153).

Parts: ``kernel.py`` (``cart_merge`` over tensors), ``method.py`` (``merge_method: cart``).
This module holds the defaults and the evidence for them, and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2412.12153"
# Chosen on the hard zoo's validation split, 3 seeds (benchmarks/quality.py
# --defaults-sweep, results/quality-hard-defaults-sweep.json; grid rank_ratio {0.02, 0.05,
# 0.1, 0.15, 0.2, 0.3} x lambda {1.0, 1.3, 1.5, 2.0, 2.5, 3.0}, 800 items per seed):
# rank 0.1 / lambda 2.0 won (mean exact match 0.673 ± 0.008 over seeds; the
# quality table's grid chose it on 2 of 3 seeds, 0.05 / 1.3 on the third), ahead
# of 0.1 / 2.5 (0.667) and 0.05 / 1.3 (0.651); 0.15 / 1.3 (the 4-task demo zoo's
# best) scored 0.555 ± 0.010, 12 points lower. The best lambda grows with the rank
# kept (0.05: 1.3, 0.1: 2.0, 0.15 and above: 3.0); the paper's ViT-B/32 8-task
# setting is 0.12 / 2.0.
DEFAULT_LAMBDA = 2.0
DEFAULT_RANK_RATIO = 0.1
# Top-k eigenvectors of the smaller Gram matrix: the same subspace as a full
# LAPACK SVD (tests/test_factorizations.py) for less work; "randomized" is
# cheaper still for small k, but its truncation is approximate on flat spectra.
DEFAULT_SVD = "gram"
