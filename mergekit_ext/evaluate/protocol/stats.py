"""The statistics every benchmark and report of this project states its numbers with.

Over seeds (independent zoos): the mean, the SAMPLE standard deviation
(``statistics.stdev``, n − 1 in the denominator; 0 for a single value), the standard
error of the mean, the paired per-seed difference to a reference method (task
arithmetic in the README's tables), and the beyond-noise test of those differences:
|paired t| above the two-sided 95 % critical value of Student's t with n − 1
degrees of freedom. Within one seed, a difference is also set against the two lm-eval
standard errors combined as if independent (conservative: both merges are scored on
the same items, so the paired error is smaller).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence

# Two-sided 95 % critical values of Student's t, by degrees of freedom.
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
# Beyond this many degrees of freedom the normal approximation's value is used.
T_CRITICAL_LARGE = 2.0
# Within one seed: a difference beyond this many standard errors of the difference.
WITHIN_SEED_Z = 2.0


def _present(values: Sequence[Optional[float]]) -> List[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def summary(values: Sequence[Optional[float]]) -> Dict[str, float]:
    """{"mean", "std" (sample), "n"} of the values that are present (None and NaN are left out)."""
    values = _present(values)
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def mean(values: Sequence[Optional[float]]) -> float:
    return summary(values)["mean"]


def sample_std(values: Sequence[Optional[float]]) -> float:
    return summary(values)["std"]


def standard_error(values: Sequence[Optional[float]]) -> float:
    """Sample std / sqrt(n): the standard error of the mean (NaN without values)."""
    stats = summary(values)
    return stats["std"] / math.sqrt(stats["n"]) if stats["n"] else float("nan")


def paired_differences(values: Sequence[float], reference: Sequence[float]) -> List[float]:
    """value − reference, seed by seed (both in seed order)."""
    if len(values) != len(reference):
        raise ValueError(f"paired differences need one reference value per seed: {len(values)} values, {len(reference)} references")
    return [value - ref for value, ref in zip(values, reference)]


def paired_t(differences: Sequence[float]) -> float:
    """The paired t statistic mean / (std / sqrt(n)); ±inf for identical non-zero differences, 0 for none."""
    stats = summary(differences)
    n = stats["n"]
    if n > 1 and stats["std"] > 0:
        return stats["mean"] / (stats["std"] / math.sqrt(n))
    return math.inf if stats["mean"] else 0.0


def t_critical(degrees_of_freedom: int) -> float:
    return T_CRITICAL.get(degrees_of_freedom, T_CRITICAL_LARGE)


def beyond_noise(differences: Sequence[float]) -> bool:
    """Across seeds: |paired t| above the two-sided 95 % critical value (needs two seeds or more)."""
    n = summary(differences)["n"]
    return bool(n > 1 and abs(paired_t(differences)) > t_critical(n - 1))


def difference_z(difference: float, stderr: Optional[float], reference_stderr: Optional[float]) -> Optional[float]:
    """A difference in standard errors of the difference (the two taken as independent); None without both."""
    if not stderr or not reference_stderr:
        return None
    return difference / math.sqrt(stderr * stderr + reference_stderr * reference_stderr)


def versus_reference(
    values: Sequence[float],
    reference: Sequence[float],
    stderrs: Optional[Sequence[Optional[float]]] = None,
    reference_stderrs: Optional[Sequence[Optional[float]]] = None,
) -> Dict[str, Any]:
    """A method against the reference over seeds: the paired differences, their summary, t,
    the beyond-noise verdict, and per seed the difference in standard errors (with how many
    seeds are above +2 and below −2)."""
    differences = paired_differences(values, reference)
    stderrs = list(stderrs) if stderrs is not None else [None] * len(differences)
    reference_stderrs = list(reference_stderrs) if reference_stderrs is not None else [None] * len(differences)
    within = [difference_z(d, se, rse) for d, se, rse in zip(differences, stderrs, reference_stderrs)]
    return {
        "differences": differences,
        "summary": summary(differences),
        "t": paired_t(differences),
        "beyond_noise": beyond_noise(differences),
        "within_seed_z": within,
        "seeds_better": sum(1 for z in within if z is not None and z > WITHIN_SEED_Z),
        "seeds_worse": sum(1 for z in within if z is not None and z < -WITHIN_SEED_Z),
    }
