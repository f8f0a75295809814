"""Indexes from a FAISS ``index_factory`` string, and the recall@k of any approximate index
against exact search (stored in index.json when the index is built)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.retrieval.faiss_common import faiss_metric
from knnlm.retrieval.index_common import f32, log
from knnlm.retrieval.torch_search import TorchExactSearch

RECALL_QUERIES = 256  # datastore rows used as queries (seeded), each excluding itself
RECALL_K = 100


def build_factory(
    keys: np.ndarray, factory: str, metric: str, train_size: int | None, seed: int,
    chunk: int, progress: bool,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """``faiss.index_factory(d, factory, metric)`` trained on a seeded sample, keys added."""
    n, d = keys.shape
    try:
        index = faiss.index_factory(d, factory, faiss_metric(metric))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise KnnlmError(f"FAISS cannot build the index {factory!r}: {msg}") from e
    size = min(n, train_size or 100_000)
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        index.train(f32(keys[rows]))
    for s in tqdm(range(0, n, chunk), desc="factory index", disable=not progress):
        index.add(f32(keys[s : s + chunk]))
    info = {"factory": factory, "faiss_class": type(index).__name__, "train_size": size}
    ivf = _ivf_or_none(index)
    info.update(nlist=None if ivf is None else int(ivf.nlist), pq_m=None, pq_bits=None)
    return index, info


def _ivf_or_none(index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def recall_at_k(index: Any, keys: np.ndarray, metric: str, seed: int) -> dict[str, Any]:
    """Share of the exact k nearest rows (torch exact search) the index returns, for a seeded
    sample of datastore rows as queries (each query's own row excluded from both)."""
    n = keys.shape[0]
    m, k = min(RECALL_QUERIES, n), min(RECALL_K, n - 1)
    if k < 1:
        return {"k": k, "queries": m, "recall": None}
    rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    q = f32(keys[rows])
    exact = TorchExactSearch(keys, np.zeros(n, np.int32), metric).search(
        torch.from_numpy(q), k, exclude_rows=rows
    )
    _, got = index.search(q, k + 1)
    got = np.where(got == rows[:, None], -1, got)  # the query's own row does not count
    want = exact.rows.numpy()
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(got, want, strict=True)]
    recall = float(np.sum(hits) / want.size)
    log.info("index recall@%d against exact search: %.4f (%d queries)", k, recall, m)
    return {"k": k, "queries": m, "seed": seed, "recall": recall}
