"""What building, searching and re-ranking share: the distance convention, the datastore's keys,
argument checks and the padding of missing neighbours (no FAISS here: the torch backend
uses it; FAISS-only helpers are in :mod:`knnlm.retrieval.search.faiss_lib`).

Distance convention (every function of the index layer): smaller is closer.

- ``metric="l2"``: squared Euclidean distance (FAISS convention, no square root).
- ``metric="ip"``: the NEGATED inner product, ``-<q, k>``.

So a caller forms kNN logits as ``-distance / temperature`` for both metrics. When fewer than k
neighbours exist, the missing ones have id ``-1`` and distance ``+inf``: mask them, never index
with them.
"""

from __future__ import annotations

import json
import logging
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.fileio import short_sha256, write_json_atomic
from knnlm.locking import locks

log = logging.getLogger("knnlm.retrieval.index")

KINDS = ("flat", "ivfpq", "factory")
METRICS = ("l2", "ip")
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
PENDING_META = "index.json.pending"  # the new metadata while index.faiss is being swapped in
PARTIAL_FILE = "index.faiss.partial"
PARTIAL_META = "index.partial.json"
FORMAT_VERSION = 2
DISTANCE_NOTE = "smaller is closer: l2 = squared L2; ip = negated inner product; missing = -1/+inf"


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise KnnlmError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def drop_pages(keys: np.ndarray) -> None:
    """Unmap the pages a pass over the keys memmap has read from this process (they stay in
    the OS page cache): a build reads the whole store, and every page read would otherwise
    count in its resident memory until the end. A no-op for in-memory arrays."""
    mm = getattr(keys, "_mmap", None)  # np.memmap's mapping (np.load(mmap_mode="r"))
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise KnnlmError(f"k must be a positive integer, got {k!r}")
    return int(k)


def as_queries(queries: Any, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim:
        raise KnnlmError(f"queries must have shape (n, {dim}), got {q.shape}")
    q = f32(q)
    if not np.isfinite(q).all():
        raise KnnlmError("queries contain NaN or infinite values")
    return q


def open_keys(ds_dir: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The datastore's keys as a read-only memmap (N, d) and its meta.json, checked to agree."""
    ds = Path(ds_dir)
    if not ds.is_dir():
        raise KnnlmError(f"datastore directory not found: {ds}")
    for name in ("keys.npy", "meta.json"):
        if not (ds / name).is_file():
            raise KnnlmError(f"datastore {ds} has no {name} (incomplete or not a datastore)")
    try:
        meta = json.loads((ds / "meta.json").read_text())
        keys = np.load(ds / "keys.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise KnnlmError(f"cannot read datastore {ds}: {e}") from e
    if not isinstance(meta, dict):
        raise KnnlmError(f"datastore {ds}: meta.json is not a JSON object")
    if keys.ndim != 2 or keys.dtype not in (np.float16, np.float32):
        raise KnnlmError(
            f"{ds}/keys.npy must be float16/float32 (N, d), got {keys.dtype} {keys.shape}"
        )
    n, d = keys.shape
    if int(meta.get("n", n)) != n or int(meta.get("dim", d)) != d:
        raise KnnlmError(
            f"datastore {ds}: meta.json says n={meta.get('n')}, dim={meta.get('dim')} but "
            f"keys.npy has shape {keys.shape}"
        )
    if n == 0:
        raise KnnlmError(f"datastore {ds} is empty (0 keys)")
    return keys, meta


def datastore_fingerprint(ds: Path) -> str:
    """Hash of meta.json: a datastore rebuilt in place makes its old index stale."""
    return short_sha256((ds / "meta.json").read_bytes())


def mark_missing(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads with +-FLT_MAX; make the padding id -1 / distance +inf."""
    dist = f32(dist)
    ids = np.asarray(ids, dtype=np.int64)
    dist[ids < 0] = np.inf
    return dist, ids


def pad(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad (with -1 / +inf) to exactly k columns."""
    n, w = ids.shape
    if w >= k:
        return dist[:, :k], ids[:, :k]
    pd = np.full((n, k), np.inf, dtype=np.float32)
    pi = np.full((n, k), -1, dtype=np.int64)
    pd[:, :w] = dist
    pi[:, :w] = ids
    return pd, pi


def index_identity(ds_dir: str | Path) -> str | None:
    """The committed index's SHA-256 from index.json (None when there is no index)."""
    path = Path(ds_dir) / INDEX_META
    return json.loads(path.read_text()).get("index_sha256") if path.is_file() else None


@locks("ds_dir", "datastore")
def record_index_check(ds_dir: str | Path, check: dict[str, Any], index_sha256: str) -> None:
    """Add ``check`` (the perplexity change the index causes) to index.json, atomically, if the
    index is still the one that was checked."""
    path = Path(ds_dir) / INDEX_META
    info = json.loads(path.read_text()) if path.is_file() else {}
    if info.get("index_sha256") != index_sha256:
        raise KnnlmError(f"the index of {ds_dir} changed during the perplexity check; not recorded")
    write_json_atomic(path, info | {"perplexity_check": check})
