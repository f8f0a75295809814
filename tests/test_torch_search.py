"""Torch exact search against a numpy float64 brute force; sharding; FAISS optional."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.choose import open_backend, resolve_search
from knnlm.retrieval.search.exact import TorchExactSearch, order, select_k
from knnlm.retrieval.search.split_precision import query_parts
from tiny import array_datastore, project, quiet_datastore


def brute(q: np.ndarray, keys: np.ndarray, metric: str, excl=None) -> np.ndarray:
    """(n, N) float64 distances (smaller is closer); a query's own row +inf."""
    q, keys = q.astype(np.float64), keys.astype(np.float64)
    if metric == "l2":
        d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    else:
        d = -(q @ keys.T)
    if excl is not None:
        hit = excl >= 0
        d[np.nonzero(hit)[0], excl[hit]] = np.inf
    return d


def check_against(nb, d_ref: np.ndarray, k: int) -> None:
    """Sets and order equal the brute force's (ties within 1e-5 relative allowed)."""
    rows, dist = nb.rows.numpy(), nb.distances.numpy()
    want = np.sort(d_ref, axis=1, kind="stable")[:, :k]
    finite = np.isfinite(want)
    assert ((rows >= 0) == finite).all()
    got = np.take_along_axis(d_ref, np.where(rows >= 0, rows, 0), axis=1)
    tol = 1e-5 * np.maximum(np.abs(want), 1.0)
    assert (np.abs(np.where(finite, got - want, 0)) <= tol).all()
    assert (np.abs(np.where(finite, dist - want, 0)) <= tol).all()
    for r in rows:  # no row twice
        r = r[r >= 0]
        assert len(np.unique(r)) == len(r)
    ref_rows = np.argsort(d_ref, axis=1, kind="stable")[:, :k]
    assert (np.where(finite, rows, -1) == np.where(finite, ref_rows, -1)).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("file_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_equals_float64_brute_force(metric, file_dtype, exclude, streamed):
    rng = np.random.default_rng(3)
    keys = (rng.normal(size=(700, 24)) * 3).astype(file_dtype)
    values = rng.integers(0, 100, size=700).astype(np.int32)
    q = rng.normal(size=(9, 24)).astype(np.float32) * 3
    excl = rng.integers(-1, 700, size=9) if exclude else None
    kw = {"budget_bytes": 0} if streamed else {}
    for recompute in (False, True):
        s = TorchExactSearch(keys, values, metric, chunk_rows=64, recompute=recompute, **kw)
        assert s.resident is not streamed
        nb = s.search(torch.from_numpy(q), 20, exclude_rows=excl)
        d_ref = brute(q, keys, metric, excl)
        check_against(nb, d_ref, 20)
        rows = nb.rows.numpy()
        assert (nb.values.numpy() == values[rows]).all()
        assert (
            nb.distances.dtype == torch.float32 and nb.rows.dtype == nb.values.dtype == torch.int64
        )


@pytest.mark.parametrize("key_dtype", ["float16", "bfloat16"])
def test_16_bit_keys_on_device_equal_brute_force_of_the_rounded_keys(key_dtype):
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(5, 16)).astype(np.float32)
    s = TorchExactSearch(keys, np.zeros(300, np.int32), "l2", key_dtype=key_dtype, chunk_rows=50)
    rounded = torch.from_numpy(keys).to(getattr(torch, key_dtype)).float().numpy()
    check_against(s.search(torch.from_numpy(q), 10), brute(q, rounded, "l2"), 10)


def test_ties_break_by_row_id_whatever_the_chunking():
    keys = np.zeros((50, 4), np.float32)
    keys[::2] = 1.0  # 25 identical rows at distance 0, 25 at distance 4 from the origin
    q = torch.zeros((2, 4))
    expect = np.arange(1, 50, 2)[:10]
    for chunk in (3, 7, 50):
        nb = TorchExactSearch(keys, np.zeros(50, np.int32), chunk_rows=chunk).search(q, 10)
        assert (nb.rows.numpy() == expect).all()
    d = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0]])
    vals, idx = order(*select_k(d, None, 2))
    assert idx.tolist() == [[1, 2]] and vals.tolist() == [[0.0, 0.0]]


def test_k_larger_than_n_pads_and_bad_input_is_one_error():
    keys = np.eye(3, dtype=np.float32)
    s = TorchExactSearch(keys, np.array([5, 6, 7], np.int32))
    nb = s.search(torch.zeros((1, 3)), 5, exclude_rows=np.array([1]))
    assert nb.rows.tolist() == [[0, 2, -1, -1, -1]]
    assert nb.values.tolist() == [[5, 7, 0, 0, 0]]
    assert np.isinf(nb.distances.numpy()[0, 2:]).all()
    with pytest.raises(KnnlmError):
        s.search(torch.zeros((1, 4)), 2)
    with pytest.raises(KnnlmError):
        s.search(torch.full((1, 3), float("nan")), 2)
    with pytest.raises(KnnlmError):
        s.search(torch.zeros((2, 3)), 2, exclude_rows=np.array([1]))
    with pytest.raises(KnnlmError):
        TorchExactSearch(keys, np.zeros(3, np.int32), key_dtype="int8")


def write_keys(path, keys, index_metric=None):
    return array_datastore(path, keys)


def test_auto_means_faiss_only_with_an_index(tmp_path):
    from knnlm.retrieval.search.index_build import build_index

    rng = np.random.default_rng(5)
    ds = write_keys(tmp_path / "ds", rng.normal(size=(200, 8)).astype(np.float32))
    assert resolve_search("auto", ds) == "exact"
    assert open_backend(ds, "auto").describe()["search"] == "exact"
    build_index(ds, "flat", metric="ip", use_gpu=False, progress=False)
    assert resolve_search("auto", ds) == "faiss"
    exact, faiss_b = open_backend(ds, "exact"), open_backend(ds, "faiss")
    assert exact.metric == "ip"  # exact search follows the index's metric
    q = torch.from_numpy(rng.normal(size=(4, 8)).astype(np.float32))
    a, b = exact.search(q, 6), faiss_b.search(q, 6)
    assert (a.rows == b.rows).all() and (a.values == b.values).all()
    assert torch.allclose(a.distances, b.distances, rtol=1e-5)
    with pytest.raises(KnnlmError, match="--search"):
        open_backend(ds, "brute")


def test_exact_search_runs_without_faiss(tmp_path):
    from knnlm.retrieval.search.index_build import build_index

    ds = write_keys(tmp_path / "ds", np.eye(4, dtype=np.float32))
    build_index(ds, "flat", use_gpu=False, progress=False)  # an index exists, faiss does not
    code = textwrap.dedent(f"""
        import sys
        sys.modules["faiss"] = None
        import torch
        from knnlm.errors import KnnlmError
        from knnlm.retrieval.search.choose import open_backend
        import knnlm.evaluate, knnlm.generation, knnlm.experiments.projection.run
        b = open_backend({str(ds)!r}, "auto")
        assert b.describe()["search"] == "exact"
        print(b.search(torch.eye(4)[:2], 1).rows.tolist())
        try:
            open_backend({str(ds)!r}, "faiss")
        except KnnlmError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[[0], [1]]" in out.stdout and "refused: --search faiss needs" in out.stdout


def _sharded_worker(rank: int, ds: str, init: str, out: str) -> None:
    import torch.distributed as dist

    from knnlm.retrieval.search.choose import open_backend

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        data = np.load(f"{out}/queries.npz")
        lo, hi = (0, 3) if rank == 0 else (3, 8)  # ranks search different numbers of queries
        b = open_backend(ds, "exact")
        assert b.describe()["shards"] == 2
        nb = b.search(torch.from_numpy(data["q"][lo:hi]), 20, exclude_rows=data["excl"][lo:hi])
        np.savez(f"{out}/rank{rank}.npz", rows=nb.rows.numpy(), dist=nb.distances.numpy(),
                 values=nb.values.numpy())  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_search_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    rng = np.random.default_rng(6)
    keys = rng.normal(size=(101, 12)).astype(np.float16)  # 50 + 51 rows: shards smaller than k
    ds = write_keys(tmp_path / "ds", keys)
    q = rng.normal(size=(8, 12)).astype(np.float32)
    excl = np.array([0, 50, 51, -1, 100, 3, 60, 7])
    np.savez(tmp_path / "queries.npz", q=q, excl=excl)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_sharded_worker, args=(str(ds), init, str(tmp_path)), nprocs=2, join=True)
    one = open_backend(ds, "exact").search(torch.from_numpy(q), 20, exclude_rows=excl)
    parts = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    rows = np.concatenate([p["rows"] for p in parts])
    assert (rows == one.rows.numpy()).all()
    assert (np.concatenate([p["values"] for p in parts]) == one.values.numpy()).all()
    assert np.allclose(np.concatenate([p["dist"] for p in parts]), one.distances.numpy(), rtol=1e-6)
    check_against(one, brute(q, keys, "l2", excl), 20)


def test_torchrun_two_process_knnlm_perplexity_equals_one_process(
    tmp_path, lm, tiny_lm_dir, tiny_corpus
):
    """`torchrun --nproc_per_node 2 -m knnlm eval --search exact` (gloo) = one process."""
    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings

    ds = quiet_datastore(lm, tiny_corpus, tmp_path / "ds", context_len=32, batch_size=16)
    knn = KnnSettings(k=16, search="exact")
    one = evaluate(lm, str(tiny_corpus), "valid", context_len=32, batch_size=4, datastore=ds,
                   knn=knn, progress=False)  # fmt: skip
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "knnlm", "eval", "--model", str(tiny_lm_dir),
           "--corpus", str(tiny_corpus), "--datastore", str(ds), "--k", "16",
           "--context-len", "32", "--stride", "32", "--batch-size", "4", "--search", "exact",
           "--quiet",
           "--device", "cpu", "--json", str(out)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the workers too, not only torchrun
        raise
    assert p.returncode == 0, err[-2000:]
    two = json.loads(out.read_text())
    assert two["settings"]["search"]["shards"] == 2 and one["settings"]["search"]["shards"] == 1
    assert two["knnlm"]["perplexity"] == pytest.approx(one["knnlm"]["perplexity"], rel=1e-9)
    assert two["lm"]["perplexity"] == pytest.approx(one["lm"]["perplexity"], rel=1e-12)


def test_torchrun_two_process_project_equals_one_process(tmp_path, lm, tiny_lm_dir, tiny_corpus):
    """`torchrun --nproc_per_node 2 -m knnlm project --search exact` (gloo) joins the group,
    shards the search and gives the one-process projection; rank 0 alone writes and prints."""
    from knnlm.retrieval.retriever import KnnSettings, MixSettings

    ds = quiet_datastore(lm, tiny_corpus, tmp_path / "ds", context_len=32, batch_size=16)
    knn, mix = KnnSettings(k=16, search="exact"), MixSettings(knn_weight=0.5, temperature=3.0)
    one = project(lm, str(tiny_corpus), ds, context_len=32, stride=32, batch_size=4, knn=knn,
                  mix=mix, max_positions=40, max_steps=20)  # fmt: skip
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "knnlm", "project", "--model", str(tiny_lm_dir),
           "--corpus", str(tiny_corpus), "--datastore", str(ds), "--k", "16",
           "--knn-weight", "0.5", "--knn-temperature", "3.0", "--context-len", "32",
           "--stride", "32", "--batch-size", "4", "--search", "exact", "--max-positions", "40",
           "--max-steps", "20", "--quiet", "--device", "cpu", "--json", str(out)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        printed, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the workers too, not only torchrun
        raise
    assert p.returncode == 0, err[-2000:]
    two = json.loads(out.read_text())
    assert two["settings"]["search"]["shards"] == 2 and one["settings"]["search"]["shards"] == 1
    assert two["positions"] == one["positions"] == 40
    # The same neighbours; p_knn over the full vocabulary is float32 (shard-local distances
    # round differently in the last bits), so the kNN-LM agrees to float32 precision.
    assert two["knnlm"]["perplexity"] == pytest.approx(one["knnlm"]["perplexity"], rel=1e-6)
    assert two["lm"]["perplexity"] == pytest.approx(one["lm"]["perplexity"], rel=1e-12)
    for name in ("proj_f", "proj_fg"):
        assert two[name]["perplexity"] == pytest.approx(one[name]["perplexity"], rel=1e-6)
    from knnlm.report.tables import projection_tables

    assert printed.count(projection_tables(one).splitlines()[0]) == 1  # rank 0 alone prints


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW8"])
def test_factory_index_reports_recall_and_searches_through_faiss(tmp_path, factory):
    from knnlm.retrieval.search.index_build import build_index, index_summary

    rng = np.random.default_rng(8)
    ds = write_keys(tmp_path / "ds", rng.normal(size=(600, 8)).astype(np.float32))
    build_index(ds, factory=factory, nprobe=8, use_gpu=False, progress=False)
    info = json.loads((ds / "index.json").read_text())
    assert info["type"] == "factory" and info["factory"] == factory
    assert info["recall"]["k"] == 100 and info["recall"]["recall"] > 0.5
    assert "recall@100" in index_summary(ds)
    b = open_backend(ds, "auto")
    assert b.describe()["index"] == "factory" and b.describe()["exact_neighbours"] is False
    q = torch.from_numpy(rng.normal(size=(3, 8)).astype(np.float32))
    exact = open_backend(ds, "exact").search(q, 5)
    if factory.startswith("IVF"):  # nprobe = nlist: every list scanned, exact sets
        assert (b.search(q, 5).rows == exact.rows).all()
    with pytest.raises(KnnlmError, match="FAISS cannot build"):
        build_index(ds, factory="NoSuchIndex", use_gpu=False, progress=False)


def test_ivfpq_index_reports_recall(tmp_path):
    from knnlm.retrieval.search.index_build import build_index

    rng = np.random.default_rng(9)
    ds = write_keys(tmp_path / "ds", rng.normal(size=(2000, 8)).astype(np.float32))
    build_index(ds, "ivfpq", nlist=8, pq_m=4, pq_bits=4, use_gpu=False, progress=False)
    recall = json.loads((ds / "index.json").read_text())["recall"]
    assert 0.0 < recall["recall"] <= 1.0 and recall["queries"] == 256


@pytest.mark.parametrize("key_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("norm", [1.0, 300.0])  # 300: |k|^2 ~ 3e6, past float16's range
def test_one_gemm_split_path_of_the_gpu_equals_float64(key_dtype, metric, streamed, norm):
    """The GPU's one-GEMM split-precision distances ([-2 q_hi, -2 q_lo, c, c] . [k, k,
    |k|^2_hi / c, |k|^2_lo / c]^T), run on the CPU (16-bit inputs upcast, float32
    accumulation as on the GPU): sets, order and distances equal a float64 brute force of the
    rounded keys, with and without streaming, self-exclusion included."""
    rng = np.random.default_rng(10)
    keys = (rng.normal(size=(400, 32)) * norm / np.sqrt(32)).astype(np.float32)
    q = (rng.normal(size=(6, 32)) * norm / np.sqrt(32)).astype(np.float32)
    excl = np.array([3, -1, 399, 0, 17, -1])
    s = TorchExactSearch(keys, np.zeros(400, np.int32), metric, key_dtype=key_dtype,
                         chunk_rows=90, split_queries=True,
                         budget_bytes=0 if streamed else None)  # fmt: skip
    assert s.split_queries and s.resident != streamed
    assert (s.fused is not None) != streamed
    rounded = torch.from_numpy(keys).to(getattr(torch, key_dtype)).float().numpy()
    nb = s.search(torch.from_numpy(q), 12, exclude_rows=excl)
    check_against(nb, brute(q, rounded, metric, excl), 12)


def test_query_parts_sum_to_the_query():
    q = np.random.default_rng(11).normal(size=(6, 32)).astype(np.float32) * 5
    for key_dtype in ("float16", "bfloat16"):
        parts = query_parts(torch.from_numpy(q), getattr(torch, key_dtype)).float()
        total = parts.view(-1, *q.shape).sum(0).numpy()
        assert np.abs(total - q).max() <= 2.0**-20 * np.abs(q).max()
