"""One retrieval interface: every search backend answers ``search(queries, k, exclude_rows)``.

A backend (:class:`SearchBackend`) holds a datastore's keys (or a shard of them) and returns
:class:`Neighbours` on the queries' device, so the kNN distribution, the interpolation, the
neighbour cache and generation consume the same tensors whatever searched them.

Backends, chosen by ``--search`` (:func:`knnlm.retrieval.search.choose.open_backend`, whose
module states the rule ``auto`` follows):

- ``exact``: exact neighbour sets, ties broken by row id: brute force in torch on the LM's
  device (:mod:`knnlm.retrieval.search.exact`; sharded over the ranks of a torch.distributed
  job, :mod:`knnlm.retrieval.search.sharded`), or ``faiss.knn`` on the CPU
  (:mod:`knnlm.retrieval.search.exact_faiss`).
- ``faiss``: the datastore's saved FAISS index (:mod:`knnlm.retrieval.search.faiss_backend`),
  re-ranked exactly by default; approximate neighbour sets for IVF-PQ. Needs the faiss package.
- ``auto``: the fastest of these for the device and the store.

Distances follow :mod:`knnlm.retrieval.search.conventions`: smaller is closer (squared L2, or the
negated inner product for ``ip``); a missing neighbour has row -1 and distance +inf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from knnlm.errors import KnnlmError

SEARCH_CHOICES = ("exact", "faiss", "auto")

# Backends added through the library API (register_backend): name -> opener(ds_dir, **options)
REGISTERED: dict[str, Callable[..., Any]] = {}


@dataclass
class Neighbours:
    """The k neighbours of each of B queries, on the queries' device."""

    distances: torch.Tensor  # (B, k) float32, ascending; +inf where missing
    rows: torch.Tensor  # (B, k) int64 datastore rows; -1 = none
    values: torch.Tensor  # (B, k) int64 next-token ids; 0 where rows == -1

    @classmethod
    def lookup(cls, distances: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> Neighbours:
        """Neighbours whose values are read from ``table`` (the datastore's values, int64)."""
        values = gather_rows(table.to(rows.device), rows).long().masked_fill(rows < 0, 0)
        return cls(distances, rows, values)

    def to(self, device: torch.device | str) -> Neighbours:
        return Neighbours(self.distances.to(device), self.rows.to(device), self.values.to(device))


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for a (B, k) ``rows`` (-1 reads row 0): a flat ``index_select``, which on
    the CPU is ~15x faster than indexing with the 2-D tensor itself."""
    flat = rows.clamp_min(0).reshape(-1)
    return table.index_select(0, flat).view(rows.shape)


class SearchBackend(Protocol):
    """What every backend provides; ``describe()`` goes into the results JSON (at least
    ``search``, ``engine`` and, set by open_backend, ``requested`` / ``why``)."""

    kind: str  # "exact" or "faiss"
    metric: str  # "l2" or "ip"
    n: int  # rows searched (all ranks together)
    dim: int
    device: torch.device  # where queries are searched without a copy (cpu for FAISS)
    chosen: dict[str, Any]  # what was asked for and why this backend (set by open_backend)

    def search(
        self, queries: torch.Tensor, k: int, exclude_rows: Any = None
    ) -> Neighbours:  # pragma: no cover - protocol
        ...

    def describe(self) -> dict[str, Any]:  # pragma: no cover - protocol
        ...


def search_choices() -> tuple[str, ...]:
    return SEARCH_CHOICES + tuple(REGISTERED)


def check_search(search: str) -> str:
    if search not in search_choices():
        choices = ", ".join(search_choices())
        raise KnnlmError(f"--search must be one of {choices}, got {search!r}")
    return search


def register_backend(name: str, opener: Callable[..., Any]) -> None:
    """Add a search backend under ``name`` (library API; the CLI's --search lists the built-in
    ones). ``opener(ds_dir, *, device, metric, nprobe, recompute, key_dtype, progress)``
    returns a :class:`SearchBackend`; :func:`knnlm.retrieval.search.choose.open_backend` calls
    it when ``search == name``, and ``KnnSettings(search=name)`` then searches with it."""
    if name in SEARCH_CHOICES:
        raise KnnlmError(f"search backend name {name!r} is built in; choose another")
    REGISTERED[name] = opener


def has_index(ds_dir: str | Path) -> bool:
    """True when the datastore has a FAISS index file and its metadata (complete or pending)."""
    ds = Path(ds_dir)
    meta = (ds / "index.json").is_file() or (ds / "index.json.pending").is_file()
    return (ds / "index.faiss").is_file() and meta


def pad_columns(
    dist: torch.Tensor, rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or pad (with +inf / -1) to exactly k columns."""
    if dist.shape[1] >= k:
        return dist[:, :k], rows[:, :k]
    pad = k - dist.shape[1]
    dist = torch.nn.functional.pad(dist, (0, pad), value=float("inf"))
    return dist, torch.nn.functional.pad(rows, (0, pad), value=-1)


def check_queries(queries: Any, dim: int) -> None:
    if not torch.is_tensor(queries) or queries.ndim != 2 or queries.shape[1] != dim:
        shape = tuple(queries.shape) if hasattr(queries, "shape") else type(queries).__name__
        raise KnnlmError(f"queries must be a tensor of shape (n, {dim}), got {shape}")
    if queries.numel() and not torch.isfinite(queries).all():
        raise KnnlmError("queries contain NaN or infinite values")
