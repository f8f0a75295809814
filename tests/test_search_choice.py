"""What ``--search auto`` picks per device, index and FAISS presence, and the faiss.knn exact
engine it picks on the CPU checked against torch exact search (sets, order, ties by row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnlm.retrieval.search import choose
from knnlm.retrieval.search.choose import StoreFacts, choose_search, open_backend
from knnlm.retrieval.search.exact import TorchExactSearch
from knnlm.retrieval.search.exact_faiss import FaissExactSearch
from knnlm.retrieval.search.index_build import build_index
from tiny import array_datastore

N, D = 500_000, 256
GB = 1 << 30
IVF = {"type": "ivfpq", "pq_m": 64, "scan_fraction": 0.008}


def facts(device="cpu", index=None, faiss=True, budget=64 * GB, n=N, ranks=1, cores=2):
    return StoreFacts(device_type=device, n=n, dim=D, file_itemsize=2, budget=budget,
                      index=index, faiss=faiss, ranks=ranks, cores=cores)  # fmt: skip


@pytest.mark.parametrize(
    ("search", "f", "want"),
    [
        ("auto", facts("cpu"), ("exact", "faiss.knn")),
        ("auto", facts("cpu", n=1000), ("exact", "torch")),  # small: the same as exact
        ("auto", facts("cpu", faiss=False), ("exact", "torch")),
        ("auto", facts("cpu", budget=N * D * 2), ("exact", "torch (streamed)")),
        ("auto", facts("cpu", index=IVF), ("faiss", "faiss index")),
        ("auto", facts("cpu", index=IVF, faiss=False), ("exact", "torch")),
        ("auto", facts("cuda", index=IVF), ("exact", "torch")),  # fits: the GPU, not the index
        ("auto", facts("cuda"), ("exact", "torch")),
        ("auto", facts("cuda", budget=GB // 8), ("exact", "torch (streamed)")),  # no index
        # 100M keys beyond the GPU: streaming 51 GB a call loses to a 0.8% IVF-PQ scan on
        # 16 cores, and wins against the same scan on 2 cores
        (
            "auto",
            facts("cuda", index=IVF, budget=GB, n=100_000_000, cores=16),
            ("faiss", "faiss index"),
        ),
        (
            "auto",
            facts("cuda", index=IVF, budget=GB, n=100_000_000, cores=2),
            ("exact", "torch (streamed)"),
        ),
        # a flat index scans everything on 2 cores: streaming to the GPU wins
        (
            "auto",
            facts("cuda", index={"type": "flat"}, budget=GB // 8),
            ("exact", "torch (streamed)"),
        ),  # noqa: E501
        ("auto", facts("cpu", ranks=2), ("exact", "torch")),  # sharded over the ranks
        ("exact", facts("cpu"), ("exact", "torch")),
        ("exact", facts("cpu", index=IVF), ("exact", "torch")),
        ("faiss", facts("cpu"), ("exact", "faiss.knn")),  # no index: FAISS brute force
        ("faiss", facts("cuda", index=IVF), ("faiss", "faiss index")),
    ],
)
def test_auto_picks_per_device_index_and_faiss(search, f, want):
    c = choose_search(search, f)
    assert (c.search, c.engine) == want
    assert c.why and "\n" not in c.why


def test_open_backend_records_the_choice_and_runs_without_faiss(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    ds = array_datastore(tmp_path / "ds", rng.normal(size=(300, 8)).astype(np.float32))
    assert open_backend(ds, "auto").describe()["engine"] == "torch"  # small: same as exact
    monkeypatch.setattr(choose, "FAISS_KNN_MIN_KEYS", 300)
    d = open_backend(ds, "auto").describe()
    assert (d["engine"], d["requested"]) == ("faiss.knn", "auto") and "no index" in d["why"]
    monkeypatch.setattr(choose, "has_faiss", lambda: False)
    assert open_backend(ds, "auto").describe()["engine"] == "torch"
    monkeypatch.setattr(choose, "has_faiss", lambda: True)
    build_index(ds, "flat", use_gpu=False, progress=False)
    d = open_backend(ds, "auto").describe()
    assert (d["search"], d["index"]) == ("faiss", "flat") and "index" in d["why"]
    monkeypatch.setattr(choose, "has_faiss", lambda: False)
    assert open_backend(ds, "auto").describe()["engine"] == "torch"


def _pair(keys: np.ndarray, metric: str) -> tuple[FaissExactSearch, TorchExactSearch]:
    values = np.arange(len(keys), dtype=np.int32) % 7
    return FaissExactSearch(keys, values, metric), TorchExactSearch(keys, values, metric)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_knn_equals_torch_exact_with_ties(metric):
    """Small integer keys and queries: every distance is exact in float32 on both paths and
    ties are everywhere, so both must return the same rows in the same (distance, row) order,
    with the same distances, excluded rows dropped, k > N padded."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n, d = int(rng.integers(5, 400)), int(rng.integers(1, 6))
        keys = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
        q = torch.from_numpy(rng.integers(-2, 3, size=(int(rng.integers(1, 40)), d)))
        q = q.float()
        excl = rng.integers(-1, n, size=q.shape[0]) if seed % 2 else None
        fx, tx = _pair(keys, metric)
        for k in (1, 3, int(rng.integers(1, n + 1)), n + 4):
            a, b = fx.search(q, k, excl), tx.search(q, k, excl)
            assert torch.equal(a.rows, b.rows), (seed, k)
            assert torch.equal(a.distances, b.distances) and torch.equal(a.values, b.values)


def test_faiss_knn_equals_torch_exact_on_gaussian_keys():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(3000, 32)).astype(np.float32)
    q = torch.from_numpy(rng.normal(size=(50, 32)).astype(np.float32))
    fx, tx = _pair(keys, "l2")
    a, b = fx.search(q, 64, np.arange(50)), tx.search(q, 64, np.arange(50))
    assert torch.equal(a.rows, b.rows)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-5, atol=1e-4)


class CountingSearch:
    """A toy backend: torch exact search that counts its calls, added through the one
    registration point (register_backend) only."""

    kind = "toy"

    def __init__(self, ds_dir, **options):
        from knnlm.retrieval.search.sharded import open_exact

        self.inner = open_exact(ds_dir, device=options["device"], metric=options["metric"])
        self.metric, self.n, self.dim = self.inner.metric, self.inner.n, self.inner.dim
        self.device, self.calls = self.inner.device, 0

    def search(self, queries, k, exclude_rows=None):
        self.calls += 1
        return self.inner.search(queries, k, exclude_rows)

    def describe(self):
        return {"search": "toy", "engine": "counting torch", "calls": self.calls, **self.chosen}


def test_a_toy_backend_registers_and_evaluate_uses_it(tmp_path, monkeypatch, lm, tiny_corpus):
    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings
    from knnlm.retrieval.search import protocol
    from knnlm.retrieval.search.protocol import register_backend
    from tiny import quiet_datastore

    monkeypatch.setattr(protocol, "REGISTERED", {})
    monkeypatch.setattr(choose, "REGISTERED", protocol.REGISTERED)
    ds = quiet_datastore(lm, tiny_corpus, tmp_path / "ds", context_len=32, batch_size=16)
    run = dict(context_len=32, batch_size=4, datastore=ds, progress=False)
    with pytest.raises(Exception, match="^search must be one of"):
        KnnSettings(k=8, search="toy")
    register_backend("toy", CountingSearch)
    toy = evaluate(lm, str(tiny_corpus), "valid", knn=KnnSettings(k=8, search="toy"), **run)
    exact = evaluate(lm, str(tiny_corpus), "valid", knn=KnnSettings(k=8, search="exact"), **run)
    assert toy["settings"]["search"]["search"] == "toy"
    assert (
        toy["settings"]["search"]["calls"] > 0 and toy["settings"]["search"]["requested"] == "toy"
    )
    assert toy["knnlm"]["perplexity"] == exact["knnlm"]["perplexity"]
