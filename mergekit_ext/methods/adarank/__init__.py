"""AdaRank: adaptive rank pruning (Lee, Choi, Lee, Kim, Hong, arXiv 2503.22178).

Official code: github.com/david3684/AdaRank. docs/methods.md#adarank. Per tensor, with
origin ``o`` = θ0 (variant ``ta``, on top of Task Arithmetic) or θavg (variant
``cart``, on top of CART) and task vectors ``vt = θt − o``:

    matrices:     vt ≈ Ut diag(st) Vtᵀ  (top ``band`` singular triplets)
                  W = o + Σt coef[t] · Ut diag(mask[t] ⊙ st) Vtᵀ
    other tensors W = o + Σt coef[t] · vt                 (never masked)

Variants ``tsv_m`` and ``iso_cts`` start from TSV-M and Iso-CTS (docs/methods.md#tsv-m, #iso-c-and-iso-cts;
the AdaRank paper's best result is Iso-CTS + AdaRank). Origin θ0; the candidate
components are the columns of the method's orthogonalized stack (the same code as
``merge_method: tsv_m`` / ``iso_cts``, ``*_components`` in their kernels):

    tsv_m:   Δ = U⊥ diag(ŝ) V⊥ᵀ, column i from task t(i), its j-th triplet
             W = θ0 + Σi coef[t(i)] · mask[t(i), j(i)] · ŝi · U⊥[:, i] V⊥ᵀ[i]
    iso_cts: the same over Iso-CTS's stack, every σ = σ̄ (the mean of the
             unmasked stack, fixed), task blocks in rows 0…T−1 and the common
             block in row T: one mask row and one coefficient per tensor for it
    other tensors W = θ0 + Σt coef[t] · vt / T   (the methods use θ0 + λ·mean τ)

so step 0 (every component on, coefficients λ) is the base method. The common
block gets its own row because its directions come from Σt τt and belong to no
task: giving it task t's mask or coefficient would make the result depend on task
order, and a separate coefficient lets learning weigh shared against
task-specific directions (the common subspace holds ~80 % of the rank). Iso-C is
``iso_cts`` with ``common_space_fraction`` 1: every component is in the common row,
so its masks prune directions of the isotropic Σt τt and its coefficient scales
them, while the task coefficients act only on non-matrix tensors.

``mask`` [T, band] is binary and ``coef`` [T] is one scalar per task per
tensor; both are learned at test time (``learner.py``) by minimising a label-free
objective on unlabeled prompts (``objectives.py``), with a straight-through
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
streams one tensor at a time like any other method), ``cli.py`` (``mergekit-ext
adarank learn / show``), and the test-time learner, one module per job:
``options.py``, ``prompts.py``, ``decoding.py``, ``teacher.py``, ``factorise.py``,
``merged.py``, ``objectives.py``, ``training.py``, ``masks.py``, ``learner.py``
(prepare / run / learn), ``apply.py`` and ``describe.py``; ``learn.py`` gathers
their public names.
This module holds the constants and defaults only and imports nothing heavy.
"""

from mergekit_ext.methods import cart as _cart
from mergekit_ext.methods import iso as _iso
from mergekit_ext.methods import tsv as _tsv

PAPER_URL = "https://arxiv.org/abs/2503.22178"
VARIANTS = ("ta", "cart", "tsv_m", "iso_cts")
# Origin θ0, components from an orthogonalized stack, mean τ on non-matrix tensors.
SUBSPACE_VARIANTS = ("tsv_m", "iso_cts")
DEFAULT_COMMON_SPACE_FRACTION = _iso.DEFAULT_COMMON_SPACE_FRACTION
# p = sigmoid(logit / MASK_TEMPERATURE); logits start at ±INITIAL_LOGIT (official code).
MASK_TEMPERATURE = 10.0
INITIAL_LOGIT = 0.1
# The same exact-truncation SVD as CART (tensors.truncated_svd "auto": a full
# LAPACK SVD for large bands, the Gram path for small ones). The learner and the
# mergekit method both factorise through ``kernel.factorize``, so they agree.
DEFAULT_SVD = "auto"
FILE_FORMAT = "mergekit-ext/adarank/1"

# Base-method settings each variant starts from (step 0 is that method exactly):
# ta: Task Arithmetic's λ on the hard zoo: 0.5, chosen on 2 of 3 seeds by both the
# quality grid (validation 0.608 ± 0.026 against 0.586 at 0.4 and 0.601 at 0.6) and the
# AdaRank benchmark's own λ grid (0.5, 0.5, 0.6).
# cart, tsv_m, iso_cts: the base methods' own defaults, chosen on the hard zoo's
# validation split (see their __init__): CART rank 0.1 / λ 2.0 (the AdaRank
# benchmark's λ grid chose 2.0 on all three seeds), TSV-M
# λ 2.0, Iso-CTS λ 3.0 at common_space_fraction 0.8. tsv_m and iso_cts start with
# every component of the stack on (init_rank_ratio 1, the only value allowed).
VARIANT_DEFAULTS = {
    "ta": {"prior": 0.5, "init_rank_ratio": 1.0},
    "cart": {"prior": _cart.DEFAULT_LAMBDA, "init_rank_ratio": _cart.DEFAULT_RANK_RATIO},
    "tsv_m": {"prior": _tsv.DEFAULT_LAMBDA, "init_rank_ratio": 1.0},
    "iso_cts": {"prior": _iso.DEFAULT_LAMBDA, "init_rank_ratio": 1.0},
}
DEFAULT_VARIANT = "cart"
DEFAULT_MAX_RANK_RATIO = 1.0
# Chosen on the hard zoo's validation split with no answers used, three seeds, scored by test
# exact match (benchmarks/adarank_bench.py; docs/adarank.md; each run in CHANGELOG.md and
# benchmarks/results/adarank*.md):
# - objective distill: the only objective that moves exact match; entropy and entropy-answer
#   stay within ±0.03 of the base method or fall (results/adarank.md).
# - 384 unlabeled prompts per task and 600 steps: more prompts and more steps raised validation
#   on all 12 runs (4 bases × 3 seeds); 768 prompts and 1200 steps gained nothing more
#   (results/adarank-unlabeled.md).
# - batch 8 per task: as good as 16 (CART 0.801 vs 0.797, TA 0.810 vs 0.807) in 58 % of the
#   time (results/adarank-defaults.md).
# - lr 3e-2 with a cosine decay to 0: CART 0.806 ± 0.011 -> 0.828 ± 0.026 (65 -> 76 % of its
#   gap to the experts) against a constant 3e-3, flat past 3e-2; TA, TSV-M and Iso-CTS gain on
#   every seed too (results/adarank-schedule.md).
DEFAULT_STEPS = 600
DEFAULT_LR = 3e-2
DEFAULT_BATCH_SIZE = 8
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LR_SCHEDULE = "cosine"
# `learn --zoo`: unlabeled prompts per task drawn from the zoo's task generators on top of
# its validation prompts (the 384 above).
DEFAULT_ZOO_UNLABELED = 384

# Label-free objectives (``learn --objective``), all where a causal LM answers:
#   entropy         next-token entropy right after each prompt (the papers' analogue);
#   entropy-answer  entropy at every position of the merged model's own greedy answer;
#   distill         KL(expert ‖ merged) at the positions of each expert's greedy answer
#                   to its own task's prompts (teacher outputs cached once, top-k).
OBJECTIVES = ("entropy", "entropy-answer", "distill")
DEFAULT_OBJECTIVE = "distill"
# The teacher cache keeps each answer position's top-k log-probabilities (plus the
# rest of the mass as one bucket): k 8 is ~64 bytes per position.
DEFAULT_TOP_K = 8
# Greedy answers stop at the first token of DEFAULT_STOP (or EOS), else after this many.
DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_STOP = "\n"
FACTOR_DTYPES = ("float32", "bfloat16")

# Fingerprint of each matrix's factorisation, recorded in the learned file: the top
# FINGERPRINT_VALUES singular values per task. ``merge_method: adarank`` recomputes
# them and refuses the tensor when one differs by more than FINGERPRINT_RTOL of that
# task's largest singular value (float32 SVDs of the same weights on CPU and GPU
# agree to ~1e-6 relative; other weights differ far more).
FINGERPRINT_VALUES = 4
FINGERPRINT_RTOL = 1e-3
