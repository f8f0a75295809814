"""The combiner (retrieval/combiner.py) against numpy references: p_knn over a (k, T) grid from
one search's prefixes, the neighbour weights a user is shown, and every mixture variant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knnlm.retrieval.combiner import combine, knn_weights, mix_log_weights, prefix_log_probs
from knnlm.retrieval.search.exact import TorchExactSearch


def _p_knn_numpy(dists, ids, values, targets, k, t, counts=None):
    """log p_knn(target) in float64 from the k nearest (a brute-force reference)."""
    d, i, v = dists[:, :k], ids[:, :k], values[:, :k]
    logits = -d / t + (0 if counts is None else np.log(counts[:, :k]))
    logits = np.where(i >= 0, logits, -np.inf)
    hit = np.where(v == targets[:, None], logits, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.logaddexp.reduce(hit, axis=1) - np.logaddexp.reduce(logits, axis=1)


def test_prefix_grid_equals_numpy_per_k_and_temperature():
    rng = np.random.default_rng(3)
    n, kmax = 40, 16
    dists = np.sort(rng.random((n, kmax)) * 4, axis=1)
    ids = rng.integers(0, 500, (n, kmax))
    ids[:3, 10:] = -1  # fewer found than the largest k
    values = rng.integers(0, 5, (n, kmax))
    counts = rng.integers(1, 4, (n, kmax))
    targets = rng.integers(0, 6, n)
    ks, temps = [1, 4, 16], [0.5, 2.0]
    for c in (None, counts):
        got = prefix_log_probs(
            torch.tensor(dists, dtype=torch.float32), torch.tensor(ids), torch.tensor(values),
            torch.tensor(targets), ks, temps, None if c is None else torch.tensor(c),
        )  # fmt: skip
        assert sorted(got) == [(k, t) for k in ks for t in temps]
        for (k, t), lp in got.items():
            ref = _p_knn_numpy(dists, ids, values, targets, k, t, c)
            fin = np.isfinite(ref)
            assert (np.isfinite(lp.numpy()) == fin).all()
            np.testing.assert_allclose(lp.double().numpy()[fin], ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_prefixes_of_one_search_are_the_smaller_searches(recompute):
    """Exact search sorts by (distance, row): its k nearest are the first k of any larger k
    (with ties, from a small integer grid of keys), so Macondo's tuning may read prefixes."""
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 3, (300, 4)).astype(np.float32)  # many exact ties
    values = rng.integers(0, 9, 300).astype(np.int32)
    s = TorchExactSearch(keys, values, "l2", chunk_rows=64, recompute=recompute)
    q = torch.tensor(rng.integers(0, 3, (25, 4)), dtype=torch.float32)
    big = s.search(q, 64)
    for k in (1, 8, 32):
        small = s.search(q, k)
        assert torch.equal(small.rows, big.rows[:, :k])
        assert torch.equal(small.distances, big.distances[:, :k])


def test_display_weights_are_the_softmax_with_counts():
    rng = np.random.default_rng(5)
    dists = rng.random((3, 6)) * 3
    ids = rng.integers(0, 50, (3, 6))
    ids[1, 4:] = -1
    ids[2, :] = -1
    counts = rng.integers(1, 5, (3, 6))
    got = knn_weights(torch.tensor(dists, dtype=torch.float32), torch.tensor(ids), 2.0,
                      torch.tensor(counts)).double().numpy()  # fmt: skip
    w = np.where(ids >= 0, np.exp(-dists / 2.0) * counts, 0.0)
    ref = np.divide(w, w.sum(1, keepdims=True), out=np.zeros_like(w),
                    where=w.sum(1, keepdims=True) > 0)  # fmt: skip
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert got[2].sum() == 0


def test_every_mixture_variant():
    lm = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    other = torch.tensor([-0.5, -5.0, float("-inf"), -1.0])
    p = np.exp(lm.double().numpy())
    q = np.exp(other.double().numpy())
    # fixed weight
    np.testing.assert_allclose(combine(lm, other, 0.25).numpy(), np.log(0.75 * p + 0.25 * q),
                               rtol=1e-6)  # fmt: skip
    # one weight per token (a learned gate's)
    w = torch.tensor([0.1, 0.5, 0.9, 0.3])
    wn = w.double().numpy()
    np.testing.assert_allclose(combine(lm, other, w).numpy(), np.log((1 - wn) * p + wn * q),
                               rtol=1e-6)  # fmt: skip
    # only the searched rows 1 and 3 mix; the others keep p_lm exactly
    rows = torch.tensor([1, 3])
    for weight, ws in ((0.25, np.array([0.25, 0.25])), (w, wn[[1, 3]])):
        got = combine(lm, other[rows], weight, rows)
        assert got[0] == lm[0] and got[2] == lm[2]
        ref = np.log((1 - ws) * p[[1, 3]] + ws * q[[1, 3]])
        np.testing.assert_allclose(got[rows].numpy(), ref, rtol=1e-6)
    assert torch.equal(combine(lm, torch.empty(0), 0.25, torch.empty(0, dtype=torch.long)), lm)
    # the gate's mixture from log-weights (its training loss)
    log_w = torch.log(torch.stack([1 - w, w], 1))
    np.testing.assert_allclose(mix_log_weights(log_w, lm, other).numpy(),
                               np.log((1 - wn) * p + wn * q), rtol=1e-6)  # fmt: skip
    assert combine(lm, other, 0.25)[2].item() == pytest.approx(-3.0 + math.log(0.75))


def test_lm_stats_equal_numpy_from_the_kept_logsumexp():
    from knnlm import forward_pass

    rng = np.random.default_rng(6)
    logits = torch.tensor(rng.standard_normal((30, 50)) * 4, dtype=torch.float32)
    rows = torch.tensor([0, 3, 4, 9, 17, 18, 19, 20, 21, 22, 29])
    x = logits.double().numpy()[rows.numpy()]
    lse = np.logaddexp.reduce(x, axis=1)
    logp = x - lse[:, None]
    ref = np.stack([-(np.exp(logp) * logp).sum(1), logp.max(1)], 1)
    for given in (None, torch.logsumexp(logits, -1)):
        got = forward_pass.lm_stats(logits, given, rows).double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    before = logits.clone()
    whole = forward_pass.lm_stats(logits).double().numpy()
    np.testing.assert_allclose(whole[rows.numpy()], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)  # the caller's logits are left alone
