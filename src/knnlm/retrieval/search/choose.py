"""Open the search backend ``--search`` names; ``auto`` picks the fastest for device and store.

FAISS is optional (imported guarded in :mod:`knnlm.retrieval.search.faiss_lib`), so exact
search runs where it is not installed.

The rule (:func:`choose_search`; the choice and why go into the backend's ``describe()``, which
``eval`` writes into its results JSON):

- ``auto`` on a GPU: torch exact search with the keys resident on the GPU when they fit its
  budget (80% of free memory), whatever index exists: a GPU scans 500k x 256 16-bit keys in a
  few ms a batch, faster than the CPU index. Beyond the budget the keys are streamed from the
  memmap for every search call, which pays off only while streaming beats the index: streaming
  is chosen when there is no index, or when its estimated time a query,
  key bytes / :data:`STREAM_BYTES_PER_S` / :data:`QUERIES_PER_CALL`, is below the index's,
  scan_fraction x N x code bytes / (:data:`SCAN_BYTES_PER_S` x cores) +
  k x d x 2 / :data:`RERANK_BYTES_PER_S` (re-ranking k = 1024 float16 keys); else the index.
- ``auto`` on the CPU with an index (and FAISS): the index with exact re-ranking.
- ``auto`` on the CPU without an index: ``faiss.knn`` over the keys held in RAM as float32
  when FAISS is installed, the store has at least :data:`FAISS_KNN_MIN_KEYS` keys and they fit
  half the available RAM (same neighbours as torch, ties by row, 1.6-2x faster); torch exact
  otherwise (streamed from the memmap beyond the budget).
- ``exact``: torch exact search on the LM's device (the same engine on every device and
  shard count, so runs compare number for number); under torch.distributed (several ranks),
  sharded over the ranks, whatever was asked.
- ``faiss``: the index; without one, ``faiss.knn`` brute force (exact).

Exact search on the CPU over more than :data:`EXACT_CPU_WARN_KEYS` keys logs a one-line
warning with the fix (build an index).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.retrieval.search.conventions import INDEX_META, PARTIAL_FILE, log, open_keys
from knnlm.retrieval.search.exact import device_budget
from knnlm.retrieval.search.exact_faiss import FaissExactSearch
from knnlm.retrieval.search.faiss_backend import FaissBackend
from knnlm.retrieval.search.faiss_lib import has_faiss
from knnlm.retrieval.search.protocol import REGISTERED, SearchBackend, check_search, has_index
from knnlm.retrieval.search.sharded import index_metric, open_exact, world

# Assumed rates of the streaming-versus-index estimate (stated, not measured per machine):
STREAM_BYTES_PER_S = 8e9  # memmapped keys copied host -> GPU (pageable memory)
QUERIES_PER_CALL = 1024  # queries one search call streams the keys for (an eval batch)
SCAN_BYTES_PER_S = 2e9  # PQ / flat code bytes one CPU core scans
RERANK_BYTES_PER_S = 4e9  # float16 keys gathered for exact re-ranking
RERANK_K = 1024  # eval's default k
EXACT_CPU_WARN_KEYS = 1_000_000
# Below this many keys auto's exact CPU search stays torch's: either takes well under a
# millisecond a query there, and small stores (Macondo's, the tests') then give the same
# numbers under auto and --search exact.
FAISS_KNN_MIN_KEYS = 65_536  # ~1 GFLOP a query at d = 256: ~100 tok/s on 2 cores


@dataclass(frozen=True)
class StoreFacts:
    """What the choice depends on: the device, the store's size and index, FAISS's presence."""

    device_type: str  # "cpu" or "cuda"
    n: int
    dim: int
    file_itemsize: int  # bytes per stored key value (2 for float16)
    budget: int  # bytes the resident keys may take on the device
    index: dict[str, Any] | None  # index.json, or None without a (complete) index
    faiss: bool
    ranks: int = 1
    cores: int = 1


@dataclass(frozen=True)
class SearchChoice:
    search: str  # "exact" or "faiss"
    engine: str  # "torch", "torch (streamed)", "faiss.knn" or "faiss index"
    why: str


def _exact(f: StoreFacts, why: str, fastest: bool = True) -> SearchChoice:
    """Exact search on the facts' device: torch's, or (``fastest``) faiss.knn on one CPU."""
    if f.ranks > 1:
        return SearchChoice("exact", "torch", f"{why}; sharded over {f.ranks} ranks")
    torch_bytes = f.n * f.dim * (4 if f.device_type == "cpu" else min(f.file_itemsize, 2))
    fits = torch_bytes <= f.budget
    big = f.n >= FAISS_KNN_MIN_KEYS
    if fastest and big and f.device_type == "cpu" and f.faiss and f.n * f.dim * 4 <= f.budget:
        return SearchChoice("exact", "faiss.knn", f"{why}; faiss.knn over float32 keys in RAM")
    engine = "torch" if fits else "torch (streamed)"
    return SearchChoice("exact", engine, why + ("" if fits else "; keys beyond the budget"))


def stream_beats_index(f: StoreFacts) -> bool:
    """Whether streaming the keys to the GPU each call is estimated faster than the index."""
    stream = f.n * f.dim * f.file_itemsize / STREAM_BYTES_PER_S / QUERIES_PER_CALL
    info = f.index or {}
    code_bytes = info.get("pq_m") or (info.get("pca") or f.dim) * 4
    scanned = (info.get("scan_fraction") or 1.0) * f.n * code_bytes
    index = scanned / (SCAN_BYTES_PER_S * max(1, f.cores))
    index += RERANK_K * f.dim * 2 / RERANK_BYTES_PER_S
    return stream < index


def choose_search(search: str, f: StoreFacts) -> SearchChoice:
    """The backend and engine for ``search`` (exact, faiss or auto) given the facts."""
    check_search(search)
    if search == "faiss":
        if f.index is None:
            return SearchChoice("exact", "faiss.knn", "--search faiss without an index")
        return SearchChoice("faiss", "faiss index", "--search faiss")
    if search == "exact":
        return _exact(f, "--search exact: torch", fastest=False)
    if f.device_type == "cuda" and f.ranks == 1:
        if f.n * f.dim * 2 <= f.budget:
            return SearchChoice("exact", "torch", "auto: the keys fit the GPU: exact on the GPU")
        if f.index is not None and f.faiss and not stream_beats_index(f):
            return SearchChoice(
                "faiss", "faiss index", "auto: keys beyond the GPU budget; the index is faster"
            )
        return _exact(f, "auto: keys beyond the GPU budget; streaming beats the index")
    if f.index is not None and f.faiss:
        return SearchChoice("faiss", "faiss index", "auto: the datastore has an index")
    why = "auto: no index" if f.index is None else "auto: an index but no faiss package"
    return _exact(f, why)


def store_facts(ds_dir: str | Path, device: torch.device) -> StoreFacts:
    """The facts :func:`choose_search` needs, read from the datastore and the machine."""
    ds = Path(ds_dir)
    keys, _ = open_keys(ds)
    info = None
    if has_index(ds):
        try:
            info = json.loads((ds / INDEX_META).read_text())
        except (OSError, ValueError):  # a pending commit: the index loader sorts it out
            info = {}
    return StoreFacts(
        device_type=device.type, n=keys.shape[0], dim=keys.shape[1],
        file_itemsize=keys.dtype.itemsize, budget=device_budget(device), index=info,
        faiss=has_faiss(), ranks=world()[1], cores=os.cpu_count() or 1,
    )  # fmt: skip


def resolve_search(search: str, ds_dir: str | Path, device: str | torch.device = "cpu") -> str:
    """``exact`` or ``faiss`` (or a registered name): what ``search`` means for this
    datastore on ``device``."""
    if check_search(search) in REGISTERED:
        return search
    return choose_search(search, store_facts(ds_dir, torch.device(device))).search


def warn_slow_exact(choice: SearchChoice, f: StoreFacts, ds: Path) -> None:
    """One line when exact search on the CPU meets a large store (with the fix), or when an
    index build was cut short."""
    if choice.search != "exact" or f.device_type != "cpu":
        return
    if (ds / PARTIAL_FILE).is_file() and f.index is None:
        log.warning("the index build of %s did not finish; searching exactly (rerun "
                    "`knnlm datastore index %s` to finish it)", ds, ds)  # fmt: skip
    elif f.n >= EXACT_CPU_WARN_KEYS:
        gflop = 2 * f.n * f.dim / 1e9
        log.warning("exact search over %d keys on the CPU is slow (~%.1f GFLOP a query): build "
                    "an index with `knnlm datastore index %s` (--search auto then uses it)",
                    f.n, gflop, ds)  # fmt: skip


def open_backend(
    ds_dir: str | Path,
    search: str = "auto",
    *,
    device: str | torch.device = "cpu",
    metric: str | None = None,
    nprobe: int | None = None,
    recompute: bool = True,
    key_dtype: str | None = None,
    progress: bool = False,
) -> SearchBackend:
    """The backend ``search`` names for the datastore in ``ds_dir`` (see the module doc).

    ``recompute``: FAISS re-ranks its candidates with exact distances from the stored keys.
    The exact backends' neighbours are exact already; their distances are the float32
    expansion |q|^2 - 2 q.k + |k|^2 (~1e-6 relative), not recomputed (that would gather k keys
    per query). ``key_dtype`` (torch exact only): float16, bfloat16 or float32 keys on the
    device.
    """
    ds, device = Path(ds_dir), torch.device(device)
    if check_search(search) in REGISTERED:
        backend = REGISTERED[search](ds, device=device, metric=metric, nprobe=nprobe,
                                     recompute=recompute, key_dtype=key_dtype, progress=progress)  # fmt: skip
        backend.chosen = {"requested": search, "why": "a registered backend"}
        return backend
    facts = store_facts(ds, device)
    choice = choose_search(search, facts)
    warn_slow_exact(choice, facts, ds)
    if choice.engine == "faiss index":
        backend = FaissBackend(ds, metric=metric, nprobe=nprobe, recompute=recompute,
                               progress=progress)  # fmt: skip
    elif choice.engine == "faiss.knn" and key_dtype in (None, "float32"):
        backend = open_faiss_exact(ds, metric)
    else:
        backend = open_exact(ds, device=device, metric=metric, key_dtype=key_dtype)
    backend.chosen = {"requested": search, "why": choice.why}
    return backend


def open_faiss_exact(ds: Path, metric: str | None) -> FaissExactSearch:
    keys, _ = open_keys(ds)
    vpath = ds / "values.npy"
    values = np.load(vpath, mmap_mode="r") if vpath.is_file() else np.zeros(len(keys), np.int32)
    return FaissExactSearch(keys, values, metric or index_metric(ds) or "l2")
