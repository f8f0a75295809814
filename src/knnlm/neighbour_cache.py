"""The neighbour cache: per scored token, the LM log-prob of the target and its k neighbours.

``evaluate(cache=...)`` writes one while it searches; ``knnlm sweep`` re-scores it over a grid
of k, weight and temperature without searching again. A cache folder holds one ``.npy`` per
array of :func:`cache_layout` (row i = the i-th scored target of the stream) and ``meta.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.fileio import (
    ARTIFACT_KEY,
    NpyRowWriter,
    check_npy,
    claim_target,
    read_meta,
    swap_in,
    temp_dir,
    write_json_atomic,
)

CACHE_KIND = "neighbour_cache"  # the artifact marker in a cache's meta.json


def cache_layout(k: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Per-row shape and dtype of each cache array."""
    return {
        "lm_log_prob": ((), np.float32),
        "targets": ((), np.int32),
        "ids": ((k,), np.int64),
        "dists": ((k,), np.float32),
        "values": ((k,), np.int32),
    }


def claim_cache(path: str | Path) -> None:
    """Refuse a cache target that holds something else (before any model is loaded)."""
    claim_target(path, CACHE_KIND, "meta.json", what="neighbour cache")


class NeighbourCache:
    """Writer of a neighbour cache of ``n`` rows of ``k`` neighbours.

    Written into ``<out>.partial`` and swapped in when complete; ``out`` must be new, empty,
    or a cache this toolkit wrote (a folder with the user's files is refused, untouched).
    """

    def __init__(self, out: str | Path, n: int, k: int, meta: dict):
        self.out = Path(out)
        claim_cache(self.out)
        self.partial = temp_dir(self.out, CACHE_KIND, "meta.json", fresh=True)
        self.meta = dict(meta, n=n, k=k, **{ARTIFACT_KEY: CACHE_KIND})
        self.writers = {
            name: NpyRowWriter(self.partial / f"{name}.npy", (n, *shape), dtype, True)
            for name, (shape, dtype) in cache_layout(k).items()
        }

    def write(self, row: int, **arrays: np.ndarray) -> None:
        """Rows ``row, row + 1, ...`` of the named arrays."""
        for name, arr in arrays.items():
            self.writers[name].write(row, arr)

    def finish(self) -> None:
        for w in self.writers.values():
            w.close()
        write_json_atomic(self.partial / "meta.json", self.meta)
        swap_in(self.partial, self.out, CACHE_KIND, "meta.json")


def load_cache(path: str | Path) -> dict:
    """A neighbour cache written by ``evaluate(cache=...)``; files checked before mapping."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise KnnlmError(f"no neighbour cache at {path}; create one with knnlm eval --cache")
    what = f"neighbour cache {path}"
    meta = read_meta(path / "meta.json", what)
    try:
        n, k = int(meta["n"]), int(meta["k"])
    except (KeyError, TypeError, ValueError):
        raise KnnlmError(f"{what}: meta.json lacks a valid n or k") from None
    arrays = {}
    for name, (shape, dtype) in cache_layout(k).items():
        check_npy(path / f"{name}.npy", (n, *shape), dtype, what)
        arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    return {"meta": meta, **arrays}
