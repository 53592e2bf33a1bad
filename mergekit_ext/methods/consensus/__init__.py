"""Consensus masks: TALL masks and Consensus Merging (Wang et al., ICML 2024, arXiv 2405.07813).

Parts: ``kernel.py`` (masks and merges over tensors), ``method.py`` (``consensus_ta``,
``consensus_ties`` for mergekit), ``format.py`` (TALL-mask bundles: compress and
recover), ``cli.py`` (``mergekit-ext tall``). This module holds the defaults only, so
that reading them imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2405.07813"
DEFAULT_TALL_LAMBDA = 0.4  # middle of the paper's per-task grid {0.2, …, 0.6}
DEFAULT_K = 2  # the paper's consensus threshold: drops "catastrophic" and "selfish" weights
DEFAULT_TIES_DENSITY = 0.2  # the paper's top 20 %
