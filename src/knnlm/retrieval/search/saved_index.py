"""Searching a datastore: its saved FAISS index (exactly re-ranked by default) or brute force.

Distances follow :mod:`knnlm.retrieval.search.conventions` (smaller is closer; ip = negated inner
product; missing neighbours are -1 / +inf).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.fileio import file_sha256
from knnlm.retrieval.search.conventions import (
    INDEX_FILE,
    INDEX_META,
    PARTIAL_FILE,
    PENDING_META,
    as_queries,
    check_k,
    check_metric,
    datastore_fingerprint,
    f32,
    log,
    mark_missing,
    open_keys,
    pad,
)
from knnlm.retrieval.search.faiss_lib import GPU_MAX_K, faiss_metric, to_gpu
from knnlm.retrieval.search.pca import base_index
from knnlm.retrieval.search.rerank import KeyStore, recompute_distances, refine

# A brute-force scan of this many keys per batch is slow enough to deserve a warning (~1 GB of
# float16 keys at d = 512); below it, an exact scan is a reasonable way to search.
BRUTE_FORCE_WARN_KEYS = 1_000_000

# --------------------------------------------------------------------------- exact search


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


# --------------------------------------------------------------------------- the saved index


def read_index_meta(ds: Path) -> dict[str, Any]:
    """index.json, or the pending metadata of an interrupted commit when the index file in
    place is the one it names (checked by SHA-256); refuses a pair that does not match."""
    path, meta_path, pending = ds / INDEX_FILE, ds / INDEX_META, ds / PENDING_META
    candidates = [p for p in (pending, meta_path) if p.is_file()]
    if not path.is_file() or not candidates:
        raise KnnlmError(f"no index in {ds} (run `knnlm datastore index {ds}`, or search exactly)")
    try:
        metas = [json.loads(p.read_text()) for p in candidates]
    except (OSError, ValueError) as e:
        raise KnnlmError(f"cannot read the index metadata in {ds}: {e}") from e
    if any(not isinstance(m, dict) for m in metas):
        raise KnnlmError(f"the index metadata in {ds} is not a JSON object; rebuild the index")
    if pending.is_file():  # a commit was interrupted: believe the metadata the file matches
        digest = file_sha256(path)
        for m in metas:
            if m.get("index_sha256") == digest:
                return m
        raise KnnlmError(
            f"the index in {ds} does not match its metadata (an interrupted build); "
            f"rerun `knnlm datastore index {ds}`"
        )
    info = metas[0]
    size = info.get("index_bytes")
    if size is not None and path.stat().st_size != size:
        raise KnnlmError(
            f"{path} has {path.stat().st_size} bytes but index.json says {size}; rebuild the index"
        )
    return info


def _check_against(ds: Path, index: Any, info: dict[str, Any], keys: np.ndarray | None) -> None:
    """The FAISS object, its metadata and the datastore must agree on type, metric, n, dim."""
    kind, metric = info.get("type"), info.get("metric")
    problems = []
    if (base_index(index) is not index) != bool(info.get("pca")):
        problems.append("index.json and the file disagree on the PCA in front of the index")
    index = base_index(index)
    if info.get("status") != "complete":
        problems.append("the index build did not complete")
    if kind == "flat":
        ok_type = isinstance(index, faiss.IndexFlat)
    elif kind == "ivfpq":
        ok_type = isinstance(index, faiss.IndexIVFPQ) and index.nlist == info.get("nlist")
        ok_type = ok_type and index.pq.M == info.get("pq_m")
    elif kind == "factory":
        ok_type = type(index).__name__ == info.get("faiss_class")
    else:
        ok_type = False
    if not ok_type:
        problems.append(f"index.json says type {kind!r} but the file holds {type(index).__name__}")
    if metric not in ("l2", "ip") or index.metric_type != faiss_metric(metric):
        problems.append(f"index.json says metric {metric!r}, the file another")
    if index.ntotal != info.get("n") or index.d != (info.get("pca") or info.get("dim")):
        problems.append(
            f"the file holds {index.ntotal} x {index.d}, index.json says "
            f"{info.get('n')} x {info.get('dim')}"
        )
    if keys is not None and (keys.shape[0], keys.shape[1]) != (index.ntotal, info.get("dim")):
        problems.append(f"the datastore holds {keys.shape[0]} x {keys.shape[1]} keys")
    if problems:
        raise KnnlmError(f"the index in {ds} does not fit: {'; '.join(problems)}; rebuild it")
    if (ds / "meta.json").is_file() and info.get("datastore_fingerprint") != datastore_fingerprint(
        ds
    ):
        raise KnnlmError(f"the datastore in {ds} changed after its index was built; rebuild it")


class KnnIndex:
    """A saved FAISS index of a datastore, ready to search (on the GPU when available)."""

    def __init__(self, index: Any, info: dict[str, Any], res: Any = None) -> None:
        self._index = index
        self._res = res
        self.info = info
        self.metric: str = info["metric"]
        self.kind: str = info["type"]
        self.n: int = int(info["n"])
        self.dim: int = int(info["dim"])
        self.nprobe: int | None = None

    @classmethod
    def load(
        cls,
        ds_dir: str | Path,
        nprobe: int | None = None,
        use_gpu: bool | str = "auto",
        keys: np.ndarray | None = None,
    ) -> KnnIndex:
        """Load and cross-check (type, metric, n, dim against index.json and, when given or
        present, the datastore's keys); a mismatch is a one-line KnnlmError."""
        ds = Path(ds_dir)
        info = read_index_meta(ds)
        try:
            index = faiss.read_index(str(ds / INDEX_FILE))
        except (OSError, ValueError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KnnlmError(f"cannot read the index in {ds}: {msg}") from e
        if keys is None and (ds / "keys.npy").is_file():
            keys = open_keys(ds)[0]
        _check_against(ds, index, info, keys)
        index, res = to_gpu(index, use_gpu)
        self = cls(index, info, res)
        if self.kind == "ivfpq" or info.get("nlist"):  # IVF (a factory string may make one)
            self.set_nprobe(int(info.get("nprobe") or 32) if nprobe is None else nprobe)
        return self

    @property
    def on_gpu(self) -> bool:
        return self._res is not None

    @property
    def faiss_index(self) -> Any:
        return self._index

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists visited per query (IVF only; capped at nlist)."""
        if not self.info.get("nlist"):  # not an IVF index
            return
        if not isinstance(nprobe, (int, np.integer)) or isinstance(nprobe, bool) or nprobe < 1:
            raise KnnlmError(f"nprobe must be a positive integer, got {nprobe!r}")
        self.nprobe = min(int(nprobe), int(self.info["nlist"]))
        if self._res is not None:
            faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", self.nprobe)
        else:
            faiss.extract_index_ivf(self._index).nprobe = self.nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dist float32 (n, k), ids int64 (n, k)); smaller distance is closer, missing = -1/+inf.

        Distances are the index's own (PQ-approximate for IVF-PQ); see :class:`Searcher`.
        """
        return _search(self._index, self, queries, k)


def _search(index: Any, meta: KnnIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    k = check_k(k)
    q = as_queries(queries, meta.dim)
    kk = min(k, meta.n)
    if meta.on_gpu and kk > GPU_MAX_K:
        raise KnnlmError(f"k={k} exceeds the FAISS GPU limit {GPU_MAX_K}; load with use_gpu=False")
    if q.shape[0] == 0:
        dist, ids = np.empty((0, kk), np.float32), np.empty((0, kk), np.int64)
    else:
        dist, ids = index.search(q, kk)
    if meta.metric == "ip":
        dist = -dist
    return pad(*mark_missing(dist, ids), k)


# --------------------------------------------------------------------------- the searcher


class Searcher:
    """k-nearest-neighbour search over a datastore: its saved index if any, else exact search.

    ``recompute`` (default on) replaces the index's distances by exact ones from the stored keys
    and re-sorts (exact re-ranking, :mod:`knnlm.retrieval.search.rerank`); exact search is always
    exact. ``keys_in_ram`` ("auto": when they fit the re-ranking RAM budget) holds the keys in
    RAM for a fused FAISS re-ranking; otherwise rows are gathered from the memmap per batch.
    ``metric`` defaults to the index's metric (``"l2"`` without an index); asking for another
    metric than the index's is an error. Without a complete index, a warning says that every
    batch scans all N keys.
    """

    def __init__(
        self,
        ds_dir: str | Path,
        k_max: int,
        nprobe: int | None = None,
        recompute: bool = True,
        metric: str | None = None,
        use_gpu: bool | str = "auto",
        progress: bool = False,
        keys_in_ram: bool | str = "auto",
    ) -> None:
        self.ds_dir = Path(ds_dir)
        self.k_max = check_k(k_max)
        self.keys, self.meta = open_keys(self.ds_dir)
        self.n, self.dim = self.keys.shape
        self.recompute = recompute
        self.progress = progress
        self.index: KnnIndex | None = None
        self._refined: Any = None
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
                self._refined = self._make_refined(keys_in_ram)
        else:
            self.metric = check_metric(metric or "l2")
            self._warn_brute_force()

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

    def search(
        self, queries: np.ndarray, k: int | None = None, exclude_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k (default k_max) nearest keys: (dist float32 (n, k), ids int64 (n, k)).

        ``exclude_ids`` (int64 (n,), -1 = none): each query's own datastore row, dropped from its
        neighbours (k+1 are searched so exactly k columns remain). k > N pads with -1 / +inf.
        """
        k = self.k_max if k is None else check_k(k)
        if k > self.k_max:
            raise KnnlmError(f"k={k} is larger than this searcher's k_max={self.k_max}")
        q = as_queries(queries, self.dim)
        excl = None
        if exclude_ids is not None:
            excl = np.asarray(exclude_ids)
            if excl.shape != (q.shape[0],) or not np.issubdtype(excl.dtype, np.integer):
                raise KnnlmError(f"exclude_ids must be integers of shape ({q.shape[0]},)")
            excl = excl.astype(np.int64)
        kk = min(k + (excl is not None), self.n)
        if self.index is None:
            dist, ids = exact_search(self.keys, q, kk, self.metric, progress=self.progress)
        elif self._refined is not None:
            dist, ids = _search(self._refined, self.index, q, kk)
        else:
            dist, ids = self.index.search(q, kk)
            if self.recompute:
                dist, ids = recompute_distances(self.keys, q, ids, self.metric)
        if excl is not None:
            dist, ids = _drop_self(dist, ids, excl)
        return pad(dist, ids, k)


def _drop_self(
    dist: np.ndarray, ids: np.ndarray, excl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Turn each row's own id into a -1/+inf entry moved to the end (order otherwise kept)."""
    self_hit = (ids == excl[:, None]) & (excl[:, None] >= 0)
    dist = np.where(self_hit, np.float32(np.inf), dist)
    ids = np.where(self_hit, -1, ids)
    order = np.argsort(self_hit, axis=1, kind="stable")
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
