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
