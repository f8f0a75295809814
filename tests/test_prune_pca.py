"""Datastore pruning by greedy merging and PCA keys, against independent numpy references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.forward_pass import score_stream
from knnlm.retrieval.combiner import knn_target_log_prob
from knnlm.retrieval.datastore import open_datastore
from knnlm.retrieval.prune import greedy_merge, prune_datastore
from knnlm.retrieval.retriever import KnnSettings
from knnlm.retrieval.search.index_build import build_index
from tiny import SMALL_CTX, SMALL_STRIDE, array_datastore, nearest, small_datastore

CTX, STRIDE = SMALL_CTX, SMALL_STRIDE
pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def write_ds(path: Path, keys: np.ndarray, values: np.ndarray) -> Path:
    meta = dict(format_version=1, key_dtype="float32", artifact="datastore", key_type="ffn_input")
    return array_datastore(path, keys.astype(np.float32), values, **meta)


def sequential_greedy(nbrs: np.ndarray, values: np.ndarray) -> tuple[list[int], dict[int, int]]:
    """He et al.'s visit in row order, written as the plain loop it is: a present row absorbs
    every same-token neighbour that is still fresh (present and has absorbed nothing yet),
    whether that neighbour was visited already or not."""
    weight = [1] * len(values)
    for i in range(len(values)):
        if weight[i] == 0:
            continue
        for j in nbrs[i]:
            j = int(j)
            if j >= 0 and j != i and weight[j] == 1 and values[j] == values[i]:
                weight[j] = 0
                weight[i] += 1
    kept = [i for i, w in enumerate(weight) if w > 0]
    return kept, {i: weight[i] for i in kept}


@pytest.mark.parametrize("seed", range(6))
def test_greedy_merge_equals_the_sequential_visit(seed):
    rng = np.random.default_rng(seed)
    n, k = 300, 5
    values = rng.integers(0, 4, n)
    nbrs = rng.integers(-1, n, (n, k))
    keep, counts = greedy_merge(nbrs, values)
    kept, ref = sequential_greedy(nbrs, values)
    assert np.flatnonzero(keep).tolist() == kept
    assert counts[keep].tolist() == [ref[i] for i in kept]
    assert counts.sum() == n


def _clusters() -> tuple[np.ndarray, np.ndarray]:
    """Exact duplicates: rows 0, 2, 5 (token 7); rows 1, 4 (tokens 3 and 4: no merge);
    rows 3, 6 (token 2); row 7 alone."""
    centres = np.eye(4, 8, dtype=np.float32) * 10
    rows = [0, 1, 0, 2, 1, 0, 2, 3]
    values = np.array([7, 3, 7, 2, 4, 7, 2, 9])
    return centres[rows], values


def test_known_duplicates_merge_to_counts_and_weighted_p_knn(tmp_path):
    keys, values = _clusters()
    src = write_ds(tmp_path / "ds", keys, values)
    report = prune_datastore(src, tmp_path / "pruned", k=3, progress=False)
    assert (report["entries_before"], report["entries_after"]) == (8, 5)
    ds2 = open_datastore(tmp_path / "pruned")
    np.testing.assert_array_equal(ds2.positions, [0, 1, 3, 4, 7])
    np.testing.assert_array_equal(ds2.counts, [3, 1, 2, 1, 1])
    np.testing.assert_array_equal(ds2.values, values[[0, 1, 3, 4, 7]])

    rng = np.random.default_rng(0)
    queries = (keys[[0, 1, 3]] + rng.normal(0, 1.0, (3, 8))).astype(np.float32)
    targets = np.array([7, 4, 2])
    temp = 100.0
    dist, ids = nearest(ds2.path, queries, 5)
    got = knn_target_log_prob(
        torch.from_numpy(dist), torch.from_numpy(ids), torch.from_numpy(ds2.values[ids] * 1),
        torch.from_numpy(targets), temp, torch.from_numpy(ds2.counts[ids]),
    )  # fmt: skip
    # numpy: count-weighted softmax over the pruned rows, and the unpruned store's p_knn
    d2 = ((queries[:, None, :] - ds2.keys[None].astype(np.float64)) ** 2).sum(-1)
    w = ds2.counts * np.exp(-d2 / temp)
    ref = np.log((w * (ds2.values == targets[:, None])).sum(1) / w.sum(1))
    np.testing.assert_allclose(got.exp().numpy(), np.exp(ref), atol=1e-6)
    d1 = ((queries[:, None, :] - keys[None].astype(np.float64)) ** 2).sum(-1)
    w1 = np.exp(-d1 / temp)
    full = np.log((w1 * (values == targets[:, None])).sum(1) / w1.sum(1))
    np.testing.assert_allclose(got.exp().numpy(), np.exp(full), atol=1e-6)
    assert np.exp(ref).min() < 0.9  # the other clusters carry real mass


def test_nothing_to_merge_is_the_identity(tmp_path):
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(60, 8)).astype(np.float32)
    values = np.arange(60)  # all distinct: no neighbour carries the same token
    write_ds(tmp_path / "ds", keys, values)
    report = prune_datastore(tmp_path / "ds", tmp_path / "p", k=9, progress=False)
    assert report["entries_after"] == report["entries_before"] == 60
    ds2 = open_datastore(tmp_path / "p")
    np.testing.assert_array_equal(ds2.keys, keys)
    np.testing.assert_array_equal(ds2.values, values)
    np.testing.assert_array_equal(ds2.counts, np.ones(60))
    np.testing.assert_array_equal(ds2.positions, np.arange(60))


def test_prune_refuses_a_foreign_target(tmp_path):
    keys, values = _clusters()
    write_ds(tmp_path / "ds", keys, values)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(KnnlmError, match="did not create"):
        prune_datastore(tmp_path / "ds", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


@pytest.fixture(scope="module")
def lm_ds(lm, small_corpus, tmp_path_factory):
    return small_datastore(lm, small_corpus, tmp_path_factory.mktemp("lm_ds") / "ds")


def _valid_records(lm, corpus):
    ids = load_tokens(lm.tokenizer, str(corpus), "valid")
    keys, lps, tgts = [], [], []
    for b in score_stream(lm.model, ids, CTX, STRIDE, progress=False):
        keys.append(b.keys.double().numpy())
        lps.append(b.lm_log_prob.double().numpy())
        tgts.append(b.targets.numpy())
    return np.concatenate(keys), np.concatenate(lps), np.concatenate(tgts)


def test_evaluating_a_pruned_store_uses_its_counts(lm, small_corpus, lm_ds, tmp_path):
    pruned = tmp_path / "pruned"
    report = prune_datastore(lm_ds, pruned, k=4, progress=False)
    assert report["entries_after"] < report["entries_before"]
    ds2 = open_datastore(pruned)
    k, w, temp = ds2.n, 0.4, 50.0
    kw = dict(context_len=CTX, stride=STRIDE, progress=False)
    res = evaluate(lm, str(small_corpus), "valid", datastore=pruned,
                   knn=KnnSettings(k=k), knn_weight=w, knn_temperature=temp, **kw)  # fmt: skip
    q, lps, tgts = _valid_records(lm, small_corpus)
    d = ((q[:, None, :] - np.asarray(ds2.keys, np.float64)[None]) ** 2).sum(-1)
    logit = -d / temp + np.log(ds2.counts)
    p = np.exp(logit - logit.max(1, keepdims=True))
    p_knn = (p * (np.asarray(ds2.values) == tgts[:, None])).sum(1) / p.sum(1)
    nll = -np.log((1 - w) * np.exp(lps) + w * p_knn).sum()
    assert res["knnlm"]["perplexity"] == pytest.approx(math.exp(nll / len(tgts)), rel=1e-5)
    with pytest.raises(KnnlmError, match="pruned"):
        evaluate(lm, str(small_corpus), "train", datastore=pruned, knn=KnnSettings(k=4), **kw)
    with pytest.raises(KnnlmError, match="counts"):
        evaluate(lm, str(small_corpus), "valid", datastore=pruned, cache=tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()


def test_pca_with_full_dimension_keeps_the_perplexity(lm, small_corpus, lm_ds, tmp_path):
    knn = KnnSettings(k=8, recompute=False)
    kw = dict(context_len=CTX, stride=STRIDE, progress=False, knn=knn, knn_weight=0.5,
              knn_temperature=5.0, datastore=lm_ds)  # fmt: skip
    ppl = {}
    for pca in (None, 32, 4):
        build_index(lm_ds, "flat", pca=pca, progress=False)
        assert json.loads((Path(lm_ds) / "index.json").read_text())["pca"] == pca
        ppl[pca] = evaluate(lm, str(small_corpus), "valid", **kw)["knnlm"]["perplexity"]
    assert ppl[32] == pytest.approx(ppl[None], rel=1e-4)
    assert ppl[4] != pytest.approx(ppl[None], rel=1e-3)  # a real reduction changes the search
    with pytest.raises(KnnlmError, match="--pca"):
        build_index(lm_ds, "flat", pca=33, progress=False)
    (Path(lm_ds) / "index.faiss").unlink()
    (Path(lm_ds) / "index.json").unlink()


def test_pca_in_front_of_ivfpq_with_exact_reranking(tmp_path):
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(2000, 16)).astype(np.float32)
    ds = write_ds(tmp_path / "ds", keys, np.arange(2000) % 5)
    build_index(ds, "ivfpq", nlist=4, pq_m=4, pq_bits=4, nprobe=4, pca=8, progress=False)
    info = json.loads((ds / "index.json").read_text())
    assert (info["pca"], info["dim"]) == (8, 16)
    dist, ids = nearest(ds, keys[:20], 5, recompute=True)
    exact = ((keys[:20, None, :] - keys[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-4)
    assert (ids[:, 0] == np.arange(20)).mean() > 0.5  # the PCA-8 search still finds itself mostly


def test_interrupted_prune_resumes_to_the_same_store(tmp_path, monkeypatch):
    import knnlm.retrieval.prune as prune_mod

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 8)) * 5
    keys = (centres[rng.integers(0, 20, 400)] + rng.normal(0, 0.1, (400, 8))).astype(np.float32)
    values = rng.integers(0, 3, 400)
    write_ds(tmp_path / "ds", keys, values)
    straight = prune_datastore(tmp_path / "ds", tmp_path / "a", k=5, chunk=64, progress=False)

    real_open, calls = prune_mod.open_backend, {"n": 0}

    def flaky_open(*a, **kw):
        backend = real_open(*a, **kw)
        real = backend.search

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return real(*a, **kw)

        backend.search = flaky
        return backend

    monkeypatch.setattr(prune_mod, "open_backend", flaky_open)
    with pytest.raises(KeyboardInterrupt):
        prune_datastore(tmp_path / "ds", tmp_path / "b", k=5, chunk=64, progress=False)
    assert not (tmp_path / "b").exists()  # nothing half-written at the target
    done = json.loads((tmp_path / "b.partial" / "prune-progress.json").read_text())["done"]
    assert done == 3 * 64
    resumed = prune_datastore(tmp_path / "ds", tmp_path / "b", k=5, chunk=64, progress=False)
    assert calls["n"] == 4 + (400 - done + 63) // 64  # only the missing chunks were searched
    assert resumed["entries_after"] == straight["entries_after"] < 400
    for name in ("keys", "values", "counts", "positions"):
        a, b = np.load(tmp_path / "a" / f"{name}.npy"), np.load(tmp_path / "b" / f"{name}.npy")
        np.testing.assert_array_equal(a, b)
