"""RMM: reversible model merging of low-rank weights (Alipour & Mohammadi Amiri, arXiv 2510.14163).

Parts: ``kernel.py`` (task-axis bases of LoRA factors, dense product-space form),
``method.py`` (``merge_method: rmm``), ``format.py`` (the RMM bundle: K basis
adapters plus coefficients), ``cli.py`` (``mergekit-ext rmm build / revert``).
"""

PAPER_URL = "https://arxiv.org/abs/2510.14163"
# The weight each model's reconstructed delta gets in `merge_method: rmm` when none is
# written. Chosen like the λ defaults, for the best worst case over zoos
# (benchmarks/defaults_worst_case.py, results/defaults-worst-case.md; share of the
# fine-tuning gain kept on validation at the default k 1): 0.8 keeps at least 0.25 on
# the `hard` zoos 3-5 and the real-LLM `smol` zoos 0 and 2. 1.0, task arithmetic's
# full sum, keeps only 0.13 on hard seed 4 and costs the most retention on the smol
# zoos (facts 0.80 / 0.82 against the base's 0.95; 0.88 / 0.85 at 0.8). To recover one
# task, write weight 1 for it and 0 for every other model.
DEFAULT_WEIGHT = 0.8
VARIANTS = ("factor", "position", "product")
