"""FAISS indexes over a datastore's keys, exact brute-force search and exact re-ranking.

Distance convention (every function here): smaller is closer.

- ``metric="l2"``: squared Euclidean distance (FAISS convention, no square root).
- ``metric="ip"``: the NEGATED inner product, ``-<q, k>``.

So a caller forms kNN logits as ``-distance / temperature`` for both metrics. When fewer than k
neighbours exist, the missing ones have id ``-1`` and distance ``+inf``: mask them, never index
with them.

Files written beside the datastore ``DS``: ``DS/index.faiss`` (a CPU FAISS index, ids = row
numbers in ``keys.npy``) and ``DS/index.json`` (its settings). An interrupted IVF-PQ build leaves
``DS/index.faiss.partial`` + ``DS/index.partial.json`` and resumes from them when rerun with the
same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.fileio import write_json_atomic

log = logging.getLogger(__name__)

KINDS = ("flat", "ivfpq")
METRICS = ("l2", "ip")
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
PARTIAL_FILE = "index.faiss.partial"
PARTIAL_META = "index.partial.json"
FORMAT_VERSION = 1
GPU_MAX_K = 2048  # FAISS GPU k-selection limit
_BLOCK_ELEMS = 1 << 24  # floats per gathered block in recompute_distances (64 MiB)
DISTANCE_NOTE = "smaller is closer: l2 = squared L2; ip = negated inner product; missing = -1/+inf"


# --------------------------------------------------------------------------- small helpers


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise KnnlmError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _write_index(index: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


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


def _fingerprint(ds: Path) -> str:
    """Hash of meta.json: a datastore rebuilt in place makes its old index stale."""
    return hashlib.sha256((ds / "meta.json").read_bytes()).hexdigest()[:16]


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim:
        raise KnnlmError(f"queries must have shape (n, {dim}), got {q.shape}")
    q = _f32(q)
    if not np.isfinite(q).all():
        raise KnnlmError("queries contain NaN or infinite values")
    return q


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise KnnlmError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _mark_missing(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS pads with +-FLT_MAX; make the padding id -1 / distance +inf."""
    dist = _f32(dist)
    ids = np.asarray(ids, dtype=np.int64)
    dist[ids < 0] = np.inf
    return dist, ids


def _pad(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad (with -1 / +inf) to exactly k columns."""
    n, w = ids.shape
    if w >= k:
        return dist[:, :k], ids[:, :k]
    pd = np.full((n, k), np.inf, dtype=np.float32)
    pi = np.full((n, k), -1, dtype=np.int64)
    pd[:, :w] = dist
    pi[:, :w] = ids
    return pd, pi


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


# --------------------------------------------------------------------------- exact search


def recompute_distances(
    keys: np.ndarray,
    queries: np.ndarray,
    ids: np.ndarray,
    metric: str = "l2",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact distances of retrieved ``ids`` from the stored keys, re-sorted ascending.

    Khandelwal et al.'s exact re-ranking: approximate (PQ) distances are replaced by distances
    computed from the full-precision keys, ``keys[ids]`` gathered from the memmap in float32 as
    ``sum((q - k)^2)`` (no cancellation-prone expansion). Ids -1 get +inf. Returns
    ``(dist float32 (n, k), ids int64 (n, k))``, both reordered by the new distances.
    """
    _check_metric(metric)
    n_keys, d = keys.shape
    q = _as_queries(queries, d)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != q.shape[0]:
        raise KnnlmError(f"ids must have shape ({q.shape[0]}, k), got {ids.shape}")
    if ids.size and ids.max() >= n_keys:
        raise KnnlmError(f"neighbour id {ids.max()} out of range for a datastore of {n_keys} keys")
    n, k = ids.shape
    dist = np.empty((n, k), dtype=np.float32)
    step = max(1, _BLOCK_ELEMS // max(1, k * d))  # bound the (rows, k, d) gather
    for s in range(0, n, step):
        b = ids[s : s + step]
        valid = b >= 0
        # Sorted unique rows: one ordered pass over the memmap, each row read once.
        uniq, inv = np.unique(b[valid], return_inverse=True)
        vecs = _f32(keys[uniq])
        g = np.zeros(b.shape + (d,), dtype=np.float32)
        g[valid] = vecs[inv]
        qb = q[s : s + step, None, :]
        if metric == "l2":
            diff = qb - g
            dd = np.einsum("nkd,nkd->nk", diff, diff)
        else:
            dd = -np.einsum("nxd,nkd->nk", qb, g)
        dd[~valid] = np.inf
        dist[s : s + step] = dd
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


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
    _check_metric(metric)
    k = _check_k(k)
    n_keys, d = keys.shape
    q = _as_queries(queries, d)
    n = q.shape[0]
    if chunk is None:
        chunk = max(4096, (1 << 25) // max(1, d))  # ~128 MiB of float32 rows
    if chunk < 1:
        raise KnnlmError(f"chunk must be positive, got {chunk}")
    best_d = np.empty((n, 0), dtype=np.float32)
    best_i = np.empty((n, 0), dtype=np.int64)
    starts = range(0, n_keys, chunk)
    for s in tqdm(starts, desc="exact search", unit="chunk", disable=not progress):
        x = _f32(keys[s : s + chunk])
        kk = min(k, x.shape[0])
        cd, ci = faiss.knn(q, x, kk, metric=_faiss_metric(metric))
        if metric == "ip":
            cd = -cd
        best_d, best_i = _merge_topk(best_d, best_i, cd, ci.astype(np.int64) + s, k)
    dist, ids = recompute_distances(keys, q, best_i, metric)
    return _pad(dist, ids, k)


# --------------------------------------------------------------------------- building


def auto_nlist(n: int) -> int:
    """About 4*sqrt(N) inverted lists, at most N/39 (FAISS wants >= 39 training points each)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def auto_pq_m(dim: int) -> int:
    """The largest divisor of d that is <= 64 and leaves >= 4 dims per sub-vector.

    PQ bytes per vector at 8 bits: 64 for d = 256 .. 1024+ (Khandelwal et al.: d=1024, 64 bytes).
    The 4-dim floor only matters for small d: FAISS trains 1- or 2-dim sub-quantizers very slowly
    (30x slower at d=64) for little gain over fewer, wider ones.
    """
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def _want_gpu(use_gpu: bool | str) -> bool:
    if use_gpu not in (True, False, "auto"):
        raise KnnlmError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    if use_gpu is False:
        return False
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not has:
        raise KnnlmError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
    return has


def _to_gpu(index: Any, use_gpu: bool | str) -> tuple[Any, Any]:
    """(index, resources): a GPU copy when wanted and supported, else the CPU index and None."""
    if not _want_gpu(use_gpu):
        return index, None
    try:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True  # PQ lookup tables in half precision: needed for large pq_m
        return faiss.index_cpu_to_gpu(res, 0, index, co), res
    except (RuntimeError, AttributeError) as e:  # e.g. a pq_m the GPU kernels do not support
        if use_gpu is True:
            raise KnnlmError(f"cannot move this index to the GPU: {e}") from e
        log.warning("FAISS GPU cannot hold this index (%s); using the CPU", e)
        return index, None


def _to_cpu(index: Any, res: Any) -> Any:
    return faiss.index_gpu_to_cpu(index) if res is not None else index


def _set_nprobe(index: Any, nprobe: int, res: Any = None) -> None:
    if res is not None:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        faiss.extract_index_ivf(index).nprobe = nprobe


def _train_sample(keys: np.ndarray, size: int, seed: int, chunk: int) -> np.ndarray:
    """A seeded random sample of rows (sorted for sequential memmap reads), as float32."""
    n = keys.shape[0]
    rows = (
        np.arange(n) if size >= n else np.sort(np.random.default_rng(seed).choice(n, size, False))
    )
    out = np.empty((rows.size, keys.shape[1]), dtype=np.float32)
    for s in range(0, rows.size, chunk):
        out[s : s + chunk] = keys[rows[s : s + chunk]]
    return out


def build_index(
    ds_dir: str | Path,
    kind: str = "flat",
    metric: str = "l2",
    nlist: int | None = None,
    pq_m: int | None = None,
    pq_bits: int = 8,
    nprobe: int = 32,
    train_size: int | None = None,
    add_chunk: int = 1_000_000,
    seed: int = 0,
    use_gpu: bool | str = "auto",
    progress: bool = True,
    checkpoint_every: int = 10,
    on_checkpoint: Callable[[int], None] | None = None,
) -> Path:
    """Build ``DS/index.faiss`` + ``DS/index.json`` over the datastore's keys; return the path.

    kind: ``"flat"`` (exact, IndexFlatL2/IP) or ``"ivfpq"`` (IVF with ``nlist`` lists, PQ with
    ``pq_m`` bytes of ``pq_bits`` bits; trained on ``train_size`` seeded random rows, default
    ``min(N, max(min(1M, 256*nlist), 39*nlist, 39*2**pq_bits))``). Defaults: ``nlist`` ~
    4*sqrt(N) (:func:`auto_nlist`), ``pq_m`` from :func:`auto_pq_m`. Keys are read from the
    memmap in chunks of ``add_chunk`` rows and converted to float32 one chunk at a time.

    An IVF-PQ build is resumable: after training and every ``checkpoint_every`` added chunks the
    index is saved to ``DS/index.faiss.partial`` (rows added = its ``ntotal``); a rerun with the
    same settings on the same datastore continues from there. ``on_checkpoint(rows_added)`` is
    called after each checkpoint. ``nprobe`` is the default stored for searching. The final file
    is written under a temporary name and renamed; it is always a CPU index.
    """
    if kind not in KINDS:
        raise KnnlmError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    _check_metric(metric)
    for name, v in (
        ("add_chunk", add_chunk),
        ("nprobe", nprobe),
        ("checkpoint_every", checkpoint_every),
    ):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise KnnlmError(f"{name} must be a positive integer, got {v!r}")
    _want_gpu(use_gpu)  # validate early
    ds = Path(ds_dir)
    keys, _ = open_keys(ds)
    n, d = keys.shape
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "type": kind,
        "metric": metric,
        "distance": DISTANCE_NOTE,
        "n": n,
        "dim": d,
        "key_dtype": str(keys.dtype),
        "seed": seed,
        "datastore_fingerprint": _fingerprint(ds),
        "faiss_version": faiss.__version__,
    }
    t0 = time.time()
    if kind == "flat":
        index = _build_flat(keys, metric, add_chunk, progress)
        info.update(nlist=None, pq_m=None, pq_bits=None, nprobe=None, train_size=None)
    else:
        settings = _ivfpq_settings(n, d, nlist, pq_m, pq_bits, train_size)
        info.update(settings)
        index = _build_ivfpq(
            ds, keys, info, add_chunk, use_gpu, progress, checkpoint_every, on_checkpoint
        )
        faiss.extract_index_ivf(index).nprobe = min(nprobe, settings["nlist"])
        info["nprobe"] = nprobe
    if index.ntotal != n:  # a bug, not a user error
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {n}")
    info.update(status="complete", build_seconds=round(time.time() - t0, 3), created=time.time())
    out = ds / INDEX_FILE
    _write_index(index, out)
    write_json_atomic(ds / INDEX_META, info)
    _unlink(ds / PARTIAL_FILE, ds / PARTIAL_META)
    return out


def _build_flat(keys: np.ndarray, metric: str, chunk: int, progress: bool) -> Any:
    d = keys.shape[1]
    index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    for s in tqdm(range(0, keys.shape[0], chunk), desc="flat index", disable=not progress):
        index.add(_f32(keys[s : s + chunk]))
    return index


def _ivfpq_settings(
    n: int, d: int, nlist: int | None, pq_m: int | None, pq_bits: int, train_size: int | None
) -> dict[str, Any]:
    nlist = auto_nlist(n) if nlist is None else nlist
    pq_m = auto_pq_m(d) if pq_m is None else pq_m
    if not isinstance(nlist, (int, np.integer)) or nlist < 1:
        raise KnnlmError(f"nlist must be a positive integer, got {nlist!r}")
    if not isinstance(pq_m, (int, np.integer)) or pq_m < 1 or d % pq_m != 0:
        raise KnnlmError(f"pq_m={pq_m!r} must be a positive divisor of the key dimension {d}")
    if not isinstance(pq_bits, (int, np.integer)) or not 1 <= pq_bits <= 16:
        raise KnnlmError(f"pq_bits must be an integer in 1..16, got {pq_bits!r}")
    need = max(nlist, 2**pq_bits)  # k-means needs at least one point per centroid
    if train_size is None:
        # 256 per list up to 1M rows, never under FAISS's 39 points per centroid.
        train_size = min(n, max(min(1_000_000, 256 * nlist), 39 * nlist, 39 * 2**pq_bits))
    if not isinstance(train_size, (int, np.integer)) or train_size < 1:
        raise KnnlmError(f"train_size must be a positive integer, got {train_size!r}")
    train_size = min(int(train_size), n)
    if train_size < need:
        raise KnnlmError(
            f"IVF-PQ with nlist={nlist}, pq_bits={pq_bits} needs at least {need} training keys, "
            f"but only {train_size} are available (N={n}); use kind='flat' for a datastore "
            "this small, or lower nlist / pq_bits"
        )
    return {
        "nlist": int(nlist),
        "pq_m": int(pq_m),
        "pq_bits": int(pq_bits),
        "train_size": train_size,
    }


def _build_ivfpq(
    ds: Path,
    keys: np.ndarray,
    info: dict[str, Any],
    chunk: int,
    use_gpu: bool | str,
    progress: bool,
    checkpoint_every: int,
    on_checkpoint: Callable[[int], None] | None,
) -> Any:
    n, d = keys.shape
    partial, partial_meta = ds / PARTIAL_FILE, ds / PARTIAL_META
    # Everything that changes the trained index or its contents; a rerun must match it to resume.
    settings = {k: info[k] for k in ("type", "metric", "n", "dim", "key_dtype", "seed",
                                     "datastore_fingerprint", "nlist", "pq_m", "pq_bits",
                                     "train_size")}  # fmt: skip
    cpu = _load_partial(partial, partial_meta, settings)
    if cpu is None:
        _unlink(partial, partial_meta)
        cpu = _train_ivfpq(keys, settings, chunk, use_gpu, progress)
    index, res = _to_gpu(cpu, use_gpu)

    def checkpoint() -> None:
        _write_index(_to_cpu(index, res), partial)
        write_json_atomic(partial_meta, {"settings": settings, "rows_added": int(index.ntotal),
                                   "status": "partial"})  # fmt: skip
        if on_checkpoint is not None:
            on_checkpoint(int(index.ntotal))

    start = int(index.ntotal)
    if start == 0:
        checkpoint()  # the trained, empty index: training is the expensive part to redo
    elif progress:
        log.info("resuming IVF-PQ add at row %d of %d", start, n)
    bar = tqdm(total=n, initial=start, desc="ivfpq add", unit="key", disable=not progress)
    for i, s in enumerate(range(start, n, chunk), start=1):
        x = _f32(keys[s : s + chunk])
        index.add(x)
        bar.update(x.shape[0])
        if i % checkpoint_every == 0 and s + chunk < n:
            checkpoint()
    bar.close()
    return _to_cpu(index, res)


def _load_partial(partial: Path, partial_meta: Path, settings: dict[str, Any]) -> Any | None:
    """The checkpointed index when it belongs to these settings, else None."""
    if not (partial.is_file() and partial_meta.is_file()):
        return None
    try:
        rec = json.loads(partial_meta.read_text())
        if rec.get("settings") != settings:
            log.warning("discarding a partial index built with other settings")
            return None
        index = faiss.read_index(str(partial))
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("discarding an unreadable partial index: %s", e)
        return None
    ok = index.is_trained and index.d == settings["dim"] and index.ntotal <= settings["n"]
    return index if ok else None


def _train_ivfpq(
    keys: np.ndarray, settings: dict[str, Any], chunk: int, use_gpu: bool | str, progress: bool
) -> Any:
    d = keys.shape[1]
    metric = settings["metric"]
    quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(
        quantizer,
        d,
        settings["nlist"],
        settings["pq_m"],
        settings["pq_bits"],
        _faiss_metric(metric),
    )
    index.cp.seed = settings["seed"]  # coarse k-means
    index.pq.cp.seed = settings["seed"]  # product-quantizer k-means
    x = _train_sample(keys, settings["train_size"], settings["seed"], chunk)
    if progress:
        log.info("training IVF-PQ on %d keys", x.shape[0])
    gpu, res = _to_gpu(index, use_gpu)
    gpu.train(x)
    return _to_cpu(gpu, res)


# --------------------------------------------------------------------------- searching


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
        cls, ds_dir: str | Path, nprobe: int | None = None, use_gpu: bool | str = "auto"
    ) -> KnnIndex:
        ds = Path(ds_dir)
        path, meta_path = ds / INDEX_FILE, ds / INDEX_META
        if not path.is_file() or not meta_path.is_file():
            raise KnnlmError(f"no index in {ds} (run build_index first, or search exactly)")
        try:
            info = json.loads(meta_path.read_text())
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError) as e:
            raise KnnlmError(f"cannot read the index in {ds}: {e}") from e
        if (
            info.get("status") != "complete"
            or index.ntotal != info.get("n")
            or index.d != info.get("dim")
        ):
            raise KnnlmError(f"the index in {ds} is incomplete or damaged; rebuild it")
        if (ds / "meta.json").is_file() and info.get("datastore_fingerprint") != _fingerprint(ds):
            raise KnnlmError(f"the datastore in {ds} changed after its index was built; rebuild it")
        index, res = _to_gpu(index, use_gpu)
        self = cls(index, info, res)
        if self.kind == "ivfpq":
            self.set_nprobe(int(info.get("nprobe") or 32) if nprobe is None else nprobe)
        return self

    @property
    def on_gpu(self) -> bool:
        return self._res is not None

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists visited per query (IVF only; capped at nlist)."""
        if self.kind != "ivfpq":
            return
        if not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
            raise KnnlmError(f"nprobe must be a positive integer, got {nprobe!r}")
        self.nprobe = min(int(nprobe), int(self.info["nlist"]))
        _set_nprobe(self._index, self.nprobe, self._res)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dist float32 (n, k), ids int64 (n, k)); smaller distance is closer, missing = -1/+inf.

        Distances are the index's own (PQ-approximate for IVF-PQ); see recompute_distances.
        """
        k = _check_k(k)
        q = _as_queries(queries, self.dim)
        kk = min(k, self.n)
        if self.on_gpu and kk > GPU_MAX_K:
            raise KnnlmError(
                f"k={k} exceeds the FAISS GPU limit {GPU_MAX_K}; load with use_gpu=False"
            )
        if q.shape[0] == 0:
            dist, ids = np.empty((0, kk), np.float32), np.empty((0, kk), np.int64)
        else:
            dist, ids = self._index.search(q, kk)
        if self.metric == "ip":
            dist = -dist
        return _pad(*_mark_missing(dist, ids), k)


class Searcher:
    """k-nearest-neighbour search over a datastore: its saved index if any, else exact search.

    ``recompute`` (default on) replaces the index's distances by exact ones from the stored keys
    and re-sorts (exact re-ranking); exact search is always exact. ``metric`` defaults to the
    index's metric (``"l2"`` without an index); asking for another metric than the index's is an
    error. Distances follow the module convention (smaller is closer; ip = negated inner product).
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
    ) -> None:
        self.ds_dir = Path(ds_dir)
        self.k_max = _check_k(k_max)
        self.keys, self.meta = open_keys(self.ds_dir)
        self.n, self.dim = self.keys.shape
        self.recompute = recompute
        self.progress = progress
        self.index: KnnIndex | None = None
        if (self.ds_dir / INDEX_FILE).is_file():
            self.index = KnnIndex.load(self.ds_dir, nprobe=nprobe, use_gpu=use_gpu)
            if metric is not None and _check_metric(metric) != self.index.metric:
                raise KnnlmError(
                    f"the index in {self.ds_dir} uses metric {self.index.metric!r}, not "
                    f"{metric!r}; rebuild it with that metric or leave metric unset"
                )
            self.metric = self.index.metric
        else:
            self.metric = _check_metric(metric or "l2")

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
        k = self.k_max if k is None else _check_k(k)
        if k > self.k_max:
            raise KnnlmError(f"k={k} is larger than this searcher's k_max={self.k_max}")
        q = _as_queries(queries, self.dim)
        excl = None
        if exclude_ids is not None:
            excl = np.asarray(exclude_ids)
            if excl.shape != (q.shape[0],) or not np.issubdtype(excl.dtype, np.integer):
                raise KnnlmError(f"exclude_ids must be integers of shape ({q.shape[0]},)")
            excl = excl.astype(np.int64)
        kk = min(k + (excl is not None), self.n)
        if self.index is None:
            dist, ids = exact_search(self.keys, q, kk, self.metric, progress=self.progress)
        else:
            dist, ids = self.index.search(q, kk)
            if self.recompute:
                dist, ids = recompute_distances(self.keys, q, ids, self.metric)
        if excl is not None:
            dist, ids = _drop_self(dist, ids, excl)
        return _pad(dist, ids, k)


def _drop_self(
    dist: np.ndarray, ids: np.ndarray, excl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Turn each row's own id into a -1/+inf entry moved to the end (order otherwise kept)."""
    self_hit = (ids == excl[:, None]) & (excl[:, None] >= 0)
    dist = np.where(self_hit, np.float32(np.inf), dist)
    ids = np.where(self_hit, -1, ids)
    order = np.argsort(self_hit, axis=1, kind="stable")
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
