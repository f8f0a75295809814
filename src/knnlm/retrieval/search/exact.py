"""Exact k-nearest-neighbour search in torch, on the CPU or a GPU.

The keys sit on the device (float16 / bfloat16 / float32; squared norms in float32), or are
streamed from the memory-mapped datastore in blocks when they exceed the device budget. A query
block is multiplied against key chunks (``q @ K^T`` with float32 accumulation and output),
turned into distances (squared L2 ``|q|^2 - 2 q.k + |k|^2``, or ``-q.k``), reduced to a top-k
per chunk and merged into the running top-k. The neighbour sets are exact (no approximate
candidate stage); ties are broken by row id, so results are deterministic and equal across
chunkings and shards. The distances are the float32 expansion (relative error ~1e-6 for LM
keys); ``recompute=True`` replaces the winners' by ``sum((q - k)^2)`` computed directly (what
the FAISS path reports), at the cost of gathering k keys per query: B * k * d values, more
than the search itself on a GPU, so it is off in :func:`knnlm.retrieval.search.choose.open_backend`.

On a GPU with 16-bit keys the float32 queries (and the keys' squared norms) are split into
two (bfloat16: three) 16-bit parts whose products with the keys are exact in float32: one GEMM
gives the distances, matching a float32 product to ~2^-22 relative, while the keys are read in
16 bits (:mod:`knnlm.retrieval.search.split_precision`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.retrieval.exclusion import exclusion_tensor
from knnlm.retrieval.search.conventions import check_k, check_metric, drop_pages
from knnlm.retrieval.search.protocol import Neighbours, check_queries, pad_columns
from knnlm.retrieval.search.split_precision import (
    fused_keys,
    fused_queries,
    fused_scores,
    fused_width,
    n_parts,
    norm_scale,
)

KEY_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCORE_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 28}  # float32 scores per chunk (256 MiB / 1 GiB)
GATHER_BYTES = 1 << 27  # float32 key bytes gathered per block when recomputing distances
BLOCK_BYTES = 1 << 28  # bytes of keys streamed from the memmap per block


def device_budget(device: torch.device) -> int:
    """Bytes the resident keys may take: 80% of free GPU memory, half of available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        return int(0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 32


def order(dist: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of candidates by (distance, row id)."""
    o = torch.argsort(rows, dim=1)
    dist, rows = dist.gather(1, o), rows.gather(1, o)
    o = torch.argsort(dist, dim=1, stable=True)
    return dist.gather(1, o), rows.gather(1, o)


def select_k(
    dist: torch.Tensor, rows: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row of ``dist`` (B, C) by (distance, row id), in no order.

    ``rows`` (B, C) are the candidates' row ids (None: the column index). torch.topk may take
    any of several equal values at the k-th place, so k + 1 are taken: where the (k+1)-th
    equals the k-th (rare), the row is redone by a full (distance, row) sort; elsewhere the
    (k+1)-th is dropped.
    """
    n = dist.shape[1]
    if k >= n:
        return dist, (idx_range(dist) if rows is None else rows)
    vals, idx = torch.topk(dist, k + 1, dim=1, largest=False, sorted=False)
    sel = idx if rows is None else rows.gather(1, idx)
    top2, pos = vals.topk(2, dim=1)  # the (k+1)-th and the k-th smallest, and where they are
    tied = (top2[:, 0] == top2[:, 1]).nonzero().squeeze(1)
    cols = torch.arange(k, device=dist.device)
    keep = cols + (cols >= pos[:, :1])  # every column but the (k+1)-th's
    vals, sel = vals.gather(1, keep), sel.gather(1, keep)
    if tied.numel():
        d_o, r_o = order(dist[tied], idx_range(dist[tied]) if rows is None else rows[tied])
        vals[tied], sel[tied] = d_o[:, :k], r_o[:, :k]
    return vals, sel


def idx_range(dist: torch.Tensor) -> torch.Tensor:
    """Column indices of ``dist`` as int64 (B, C)."""
    return torch.arange(dist.shape[1], device=dist.device).expand(dist.shape[0], -1)


class TorchExactSearch:
    """Brute-force search of ``keys`` (rows ``row_offset`` onwards of a datastore) in torch.

    ``keys``: (N, d) float16/float32 array (the datastore's memmap, or a shard of it), or a
    tensor (kept resident); ``values``: the datastore's values (all rows, for the lookup).
    """

    kind = "exact"
    chosen: dict[str, Any] = {}  # why open_backend chose it (knnlm.retrieval.search.choose)

    def __init__(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        metric: str = "l2",
        device: str | torch.device = "cpu",
        *,
        key_dtype: str | None = None,
        row_offset: int = 0,
        budget_bytes: int | None = None,
        recompute: bool = False,
        chunk_rows: int | None = None,
        split_queries: bool | None = None,
    ) -> None:
        self.metric = check_metric(metric)
        self.device = torch.device(device)
        self.keys_np = keys
        self.n_local, self.dim = keys.shape
        self.n = self.n_local
        self.row_offset = row_offset
        self.recompute = recompute
        self.chunk_rows = chunk_rows
        self.dtype = self._pick_dtype(key_dtype)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        budget = device_budget(self.device) if budget_bytes is None else budget_bytes
        # 16-bit keys on a GPU: the one-GEMM split-precision product (split_precision.py)
        split = self.device.type == "cuda" if split_queries is None else split_queries
        split = split and self.dtype != torch.float32
        self.width = fused_width(self.dim, n_parts(self.dtype), self.metric) if split else self.dim
        self.resident = torch.is_tensor(keys) or self.n_local * self.width * itemsize <= budget
        self.keys = self._load_keys() if self.resident else None
        self.norms = self._norms()
        self.values = torch.as_tensor(np.array(values) if not torch.is_tensor(values) else values)
        self.values = self.values.to(self.device)
        self.scale = norm_scale(self.norms, self.dtype) if split else None
        self.split_queries = split and self.scale is not None  # else norms beyond float16
        self.out_dtype_mm = self.split_queries and _has_out_dtype_mm(self.device, self.dtype)
        self.fused = None
        if self.split_queries and self.keys is not None:  # the keys are its first d columns
            self.fused = fused_keys(self.keys, self.norms, self.dtype, self.scale, self.metric)
            self.keys = self.fused[:, : self.dim]

    def _pick_dtype(self, key_dtype: str | None) -> torch.dtype:
        """float32 on the CPU (16-bit matmuls are slow there), the file's dtype on a GPU."""
        if key_dtype is not None:
            if key_dtype not in KEY_DTYPES:
                raise KnnlmError(
                    f"key dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}"
                )
            return KEY_DTYPES[key_dtype]
        if self.device.type == "cpu" or self.keys_np.dtype in (np.float32, torch.float32):
            return torch.float32
        return torch.float16

    def _block(self, s: int, e: int) -> torch.Tensor:
        """Rows s:e of the keys on the device in the search dtype (read from the memmap)."""
        if self.keys is not None:
            return self.keys[s:e]
        x = torch.from_numpy(np.array(self.keys_np[s:e]))
        drop_pages(self.keys_np)  # a pass reads the whole store: keep it out of our memory
        return x.to(self.device, non_blocking=True).to(self.dtype)

    def _load_keys(self) -> torch.Tensor:
        if torch.is_tensor(self.keys_np):  # keys already in memory (benchmarks, tests)
            return self.keys_np.to(self.device, self.dtype)
        out = torch.empty((self.n_local, self.dim), dtype=self.dtype, device=self.device)
        step = max(1, BLOCK_BYTES // (4 * self.dim))
        for s in range(0, self.n_local, step):
            x = torch.from_numpy(np.array(self.keys_np[s : s + step]))
            out[s : s + step] = x.to(self.device).to(self.dtype)
        return out

    def _norms(self) -> torch.Tensor:
        """Squared norms of the keys as stored on the device, in float32."""
        out = torch.empty(self.n_local, dtype=torch.float32, device=self.device)
        step = max(1, BLOCK_BYTES // (4 * self.dim))
        for s in range(0, self.n_local, step):
            out[s : s + step] = self._block(s, s + step).float().pow(2).sum(1)
        return out

    def _distances(
        self, q: torch.Tensor, qp: torch.Tensor | None, kc: torch.Tensor, s: int
    ) -> torch.Tensor:
        """(B, C) distances to rows s:s+C, less the per-query |q|^2 for L2 (added at the end:
        it does not change a query's ranking), in float32."""
        e = s + kc.shape[0]
        if qp is not None:  # one split-precision GEMM (16-bit keys on a GPU)
            kf = self.fused[s:e] if self.fused is not None else None
            if kf is None:  # streamed keys: the block's fused rows built on the device
                kf = fused_keys(kc, self.norms[s:e], self.dtype, self.scale, self.metric)
            return fused_scores(qp, kf, self.out_dtype_mm)
        norms = self.norms[s:e].unsqueeze(0)
        kt = kc.T if kc.dtype == torch.float32 else kc.float().T  # float32 product (the CPU)
        if self.metric == "l2":
            return torch.addmm(norms, q, kt, alpha=-2)  # one fused BLAS call
        return torch.addmm(norms, q, kt, beta=0, alpha=-1)

    def candidates(
        self, queries: torch.Tensor, k: int, exclude_rows: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(distances less |q|^2 for L2, global rows, exact distances or None) of the k
        best rows of this backend's keys, sorted by (distance, row), on its device; missing
        or excluded neighbours have distance +inf (marked -1 by :func:`finish`)."""
        q = queries.to(self.device, torch.float32)
        excl = exclusion_tensor(exclude_rows, q.shape[0], self.device)
        excl = None if excl is None else excl - self.row_offset
        qp = None
        if self.split_queries:
            qp = fused_queries(q, self.dtype, self.scale, self.metric, self.width)
        per_chunk = SCORE_ELEMENTS.get(self.device.type, 1 << 24) // max(1, q.shape[0])
        # chunks of at least 8k rows: selecting k of few rows is mostly merge overhead
        chunk = self.chunk_rows or max(per_chunk, 8 * k)
        best_d = torch.empty((q.shape[0], 0), dtype=torch.float32, device=self.device)
        best_r = torch.empty((q.shape[0], 0), dtype=torch.int64, device=self.device)
        for s in range(0, self.n_local, chunk):
            kc = self._block(s, min(s + chunk, self.n_local))
            dist = self._distances(q, qp, kc, s)
            if excl is not None:  # a query's own row is never its neighbour
                hit = ((excl >= s) & (excl < s + kc.shape[0])).nonzero().squeeze(1)
                dist[hit, excl[hit] - s] = float("inf")
            d, r = select_k(dist, None, k)
            best_d, best_r = select_k(torch.cat([best_d, d], 1), torch.cat([best_r, r + s], 1), k)
        best_d, best_r = order(best_d, best_r)
        exact = self.exact_distances(q, best_r) if self.recompute else None
        return best_d, best_r + self.row_offset, exact

    def exact_distances(self, q: torch.Tensor, local_rows: torch.Tensor) -> torch.Tensor:
        """sum((q - k)^2) (or -q.k) in float32 for each (query, local row), +inf for none."""
        out = torch.empty(local_rows.shape, dtype=torch.float32, device=self.device)
        step = max(1, GATHER_BYTES // max(1, 4 * self.dim * max(1, local_rows.shape[1])))
        for a in range(0, q.shape[0], step):
            r = local_rows[a : a + step]
            kg = self._gather(r.clamp_min(0)).float()  # (b, k, d)
            qa = q[a : a + step, None, :]
            d = (kg - qa).pow_(2).sum(-1) if self.metric == "l2" else -(kg * qa).sum(-1)
            out[a : a + step] = d
        return out

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        if self.keys is not None:
            return self.keys[rows]
        flat = rows.reshape(-1).cpu().numpy()
        uniq, inv = np.unique(flat, return_inverse=True)
        g = torch.from_numpy(np.array(self.keys_np[uniq])).to(self.device, self.dtype)
        return g[torch.from_numpy(inv).to(self.device)].reshape(*rows.shape, self.dim)

    def search(self, queries: torch.Tensor, k: int, exclude_rows: Any = None) -> Neighbours:
        """The k nearest rows of each query, on the queries' device (k > N pads -1 / +inf)."""
        k = check_k(k)
        check_queries(queries, self.dim)
        d, rows, exact = self.candidates(queries, k, exclude_rows)
        qn = squared_norms(queries.to(self.device, torch.float32), self.metric)
        return finish(d, rows, exact, qn, k, self.values).to(queries.device)

    def describe(self) -> dict[str, Any]:
        return describe_exact(self, shards=1) | self.chosen


def describe_exact(s: TorchExactSearch, shards: int) -> dict[str, Any]:
    return {
        "search": "exact",
        "engine": "torch",
        "device": str(s.device),
        "key_dtype": str(s.dtype).removeprefix("torch."),
        "keys_resident": s.resident,
        "metric": s.metric,
        "shards": shards,
        "exact_neighbours": True,
        "exact_distances": s.recompute,  # else the float32 expansion, ~1e-6 relative
    }


def squared_norms(q: torch.Tensor, metric: str) -> torch.Tensor | None:
    """The |q|^2 that L2 candidate distances leave out (None for inner product)."""
    return q.pow(2).sum(1, keepdim=True) if metric == "l2" else None


def finish(
    d: torch.Tensor,
    rows: torch.Tensor,
    exact: torch.Tensor | None,
    qn: torch.Tensor | None,
    k: int,
    table: torch.Tensor,
) -> Neighbours:
    """Merged candidates -> Neighbours: |q|^2 added back (L2, clamped at 0; the order stays
    the candidates' (distance, row) order), or the exact distances re-sorted when given;
    missing neighbours as -1 / +inf, padded to k columns."""
    missing = torch.isinf(d)
    rows = rows.masked_fill(missing, -1)
    if exact is not None:
        d, rows = order(exact.masked_fill(missing, float("inf")), rows)  # +inf entries last
    elif qn is not None:  # the (distance, row) order of the candidates stays
        d = (d + qn).clamp_(min=0)
    d, rows = pad_columns(d, rows, k)
    return Neighbours.lookup(d, rows, table)


def _has_out_dtype_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm can multiply 16-bit inputs into a float32 output on this device."""
    try:
        a = torch.ones((2, 2), dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False
