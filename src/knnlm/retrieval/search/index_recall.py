"""Recall@k of an approximate index against exact search (stored in index.json when the index
is built): how many true neighbours the index finds."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from knnlm.retrieval.search.conventions import drop_pages, f32, log
from knnlm.retrieval.search.exact import TorchExactSearch

RECALL_BUDGET = 1 << 28  # bytes of keys the exact reference may hold (256 MiB)
RECALL_QUERIES = 256  # datastore rows used as queries (seeded), each excluding itself
RECALL_K = 100


def recall_at_k(index: Any, keys: np.ndarray, metric: str, seed: int) -> dict[str, Any]:
    """Share of the exact k nearest rows (torch exact search) the index returns, for a seeded
    sample of datastore rows as queries (each query's own row excluded from both)."""
    n = keys.shape[0]
    m, k = min(RECALL_QUERIES, n), min(RECALL_K, n - 1)
    if k < 1:
        return {"k": k, "queries": m, "recall": None}
    rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    q = f32(keys[rows])
    # keys beyond the budget stream from the memmap: the check must not hold a float32 copy of
    # a store the build itself only reads in blocks (2.5 GB at 2.44M x 256)
    exact = TorchExactSearch(keys, np.zeros(n, np.int32), metric, budget_bytes=RECALL_BUDGET)
    found = exact.search(torch.from_numpy(q), k, exclude_rows=rows)
    drop_pages(keys)
    _, got = index.search(q, k + 1)
    got = np.where(got == rows[:, None], -1, got)  # the query's own row does not count
    want = found.rows.numpy()
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(got, want, strict=True)]
    recall = float(np.sum(hits) / want.size)
    log.info("index recall@%d against exact search: %.4f (%d queries)", k, recall, m)
    return {"k": k, "queries": m, "seed": seed, "recall": recall}
