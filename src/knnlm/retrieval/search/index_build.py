"""Building a FAISS index over a datastore's keys: flat (exact) or IVF-PQ, resumable.

Files written beside the datastore ``DS``: ``DS/index.faiss`` (a CPU FAISS index, ids = row
numbers in ``keys.npy``) and ``DS/index.json`` (its settings, size and SHA-256). The pair is
committed so that a crash at any instant leaves the old pair or the new one: the new index is
written to ``index.faiss.tmp`` and fsynced, its metadata (naming the new file's hash) to
``index.json.pending``, then ``index.faiss`` and ``index.json`` are replaced in that order. A
pending metadata file therefore marks the only window where the two may disagree; the loader
then believes whichever metadata the index file's hash matches, and the next build finishes
(or drops) the pending commit.

An interrupted IVF-PQ build leaves ``DS/index.faiss.partial`` + ``DS/index.partial.json`` and
resumes from them when rerun with the same settings; the finished file is byte-identical to an
uninterrupted build's (training is seeded, rows are added in id order).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.fileio import disk_full_error, file_sha256, fsync_dir, is_disk_full, write_json_atomic
from knnlm.locking import locks
from knnlm.retrieval.search.conventions import (
    DISTANCE_NOTE,
    FORMAT_VERSION,
    INDEX_FILE,
    INDEX_META,
    PARTIAL_FILE,
    PARTIAL_META,
    PENDING_META,
    datastore_fingerprint,
    drop_pages,
    f32,
    log,
    open_keys,
)
from knnlm.retrieval.search.faiss_lib import (
    faiss,
    faiss_metric,
    require_faiss,
    to_cpu,
    to_gpu,
    want_gpu,
)
from knnlm.retrieval.search.index_factory import build_factory
from knnlm.retrieval.search.index_recall import recall_at_k
from knnlm.retrieval.search.index_settings import IndexSettings
from knnlm.retrieval.search.pca import check_pca, pca_sample_size, train_pca, with_pca

REFERENCE_SCAN = 32 / 4096  # Khandelwal et al.: nprobe 32 of 4096 lists (0.78% of the keys)
MIN_NPROBE = 32
ADD_BLOCK = 1 << 16  # rows handed to FAISS's add at a time (64 MiB as float32 at d = 256)


# --------------------------------------------------------------------------- defaults


def auto_nlist(n: int) -> int:
    """About 4*sqrt(N) inverted lists, at most N/39 (FAISS wants >= 39 training points each)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def auto_nprobe(nlist: int) -> int:
    """Lists probed by default: the reference's scan fraction (32 of 4096 lists), never fewer
    than 32 lists, never more than nlist.

    nlist grows as 4 sqrt(N) while the reference's 32 was chosen for 4096 lists; a fixed 32 at
    103M keys (~40k lists) scans 0.08% of the store instead of 0.78%. Below 4096 lists the floor
    of 32 scans more than 0.78%: small stores have few keys per list and k = 1024 neighbours
    need enough candidates (recall measured in benchmarks/README.md).
    """
    return int(min(nlist, max(MIN_NPROBE, math.ceil(nlist * REFERENCE_SCAN))))


def auto_pq_m(dim: int) -> int:
    """The largest divisor of d that is <= 64 and leaves >= 4 dims per sub-vector.

    PQ bytes per vector at 8 bits: 64 for d = 256 .. 1024+ (Khandelwal et al.: d=1024, 64 bytes).
    The 4-dim floor only matters for small d: FAISS trains 1- or 2-dim sub-quantizers very slowly
    (30x slower at d=64) for little gain over fewer, wider ones.
    """
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def scan_fraction(info: dict[str, Any]) -> float:
    """Expected share of the keys scanned per query (nprobe / nlist; 1.0 for flat)."""
    if info.get("type") != "ivfpq":
        return 1.0
    return min(int(info["nprobe"]), int(info["nlist"])) / int(info["nlist"])


def index_summary(ds_dir: str | Path) -> str:
    """One line describing the committed index, with its expected scan fraction."""
    info = json.loads((Path(ds_dir) / INDEX_META).read_text())
    recall = info.get("recall") or {}
    tail = f"; recall@{recall['k']} {recall['recall']:.3f}" if recall.get("recall") else ""
    pca = f", PCA {info['dim']} -> {info['pca']} dims" if info.get("pca") else ""
    if info["type"] == "factory":
        return f"factory {info['factory']!r}, {info['n']:,} keys, {info['metric']}{pca}{tail}"
    if info["type"] != "ivfpq":
        return f"flat (exact), {info['n']:,} keys, {info['metric']}{pca}"
    return (
        f"ivfpq nlist={info['nlist']} pq_bytes={info['pq_m']} nprobe={info['nprobe']}: "
        f"expected scan {100 * scan_fraction(info):.2f}% of {info['n']:,} keys per query{pca}{tail}"
    )


# --------------------------------------------------------------------------- commit


def _write_faiss(index: Any, tmp: Path) -> None:
    """``faiss.write_index``; a full disk ends in one line (and no temporary left)."""
    try:
        faiss.write_index(index, str(tmp))
    except RuntimeError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            code = int(getattr(index, "code_size", 4 * index.d))  # + 8 bytes of id (IVF)
            raise disk_full_error(tmp, index.ntotal * (code + 8) + (1 << 20)) from None
        raise


def _write_index(index: Any, path: Path) -> None:
    """A FAISS file through a temporary name, fsynced before the rename."""
    tmp = path.with_name(path.name + ".tmp")
    _write_faiss(index, tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(ds: Path, index: Any, info: dict[str, Any]) -> Path:
    """Swap ``index.faiss`` + ``index.json`` in as a pair (see the module docstring)."""
    out, tmp = ds / INDEX_FILE, ds / (INDEX_FILE + ".tmp")
    _write_faiss(index, tmp)
    _fsync_file(tmp)
    info.update(index_sha256=file_sha256(tmp), index_bytes=tmp.stat().st_size)
    write_json_atomic(ds / PENDING_META, info)
    os.replace(tmp, out)
    fsync_dir(ds)
    os.replace(ds / PENDING_META, ds / INDEX_META)
    fsync_dir(ds)
    return out


def finish_pending_commit(ds: Path) -> None:
    """After a crash: complete a commit whose index file is in place, else drop it."""
    pending = ds / PENDING_META
    # Temporaries a killed build may leave (this module's and write_json_atomic's names).
    for name in (INDEX_FILE, PARTIAL_FILE):
        (ds / f"{name}.tmp").unlink(missing_ok=True)
    for name in (INDEX_META, PENDING_META, PARTIAL_META):
        (ds / f".{name}.tmp").unlink(missing_ok=True)
    if not pending.is_file():
        return
    try:
        want = json.loads(pending.read_text()).get("index_sha256")
    except (OSError, ValueError):
        want = None
    if want and (ds / INDEX_FILE).is_file() and file_sha256(ds / INDEX_FILE) == want:
        os.replace(pending, ds / INDEX_META)
    else:
        pending.unlink()
    fsync_dir(ds)


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- building


def _train_sample(keys: np.ndarray, size: int, seed: int, chunk: int) -> np.ndarray:
    """A seeded random sample of rows (sorted for sequential memmap reads), as float32."""
    n = keys.shape[0]
    rows = (
        np.arange(n) if size >= n else np.sort(np.random.default_rng(seed).choice(n, size, False))
    )
    out = np.empty((rows.size, keys.shape[1]), dtype=np.float32)
    for s in range(0, rows.size, chunk):
        out[s : s + chunk] = keys[rows[s : s + chunk]]
        drop_pages(keys)
    return out


def build_index(
    ds_dir: str | Path,
    kind: str = "flat",
    metric: str = "l2",
    nlist: int | None = None,
    pq_m: int | None = None,
    pq_bits: int = 8,
    nprobe: int | None = None,
    train_size: int | None = None,
    add_chunk: int = 1_000_000,
    seed: int = 0,
    use_gpu: bool | str = "auto",
    progress: bool = True,
    checkpoint_every: int = 10,
    on_checkpoint: Callable[[int], None] | None = None,
    factory: str | None = None,
    pca: int | None = None,
) -> Path:
    """:func:`make_index` with the :class:`IndexSettings` as keywords; e.g.
    ``build_index("runs/ds", "ivfpq", nlist=64)``."""
    settings = IndexSettings(
        kind=kind, metric=metric, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, nprobe=nprobe,
        train_size=train_size, add_chunk=add_chunk, seed=seed, use_gpu=use_gpu,
        checkpoint_every=checkpoint_every, factory=factory, pca=pca,
    )  # fmt: skip
    return make_index(ds_dir, settings, progress=progress, on_checkpoint=on_checkpoint)


@locks("ds_dir", "datastore")
def make_index(
    ds_dir: str | Path,
    settings: IndexSettings,
    *,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> Path:
    """Build ``DS/index.faiss`` + ``DS/index.json`` over the datastore's keys; return the path.

    The settings (:class:`IndexSettings`, fields named below):

    kind: ``"flat"`` (exact, IndexFlatL2/IP) or ``"ivfpq"`` (IVF with ``nlist`` lists, PQ with
    ``pq_m`` bytes of ``pq_bits`` bits; trained on ``train_size`` seeded random rows, default
    ``min(N, max(min(1M, 256*nlist), 39*nlist, 39*2**pq_bits))``). Defaults: ``nlist`` ~
    4*sqrt(N) (:func:`auto_nlist`), ``nprobe`` from :func:`auto_nprobe` (stored as the search
    default), ``pq_m`` from :func:`auto_pq_m`. Keys are read from the memmap in chunks of
    ``add_chunk`` rows and converted to float32 one chunk at a time. On a GPU, the coarse
    k-means assigns with a GPU flat index while the seeded CPU clustering drives it.

    An IVF-PQ build is resumable: after training and every ``checkpoint_every`` added chunks the
    index is saved to ``DS/index.faiss.partial`` (rows added = its ``ntotal``); a rerun with the
    same settings on the same datastore continues from there. ``on_checkpoint(rows_added)`` is
    called after each checkpoint. The result is always a CPU index; its expected scan fraction
    is logged and stored in index.json (``scan_fraction``).

    ``factory`` (kind ``"factory"``): any ``faiss.index_factory`` string ("HNSW32",
    "OPQ64,IVF4096,PQ64", ...), trained on ``train_size`` seeded rows (default 100k). Every
    index but flat gets its recall@k against exact search stored in index.json (``recall``).
    ``pca=D`` puts a PCA d -> D (:mod:`knnlm.retrieval.search.pca`), trained on a seeded sample, in
    front of the index: it stores D-dim vectors and takes d-dim queries.
    """
    s = settings
    kind, metric, seed, add_chunk, nprobe = s.kind, s.metric, s.seed, s.add_chunk, s.nprobe
    require_faiss("building an index")
    want_gpu(s.use_gpu)  # FAISS sees a GPU when asked for one
    ds = Path(ds_dir)
    keys, _ = open_keys(ds)
    finish_pending_commit(ds)
    n, d = keys.shape
    pca = check_pca(s.pca, d)
    info = _index_info(ds, keys, kind, metric, seed, pca)
    # The settings whole beside what they resolved to (nlist, nprobe, ... below).
    info["settings"] = {"index": s.to_dict()}
    t0 = time.time()
    if kind == "flat":
        index = _build_flat(keys, metric, add_chunk, progress, pca, seed)
        info.update(nlist=None, pq_m=None, pq_bits=None, nprobe=None, train_size=None)
    elif kind == "factory":
        index = _build_factory(keys, s.factory, metric, s.train_size, seed, add_chunk, progress,
                               nprobe, info)  # fmt: skip
    else:
        ivf = _ivfpq_settings(n, pca or d, s.nlist, s.pq_m, s.pq_bits, s.train_size)
        info.update(ivf)
        index = _build_ivfpq(
            ds, keys, info, add_chunk, s.use_gpu, progress, s.checkpoint_every, on_checkpoint
        )
        nprobe = auto_nprobe(ivf["nlist"]) if nprobe is None else int(nprobe)
        faiss.extract_index_ivf(index).nprobe = min(nprobe, ivf["nlist"])
        info["nprobe"] = nprobe
    if index.ntotal != n:  # a bug, not a user error
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {n}")
    info["scan_fraction"] = scan_fraction(info) if kind != "factory" else None
    if kind != "flat" or pca:  # a PCA in front of a flat index is approximate too
        info["recall"] = recall_at_k(index, keys, metric, seed)
    info.update(status="complete", build_seconds=round(time.time() - t0, 3), created=time.time())
    out = _commit(ds, index, info)
    _unlink(ds / PARTIAL_FILE, ds / PARTIAL_META)
    log.info("index written: %s", index_summary(ds))
    return out


def _index_info(
    ds: Path, keys: np.ndarray, kind: str, metric: str, seed: int, pca: int | None
) -> dict[str, Any]:
    """What index.json records of every index, before the kind's own settings."""
    n, d = keys.shape
    return {
        "format_version": FORMAT_VERSION,
        "type": kind,
        "metric": metric,
        "distance": DISTANCE_NOTE,
        "n": n,
        "dim": d,
        "key_dtype": str(keys.dtype),
        "seed": seed,
        "datastore_fingerprint": datastore_fingerprint(ds),
        "faiss_version": faiss.__version__,
        "pca": pca,
    }


def _build_factory(
    keys: np.ndarray, factory: str | None, metric: str, train_size: int | None, seed: int,
    add_chunk: int, progress: bool, nprobe: int | None, info: dict[str, Any],
) -> Any:  # fmt: skip
    """A ``faiss.index_factory`` index; its settings (and search nprobe, for an IVF) go into
    ``info``."""
    index, more = build_factory(keys, factory, metric, train_size, seed, add_chunk, progress)
    info.update(more, nprobe=None)
    if more["nlist"] is not None:
        info["nprobe"] = auto_nprobe(more["nlist"]) if nprobe is None else int(nprobe)
        faiss.extract_index_ivf(index).nprobe = min(info["nprobe"], more["nlist"])
    return index


def _build_flat(
    keys: np.ndarray, metric: str, chunk: int, progress: bool, pca: int | None, seed: int
) -> Any:
    index = faiss.IndexFlat(pca or keys.shape[1], faiss_metric(metric))
    if pca is not None:
        sample = _train_sample(keys, pca_sample_size(*keys.shape), seed, chunk)
        index = with_pca(train_pca(sample, pca), index)
    for s in tqdm(range(0, keys.shape[0], chunk), desc="flat index", disable=not progress):
        index.add(f32(keys[s : s + chunk]))
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
                                     "train_size", "pca")}  # fmt: skip
    cpu = _load_partial(partial, partial_meta, settings)
    if cpu is None:
        _unlink(partial, partial_meta)
        cpu = _train_ivfpq(keys, settings, chunk, use_gpu, progress)
    index, res = to_gpu(cpu, use_gpu)

    def checkpoint() -> None:
        _write_index(to_cpu(index, res), partial)
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
        # FAISS copies residuals of what it is given: blocks keep that and the float32 copy
        # small whatever the checkpoint unit (``chunk``); same codes, same order
        for b in range(s, min(s + chunk, n), ADD_BLOCK):
            x = f32(keys[b : min(b + ADD_BLOCK, s + chunk, n)])
            index.add(x)
            bar.update(x.shape[0])
            drop_pages(keys)
        if i % checkpoint_every == 0 and s + chunk < n:
            checkpoint()
    bar.close()
    return to_cpu(index, res)


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
    x = _train_sample(keys, settings["train_size"], settings["seed"], chunk)
    pca = None
    if settings["pca"] is not None:  # the IVF-PQ is trained on the projected sample
        pca = train_pca(x, settings["pca"])
        x = pca.apply(x)
    d = x.shape[1]
    metric = settings["metric"]
    quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(
        quantizer,
        d,
        settings["nlist"],
        settings["pq_m"],
        settings["pq_bits"],
        faiss_metric(metric),
    )
    index.cp.seed = settings["seed"]  # coarse k-means
    index.pq.cp.seed = settings["seed"]  # product-quantizer k-means
    if progress:
        log.info("training IVF-PQ on %d keys", x.shape[0])
    # Seeded on a GPU too: the CPU index runs its own seeded k-means and only borrows a GPU
    # flat index (float32, exact) for the assignment step, FAISS's documented way to train
    # an IVF on a GPU; a GPU clone would run its own, unseeded clustering.
    assign, res = to_gpu(faiss.IndexFlat(d, faiss_metric(metric)), use_gpu)
    if res is not None:
        index.clustering_index = assign
    index.train(x)
    if res is not None:
        index.clustering_index = None
    return index if pca is None else with_pca(pca, index)
