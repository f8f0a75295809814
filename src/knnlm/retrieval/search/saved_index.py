"""A datastore's saved FAISS index: its metadata read and checked against the file and the
datastore, loaded (on a GPU when FAISS has one) and searched.

Distances follow :mod:`knnlm.retrieval.search.conventions` (smaller is closer; ip = negated inner
product; missing neighbours are -1 / +inf).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.fileio import file_sha256
from knnlm.retrieval.search.conventions import (
    INDEX_FILE,
    INDEX_META,
    PENDING_META,
    as_queries,
    check_k,
    datastore_fingerprint,
    mark_missing,
    open_keys,
    pad,
)
from knnlm.retrieval.search.faiss_lib import GPU_MAX_K, faiss, faiss_metric, require_faiss, to_gpu
from knnlm.retrieval.search.pca import base_index

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
        require_faiss("a FAISS index")
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

        Distances are the index's own (PQ-approximate for IVF-PQ); the FAISS backend
        (:mod:`knnlm.retrieval.search.faiss_backend`) re-ranks them exactly.
        """
        return search_index(self._index, self, queries, k)


def search_index(index: Any, meta: KnnIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
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
