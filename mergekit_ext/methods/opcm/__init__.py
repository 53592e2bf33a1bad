"""OPCM: orthogonal-projection continual merging (Tang et al., arXiv 2501.09522).

Parts: ``kernel.py`` (projection step, continual recurrences), ``method.py``
(``merge_method: opcm``), ``format.py`` (the continual state folder: init, add,
atomic swap, lock), ``cli.py`` (``mergekit-ext continual``). This module holds the
defaults only and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2501.09522"
# Checked on the hard zoo's validation split, 3 seeds (benchmarks/quality.py,
# results/quality-hard.md; merge_method opcm, grid alpha {0.1, …, 0.9}): flat
# from 0.1 to 0.5 (0.554-0.562 mean exact match; 0.4 best, +0.8 points over 0.5,
# per-seed winners 0.4 / 0.2 / 0.1) and declining above (0.527 at 0.9). Within
# noise, so the paper's 0.5 stays.
DEFAULT_ALPHA = 0.5
# The paper's continual baselines: c = 0.3 for 8 tasks (0.1 for 14/20), TIES keeps 20 %.
DEFAULT_COEFFICIENT = 0.3
DEFAULT_DENSITY = 0.2
CONTINUAL_METHODS = ("opcm", "ta", "ties", "average")
