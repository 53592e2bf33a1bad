"""RMM: reversible model merging of low-rank weights (Alipour & Mohammadi Amiri, arXiv 2510.14163).

Parts: ``kernel.py`` (task-axis bases of LoRA factors, dense product-space form),
``method.py`` (``merge_method: rmm``), ``format.py`` (the RMM bundle: K basis
adapters plus coefficients), ``cli.py`` (``mergekit-ext rmm build / revert``).
"""

PAPER_URL = "https://arxiv.org/abs/2510.14163"
VARIANTS = ("factor", "position", "product")
