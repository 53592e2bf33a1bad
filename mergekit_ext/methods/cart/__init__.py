"""CART: centered low-rank merging (Choi, Kim, Lee, Hong, arXiv 2412.12153).

Parts: ``kernel.py`` (``cart_merge`` over tensors), ``method.py`` (``merge_method: cart``).
This module holds the defaults and the evidence for them, and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2412.12153"
# Chosen on the validation split of benchmarks/quality.py (demo zoo, grid
# rank_ratio {0.05, 0.15} x lambda {1.3, 2.0}): lambda 1.3 won at both ratios and
# 0.15 at both lambdas. lambda 1.3 is also the AdaRank authors' GPT-2 setting;
# the paper's ViT setting was 0.12 / 2.0. Evidence and caveats in the README.
DEFAULT_LAMBDA = 1.3
DEFAULT_RANK_RATIO = 0.15
# Top-k eigenvectors of the smaller Gram matrix: agrees with a full LAPACK SVD
# to ~1e-5 relative on realistic spectra and is 2-11x faster at every k
# measured; "randomized" is faster still for small k but its truncation can
# differ from the SVD's by ~5-15 % on flat spectra (see the README numbers).
DEFAULT_SVD = "gram"
