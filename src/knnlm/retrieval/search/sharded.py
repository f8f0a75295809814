"""Exact search sharded over the ranks of a torch.distributed job (gloo on CPU, NCCL on GPU).

Under ``torchrun --nproc_per_node N -m knnlm eval ...`` each rank holds a contiguous shard of
the datastore's rows. A search all-gathers the queries of every rank, each rank finds the top-k
of all of them in its shard (global row ids, sorted by (distance, row)), the candidates are
all-gathered, and each rank merges those of its own queries. Shards are in row order, so the
merge (stable on distance) breaks ties by row id exactly as one process does: the neighbours
equal the single-process ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from knnlm.retrieval.exclusion import exclusion_tensor
from knnlm.retrieval.search.conventions import INDEX_META, check_k, check_metric, open_keys
from knnlm.retrieval.search.exact import (
    TorchExactSearch,
    describe_exact,
    finish,
    squared_norms,
)
from knnlm.retrieval.search.protocol import Neighbours, check_queries


def world() -> tuple[int, int]:
    """(rank, world size) of the running torch.distributed job, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, size: int) -> list[int]:
    """Row boundaries of ``size`` contiguous shards of n rows (sizes differ by at most one)."""
    return [int(b) for b in np.linspace(0, n, size + 1).round()]


inf = float("inf")


def _pad_cols(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """Candidates padded to k columns (a shard smaller than k has fewer)."""
    return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=fill)


def _gather(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Every rank's ``x`` (its first dimension ``counts[rank]``), padded for all_gather."""
    pad = torch.zeros((max(counts) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    xp = torch.cat([x, pad]).contiguous()
    out = [torch.empty_like(xp) for _ in counts]
    dist.all_gather(out, xp)
    return [o[:c] for o, c in zip(out, counts, strict=True)]


class ShardedExactSearch:
    """This rank's shard of the rows, searched together with the other ranks' shards."""

    kind = "exact"
    chosen: dict[str, Any] = {}

    def __init__(self, local: TorchExactSearch, n_total: int) -> None:
        self.local = local
        self.metric, self.dim, self.n = local.metric, local.dim, n_total
        self.device = local.device
        self.rank, self.size = world()

    def search(self, queries: torch.Tensor, k: int, exclude_rows: Any = None) -> Neighbours:
        """Like :meth:`TorchExactSearch.search`; every rank must call it (collective)."""
        k = check_k(k)
        check_queries(queries, self.dim)
        dev = self.local.device  # the collectives' device (NCCL: this rank's GPU)
        q = queries.to(dev, torch.float32)
        excl = exclusion_tensor(exclude_rows, q.shape[0], dev)
        excl = (
            torch.full((q.shape[0],), -1, dtype=torch.int64, device=dev) if excl is None else excl
        )
        counts = [int(c) for c in _gather(torch.tensor([q.shape[0]], device=dev), [1] * self.size)]
        all_q = torch.cat(_gather(q, counts))
        all_ex = torch.cat(_gather(excl, counts))
        d, r, e = self.local.candidates(all_q, k, all_ex)
        cols = [_pad_cols(t, k, fill) for t, fill in ((d, inf), (r, -1), (e, inf)) if t is not None]
        got = [_gather(t, [all_q.shape[0]] * self.size) for t in cols]
        lo = sum(counts[: self.rank])
        mine = [torch.cat([g[lo : lo + q.shape[0]] for g in per_rank], 1) for per_rank in got]
        # shards in row order, each sorted by (distance, row): a stable sort keeps row order
        o = torch.argsort(mine[0], dim=1, stable=True)[:, :k]
        mine = [t.gather(1, o) for t in mine]
        exact = mine[2] if e is not None else None
        qn = squared_norms(q, self.metric)
        return finish(mine[0], mine[1], exact, qn, k, self.local.values).to(queries.device)

    def describe(self) -> dict[str, Any]:
        return describe_exact(self.local, shards=self.size) | self.chosen


def index_metric(ds_dir: Path) -> str | None:
    """The metric of the datastore's index, if it has one (exact search then agrees with it)."""
    try:
        return json.loads((ds_dir / INDEX_META).read_text()).get("metric")
    except (OSError, ValueError, AttributeError):
        return None


def open_exact(
    ds_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    metric: str | None = None,
    recompute: bool = False,
    key_dtype: str | None = None,
    progress: bool = False,
) -> TorchExactSearch | ShardedExactSearch:
    """The torch exact backend for a datastore: sharded when a torch.distributed job runs.

    A folder of keys without values.npy (benchmarks) gets values 0. ``progress`` is accepted
    for symmetry with FAISS; the scan has no bar.
    """
    ds = Path(ds_dir)
    keys, _ = open_keys(ds)
    metric = check_metric(metric or index_metric(ds) or "l2")
    vpath = ds / "values.npy"
    values = np.load(vpath, mmap_mode="r") if vpath.is_file() else np.zeros(len(keys), np.int32)
    rank, size = world()
    bounds = shard_bounds(len(keys), size)
    lo, hi = bounds[rank], bounds[rank + 1]
    local = TorchExactSearch(keys[lo:hi], values, metric, device, key_dtype=key_dtype,
                             row_offset=lo, recompute=recompute)  # fmt: skip
    return local if size == 1 else ShardedExactSearch(local, len(keys))
