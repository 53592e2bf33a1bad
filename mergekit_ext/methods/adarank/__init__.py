"""AdaRank: adaptive rank pruning (Lee, Choi, Lee, Kim, Hong, arXiv 2503.22178).

Official code: github.com/david3684/AdaRank. METHODS.md §3. Per tensor, with
origin ``o`` = θ0 (variant ``ta``, on top of Task Arithmetic) or θavg (variant
``cart``, on top of CART) and task vectors ``vt = θt − o``:

    matrices:     vt ≈ Ut diag(st) Vtᵀ  (top ``band`` singular triplets)
                  W = o + Σt coef[t] · Ut diag(mask[t] ⊙ st) Vtᵀ
    other tensors W = o + Σt coef[t] · vt                 (never masked)

``mask`` [T, band] is binary and ``coef`` [T] is one scalar per task per
tensor; both are learned at test time (``mergekit_ext.adarank``) by
minimising prediction entropy on unlabeled prompts, with a straight-through
estimator on ``p = sigmoid(logit / 10)``.

The band: only the top ``band = max(1, int(max_rank_ratio · min(m, n)))``
singular triplets of each task vector are kept as candidates; everything below
is pruned for good. ``max_rank_ratio = 1`` is the paper's method (full SVD,
so all-ones masks give back ``vt`` exactly); a smaller band bounds the memory
of the learner (full U, V per task is about twice the model per task) and the
paper's ablation says pruning only within the top 16 % costs 0.4 points.

Parts: ``kernel.py`` (pure kernels, tensors in and out), ``format.py`` (the
learned file: safetensors with hard masks and coefficients, JSON metadata),
``method.py`` (``merge_method: adarank``, which applies a learned file in the
stock ``mergekit-yaml``: per tensor it recomputes the same deterministic float32
factorisation and applies the stored masks and coefficients, so the merge
streams one tensor at a time like any other method), ``learn.py`` (the
test-time learner) and ``cli.py`` (``mergekit-ext adarank learn / show``).
This module holds the constants and defaults only and imports nothing heavy.
"""

PAPER_URL = "https://arxiv.org/abs/2503.22178"
VARIANTS = ("ta", "cart")
# p = sigmoid(logit / MASK_TEMPERATURE); logits start at ±INITIAL_LOGIT (official code).
MASK_TEMPERATURE = 10.0
INITIAL_LOGIT = 0.1
# The same exact-truncation SVD as CART (tensors.truncated_svd "auto": a full
# LAPACK SVD for large bands, the Gram path for small ones). The learner and the
# mergekit method both factorise through ``kernel.factorize``, so they agree.
DEFAULT_SVD = "auto"
FILE_FORMAT = "mergekit-ext/adarank/1"

# Base-method settings each variant starts from (step 0 is that method exactly):
# Task Arithmetic's lambda from the demo zoo's validation grid (mergekit_ext.demo),
# CART's defaults from mergekit_ext.methods.cart (same evidence).
VARIANT_DEFAULTS = {
    "ta": {"prior": 0.4, "init_rank_ratio": 1.0},
    "cart": {"prior": 1.3, "init_rank_ratio": 0.15},
}
DEFAULT_VARIANT = "cart"
DEFAULT_MAX_RANK_RATIO = 1.0
# Chosen on the demo zoo's validation split (README, "AdaRank"; 200 steps, 16
# prompts per task): lower answer entropy did NOT mean higher accuracy there.
# lr 5e-4 left CART at its accuracy (val 0.818 -> 0.823 / 0.818 over two seeds)
# while 1e-3, 2e-3 and 1e-2 cut the entropy further and the accuracy with it
# (CART val 0.798, 0.760, 0.683; TA likewise). With p = sigmoid(logit / 10) and
# logits at ±0.1, Adam moves a logit ~lr per step, so lr·steps (0.1 here) is
# how far a logit can travel: the papers' language setting (5e-5 to 1e-4 for
# 5,000 steps) allows 0.25 to 0.5, vision (1e-3 for 10,000) allows 10.
DEFAULT_STEPS = 200
DEFAULT_LR = 5e-4
DEFAULT_BATCH_SIZE = 16
