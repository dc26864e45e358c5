"""Is a variant better than the baseline, and by how much? Means over seeds and a paired confidence interval.

Every variant of a comparison trains with the same seeds, and a seed fixes the data order and the
initialisation of everything the variants share, so the runs pair up by seed: the difference
``candidate[seed] - baseline[seed]`` removes what the seed alone explains. Its mean gets a
t-interval with n - 1 degrees of freedom. A verdict names a winner only when that interval
excludes zero.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from scipy.stats import t as student_t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    mean: float
    std: Optional[float]  # sample standard deviation; None from one value
    n: int


@dataclass(frozen=True)
class Difference:
    """candidate - baseline, paired by seed; the interval is None from one pair."""

    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def spread(values: list[float]) -> Spread:
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def paired_difference(candidate: list[float], baseline: list[float], confidence: float = CONFIDENCE) -> Difference:
    """Mean of candidate[i] - baseline[i] and its two-sided t-interval."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("paired_difference needs the same, non-zero number of values on each side")
    return mean_interval([c - b for c, b in zip(candidate, baseline)], confidence)


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Difference:
    """The mean of ``values`` and its two-sided t-interval (none from one value)."""
    mean, n = statistics.fmean(values), len(values)
    if n < 2:
        return Difference(mean, None, None, n)
    half_width = student_t.ppf(0.5 + confidence / 2, df=n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Difference(mean, mean - half_width, mean + half_width, n)


def verdict(
    candidate: str, baseline: str, difference: Difference, metric: str = "val loss", higher_is_better: bool = False
) -> str:
    """One sentence; lower is better for ``metric`` unless ``higher_is_better`` (an accuracy)."""
    if difference.low is None:
        return (
            f"{candidate} vs {baseline}: {metric} {difference.mean:+.4f} from one seed, so no confidence interval; "
            "run with --seeds 3 or more for a verdict"
        )
    interval = f"{CONFIDENCE:.0%} CI {difference.low:+.4f} to {difference.high:+.4f}, {difference.n} seeds"
    if not difference.excludes_zero:
        return f"no difference shown between {candidate} and {baseline}: {metric} {difference.mean:+.4f} ({interval})"
    candidate_wins = (difference.mean > 0) if higher_is_better else (difference.mean < 0)
    better, worse = (candidate, baseline) if candidate_wins else (baseline, candidate)
    direction = "higher" if higher_is_better else "lower"
    return f"{better} beats {worse}: {metric} {direction} by {abs(difference.mean):.4f} ({interval})"
