"""Seed and position statistics shared by the experiments and the report.

One convention everywhere: the spread over seeds is the *sample* standard deviation (ddof=1),
undefined (None) for a single seed. Tests of a paired effect are one-sided (the paper's claims
all say which way the effect goes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
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


# ----------------------------------------------------------------------------- intervals

ONE_SIDED_LEVEL = 0.95  # every claim's interval: one-sided 95%
POWER = 0.8  # the power line's target: detect the minimum effect 4 times in 5
MIN_SEEDS = 3  # fewer seeds: the interval is bootstrapped over tokens / positions instead


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q > 0.5) of Student's t with ``df`` degrees of freedom (bisection on
    the same incomplete beta as :func:`t_test_p`)."""
    if not 0.5 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df > 0, got q={q}, df={df}")
    lo, hi = 0.0, 1.0
    while 0.5 * _betainc(df / 2.0, 0.5, df / (df + hi * hi)) > 1.0 - q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * _betainc(df / 2.0, 0.5, df / (df + mid * mid)) > 1.0 - q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A one-sided interval pair for a mean effect: ``lower`` bounds it from below and
    ``upper`` from above, each at :data:`ONE_SIDED_LEVEL`; ``over`` names the units (seeds,
    positions, test children), ``sd`` their spread, ``method`` how the bounds were made."""

    mean: float
    lower: float
    upper: float
    n: int
    sd: float | None
    over: str
    method: str

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: Any) -> Interval:
        return cls(**{k: d[k] for k in ("mean", "lower", "upper", "n", "sd", "over", "method")})


def seed_interval(values: Sequence[float], level: float = ONE_SIDED_LEVEL) -> Interval:
    """One-sided t bounds of the mean over seeds (at least 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError("a t interval over seeds needs at least 2 seeds")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(level, x.size - 1) * sd / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), sd, "seeds",
                    f"one-sided t bounds over {x.size} seeds")  # fmt: skip


def bootstrap_interval(
    values: Sequence[float],
    over: str,
    *,
    strata: Sequence[Any] | None = None,
    seed: int = 0,
    resamples: int = 2000,
    level: float = ONE_SIDED_LEVEL,
) -> Interval:
    """Seeded paired bootstrap bounds of a mean over units (tokens, positions, children).

    With ``strata`` (one label per value) units are resampled within each stratum and the
    statistic is the mean of the strata's means (each stratum weighted equally, e.g. each
    (seed, n) cell of Macondo); without, the plain mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    labels = np.zeros(x.size, dtype=np.int64) if strata is None else np.unique(
        np.asarray([str(s) for s in strata]), return_inverse=True)[1]  # fmt: skip
    rng = np.random.default_rng(seed)
    cells = [x[labels == c] for c in range(int(labels.max()) + 1)]
    # Resamples in chunks of ~2e7 draws: a corpus' test tokens stay within memory.
    chunk = max(1, int(2e7 // x.size))
    boot = np.concatenate([
        np.mean([c[rng.integers(0, c.size, size=(min(chunk, resamples - i), c.size))].mean(1)
                 for c in cells], axis=0)
        for i in range(0, resamples, chunk)
    ])  # fmt: skip
    mean = float(np.mean([c.mean() for c in cells]))
    lo, hi = np.percentile(boot, [100 * (1 - level), 100 * level])
    sd = float(x.std(ddof=1)) if x.size > 1 else None
    return Interval(mean, float(lo), float(hi), int(x.size), sd, over,
                    f"seeded paired bootstrap over {x.size} {over} ({resamples} resamples, "
                    f"seed {seed})")  # fmt: skip


def units_needed(
    sd: float | None, min_effect: float, level: float = ONE_SIDED_LEVEL, power: float = POWER
) -> int | None:
    """Units (seeds, positions) a one-sided test at ``level`` needs to detect ``min_effect``
    with probability ``power`` at spread ``sd`` (normal approximation); None without a spread."""
    if sd is None or not min_effect > 0:
        return None
    z = NormalDist().inv_cdf(level) + NormalDist().inv_cdf(power)
    return max(2, math.ceil((z * sd / min_effect) ** 2))


def share_interval(
    lm_logp: Sequence[float],
    model_logp: Sequence[float],
    knn_logp: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = 2000,
    level: float = ONE_SIDED_LEVEL,
) -> Interval:
    """Seeded paired bootstrap over positions of the share of the LM -> kNN-LM perplexity gap a
    model closes, (ppl_lm - ppl_model) / (ppl_lm - ppl_knnlm), each perplexity exp of the mean
    NLL over the resampled positions (the three resampled together)."""
    a = np.stack([np.asarray(v, dtype=np.float64) for v in (lm_logp, model_logp, knn_logp)])
    if a.shape[1] == 0:
        raise ValueError("no positions")
    idx = np.random.default_rng(seed).integers(0, a.shape[1], size=(resamples, a.shape[1]))

    def share(rows: np.ndarray) -> np.ndarray:
        ppl = np.exp(-rows.mean(-1))  # (3, ...) perplexities
        with np.errstate(divide="ignore", invalid="ignore"):
            return (ppl[0] - ppl[1]) / (ppl[0] - ppl[2])

    boot = share(a[:, idx])
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [100 * (1 - level), 100 * level])
    return Interval(float(share(a)), float(lo), float(hi), int(a.shape[1]),
                    float(np.std(boot, ddof=1)) * math.sqrt(a.shape[1]), "positions",
                    f"seeded paired bootstrap over {a.shape[1]} positions ({resamples} "
                    f"resamples, seed {seed})")  # fmt: skip
