"""Exact re-ranking: distances of retrieved neighbours recomputed from the stored keys.

Khandelwal et al. replace the approximate (PQ) distances of the k retrieved neighbours by
distances computed from the full-precision keys and re-sort. Re-ranking k = 1024 neighbours of
d = 256 float16 values gathers 512 KiB per query, so it should run near memory bandwidth. Two
fused paths, both computing ``sum((q - k)^2)`` (or ``<q, k>``) directly in float32, so the
distances are exact to float32 rounding (no ``|q|^2 - 2 q.k + |k|^2`` cancellation):

- **keys in RAM** (:class:`KeyStore`, when the keys as float32 fit under :func:`ram_budget`):
  the keys are copied once to float32 (float16 converts exactly), and a batch's k neighbours
  are re-ranked by one OpenMP-parallel FAISS call (``fvec_L2sqr_by_idx`` /
  ``fvec_inner_products_by_idx`` over the whole (n, k) id block, straight from the array) and a
  stable sort. ``faiss.IndexRefine`` over a float16 scalar-quantizer copy, used before,
  decoded each neighbour's key through a per-neighbour distance computer: 1.21-1.55x the PQ
  search time where this is ~1.1x or less (``benchmarks/README.md``), at twice the RAM of
  float16 keys. A flat index is its own key store (``IndexRefine`` on itself).
- **keys on disk** (larger than the budget): :func:`recompute_distances` gathers the rows of a
  block of queries from the memmap (sorted unique rows: one ordered pass, each row read once,
  the OS page cache keeps what fits) and FAISS's ``fvec_L2sqr_by_idx`` /
  ``fvec_inner_products_by_idx`` computes the distances over the gathered block in parallel.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.conventions import as_queries, check_metric, f32, log
from knnlm.retrieval.search.faiss_lib import faiss

_BLOCK_BYTES = 1 << 27  # float32 bytes gathered per block on the memmap path (128 MiB)
RAM_FRACTION = 0.5  # keys go to RAM when they take at most this share of the available memory


def recompute_distances(
    keys: np.ndarray,
    queries: np.ndarray,
    ids: np.ndarray,
    metric: str = "l2",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact distances of retrieved ``ids`` from the stored ``keys``, re-sorted ascending.

    ``keys`` is the (N, d) memmap (or any array); ids -1 get +inf. Returns
    ``(dist float32 (n, k), ids int64 (n, k))``, both reordered by the new distances.
    """
    check_metric(metric)
    n_keys, d = keys.shape
    q = as_queries(queries, d)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != q.shape[0]:
        raise KnnlmError(f"ids must have shape ({q.shape[0]}, k), got {ids.shape}")
    if ids.size and ids.max() >= n_keys:
        raise KnnlmError(f"neighbour id {ids.max()} out of range for a datastore of {n_keys} keys")
    dist = rows_distances(keys, q, ids, metric)
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


def rows_distances(keys: np.ndarray, q: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """(n, k) exact distances of float32 queries ``q`` to the stored rows ``ids`` (-1: +inf),
    unsorted, gathered from ``keys`` (a memmap or any array) in blocks of sorted unique rows."""
    n, k = ids.shape
    d = keys.shape[1]
    dist = np.empty((n, k), dtype=np.float32)
    step = max(1, _BLOCK_BYTES // max(1, 4 * k * d))
    for s in range(0, n, step):
        b = ids[s : s + step]
        valid = b >= 0
        # Sorted unique rows: one ordered pass over the memmap, each row read once.
        uniq, inv = np.unique(b[valid], return_inverse=True)
        local = np.full(b.shape, -1, dtype=np.int64)
        local[valid] = inv
        dist[s : s + step] = distances_by_idx(q[s : s + step], f32(keys[uniq]), local, metric)
    return dist


def distances_by_idx(q: np.ndarray, rows: np.ndarray, local: np.ndarray, metric: str) -> np.ndarray:
    """(n, k) distances of q[i] to rows[local[i, j]] (FAISS, parallel); local -1 -> +inf."""
    n, k = local.shape
    d = q.shape[1]
    out = np.empty((n, k), dtype=np.float32)
    q, rows, local = f32(q), f32(rows), np.ascontiguousarray(local, dtype=np.int64)
    if rows.shape[0] == 0:  # nothing valid; FAISS would be handed an empty buffer
        out.fill(np.inf)
        return out
    args = (faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(rows), faiss.swig_ptr(local))
    if metric == "l2":
        faiss.fvec_L2sqr_by_idx(*args, d, n, k)
    else:
        faiss.fvec_inner_products_by_idx(*args, d, n, k)
        np.negative(out, out=out)
        out[local < 0] = np.inf
    return out


def available_memory() -> int:
    """Bytes of memory available to this process (MemAvailable), 0 when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def ram_budget() -> int:
    """Largest key array copied to RAM for re-ranking: ``KNNLM_RERANK_RAM_BYTES`` if set, else
    :data:`RAM_FRACTION` of the available memory."""
    env = os.environ.get("KNNLM_RERANK_RAM_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise KnnlmError(f"KNNLM_RERANK_RAM_BYTES must be a number, got {env!r}") from None
    return int(available_memory() * RAM_FRACTION)


class KeyStore:
    """The stored keys held in RAM as float32 (float16 keys converted once, exactly), re-ranked
    against with one parallel FAISS call per batch (:func:`rerank_in_ram`)."""

    def __init__(self, keys: np.ndarray, metric: str, chunk: int = 1 << 16) -> None:
        n, d = keys.shape
        self.metric = check_metric(metric)
        self.keys = np.empty((n, d), dtype=np.float32)
        for s in range(0, n, chunk):
            self.keys[s : s + chunk] = keys[s : s + chunk]
        self.nbytes = int(self.keys.nbytes)

    @classmethod
    def maybe(cls, keys: np.ndarray, metric: str, in_ram: bool | str = "auto") -> KeyStore | None:
        """A KeyStore when ``in_ram`` is True, or "auto" and the float32 keys fit
        :func:`ram_budget`."""
        if in_ram not in (True, False, "auto"):
            raise KnnlmError(f"keys_in_ram must be True, False or 'auto', got {in_ram!r}")
        nbytes = keys.shape[0] * keys.shape[1] * 4
        if in_ram == "auto" and nbytes > ram_budget():
            log.warning(
                "keys (%.0f MiB as float32) exceed the re-ranking RAM budget; re-ranking "
                "gathers from disk", nbytes / 2**20,
            )  # fmt: skip
            return None
        return cls(keys, metric) if in_ram else None

    def rerank(self, q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances of ``ids`` (n, k; -1 = none) re-sorted ascending: one parallel
        FAISS pass over the block (``fvec_L2sqr_by_idx``), no per-neighbour decode or copy."""
        dist = distances_by_idx(q, self.keys, ids, self.metric)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


def refine(base: Any, store: Any) -> Any:
    """``base`` searched, then its k results re-ranked exactly against ``store`` (k_factor 1)."""
    r = faiss.IndexRefine(base, store)
    r.k_factor = 1.0
    return r
