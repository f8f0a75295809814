"""Seed statistics against published tables and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from knnlm.experiments.stats import (
    mean_std,
    mean_std_rows,
    paired_bootstrap,
    sign_test_p,
    t_test_p,
)


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(7 / 3)))
    assert mean_std([3.0]) == (3.0, None)
    assert mean_std([None, 2.0, 4.0]) == (3.0, math.sqrt(2.0))
    assert mean_std([]) == (None, None)
    mean, std = mean_std_rows([[1, 2], [3, 6]])
    assert mean == [2, 4] and std == pytest.approx([math.sqrt(2), math.sqrt(8)])
    assert mean_std_rows([[1, 2]])[1] is None


def test_sign_test_by_enumeration():
    for diffs in ([1, 1, 1, 1, 1], [1, -1, 1, 1, 1], [0.2, -0.1, 0.3], [-1, -1]):
        n, wins = len(diffs), sum(d > 0 for d in diffs)
        count = sum(sum(s) >= wins for s in itertools.product([0, 1], repeat=n))
        assert sign_test_p(diffs) == pytest.approx(count / 2**n)
    assert sign_test_p([1] * 5) == pytest.approx(1 / 32)  # 5 seeds can reach p < 0.05


@pytest.mark.parametrize("df, t_crit", [(2, 2.920), (4, 2.132), (4, 3.747), (9, 1.833)])
def test_t_test_matches_the_printed_t_table(df, t_crit):
    # One-sided critical values from a standard t table: p = 0.05 (and 0.01 for 3.747).
    p_expected = 0.01 if t_crit == 3.747 else 0.05
    n = df + 1
    x = np.array([1.0, -1.0] * (n // 2) + [0.0] * (n % 2))
    x = (x - x.mean()) / x.std(ddof=1)  # mean 0, sd 1
    diffs = x + t_crit / math.sqrt(n)  # t statistic = t_crit
    assert t_test_p(diffs) == pytest.approx(p_expected, abs=2e-4)
    assert t_test_p(-diffs) == pytest.approx(1 - p_expected, abs=2e-4)
    assert t_test_p(diffs, min_effect=10.0) > 0.99


def test_t_test_edge_cases():
    assert t_test_p([0.3]) is None
    assert t_test_p([0.3, 0.3]) == 0.0
    assert t_test_p([-0.3, -0.3]) == 1.0


def test_paired_bootstrap_brackets_the_mean():
    rng = np.random.default_rng(0)
    d = rng.normal(0.5, 1.0, 400)
    lo, hi = paired_bootstrap(d, seed=1)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert lo < d.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert paired_bootstrap(d, seed=1) == (lo, hi)


# ----------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("q, df, printed", [(0.95, 1, 6.314), (0.95, 2, 2.920), (0.95, 4, 2.132),
                                            (0.975, 10, 2.228), (0.99, 30, 2.457)])  # fmt: skip
def test_t_quantile_matches_the_printed_t_table(q, df, printed):
    from knnlm.experiments.stats import t_quantile

    assert t_quantile(q, df) == pytest.approx(printed, abs=1e-3)


def test_seed_interval_by_hand():
    from knnlm.experiments.stats import seed_interval

    iv = seed_interval([0.3, 0.2, 0.4])  # mean 0.3, sd 0.1, t(0.95, 2) = 2.91999
    half = 2.919986 * 0.1 / math.sqrt(3)
    assert (iv.mean, iv.n, iv.over) == (pytest.approx(0.3), 3, "seeds")
    assert iv.lower == pytest.approx(0.3 - half, abs=1e-6)
    assert iv.upper == pytest.approx(0.3 + half, abs=1e-6)
    with pytest.raises(ValueError):
        seed_interval([1.0])


def test_bootstrap_interval_is_seeded_and_stratified():
    from knnlm.experiments.stats import bootstrap_interval

    x = [0.0, 1.0] * 50 + [10.0] * 10
    a, b = bootstrap_interval(x, "tokens", seed=3), bootstrap_interval(x, "tokens", seed=3)
    assert a == b and a.lower < a.mean < a.upper
    # Two strata weigh equally: the mean of 0.5 (100 values) and 10 (10 values) is 5.25.
    iv = bootstrap_interval(x, "children", strata=["a"] * 100 + ["b"] * 10)
    assert iv.mean == pytest.approx(5.25)
    assert iv.lower == pytest.approx(5.25, abs=0.2)  # stratum b has no spread
    # One-sided 95%: about 5% of resample means fall below the lower bound.
    rng = np.random.default_rng(0)
    y = rng.normal(1.0, 2.0, size=400)
    iv = bootstrap_interval(y, "positions")
    se = y.std(ddof=1) / math.sqrt(y.size)
    assert iv.lower == pytest.approx(y.mean() - 1.645 * se, abs=0.25 * se)


def test_units_needed_by_hand():
    from knnlm.experiments.stats import units_needed

    # (1.6449 + 0.8416)^2 * 0.37^2 / 0.05^2 = 338.6 -> 339 (issue 27: "about 330 seeds").
    assert units_needed(0.37, 0.05) == 339
    assert units_needed(None, 0.05) is None
    assert units_needed(0.1, 1.0) == 2


def test_share_interval_by_hand():
    from knnlm.experiments.stats import share_interval

    spread = [0.5 * ((i % 5) - 2) for i in range(300)]
    lp = lambda ppl: [-math.log(ppl) + s for s in spread]  # noqa: E731
    # The same spread everywhere: every resample scales the three perplexities alike, so the
    # share is (40 - 37) / (40 - 36) = 0.75 at every resample.
    iv = share_interval(lp(40.0), lp(37.0), lp(36.0))
    assert iv.mean == pytest.approx(0.75) and iv.lower == pytest.approx(0.75)
    assert iv.upper == pytest.approx(0.75)
