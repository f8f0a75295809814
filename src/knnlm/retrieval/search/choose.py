"""Open the search backend ``--search`` names (see :mod:`knnlm.retrieval.search.protocol`).

FAISS is optional (imported guarded in :mod:`knnlm.retrieval.search.faiss_lib`), so ``exact``
runs where it is not installed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from knnlm.retrieval.search.faiss_backend import FaissBackend
from knnlm.retrieval.search.faiss_lib import has_faiss
from knnlm.retrieval.search.protocol import SearchBackend, check_search, has_index
from knnlm.retrieval.search.sharded import open_exact


def resolve_search(search: str, ds_dir: str | Path) -> str:
    """``exact`` or ``faiss``: what ``auto`` means for this datastore."""
    if check_search(search) != "auto":
        return search
    # auto with an index but no faiss installed: search exactly rather than fail
    return "faiss" if has_index(ds_dir) and has_faiss() else "exact"


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
    The exact backend's neighbours are exact already; its distances are the float32 expansion
    |q|^2 - 2 q.k + |k|^2 (~1e-6 relative), not recomputed (that would gather k keys per query).
    ``key_dtype`` (exact only): float16, bfloat16 or float32 keys on the device.
    """
    kind = resolve_search(search, ds_dir)
    if kind == "faiss":
        return FaissBackend(ds_dir, metric=metric, nprobe=nprobe, recompute=recompute,
                            progress=progress)  # fmt: skip
    return open_exact(ds_dir, device=device, metric=metric, key_dtype=key_dtype,
                      progress=progress)  # fmt: skip
