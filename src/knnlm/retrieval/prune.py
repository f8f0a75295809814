"""Datastore pruning by greedy merging (He et al., EMNLP 2021): fewer entries, counts as weights.

Each entry's ``k`` nearest other entries are searched in the datastore itself (its saved index
when it has one, else exactly). Entries are then visited in row order; an entry still present
keeps its place and absorbs every later neighbour that carries the same next token and is still
present, adding that neighbour's count to its own. An entry that kept its place is never merged
later. The kept rows form a new datastore with ``counts.npy`` (a weight in p_knn, see
:mod:`knnlm.retrieval.knn`) and ``positions.npy`` (each row's row in the unpruned datastore).

The visit in row order is sequential by nature; :func:`greedy_merge` computes the same result in
vectorised rounds (an entry is decided once every earlier entry pointing at it is decided), so
no Python loop runs over the entries.

The self-neighbour search is the slow part and is resumable: rows are written into
``<out>.partial/neighbours.npy`` with progress recorded, and a rerun with the same settings
continues from there. The result is swapped in when complete (the artifact rule).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.fileio import (
    ARTIFACT_KEY,
    NpyRowWriter,
    claim_target,
    read_json,
    swap_in,
    temp_dir,
    write_json_atomic,
)
from knnlm.locking import locks
from knnlm.retrieval.datastore import KIND, META, Datastore, open_datastore
from knnlm.retrieval.search import Searcher

NEIGHBOURS = "neighbours.npy"
PROGRESS = "prune-progress.json"


def greedy_merge(
    neighbours: np.ndarray, values: np.ndarray, counts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(keep (N,) bool, counts (N,) int64 of the kept rows' merged totals; 0 where merged).

    ``neighbours`` (N, k): each row's neighbour rows (-1 = none; the row itself is ignored).
    Equals the sequential greedy visit in row order described in the module docstring.
    """
    n, k = neighbours.shape
    counts = np.ones(n, np.int64) if counts is None else np.asarray(counts, np.int64)
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst = np.asarray(neighbours, np.int64).ravel()
    # Only a later row can be absorbed: an earlier one was already kept or merged.
    ok = dst > src
    ok[ok] = values[dst[ok]] == values[src[ok]]
    src, dst = all_src, all_dst = src[ok], dst[ok]
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, 2 merged
    while True:
        open_edge = state[dst] == 0
        src, dst = src[open_edge], dst[open_edge]
        undecided = state == 0
        if not undecided.any():
            break
        s = state[src]
        from_kept = s == 1
        has_kept = np.zeros(n, bool)
        has_kept[dst[from_kept]] = True
        waiting = np.zeros(n, bool)
        waiting[dst[s == 0]] = True
        state[undecided & has_kept] = 2
        state[undecided & ~has_kept & ~waiting] = 1
    keep = state == 1
    # A merged row goes to the first kept row (in row order) that lists it.
    absorber = np.full(n, n, np.int64)
    by_kept = keep[all_src]
    np.minimum.at(absorber, all_dst[by_kept], all_src[by_kept])
    merged = np.flatnonzero(~keep)
    total = np.where(keep, counts, 0)
    np.add.at(total, absorber[merged], counts[merged])
    return keep, total


def _settings(ds: Datastore, k: int, nprobe: int | None) -> dict:
    return {"source": str(ds.path.resolve()), "source_n": ds.n, "k": k, "nprobe": nprobe,
            "source_meta": ds.meta}  # fmt: skip


def self_neighbours(
    ds: Datastore, partial: Path, k: int, nprobe: int | None, chunk: int, progress: bool
) -> np.ndarray:
    """(N, k) each row's k nearest other rows, written resumably into ``partial``."""
    settings = _settings(ds, k, nprobe)
    rec = read_json(partial / PROGRESS)
    resume = (
        rec is not None and rec.get("settings") == settings and (partial / NEIGHBOURS).is_file()
    )
    done = int(rec["done"]) if resume else 0
    writer = NpyRowWriter(partial / NEIGHBOURS, (ds.n, k), np.int64, create=not resume)
    searcher = Searcher(ds.path, k_max=k, nprobe=nprobe, recompute=True)
    bar = tqdm(total=ds.n, initial=done, desc="self-neighbours", unit="key", disable=not progress)
    for s in range(done, ds.n, chunk):
        rows = np.arange(s, min(s + chunk, ds.n), dtype=np.int64)
        _, ids = searcher.search(np.asarray(ds.keys[rows]), k, exclude_ids=rows)
        writer.write(s, ids)
        write_json_atomic(partial / PROGRESS, {"settings": settings, "done": int(rows[-1]) + 1})
        bar.update(rows.size)
    bar.close()
    writer.close()
    return np.load(partial / NEIGHBOURS, allow_pickle=False)


def _write_kept_rows(partial: Path, ds: Datastore, rows: np.ndarray, chunk: int) -> None:
    keys = NpyRowWriter(partial / "keys.npy", (rows.size, ds.dim), ds.keys.dtype, create=True)
    for s in range(0, rows.size, chunk):
        keys.write(s, ds.keys[rows[s : s + chunk]])
    keys.close()
    np.save(partial / "values.npy", np.asarray(ds.values[rows], np.int32))
    origin = rows if ds.positions is None else np.asarray(ds.positions)[rows]
    np.save(partial / "positions.npy", origin.astype(np.int64))


@locks("out", "datastore")
def prune_datastore(
    datastore: str | Path,
    out: str | Path,
    k: int = 9,
    nprobe: int | None = None,
    chunk: int = 4096,
    progress: bool = True,
) -> dict:
    """Write the greedy-merged datastore to ``out``; return entries before / after."""
    if not isinstance(k, int) or k < 1:
        raise KnnlmError(f"--k must be a positive integer, got {k!r}")
    ds = open_datastore(datastore)
    out = Path(out)
    if out.resolve() == ds.path.resolve():
        raise KnnlmError("--out must differ from the datastore being pruned")
    claim_target(out, KIND, META, what="datastore")
    partial = temp_dir(out, KIND, META, fresh=False)
    t0 = time.time()
    nbrs = self_neighbours(ds, partial, min(k, max(ds.n - 1, 1)), nprobe, chunk, progress)
    keep, total = greedy_merge(nbrs, np.asarray(ds.values), ds.counts)
    rows = np.flatnonzero(keep)
    _write_kept_rows(partial, ds, rows, chunk)
    np.save(partial / "counts.npy", total[rows].astype(np.int32))
    report = {
        "entries_before": ds.n,
        "entries_after": int(rows.size),
        "removed_share": 1.0 - rows.size / ds.n,
        "k": k,
        "seconds": round(time.time() - t0, 3),
    }
    meta = dict(ds.meta, n=int(rows.size), created=time.time(), **{ARTIFACT_KEY: KIND})
    meta["pruned"] = dict(report, source=str(ds.path), nprobe=nprobe, method="greedy_merge")
    (partial / NEIGHBOURS).unlink()
    (partial / PROGRESS).unlink()
    write_json_atomic(partial / META, meta)
    swap_in(partial, out, KIND, META)
    return report
