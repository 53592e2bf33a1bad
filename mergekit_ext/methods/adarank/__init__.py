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
# Chosen on the hard zoo's validation split (benchmarks/adarank_bench.py; README "AdaRank"),
# no answers used, three seeds, test exact match mean ± std
# and the share of the base method's gap to the experts closed:
# - objective, benchmarks/results/adarank.{json,md}: `distill` is the only objective that
#   moves exact match; `entropy` and `entropy-answer` stay within ±0.03 of the base method
#   or fall (CART entropy 0.686 -> 0.657 at 150 steps); lr 1e-3 gets about half as far as 3e-3.
# - unlabeled prompts and steps, benchmarks/results/adarank-unlabeled.{json,md} (zoos from
#   an earlier `zoo` build: base 0.364, experts 0.891): on the 100 validation prompts alone, 300 steps close
#   0.62 ± 0.05 of CART's gap and 0.66 ± 0.08 of TA's; with 384 more unlabeled prompts
#   per task and 600 steps (batch 16), 0.73 ± 0.07 and 0.76 ± 0.11; validation rose from
#   300 to 600 steps on all 12 runs (4 bases × 3 seeds); 768 prompts and 1200 steps on
#   CART gained nothing more (0.71 ± 0.09).
# - batch, benchmarks/results/adarank-defaults.{json,md} (the zoos `mergekit-ext zoo --preset
#   hard --seed 0/1/2` builds, the same as adarank.md's: base 0.380, experts 0.876), with the
#   unlabeled prompts above at a constant rate: CART 0.674 -> 0.801 ± 0.020 (0.62 ± 0.06 of
#   its gap; 0.54 on validation prompts alone), TA 0.622 -> 0.810 ± 0.015 (0.73 ± 0.03;
#   0.61 on validation prompts alone). Batch 8 per task equals 16 (CART 0.801 vs 0.797, TA 0.810 vs 0.807) in 58 % of
#   the time (~165 s vs ~285 s a run); lr 1e-2 on CART chose fewer steps on validation
#   (0.804 vs 0.813) and scored 0.803 on test.
# - rate and schedule, benchmarks/results/adarank-schedule.{json,md} (the same zoos, one run, 600 steps, batch
#   8, every run scored at its last step): a cosine decay of the rate to 0 lets a 10x larger
#   rate work (our reading: the mask logits stop crossing 0 at the end, so the last step is
#   a settled merge rather than a sample of the noise a constant rate keeps up). Validation / test on
#   CART: constant 3e-3 0.807 / 0.806 ± 0.009 (65 % of its gap); cosine 3e-3 0.815, 1e-2
#   0.829, 3e-2 0.831 / 0.828 ± 0.021 (76 ± 1 %), 1e-1 0.833 / 0.829 (flat past 3e-2).
#   On TA: constant 3e-3 0.812 / 0.810 (73 %); cosine 1e-2 0.823, 3e-2 0.828 / 0.830 ± 0.019
#   (81 ± 4 %); TSV-M 63 -> 76 ± 6 %, Iso-CTS 67 -> 75 ± 1 %. Per seed, cosine 3e-2 minus
#   constant 3e-3 (test): CART +0.023 / +0.043 / -0.001, TA +0.023 / +0.026 / +0.013,
#   TSV-M +0.010 / +0.047 / +0.017, Iso-CTS +0.015 / +0.020 / +0.003. Training every weight
#   of CART's merge instead (the bench's reference) reaches the experts (0.873 ± 0.019).
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
