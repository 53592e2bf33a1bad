"""The learner's options: one frozen record, validated and completed with the variant's defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

from mergekit_ext.methods.adarank import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COMMON_SPACE_FRACTION,
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_RANK_RATIO,
    DEFAULT_OBJECTIVE,
    DEFAULT_STEPS,
    DEFAULT_STOP,
    DEFAULT_SVD,
    DEFAULT_TOP_K,
    DEFAULT_VARIANT,
    FACTOR_DTYPES,
    LR_SCHEDULES,
    OBJECTIVES,
    SUBSPACE_VARIANTS,
    VARIANT_DEFAULTS,
    VARIANTS,
)


@dataclass(frozen=True)
class LearnOptions:
    variant: str = DEFAULT_VARIANT
    prior: Optional[float] = None  # None: the variant's default
    init_rank_ratio: Optional[float] = None  # None: the variant's default
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    lr_schedule: str = DEFAULT_LR_SCHEDULE  # constant, or cosine decay to 0 over the steps
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    svd: str = DEFAULT_SVD
    add_special_tokens: bool = False
    device: str = "cpu"
    objective: str = DEFAULT_OBJECTIVE
    coefficients_only: bool = False  # masks frozen at step 0 (AdaMerging-style ablation)
    top_k: int = DEFAULT_TOP_K  # distill: teacher log-probs kept per answer position
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # greedy answers (entropy-answer, distill)
    stop: Optional[str] = DEFAULT_STOP  # an answer ends at this token (or EOS); None: EOS only
    factor_dtype: str = "float32"  # storage of the learner's U, V and non-matrix task vectors (bfloat16 halves them)
    held_out: Optional[int] = None  # prompts per task kept out of training; None: min(batch, pool // 2)
    common_space_fraction: float = DEFAULT_COMMON_SPACE_FRACTION  # iso_cts only (1: Iso-C)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
    # Pose each prompt as a user turn through the tokenizer's chat template (answers then end at
    # the template's end-of-turn token or EOS, not at ``stop``); None: when the tokenizer has one.
    chat_template: Optional[bool] = None

    def resolved(self) -> "LearnOptions":
        """The options with the variant's defaults filled in, validated."""
        if self.variant not in VARIANTS:
            raise ValueError(f"adarank: unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"adarank: unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"adarank: unknown lr_schedule {self.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"adarank: factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {self.factor_dtype!r}")
        defaults = VARIANT_DEFAULTS[self.variant]
        prior = defaults["prior"] if self.prior is None else self.prior
        init = defaults["init_rank_ratio"] if self.init_rank_ratio is None else self.init_rank_ratio
        for label, value in (("init_rank_ratio", init), ("max_rank_ratio", self.max_rank_ratio)):
            if not 0 < value <= 1:
                raise ValueError(f"adarank: {label} must be in (0, 1], got {value}")
        if self.variant in SUBSPACE_VARIANTS and (init != 1.0 or self.max_rank_ratio != 1.0):
            raise ValueError(
                f"adarank: variant {self.variant} starts from every component of the method's stack: "
                f"init_rank_ratio and max_rank_ratio must be 1 (got {init} and {self.max_rank_ratio})"
            )
        if init > self.max_rank_ratio:
            raise ValueError(
                f"adarank: init_rank_ratio {init} is above max_rank_ratio {self.max_rank_ratio}: "
                "step 0 could not be the base method"
            )
        if not 0 < self.common_space_fraction <= 1:
            raise ValueError(f"adarank: common_space_fraction must be in (0, 1], got {self.common_space_fraction}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("adarank: steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.top_k < 1 or self.max_new_tokens < 1 or (self.held_out is not None and self.held_out < 0):
            raise ValueError("adarank: top_k and max_new_tokens must be >= 1, held_out >= 0")
        for label, value in (("--lr", self.lr), ("--prior", prior)):
            if not math.isfinite(value):  # inf/nan would train NaN masks and coefficients
                raise ValueError(f"adarank: {label} must be a finite number, got {value}")
        return LearnOptions(**{**asdict(self), "prior": float(prior), "init_rank_ratio": float(init)})


def held_out_count(pool_size: int, options: LearnOptions) -> int:
    """Prompts of a pool of ``pool_size`` kept out of training to measure the objective on."""
    if options.held_out is not None:
        return min(options.held_out, max(0, pool_size - 1))
    return min(options.batch_size, pool_size // 2)


def split_held_out(pools: Sequence[list], options: LearnOptions) -> Tuple[List[list], List[list]]:
    """(training, held-out) items per task: the first ``held_out_count`` items of each pool are
    held out (a pool too small to spare any is measured on its first ``batch_size`` items)."""
    held = [held_out_count(len(pool), options) for pool in pools]
    held_out_pools = [pool[:k] if k else pool[: options.batch_size] for pool, k in zip(pools, held)]
    train_pools = [pool[k:] for pool, k in zip(pools, held)]
    return train_pools, held_out_pools
