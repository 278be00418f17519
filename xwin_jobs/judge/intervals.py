"""95% intervals for the evaluate stage's figures: a seeded percentile bootstrap over prompts.

Every figure of the report (win rate, mean grade, accuracy) is a mean over items grouped by
prompt: an AlpacaEval prompt has one win share, an MT-bench question has two graded turns
(which are not independent: a wrong first answer makes the second one wrong too). The
bootstrap resamples whole prompts with replacement, so a question's turns stay together, and
takes the 2.5th and 97.5th percentiles of the resampled means. Seeded: the same items give the
same interval on every machine.

Pure: the standard library only.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

RESAMPLES = 2000
LEVEL = 0.95


def mean_of_groups(groups: Sequence[Sequence[float]]) -> float | None:
    """The mean over every value of every group (None when there is none)."""
    n = sum(len(g) for g in groups)
    return sum(sum(g) for g in groups) / n if n else None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linear between the closest ranks."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_interval(groups: Sequence[Sequence[float]], resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float] | None:
    """The percentile-bootstrap interval of `mean_of_groups(groups)`, resampling groups.
    None when there is no value; (x, x) when there is one group or all values are equal."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return None
    sums, sizes = [sum(g) for g in groups], [len(g) for g in groups]
    rng, k = random.Random(seed), len(groups)
    means = []
    for _ in range(resamples):
        picks = [rng.randrange(k) for _ in range(k)]
        means.append(sum(sums[i] for i in picks) / sum(sizes[i] for i in picks))
    means.sort()
    tail = (1 - level) / 2
    return percentile(means, tail), percentile(means, 1 - tail)


def summary(groups: Sequence[Sequence[float]], seed: int = 0) -> dict[str, float | list | int | None]:
    """{"mean", "ci": [lo, hi], "n": prompts} of grouped values."""
    ci = bootstrap_interval(groups, seed=seed)
    return {"mean": mean_of_groups(groups), "ci": list(ci) if ci else None,
            "n": sum(1 for g in groups if len(g))}
