"""RetoMaton pointers against a plain token-by-token loop (numpy brute-force search), and at a
threshold of infinity against the plain kNN-LM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnlm.retrieval.pointers import pointer_neighbours, row_distances
from knnlm.retrieval.search.exact import TorchExactSearch


def loop_reference(keys, values, queries, targets, own, k, threshold, segment):
    """Token by token: search at a segment's start or when fewer than ``threshold`` pointers
    survive, else read the pointers; then follow the neighbours whose value is the target."""
    n, big = len(targets), len(values)
    sets, searched, state = [], [], []
    for t in range(n):
        if t % segment == 0 or len(state) < threshold:
            d = ((keys.astype(np.float64) - queries[t]) ** 2).sum(1)
            if own[t] >= 0:
                d[own[t]] = np.inf
            order = np.lexsort((np.arange(big), d))[:k]
            rows = [int(r) for r in order if np.isfinite(d[r])]
            searched.append(True)
        else:
            rows = state
            searched.append(False)
        sets.append(sorted(rows))
        nxt = own[t + 1] if t + 1 < n else -1
        state = [r + 1 for r in rows if values[r] == targets[t] and r + 1 < big and r + 1 != nxt]
    return sets, np.array(searched)


def _case(seed: int):
    """A repetitive stream (a phrase with 10% noise) as the datastore, and its own text."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, 6, 17)
    stream = np.tile(phrase, 12)
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(0, 6, noise.sum())
    big = len(stream) - 1
    values = stream[1:].astype(np.int64)  # row r: context ending at token r, value r + 1
    prev = np.concatenate([[0], stream[:-2]])
    keys = np.stack([stream[:-1], prev, rng.integers(0, 2, big)], 1).astype(np.float32)
    return keys, values


@pytest.mark.parametrize("seed,k,threshold,segment,exclude", [
    (0, 8, 1, 32, "own"), (1, 8, 3, 16, "own"), (2, 16, 2, 64, "none"), (3, 4, 4, 7, "own"),
    (4, 8, 1, 32, "shifted"),  # rows a pointer can reach: the drop must be checked per pointer
])  # fmt: skip
def test_pointers_equal_the_plain_loop(seed, k, threshold, segment, exclude):
    keys, values = _case(seed)
    big = len(values)
    pos = np.arange(1, big)  # the text is the store's own stream: target p, query row p - 1
    queries, targets = keys[pos - 1], values[pos - 1]
    # "shifted": a row one period of the phrase later, which pointers reach often
    shifted = np.where((pos % 2 == 1) & (pos + 16 < big), pos + 16, -1)  # every other token
    own = {"own": pos - 1, "none": np.full(len(pos), -1), "shifted": shifted}[exclude]
    exclude = exclude != "none"
    backend = TorchExactSearch(keys, values.astype(np.int32), "l2")
    q = torch.from_numpy(queries)
    own_t = torch.from_numpy(own)

    def search(tok):
        ex = own_t[tok].numpy() if exclude else None
        return backend.search(q[tok], k, exclude_rows=ex)

    def distances(tok, rows):
        return row_distances(keys, q[tok], rows)

    nb, searched = pointer_neighbours(torch.from_numpy(targets), k, threshold,
                                      torch.from_numpy(values), search, distances, own_t,
                                      segment)  # fmt: skip
    ref_sets, ref_searched = loop_reference(keys, values, queries, targets, own, k, threshold,
                                            segment)  # fmt: skip
    assert searched.numpy().tolist() == ref_searched.tolist()
    assert 0 < searched.sum() < len(targets)  # the case really skips searches
    for t, want in enumerate(ref_sets):
        got = nb.rows[t][nb.rows[t] >= 0]
        assert sorted(got.tolist()) == want, t
        d = ((keys[got.numpy()].astype(np.float64) - queries[t]) ** 2).sum(1)
        np.testing.assert_allclose(nb.distances[t][nb.rows[t] >= 0].numpy(), d, atol=1e-5)
        assert (nb.values[t][nb.rows[t] >= 0].numpy() == values[got.numpy()]).all()


def test_a_threshold_above_k_searches_every_token():
    keys, values = _case(5)
    q = torch.from_numpy(keys[:50])
    backend = TorchExactSearch(keys, values.astype(np.int32), "l2")
    calls = []

    def search(tok):
        calls.append(tok)
        return backend.search(q[tok], 4)

    nb, searched = pointer_neighbours(torch.from_numpy(values[:50]), 4, float("inf"),
                                      torch.from_numpy(values), search, None)  # fmt: skip
    assert searched.all() and len(calls) == 1
    assert torch.equal(nb.rows, backend.search(q, 4).rows)


def test_eval_with_pointers_at_infinity_is_the_knnlm(lm, small_corpus, tmp_path):
    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings
    from tiny import SMALL_CTX, quiet_datastore

    ds = quiet_datastore(lm, small_corpus, tmp_path / "ds", context_len=SMALL_CTX)
    kw = dict(context_len=SMALL_CTX, datastore=ds, progress=False, knn=KnnSettings(k=8))
    plain = evaluate(lm, str(small_corpus), "train", **kw)
    inf = evaluate(lm, str(small_corpus), "train", pointers=float("inf"), **kw)
    assert inf["knnlm"]["nll_sum"] == plain["knnlm"]["nll_sum"]
    assert inf["knnlm"]["searches_saved"] == 0.0 and inf["settings"]["pointers"] == float("inf")
    one = evaluate(lm, str(small_corpus), "train", pointers=1, **kw)
    assert 0 < one["knnlm"]["searches_saved"] < 1
    assert one["knnlm"]["retrieval_share"] == pytest.approx(1 - one["knnlm"]["searches_saved"])
    assert np.isfinite(one["knnlm"]["perplexity"])


@pytest.mark.parametrize("extra, message", [
    (["--pointers", "0"], "--pointers must be at least 1"),
    (["--pointers", "2", "--cache", "c"], "--pointers and --cache"),
])  # fmt: skip
def test_pointer_mistakes_are_one_line(monkeypatch, capsys, tmp_path, lm, small_corpus, extra,
                                       message):  # fmt: skip
    from tiny import SMALL_CTX, quiet_datastore, run_cli

    ds = quiet_datastore(lm, small_corpus, tmp_path / "ds", context_len=SMALL_CTX)
    extra = [str(tmp_path / a) if a == "c" else a for a in extra]
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", "nowhere", "-c", str(small_corpus),
                           "-d", str(ds), "--k", "8", *extra)  # fmt: skip
    assert code == 2 and err.startswith("Error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
