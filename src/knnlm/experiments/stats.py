"""Seed and position statistics shared by the experiments and the report.

One convention everywhere: the spread over seeds is the *sample* standard deviation (ddof=1),
undefined (None) for a single seed. Tests of a paired effect are one-sided (the paper's claims
all say which way the effect goes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_std(values: Sequence[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) over seeds; std is None for one value.

    None entries are dropped (a seed that did not report the value); no values -> (None, None).
    """
    vals = [float(np.asarray(v).item()) for v in values if v is not None]
    if not vals:
        return None, None
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def mean_std_rows(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[float] | None]:
    """Per column of a (seeds, steps) table: mean and sample std (ddof=1; None for one seed)."""
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"expected a non-empty (seeds, steps) table; got shape {a.shape}")
    return a.mean(0).tolist(), (a.std(0, ddof=1).tolist() if a.shape[0] > 1 else None)


def sign_test_p(diffs: Sequence[float]) -> float:
    """One-sided exact sign test: P(at least this many positive differences | no effect).

    Zeros count as not positive (conservative)."""
    n = len(diffs)
    wins = sum(d > 0 for d in diffs)
    return math.fsum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
    front = math.exp(ln + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_test_p(diffs: Sequence[float], min_effect: float = 0.0) -> float | None:
    """One-sided one-sample t-test of mean(diffs) > min_effect: the p-value, None under two
    values. A zero spread gives p 0 (or 1) as the mean is above (or not above) min_effect."""
    x = np.asarray(diffs, dtype=np.float64)
    n = x.size
    if n < 2:
        return None
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0.0:
        return 0.0 if mean > min_effect else 1.0
    t = (mean - min_effect) / (sd / math.sqrt(n))
    df = n - 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t > 0 else 1.0 - tail


def paired_bootstrap(
    diffs: Sequence[float], *, seed: int = 0, resamples: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (seeded)."""
    x = np.asarray(diffs, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no paired differences")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)
