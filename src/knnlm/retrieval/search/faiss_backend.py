"""The FAISS backend (``--search faiss``): the datastore's saved index behind the one interface.

The index (IVF-PQ, flat, or a factory string) is searched for the k nearest rows, and by
default their distances are replaced by exact ones from the stored keys and re-sorted (exact
re-ranking, :mod:`knnlm.retrieval.search.rerank`). Brute force without an index is exact
search (:mod:`knnlm.retrieval.search.exact_faiss`).
The search runs on the host (or FAISS's own GPU copy); results come back on the queries' device.
Distances follow :mod:`knnlm.retrieval.search.conventions` (smaller is closer; ip = negated
inner product; missing neighbours are -1 / +inf).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.retrieval.exclusion import drop_rows, exclusion_tensor
from knnlm.retrieval.search.conventions import (
    as_queries,
    check_k,
    check_metric,
    open_keys,
)
from knnlm.retrieval.search.faiss_lib import require_faiss
from knnlm.retrieval.search.protocol import Neighbours, check_queries, pad_columns
from knnlm.retrieval.search.rerank import (
    KeyStore,
    distances_by_idx,
    recompute_distances,
    refine,
    rows_distances,
)
from knnlm.retrieval.search.saved_index import KnnIndex, search_index


class FaissBackend:
    """k-nearest-neighbour search over a datastore's saved index.

    ``recompute`` (default on) replaces the index's distances by exact ones from the stored keys
    and re-sorts; exact search is always exact. ``keys_in_ram`` ("auto": when they fit the
    re-ranking RAM budget) holds the keys in RAM for a fused FAISS re-ranking; otherwise rows
    are gathered from the memmap per batch. ``metric`` defaults to the index's metric; asking
    for another metric than the index's is an error.
    """

    kind = "faiss"
    device = torch.device("cpu")
    chosen: dict[
        str, Any
    ] = {}  # why open_backend chose it (knnlm.retrieval.search.choose)  # FAISS takes host arrays (it may copy them to its GPU index)

    def __init__(
        self,
        ds_dir: str | Path,
        *,
        metric: str | None = None,
        nprobe: int | None = None,
        recompute: bool = True,
        progress: bool = False,
        use_gpu: bool | str = "auto",
        keys_in_ram: bool | str = "auto",
    ) -> None:
        require_faiss("--search faiss")
        self.ds_dir = Path(ds_dir)
        self.keys, self.meta = open_keys(self.ds_dir)
        self.n, self.dim = self.keys.shape
        self.recompute = recompute
        self.progress = progress
        self.index = KnnIndex.load(self.ds_dir, nprobe=nprobe, use_gpu=use_gpu, keys=self.keys)
        if metric is not None and check_metric(metric) != self.index.metric:
            raise KnnlmError(
                f"the index in {self.ds_dir} uses metric {self.index.metric!r}, not "
                f"{metric!r}; rebuild it with that metric or leave metric unset"
            )
        self.metric = self.index.metric
        self.refined = self._make_refined(keys_in_ram) if recompute else None
        vpath = self.ds_dir / "values.npy"
        vals = np.load(vpath, mmap_mode="r") if vpath.is_file() else np.zeros(self.n, np.int32)
        self.values = torch.from_numpy(np.array(vals))

    def _make_refined(self, keys_in_ram: bool | str) -> Any:
        """IndexRefine(flat index, itself), a KeyStore (keys in RAM), or None (memmap path)."""
        idx = self.index
        # A flat index holds the keys, unless a PCA stores their projections.
        flat_keys = idx.kind == "flat" and not idx.info.get("pca")
        if flat_keys and not idx.on_gpu and keys_in_ram is not False:
            return refine(idx.faiss_index, idx.faiss_index)
        return KeyStore.maybe(self.keys, self.metric, keys_in_ram)

    @property
    def exact(self) -> bool:
        """True when every returned distance is exact."""
        return self.recompute

    def nearest(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dist float32 (n, k'), ids int64 (n, k')), k' = min(k, N), of float32 queries."""
        if self.refined is not None and not isinstance(self.refined, KeyStore):
            return search_index(self.refined, self.index, q, k)  # a flat index, refined
        dist, ids = self.index.search(q, k)
        if self.recompute:
            if isinstance(self.refined, KeyStore):
                return self.refined.rerank(q, ids)
            dist, ids = recompute_distances(self.keys, q, ids, self.metric)
        return dist, ids

    def search(self, queries: torch.Tensor, k: int, exclude_rows: Any = None) -> Neighbours:
        """The k nearest rows; each query's ``exclude_rows`` entry (-1 = none) is dropped from
        its neighbours (k + 1 are searched so exactly k columns remain); k > N pads -1 / +inf."""
        k = check_k(k)
        check_queries(queries, self.dim)
        excl = exclusion_tensor(exclude_rows, queries.shape[0], self.device)
        q = as_queries(queries.detach().float().cpu().numpy(), self.dim)
        dist, ids = self.nearest(q, min(k + (excl is not None), self.n))
        d, rows = torch.from_numpy(dist), torch.from_numpy(ids)
        if excl is not None:
            d, rows = drop_rows(d, rows, excl)
        d, rows = pad_columns(d, rows, k)
        return Neighbours.lookup(d, rows, self.values).to(queries.device)

    def row_distances(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(m, k) exact distances of ``queries`` to the given stored ``rows`` (-1: +inf), as
        re-ranking computes them: one parallel FAISS pass over the keys in RAM when held there,
        else over blocks gathered from the memmap (RetoMaton's pointed-to rows)."""
        q = as_queries(queries.detach().float().cpu().numpy(), self.dim)
        ids = np.ascontiguousarray(rows.cpu().numpy(), dtype=np.int64)
        if isinstance(self.refined, KeyStore):
            dist = distances_by_idx(q, self.refined.keys, ids, self.metric)
        else:
            dist = rows_distances(self.keys, q, ids, self.metric)
        return torch.from_numpy(dist)

    def describe(self) -> dict[str, Any]:
        idx = self.index
        return {
            "search": "faiss",
            "engine": "faiss",
            "index": idx.kind,
            "device": "gpu" if idx.on_gpu else "cpu",
            "nprobe": idx.nprobe,
            "metric": self.metric,
            "exact_neighbours": idx.kind == "flat" and not idx.info.get("pca"),
            "exact_distances": self.exact,
            **self.chosen,
        }
