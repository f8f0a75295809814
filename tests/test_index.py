"""FAISS index layer: exact search, flat / IVF-PQ indexes, re-ranking, self-exclusion, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.choose import open_backend
from knnlm.retrieval.search.conventions import open_keys
from knnlm.retrieval.search.exact_faiss import FaissExactSearch
from knnlm.retrieval.search.faiss_backend import FaissBackend
from knnlm.retrieval.search.index_build import build_index
from knnlm.retrieval.search.index_settings import IndexSettings
from knnlm.retrieval.search.rerank import recompute_distances
from knnlm.retrieval.search.saved_index import KnnIndex
from tiny import array_datastore, nearest

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def write_ds(path: Path, keys: np.ndarray, dtype=np.float16) -> Path:
    """A minimal datastore as the datastore module writes it."""
    k = keys.astype(dtype)
    return array_datastore(path, k, key_dtype=str(k.dtype))


def loop_knn(keys: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2"):
    """Independent reference: float64, explicit loops, ties broken by id, -1/+inf padding."""
    keys = keys.astype(np.float64)
    dist = np.full((len(queries), k), np.inf)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for i, q in enumerate(queries.astype(np.float64)):
        scored = []
        for j, key in enumerate(keys):
            d = float(np.sum((q - key) ** 2)) if metric == "l2" else -float(np.dot(q, key))
            scored.append((d, j))
        scored.sort()
        for c, (d, j) in enumerate(scored[:k]):
            dist[i, c], ids[i, c] = d, j
    return dist, ids


def clustered(n: int, d: int, centers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 4
    keys = c[rng.integers(centers, size=n)] + rng.normal(size=(n, d))
    queries = c[rng.integers(centers, size=40)] + rng.normal(size=(40, d))
    return keys.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_search_matches_loops(tmp_path, metric, dtype):
    rng = np.random.default_rng(0)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(53, 8)), dtype)
    keys, _ = open_keys(ds)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    ref_d, ref_i = loop_knn(np.asarray(keys), q, 10, metric)
    nb = FaissExactSearch(keys, np.zeros(53, np.int32), metric).search(torch.from_numpy(q), 10)
    dist, ids = nb.distances.numpy(), nb.rows.numpy()
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and dist.shape == (6, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)


def test_exact_search_k_larger_than_n_pads(tmp_path):
    rng = np.random.default_rng(1)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(5, 4)))
    keys, _ = open_keys(ds)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    dist, ids = nearest(ds, q, 8)
    ref_d, ref_i = loop_knn(np.asarray(keys), q, 8)
    np.testing.assert_array_equal(ids, ref_i)
    assert (ids[:, 5:] == -1).all() and np.isinf(dist[:, 5:]).all()
    np.testing.assert_allclose(dist[:, :5], ref_d[:, :5], rtol=1e-5, atol=1e-5)


def test_recompute_distances_exact_and_resorted(tmp_path):
    rng = np.random.default_rng(2)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(30, 6)), np.float32)
    keys, _ = open_keys(ds)
    q = rng.normal(size=(4, 6)).astype(np.float32)
    ids = np.array([[3, 1, -1, 7], [0, 29, 5, 2], [-1, -1, -1, -1], [9, 8, 7, 6]])
    dist, out_ids = recompute_distances(keys, q, ids)
    ref = np.array(keys, dtype=np.float64)
    for i in range(4):
        want = sorted(
            (float(np.sum((q[i] - ref[j]) ** 2)) if j >= 0 else np.inf, c)
            for c, j in enumerate(ids[i])
        )
        np.testing.assert_allclose(dist[i], [w[0] for w in want], rtol=1e-6)
        np.testing.assert_array_equal(out_ids[i], [ids[i][w[1]] for w in want])


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_index_equals_bruteforce(tmp_path, metric):
    rng = np.random.default_rng(3)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(200, 16)))
    path = build_index(ds, kind="flat", metric=metric, add_chunk=64, progress=False)
    assert path == ds / "index.faiss" and path.is_file()
    info = json.loads((ds / "index.json").read_text())
    assert info["type"] == "flat" and info["metric"] == metric and info["n"] == 200
    keys, _ = open_keys(ds)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    ref_d, ref_i = loop_knn(np.asarray(keys), q, 12, metric)

    index = KnnIndex.load(ds, use_gpu=False)
    assert (index.kind, index.metric, index.n) == ("flat", metric, 200)
    dist, ids = index.search(q, 12)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)

    dist, ids = nearest(ds, q, 12, use_gpu=False)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)


def test_ivfpq_full_probe_top1_and_recompute_exact(tmp_path):
    keys, q = clustered(4000, 16, 20, seed=4)
    ds = write_ds(tmp_path / "ds", keys)
    build_index(ds, kind="ivfpq", nlist=16, pq_m=8, pq_bits=8, add_chunk=1000, progress=False)
    info = json.loads((ds / "index.json").read_text())
    assert (info["type"], info["nlist"], info["pq_m"], info["status"]) == (
        "ivfpq",
        16,
        8,
        "complete",
    )
    # The settings whole beside what they resolved to (an nprobe of None became one).
    assert IndexSettings.from_dict(info["settings"]["index"]) == IndexSettings(
        "ivfpq", nlist=16, pq_m=8, pq_bits=8, add_chunk=1000
    )
    assert info["settings"]["index"]["nprobe"] is None and info["nprobe"] >= 1
    stored, _ = open_keys(ds)
    ref = np.asarray(stored, np.float64)
    ref_top1 = ((q[:, None, :].astype(np.float64) - ref[None]) ** 2).sum(-1).argmin(1)

    index = KnnIndex.load(ds, nprobe=16, use_gpu=False)
    assert index.kind == "ivfpq" and index.nprobe == 16
    _, ids = index.search(q, 20)
    assert (ids[:, 0] == ref_top1).mean() >= 0.5  # PQ distances alone are approximate

    dist, ids = nearest(ds, q, 20, nprobe=16, use_gpu=False)
    assert (ids[:, 0] == ref_top1).mean() >= 0.95  # exact re-ranking fixes the order
    exact = ((q[:, None, :].astype(np.float64) - ref[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize("with_index", [False, True])
def test_exclude_ids_drops_self_hits(tmp_path, with_index):
    rng = np.random.default_rng(5)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(60, 8)))
    if with_index:
        build_index(ds, kind="flat", progress=False)
    stored = np.asarray(open_keys(ds)[0], dtype=np.float32)
    rows = np.array([4, 17, 59, 0])
    q = stored[rows]
    excl = rows.copy()
    excl[3] = -1  # no exclusion for the last query: it finds itself first
    dist, ids = nearest(ds, q, 6, excl, use_gpu=False)
    assert ids.shape == (4, 6)
    for i, r in enumerate(excl):
        others = np.delete(np.arange(60), r) if r >= 0 else np.arange(60)
        ref_d, ref_i = loop_knn(stored[others], q[i : i + 1], 6)
        np.testing.assert_array_equal(ids[i], others[ref_i[0]])
        np.testing.assert_allclose(dist[i], ref_d[0], rtol=1e-5, atol=1e-5)
    assert ids[3, 0] == 0 and dist[3, 0] == 0


def test_searcher_k_larger_than_n(tmp_path):
    rng = np.random.default_rng(6)
    ds = write_ds(tmp_path / "ds", rng.normal(size=(5, 4)))
    q = np.asarray(open_keys(ds)[0][:2], dtype=np.float32)
    dist, ids = nearest(ds, q, 9)
    assert (np.sort(ids[:, :5], axis=1) == np.arange(5)).all()
    assert (ids[:, 5:] == -1).all() and np.isinf(dist[:, 5:]).all()
    dist, ids = nearest(ds, q, 9, np.array([0, 1]))
    assert (ids[:, 4:] == -1).all() and np.isinf(dist[:, 4:]).all()
    assert 0 not in ids[0] and 1 not in ids[1] and (ids[:, :4] >= 0).all()
    build_index(ds, kind="flat", progress=False)
    dist, ids = nearest(ds, q, 9, use_gpu=False)
    assert (ids[:, 5:] == -1).all() and np.isinf(dist[:, 5:]).all()


class Interrupt(Exception):
    pass


def test_ivfpq_resume_matches_uninterrupted(tmp_path):
    keys, q = clustered(3000, 16, 12, seed=7)
    a, b = write_ds(tmp_path / "a", keys), write_ds(tmp_path / "b", keys)
    opts = dict(kind="ivfpq", nlist=8, pq_m=4, pq_bits=6, add_chunk=400, checkpoint_every=2)
    opts["progress"] = False

    def stop(rows: int) -> None:
        if rows > 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_index(a, on_checkpoint=stop, **opts)
    assert (a / "index.faiss.partial").is_file() and not (a / "index.faiss").exists()
    assert json.loads((a / "index.partial.json").read_text())["rows_added"] == 800

    seen: list[int] = []
    build_index(a, on_checkpoint=seen.append, **opts)
    assert seen and seen[0] > 800  # resumed: no retraining (that would checkpoint 0 rows first)
    assert not (a / "index.faiss.partial").exists() and not (a / "index.partial.json").exists()
    build_index(b, **opts)
    # The resumed file is the uninterrupted one, byte for byte.
    assert (a / "index.faiss").read_bytes() == (b / "index.faiss").read_bytes()

    ra = KnnIndex.load(a, nprobe=8, use_gpu=False).search(q, 10)
    rb = KnnIndex.load(b, nprobe=8, use_gpu=False).search(q, 10)
    np.testing.assert_array_equal(ra[1], rb[1])
    np.testing.assert_array_equal(ra[0], rb[0])


def test_partial_from_other_settings_is_discarded(tmp_path):
    keys, _ = clustered(2000, 8, 6, seed=8)
    ds = write_ds(tmp_path / "ds", keys)
    opts = dict(kind="ivfpq", nlist=8, pq_m=4, pq_bits=6, add_chunk=400, checkpoint_every=1)

    def stop(rows: int) -> None:
        if rows > 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_index(ds, on_checkpoint=stop, progress=False, **opts)
    seen: list[int] = []
    build_index(ds, on_checkpoint=seen.append, progress=False, seed=1, **opts)
    assert seen[0] == 0  # retrained from scratch
    assert json.loads((ds / "index.json").read_text())["seed"] == 1


def test_bad_inputs(tmp_path):
    rng = np.random.default_rng(9)
    with pytest.raises(KnnlmError, match="not found"):
        build_index(tmp_path / "missing")
    ds = write_ds(tmp_path / "ds", rng.normal(size=(100, 12)))
    with pytest.raises(KnnlmError, match="flat"):
        build_index(ds, kind="ivfpq", progress=False)  # 100 keys < 256 PQ centroids
    with pytest.raises(KnnlmError, match="divisor"):
        build_index(ds, kind="ivfpq", pq_m=5, pq_bits=4, nlist=2, progress=False)
    with pytest.raises(KnnlmError, match="kind"):
        build_index(ds, kind="hnsw")
    with pytest.raises(KnnlmError, match="metric"):
        build_index(ds, metric="cosine")
    with pytest.raises(KnnlmError, match="no index"):
        KnnIndex.load(ds)
    keys, _ = open_keys(ds)
    exact = FaissExactSearch(keys, np.zeros(len(keys), np.int32))
    with pytest.raises(KnnlmError, match="shape"):
        exact.search(torch.zeros((2, 5)), 3)
    with pytest.raises(KnnlmError, match="k must"):
        exact.search(torch.zeros((2, 12)), 0)
    build_index(ds, kind="flat", metric="ip", progress=False)
    with pytest.raises(KnnlmError, match="metric"):
        FaissBackend(ds, metric="l2", use_gpu=False)
    meta = json.loads((ds / "meta.json").read_text())
    (ds / "meta.json").write_text(json.dumps({**meta, "note": "rebuilt"}))
    with pytest.raises(KnnlmError, match="changed"):
        KnnIndex.load(ds, use_gpu=False)
    shutil.rmtree(ds)
    (ds).mkdir()
    with pytest.raises(KnnlmError, match="keys.npy"):
        open_backend(ds, "faiss")
