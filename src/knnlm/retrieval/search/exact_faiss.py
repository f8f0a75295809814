"""Exact search on the CPU through ``faiss.knn`` over the keys held in RAM as float32.

The same neighbours as :class:`knnlm.retrieval.search.exact.TorchExactSearch` (exact sets, ties
broken by row id), about twice as fast on the CPU (``benchmarks/results/search_cpu.json``):
FAISS's blocked BLAS scan keeps a heap of the k best per query instead of writing and
selecting from a (B, C) score block. FAISS breaks ties between equal distances its own way, so
k + 1 neighbours are searched: where the (k+1)-th distance equals the k-th (rare; only exact
duplicates of a distance), the query is redone by the torch search, which orders ties by
row; elsewhere the k are sorted by (distance, row). Distances are FAISS's float32 expansion
|q|^2 - 2 q.k + |k|^2 (clamped at 0), like the torch search's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from knnlm.retrieval.exclusion import drop_rows, exclusion_tensor
from knnlm.retrieval.search.conventions import check_k, check_metric, f32
from knnlm.retrieval.search.exact import TorchExactSearch, order
from knnlm.retrieval.search.faiss_lib import faiss, faiss_metric, require_faiss
from knnlm.retrieval.search.protocol import Neighbours, check_queries, pad_columns

BLOCK_ROWS = 1 << 16  # rows converted to float32 at a time when the keys are loaded


class FaissExactSearch:
    """Brute-force search of all of a datastore's ``keys`` with ``faiss.knn`` on the CPU.

    ``keys``: (N, d) float16/float32 array (the datastore's memmap), copied once to float32;
    ``values``: the datastore's values (for the lookup).
    """

    kind = "exact"
    device = torch.device("cpu")
    chosen: dict[str, Any] = {}

    def __init__(self, keys: np.ndarray, values: np.ndarray, metric: str = "l2") -> None:
        require_faiss("faiss.knn exact search")
        self.metric = check_metric(metric)
        self.n, self.dim = keys.shape
        self.keys = np.empty((self.n, self.dim), dtype=np.float32)
        for s in range(0, self.n, BLOCK_ROWS):
            self.keys[s : s + BLOCK_ROWS] = keys[s : s + BLOCK_ROWS]
        self.values = torch.as_tensor(np.array(values) if not torch.is_tensor(values) else values)
        # ties at the k-th place are redone here, over the same float32 keys (no copy)
        self.torch_search = TorchExactSearch(torch.from_numpy(self.keys), self.values, metric)

    def search(self, queries: torch.Tensor, k: int, exclude_rows: Any = None) -> Neighbours:
        """The k nearest rows of each query, on the queries' device (k > N pads -1 / +inf)."""
        k = check_k(k)
        check_queries(queries, self.dim)
        excl = exclusion_tensor(exclude_rows, queries.shape[0], self.device)
        q = f32(queries.detach().float().cpu().numpy())
        kk = min(k + 1 + (excl is not None), self.n)  # one more: is the k-th place tied?
        dist, ids = faiss.knn(q, self.keys, kk, metric=faiss_metric(self.metric))
        d = torch.from_numpy(-dist if self.metric == "ip" else dist)
        rows = torch.from_numpy(ids.astype(np.int64))
        d = d.masked_fill(rows < 0, float("inf"))
        if excl is not None:
            d, rows = drop_rows(d, rows, excl)
        d, rows = order(d, rows)
        tied = torch.zeros(q.shape[0], dtype=torch.bool)
        if d.shape[1] > k:
            tied = (d[:, k] == d[:, k - 1]) & torch.isfinite(d[:, k])
        d, rows = pad_columns(d[:, :k], rows[:, :k], k)
        rows = rows.masked_fill(torch.isinf(d), -1)
        if self.metric == "l2":
            d = d.clamp(min=0)
        if tied.any():
            idx = tied.nonzero().squeeze(1)
            redo = self.torch_search.search(
                queries.detach().cpu()[idx], k, None if excl is None else excl[idx]
            )
            d[idx], rows[idx] = redo.distances, redo.rows
        return Neighbours.lookup(d, rows, self.values).to(queries.device)

    def describe(self) -> dict[str, Any]:
        return {
            "search": "exact",
            "engine": "faiss.knn",
            "device": "cpu",
            "key_dtype": "float32",
            "keys_resident": True,
            "metric": self.metric,
            "shards": 1,
            "exact_neighbours": True,
            "exact_distances": False,  # the float32 expansion, ~1e-6 relative
            **self.chosen,
        }
