"""The FAISS backend (``--search faiss``): the datastore's saved index behind the one interface.

The index (IVF-PQ, flat, or a factory string) is searched for the k nearest rows, and by
default their distances are replaced by exact ones from the stored keys and re-sorted (exact
re-ranking, :mod:`knnlm.retrieval.search.rerank`). Without an index, ``faiss.knn`` brute force.
The search runs on the host (or FAISS's own GPU copy); results come back on the queries' device.
Distances follow :mod:`knnlm.retrieval.search.conventions` (smaller is closer; ip = negated
inner product; missing neighbours are -1 / +inf).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.retrieval.exclusion import drop_rows, exclusion_tensor
from knnlm.retrieval.search.conventions import (
    INDEX_FILE,
    INDEX_META,
    PARTIAL_FILE,
    PENDING_META,
    as_queries,
    check_k,
    check_metric,
    f32,
    log,
    mark_missing,
    open_keys,
    pad,
)
from knnlm.retrieval.search.faiss_lib import faiss, faiss_metric, require_faiss
from knnlm.retrieval.search.protocol import Neighbours, check_queries, pad_columns
from knnlm.retrieval.search.rerank import KeyStore, recompute_distances, refine
from knnlm.retrieval.search.saved_index import KnnIndex, search_index

# A brute-force scan of this many keys per batch is slow enough to deserve a warning (~1 GB of
# float16 keys at d = 512); below it, an exact scan is a reasonable way to search.
BRUTE_FORCE_WARN_KEYS = 1_000_000


class FaissBackend:
    """k-nearest-neighbour search over a datastore: its saved index if any, else exact search.

    ``recompute`` (default on) replaces the index's distances by exact ones from the stored keys
    and re-sorts; exact search is always exact. ``keys_in_ram`` ("auto": when they fit the
    re-ranking RAM budget) holds the keys in RAM for a fused FAISS re-ranking; otherwise rows
    are gathered from the memmap per batch. ``metric`` defaults to the index's metric
    (``"l2"`` without an index); asking for another metric than the index's is an error.
    """

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
        keys_in_ram: bool | str = "auto",
    ) -> None:
        require_faiss("--search faiss")
        self.ds_dir = Path(ds_dir)
        self.keys, self.meta = open_keys(self.ds_dir)
        self.n, self.dim = self.keys.shape
        self.recompute = recompute
        self.progress = progress
        self.index: KnnIndex | None = None
        self.refined: Any = None
        has_meta = (self.ds_dir / INDEX_META).is_file() or (self.ds_dir / PENDING_META).is_file()
        if (self.ds_dir / INDEX_FILE).is_file() and has_meta:
            self.index = KnnIndex.load(self.ds_dir, nprobe=nprobe, use_gpu=use_gpu, keys=self.keys)
            if metric is not None and check_metric(metric) != self.index.metric:
                raise KnnlmError(
                    f"the index in {self.ds_dir} uses metric {self.index.metric!r}, not "
                    f"{metric!r}; rebuild it with that metric or leave metric unset"
                )
            self.metric = self.index.metric
            if recompute:
                self.refined = self._make_refined(keys_in_ram)
        else:
            self.metric = check_metric(metric or "l2")
            self._warn_brute_force()
        vpath = self.ds_dir / "values.npy"
        vals = np.load(vpath, mmap_mode="r") if vpath.is_file() else np.zeros(self.n, np.int32)
        self.values = torch.from_numpy(np.array(vals))

    def _make_refined(self, keys_in_ram: bool | str) -> Any:
        """IndexRefine(index, keys) for a fused exact re-ranking, or None (memmap path)."""
        idx = self.index
        # A flat index holds the keys, unless a PCA stores their projections.
        flat_keys = idx.kind == "flat" and not idx.info.get("pca")
        if flat_keys and not idx.on_gpu and keys_in_ram is not False:
            return refine(idx.faiss_index, idx.faiss_index)
        store = KeyStore.maybe(self.keys, self.metric, keys_in_ram)
        return None if store is None else refine(idx.faiss_index, store.index)

    def _warn_brute_force(self) -> None:
        """Say why every batch scans all keys: a warning when an index build was cut short or
        the store is large enough for the scan to be slow; a note in the log otherwise (small
        stores, e.g. one per Macondo checkpoint, are meant to be searched this way)."""
        partial = (self.ds_dir / PARTIAL_FILE).is_file() or (self.ds_dir / INDEX_FILE).is_file()
        why = (
            "the index build did not finish"
            if partial
            else "it has no index (build one with `knnlm datastore index`)"
        )
        level = logging.WARNING if partial or self.n >= BRUTE_FORCE_WARN_KEYS else logging.INFO
        log.log(level, "searching %s exactly: %s; every batch scans all %d keys",
                self.ds_dir, why, self.n)  # fmt: skip

    @property
    def exact(self) -> bool:
        """True when every returned distance is exact."""
        return self.index is None or self.recompute

    def nearest(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dist float32 (n, k'), ids int64 (n, k')), k' = min(k, N), of float32 queries."""
        if self.index is None:
            return exact_search(self.keys, q, k, self.metric, progress=self.progress)
        if self.refined is not None:
            return search_index(self.refined, self.index, q, k)
        dist, ids = self.index.search(q, k)
        if self.recompute:
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

    def describe(self) -> dict[str, Any]:
        idx = self.index
        return {
            "search": "faiss",
            "engine": "faiss",
            "index": idx.kind if idx is not None else "none (faiss.knn brute force)",
            "device": "gpu" if idx is not None and idx.on_gpu else "cpu",
            "nprobe": idx.nprobe if idx is not None else None,
            "metric": self.metric,
            "exact_neighbours": idx is None or idx.kind == "flat",
            "exact_distances": self.exact,
        }


def _merge_topk(
    d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of two (n, *) candidate lists, sorted ascending."""
    d = np.concatenate([d1, d2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    if d.shape[1] > k:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        d = np.take_along_axis(d, part, axis=1)
        i = np.take_along_axis(i, part, axis=1)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def exact_search(
    keys: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str = "l2",
    chunk: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest neighbours over all datastore rows, memory bounded.

    The rows are scanned in chunks (float32 per chunk, ``faiss.knn`` on each), the running top-k
    merged with vectorised numpy, and the final distances recomputed exactly
    (:func:`recompute_distances`). ``k`` may exceed N: the extra columns are -1 / +inf.
    """
    check_metric(metric)
    k = check_k(k)
    n_keys, d = keys.shape
    q = as_queries(queries, d)
    n = q.shape[0]
    if chunk is None:
        chunk = max(4096, (1 << 25) // max(1, d))  # ~128 MiB of float32 rows
    if chunk < 1:
        raise KnnlmError(f"chunk must be positive, got {chunk}")
    best_d = np.empty((n, 0), dtype=np.float32)
    best_i = np.empty((n, 0), dtype=np.int64)
    starts = range(0, n_keys, chunk)
    for s in tqdm(starts, desc="exact search", unit="chunk", disable=not progress):
        x = f32(keys[s : s + chunk])
        kk = min(k, x.shape[0])
        cd, ci = faiss.knn(q, x, kk, metric=faiss_metric(metric))
        if metric == "ip":
            cd = -cd
        ci = ci.astype(np.int64)
        # FAISS marks a missing neighbour -1: it must stay -1, not become row s - 1.
        cd, ci = mark_missing(cd, ci)
        best_d, best_i = _merge_topk(best_d, best_i, cd, np.where(ci < 0, -1, ci + s), k)
    dist, ids = recompute_distances(keys, q, best_i, metric)
    return pad(dist, ids, k)
