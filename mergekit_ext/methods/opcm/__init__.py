"""OPCM: orthogonal-projection continual merging (Tang et al., arXiv 2501.09522).

Parts: ``kernel.py`` (projection step, continual recurrences), ``method.py``
(``merge_method: opcm``), ``format.py`` (the continual state folder: init, add,
atomic swap, lock), ``cli.py`` (``mergekit-ext continual``). This module holds the
defaults only and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2501.09522"
DEFAULT_ALPHA = 0.5
# The paper's continual baselines: c = 0.3 for 8 tasks (0.1 for 14/20), TIES keeps 20 %.
DEFAULT_COEFFICIENT = 0.3
DEFAULT_DENSITY = 0.2
CONTINUAL_METHODS = ("opcm", "ta", "ties", "average")
