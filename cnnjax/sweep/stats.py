"""Statistics over seeds: mean with a t-distribution confidence interval, paired t-tests, Pareto fronts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the `confidence` interval for the mean: t_{n-1} x s / sqrt(n).

    With one value the half-width is nan: one seed says nothing about the spread.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    sem = x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * sem)


def paired_test(variant: Sequence[float], baseline: Sequence[float]) -> dict:
    """Paired t-test (scipy.stats.ttest_rel, two-sided) of variant - baseline over matched seeds.

    Returns the mean difference, its 95% CI half-width, t, p and n; t and p are nan below 2 pairs
    or when every difference is identical (no spread to test against).
    """
    a = np.asarray(variant, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs matched seeds, got {a.size} and {b.size} values")
    diff = a - b
    mean, half = mean_ci(diff)
    t = p = math.nan
    if diff.size >= 2 and np.ptp(diff) > 0:
        result = stats.ttest_rel(a, b)
        t, p = float(result.statistic), float(result.pvalue)
    return {"diff": mean, "diff_ci": half, "t": t, "p": p, "n": int(diff.size)}


def pareto_front(cost: Sequence[float], score: Sequence[float]) -> list[bool]:
    """Marks points no other point beats: none has cost <= and score >= with one strictly better."""
    c = np.asarray(cost, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    front = []
    for i in range(c.size):
        dominated = np.any((c <= c[i]) & (s >= s[i]) & ((c < c[i]) | (s > s[i])))
        front.append(bool(not dominated and np.isfinite(s[i])))
    return front
