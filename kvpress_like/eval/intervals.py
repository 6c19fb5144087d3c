"""95% intervals for the summary: Wilson's score interval for accuracies (right at 0 and 1 and
for few samples, where the normal approximation is not), a percentile bootstrap for means of
other values (top-1 agreement, KL)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``successes / n`` (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"n: must be at least 1 (got {n})")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded: the same values give the same interval)."""
    if not values:
        raise ValueError("values: must not be empty")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * (resamples - 1))], means[math.ceil((1 - tail) * (resamples - 1))]


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Wilson's interval when every value is 0 or 1 (an accuracy), else the bootstrap's."""
    if all(v in (0, 1) for v in values):
        return wilson(sum(values), len(values))
    return bootstrap_mean(values)
