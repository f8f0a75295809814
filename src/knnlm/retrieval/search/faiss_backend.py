"""The FAISS backend (``--search faiss``): the datastore's saved index behind the one interface.

Wraps :class:`knnlm.retrieval.search.Searcher`: the index (IVF-PQ, flat, or a factory string),
re-ranked with exact distances by default; without an index, ``faiss.knn`` brute force. The
search runs on the host (or FAISS's own GPU copy); results come back on the queries' device.
Importing this module needs faiss (through :mod:`knnlm.retrieval.search.saved_index`);
:mod:`knnlm.retrieval.search.choose` imports it guarded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.retrieval.search.conventions import check_k
from knnlm.retrieval.search.exact import check_queries
from knnlm.retrieval.search.protocol import Neighbours
from knnlm.retrieval.search.saved_index import Searcher

K_UNBOUNDED = 1 << 30  # the interface takes k per call; Searcher's own cap is not used


class FaissBackend:
    kind = "faiss"
    device = torch.device("cpu")  # FAISS takes host arrays (it may copy them to its GPU index)

    def __init__(
        self,
        ds_dir: str | Path,
        *,
        metric: str | None = None,
        nprobe: int | None = None,
        recompute: bool = True,
        progress: bool = False,
        use_gpu: bool | str = "auto",
    ) -> None:
        self.searcher = Searcher(ds_dir, K_UNBOUNDED, nprobe=nprobe, recompute=recompute,
                                 metric=metric, use_gpu=use_gpu, progress=progress)  # fmt: skip
        self.metric, self.n, self.dim = self.searcher.metric, self.searcher.n, self.searcher.dim
        vpath = Path(ds_dir) / "values.npy"
        vals = np.load(vpath, mmap_mode="r") if vpath.is_file() else np.zeros(self.n, np.int32)
        self.values = torch.from_numpy(np.array(vals))

    def search(self, queries: torch.Tensor, k: int, exclude_rows: Any = None) -> Neighbours:
        k = check_k(k)
        check_queries(queries, self.dim)
        excl = None
        if exclude_rows is not None:
            excl = exclude_rows.cpu().numpy() if torch.is_tensor(exclude_rows) else exclude_rows
        q = queries.detach().float().cpu().numpy()
        d, rows = self.searcher.search(q, k, exclude_ids=excl)
        nb = Neighbours.lookup(torch.from_numpy(d), torch.from_numpy(rows), self.values)
        return nb.to(queries.device)

    def describe(self) -> dict[str, Any]:
        idx = self.searcher.index
        return {
            "search": "faiss",
            "engine": "faiss",
            "index": idx.kind if idx is not None else "none (faiss.knn brute force)",
            "device": "gpu" if idx is not None and idx.on_gpu else "cpu",
            "nprobe": idx.nprobe if idx is not None else None,
            "metric": self.metric,
            "exact_neighbours": idx is None or idx.kind == "flat",
            "exact_distances": self.searcher.exact,
        }
