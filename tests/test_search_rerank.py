"""Exact re-ranking, IVF recall, -1 masking, the index/metadata pair, GPU options (mocked)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.retrieval.search import faiss_lib
from knnlm.retrieval.search.choose import open_backend
from knnlm.retrieval.search.conventions import open_keys
from knnlm.retrieval.search.faiss_backend import FaissBackend
from knnlm.retrieval.search.index_build import (
    auto_nprobe,
    build_index,
    finish_pending_commit,
    index_summary,
)
from knnlm.retrieval.search.rerank import KeyStore, recompute_distances
from knnlm.retrieval.search.saved_index import KnnIndex
from tiny import array_datastore, nearest

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def write_ds(path: Path, keys: np.ndarray, dtype=np.float16) -> Path:
    return array_datastore(path, keys.astype(dtype))


def clustered(n: int, d: int, centers: int, seed: int, nq: int = 40):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 4
    keys = c[rng.integers(centers, size=n)] + rng.normal(size=(n, d))
    queries = c[rng.integers(centers, size=nq)] + rng.normal(size=(nq, d))
    return keys.astype(np.float32), queries.astype(np.float32)


def numpy_dist(keys, q, ids, metric="l2"):
    """float64 brute-force reference for given ids (-1 -> inf)."""
    k = np.asarray(keys, np.float64)[np.where(ids < 0, 0, ids)]
    qq = q.astype(np.float64)[:, None, :]
    d = ((qq - k) ** 2).sum(-1) if metric == "l2" else -(qq * k).sum(-1)
    return np.where(ids < 0, np.inf, d)


def numpy_topk(keys, q, k, metric="l2"):
    all_ids = np.broadcast_to(np.arange(len(keys)), (len(q), len(keys)))
    d = numpy_dist(keys, q, all_ids, metric)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


# --------------------------------------------------------------------------- re-ranking


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("in_ram", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_reranked_ivfpq_distances_match_numpy(tmp_path, metric, in_ram, dtype):
    keys, q = clustered(3000, 16, 12, seed=1)
    ds = write_ds(tmp_path / "ds", keys, dtype)
    build_index(ds, kind="ivfpq", metric=metric, nlist=16, pq_m=4, pq_bits=6, progress=False)
    stored = np.asarray(open_keys(ds)[0])
    s = FaissBackend(ds, nprobe=4, use_gpu=False, keys_in_ram=in_ram)
    assert (s.refined is not None) == in_ram  # the fused path is the one under test
    nb = s.search(torch.from_numpy(q), 50)
    dist, ids = nb.distances.numpy(), nb.rows.numpy()
    assert (ids >= 0).all() and (np.diff(dist, axis=1) >= 0).all()
    ref = numpy_dist(stored, q, ids, metric)
    np.testing.assert_allclose(dist, ref, rtol=1e-5, atol=1e-4)
    # The same candidates as PQ search, only re-ordered by exact distance.
    _, pq_ids = nearest(ds, q, 50, nprobe=4, recompute=False, use_gpu=False)
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(pq_ids, 1))


def test_flat_index_reranks_itself_exactly(tmp_path):
    keys, q = clustered(800, 12, 5, seed=2)
    ds = write_ds(tmp_path / "ds", keys)
    build_index(ds, kind="flat", progress=False)
    stored = np.asarray(open_keys(ds)[0])
    ref_d, ref_i = numpy_topk(stored, q, 20)
    dist, ids = nearest(ds, q, 20, use_gpu=False)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)


def test_recompute_distances_random_ids_and_missing(tmp_path):
    rng = np.random.default_rng(3)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(500, 32)) * 3)
    keys, _ = open_keys(ds)
    q = rng.normal(size=(9, 32)).astype(np.float32) * 3
    ids = rng.integers(0, 500, size=(9, 64))
    ids[2, 5:] = -1
    ids[4] = -1
    dist, out = recompute_distances(keys, q, ids)
    ref = numpy_dist(keys, q, out)
    np.testing.assert_allclose(dist, ref, rtol=1e-5)
    assert np.isinf(dist[4]).all() and (out[4] == -1).all()
    np.testing.assert_array_equal(np.sort(out, 1), np.sort(ids, 1))


def test_keystore_holds_the_float16_keys_exactly_as_float32(tmp_path):
    rng = np.random.default_rng(4)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(70, 8)))
    keys, _ = open_keys(ds)
    store = KeyStore(keys, "l2", chunk=16)
    assert store.keys.dtype == np.float32
    assert (store.keys.astype(np.float16) == np.asarray(keys)).all()
    assert (store.keys == np.asarray(keys).astype(np.float64)).all()


def test_ivfpq_rerank_recall_at_k_against_exact(tmp_path):
    """nprobe < nlist misses some true neighbours; re-ranking must not lose more, and the
    exact top-k overlap must stay high on clustered data."""
    keys, q = clustered(6000, 16, 24, seed=5, nq=60)
    ds = write_ds(tmp_path / "ds", keys)
    build_index(ds, kind="ivfpq", nlist=32, pq_m=8, pq_bits=8, progress=False)
    stored = np.asarray(open_keys(ds)[0])
    _, ref = numpy_topk(stored, q, 10)
    _, ids = nearest(ds, q, 100, nprobe=8, use_gpu=False)
    recall_at_10 = np.mean([len(set(ref[i]) & set(ids[i, :10])) / 10 for i in range(len(q))])
    assert recall_at_10 >= 0.9
    assert (ids[:, 0] == ref[:, 0]).mean() >= 0.95


# --------------------------------------------------------------------------- -1 masking


def test_faiss_knn_missing_ids_stay_missing(tmp_path, monkeypatch):
    """Ids FAISS marks -1 (with +-FLT_MAX distances) come out as -1 / +inf, never as a row."""
    import knnlm.retrieval.search.exact_faiss as exact_faiss

    rng = np.random.default_rng(6)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(30, 4)))
    q = rng.normal(size=(3, 4)).astype(np.float32)
    real_knn = faiss.knn

    def knn(xq, xb, k, metric=faiss.METRIC_L2):
        d, i = real_knn(xq, xb, k, metric=metric)
        d[:, 10:], i[:, 10:] = np.finfo(np.float32).max, -1  # "finds" only 10
        return d, i

    monkeypatch.setattr(exact_faiss.faiss, "knn", knn)
    dist, ids = nearest(ds, q, 15)
    assert (ids[:, :10] >= 0).all() and (ids[:, 10:] == -1).all() and np.isinf(dist[:, 10:]).all()


# --------------------------------------------------------------------------- the file pair


def test_index_json_mismatches_are_refused(tmp_path):
    rng = np.random.default_rng(7)
    a = write_ds(tmp_path / "a", rng.normal(size=(300, 8)))
    b = write_ds(tmp_path / "b", rng.normal(size=(200, 8)))
    build_index(a, kind="flat", progress=False)
    build_index(b, kind="flat", metric="ip", progress=False)
    info = json.loads((a / "index.json").read_text())
    assert info["index_sha256"] and info["index_bytes"] == (a / "index.faiss").stat().st_size

    (a / "index.faiss").write_bytes((b / "index.faiss").read_bytes())  # another datastore's
    with pytest.raises(KnnlmError, match="bytes|does not fit"):
        KnnIndex.load(a, use_gpu=False)
    del info["index_bytes"]  # without the size check, the contents are cross-checked
    (a / "index.json").write_text(json.dumps(info))
    with pytest.raises(KnnlmError, match="does not fit") as e:
        KnnIndex.load(a, use_gpu=False)
    assert "\n" not in str(e.value) and "metric" in str(e.value) and "300" in str(e.value)

    build_index(a, kind="flat", progress=False)
    info = json.loads((a / "index.json").read_text())
    (a / "index.json").write_text(json.dumps({**info, "type": "ivfpq", "nlist": 4, "pq_m": 2}))
    with pytest.raises(KnnlmError, match="type"):
        KnnIndex.load(a, use_gpu=False)
    (a / "index.json").write_text(json.dumps(info))
    raw = (a / "index.faiss").read_bytes()
    (a / "index.faiss").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(KnnlmError) as e:
        FaissBackend(a, use_gpu=False)
    assert "\n" not in str(e.value)


def test_interrupted_commit_pairs_by_hash(tmp_path):
    """A crash between the two renames leaves index.json.pending: the loader believes the
    metadata whose hash the index file has, and the next build finishes the commit."""
    rng = np.random.default_rng(8)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(120, 8)))
    build_index(ds, kind="flat", metric="l2", progress=False)
    old_meta = (ds / "index.json").read_text()
    old_index = (ds / "index.faiss").read_bytes()
    build_index(ds, kind="flat", metric="ip", progress=False)
    new_meta = (ds / "index.json").read_text()

    # Crash after index.faiss was replaced, before index.json: new file, old json, pending new.
    (ds / "index.json").write_text(old_meta)
    (ds / "index.json.pending").write_text(new_meta)
    assert KnnIndex.load(ds, use_gpu=False).metric == "ip"
    # Crash before index.faiss was replaced: old file, old json, pending new.
    new_index = (ds / "index.faiss").read_bytes()
    (ds / "index.faiss").write_bytes(old_index)
    assert KnnIndex.load(ds, use_gpu=False).metric == "l2"
    # Neither matches: refused.
    (ds / "index.faiss").write_bytes(new_index[:-8] + b"\0" * 8)
    with pytest.raises(KnnlmError, match="interrupted"):
        KnnIndex.load(ds, use_gpu=False)
    # Recovery by the next build: the new file in place -> the commit is completed.
    (ds / "index.faiss").write_bytes(new_index)
    finish_pending_commit(ds)
    assert not (ds / "index.json.pending").exists()
    assert json.loads((ds / "index.json").read_text())["metric"] == "ip"


# --------------------------------------------------------------------------- defaults, warnings


def test_auto_nprobe_follows_the_reference_scan_fraction():
    assert auto_nprobe(10) == 10  # never more than nlist
    assert auto_nprobe(1024) == 32  # floor
    assert auto_nprobe(4096) == 32  # the reference setting
    assert auto_nprobe(40_000) == 313  # ceil(40000 * 32 / 4096)


def test_index_summary_reports_scan_fraction(tmp_path):
    keys, _ = clustered(2000, 8, 6, seed=9)
    ds = write_ds(tmp_path / "ds", keys)
    build_index(ds, kind="ivfpq", nlist=40, pq_m=4, pq_bits=6, nprobe=10, progress=False)
    assert json.loads((ds / "index.json").read_text())["scan_fraction"] == 0.25
    assert "25.00%" in index_summary(ds)


def test_exact_cpu_search_of_a_large_store_warns(tmp_path, caplog, monkeypatch):
    """Exact CPU search past EXACT_CPU_WARN_KEYS, or after an index build cut short, warns in
    one line with the fix; a small store without an index is searched exactly in silence."""
    from knnlm.retrieval.search import choose

    rng = np.random.default_rng(10)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(50, 4)))
    logger = "knnlm.retrieval.index"
    with caplog.at_level(logging.WARNING, logger=logger):
        open_backend(ds, "auto")
    assert not caplog.records
    monkeypatch.setattr(choose, "EXACT_CPU_WARN_KEYS", 50)
    with caplog.at_level(logging.WARNING, logger=logger):
        open_backend(ds, "auto")
    assert "50 keys" in caplog.text and "knnlm datastore index" in caplog.text
    assert "\n" not in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(choose, "EXACT_CPU_WARN_KEYS", 10**9)
    (ds / "index.faiss.partial").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger=logger):
        open_backend(ds, "auto")
    assert "did not finish" in caplog.text


# --------------------------------------------------------------------------- GPU (mocked)


class FakeClonerOptions:
    def __init__(self):
        self.useFloat16 = True  # FAISS's default would be False; start from the dangerous value
        self.useFloat16CoarseQuantizer = True


@pytest.fixture
def fake_gpu(monkeypatch):
    """FAISS GPU entry points mocked: the 'GPU' copy is the CPU index; options are recorded."""
    seen = []

    def cpu_to_gpu(res, device, index, co=None):
        seen.append((type(index).__name__, co))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
    return seen


def test_flat_gpu_copy_does_not_request_float16(tmp_path, fake_gpu):
    rng = np.random.default_rng(11)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(40, 8)))
    build_index(ds, kind="flat", use_gpu=False, progress=False)
    KnnIndex.load(ds, use_gpu=True)
    ((name, co),) = fake_gpu
    assert name.startswith("IndexFlat") and co.useFloat16 is False
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(8), 8, 2, 2, 4)
    assert faiss_lib.gpu_cloner_options(ivf).useFloat16 is True
    assert faiss_lib.gpu_cloner_options(ivf).useFloat16CoarseQuantizer is False


def test_gpu_ivf_training_is_seeded(tmp_path, fake_gpu):
    """With a (mocked) GPU the trained index equals the CPU build's: same seeds drive it."""
    keys, _ = clustered(2000, 8, 6, seed=12)
    a, b = write_ds(tmp_path / "a", keys), write_ds(tmp_path / "b", keys)
    opts = dict(kind="ivfpq", nlist=8, pq_m=4, pq_bits=6, seed=3, progress=False)
    build_index(a, use_gpu=True, **opts)
    assert any(co is not None and co.useFloat16 is False for _, co in fake_gpu)  # assignment
    build_index(b, use_gpu=False, **opts)
    assert (a / "index.faiss").read_bytes() == (b / "index.faiss").read_bytes()
    assert os.path.getsize(a / "index.faiss") > 0


# --------------------------------------------------------------------------- pipeline


def test_prefetch_keeps_order_overlaps_and_raises():
    import threading

    from knnlm.prefetch import prefetch

    produced: list[int] = []
    second_ready = threading.Event()

    def gen():
        for i in range(5):
            produced.append(i)
            if i == 1:
                second_ready.set()
            yield i * i

    out = []
    for x in prefetch(gen(), depth=1):
        if x == 0:  # the producer runs ahead while the consumer holds item 0
            assert second_ready.wait(10)
        out.append(x)
    assert out == [0, 1, 4, 9, 16] == list(prefetch((i * i for i in range(5)), depth=0))

    def bad():
        yield 1
        raise KnnlmError("boom")

    with pytest.raises(KnnlmError, match="boom"):
        list(prefetch(bad(), depth=2))


# --------------------------------------------------------------------------- given rows


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("in_ram", [True, False, "fallback"])
def test_row_distances_of_given_rows_match_numpy(tmp_path, metric, in_ram):
    """RetoMaton's pointed-to rows: exact distances of chosen rows (-1: +inf), unsorted, by
    the FAISS backend's re-ranking routine (keys in RAM or gathered) and by the fallback."""
    from knnlm.retrieval.pointers import row_distances

    keys, q = clustered(2000, 16, 10, seed=3)
    ds = write_ds(tmp_path / "ds", keys, np.float16)
    build_index(ds, kind="ivfpq", metric=metric, nlist=16, pq_m=4, pq_bits=6, progress=False)
    stored = np.asarray(open_keys(ds)[0])
    rng = np.random.default_rng(4)
    rows = rng.integers(0, len(keys), size=(len(q), 37))
    rows[rng.random(rows.shape) < 0.3] = -1
    rows[0] = -1  # a query with no row at all
    if in_ram == "fallback":  # backends without their own routine; tiny blocks
        got = row_distances(stored, torch.from_numpy(q), torch.from_numpy(rows), metric, 4096)
    else:
        s = FaissBackend(ds, nprobe=4, use_gpu=False, keys_in_ram=in_ram)
        got = s.row_distances(torch.from_numpy(q), torch.from_numpy(rows))
    ref = numpy_dist(stored, q, rows.clip(0), metric)
    ref[rows < 0] = np.inf
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)
