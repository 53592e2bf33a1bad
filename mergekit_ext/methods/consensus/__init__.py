"""Consensus masks: TALL masks and Consensus Merging (Wang et al., ICML 2024, arXiv 2405.07813).

Parts: ``kernel.py`` (masks and merges over tensors), ``method.py`` (``consensus_ta``,
``consensus_ties`` for mergekit), ``format.py`` (TALL-mask bundles: compress and
recover), ``cli.py`` (``mergekit-ext tall``). This module holds the defaults only, so
that reading them imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2405.07813"
# Checked on the hard zoo's validation split, 3 seeds (benchmarks/quality.py
# --defaults-sweep, results/quality-hard-defaults-sweep.json; consensus_ta, grid k {1, 2, 3}
# x tall_lambda {0.2, …, 0.6} x lambda {0.5, 0.7, 0.9, 1.1}; best lambda per cell):
# k 1 won on every seed (best 0.619 ± 0.023 at tall_lambda 0.5) against k 2 (best
# 0.601 ± 0.034; 0.599 at tall_lambda 0.4) and k 3 (0.583): per seed k 1 leads by
# 3.5 / 1.4 / 0.4 points, within the noise of 800 items, and consensus_ties'
# quality grid agrees (k 1 chosen on 3 of 3 seeds, +0.9 points). Within k 2,
# tall_lambda 0.2 to 0.4 are within 0.2 points of each other. Neither difference
# is beyond noise, so both keep the paper's values (k 2 was also best in the
# paper's 8-20-task vision setting; with two models, k 2 keeps only weights both
# masks select, use k 1 there).
DEFAULT_TALL_LAMBDA = 0.4  # middle of the paper's per-task grid {0.2, …, 0.6}; hard zoo: within noise of 0.2-0.6
DEFAULT_K = 2  # the paper's consensus threshold: drops "catastrophic" and "selfish" weights; hard zoo: k 1 +1.8 points, within noise
DEFAULT_TIES_DENSITY = 0.2  # the paper's top 20 %
