"""Self-exclusion: when the evaluated stream is the datastore's own, each target drops its row.

Every target position p >= 1 of a stream is scored exactly once, in stream order, so the
datastore row of position p is p - 1 whatever the context length and stride: exclusion needs
only the evaluated stream to be the datastore's own (equal corpus fingerprints). Datastores of
independent examples have no stream rows and are never excluded by position.

The one home of self-exclusion: which stream excludes (:func:`should_exclude`), which row a
target drops (:func:`own_rows`), the rows a search is given (:func:`exclusion_tensor`) and, for
backends that cannot skip a row while scanning (FAISS), dropping it from their results
(:func:`drop_rows`). Torch exact search skips it while scanning
(:meth:`knnlm.retrieval.search.exact.TorchExactSearch.candidates`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from knnlm.errors import KnnlmError

if TYPE_CHECKING:  # search backends import this module; the datastore is only a type here
    from knnlm.retrieval.datastore import Datastore


def is_own_stream(ds: Datastore, eval_fp: str) -> bool:
    """True when ``eval_fp`` is the fingerprint of the stream the datastore was built on."""
    stream_built = ds.meta.get("context_len") is not None
    return stream_built and ds.meta.get("corpus_fingerprint") == eval_fp


def should_exclude(ds: Datastore, mode: str, eval_fp: str) -> bool:
    """Whether each target drops its own datastore row (``mode``: auto, yes or no).

    ``yes`` on a stream that is not the datastore's own is a user mistake (KnnlmError).
    """
    same = is_own_stream(ds, eval_fp)
    if mode == "yes" and not same:
        raise KnnlmError(
            f"--exclude-self yes needs the token stream the datastore {ds.path} was built on "
            f"({ds.meta.get('corpus')} {ds.meta.get('split')}); this text differs"
        )
    exclude = mode == "yes" or (mode == "auto" and same)
    if exclude and ds.meta.get("pruned"):
        raise KnnlmError(
            f"datastore {ds.path} is pruned (its rows merge several positions), so a target "
            "cannot drop only its own entry: evaluate another split, or pass --exclude-self no"
        )
    return exclude


def own_rows(positions: np.ndarray) -> np.ndarray:
    """Datastore row of each target position of the datastore's own stream: p - 1."""
    return np.asarray(positions, dtype=np.int64) - 1


def exclusion_tensor(
    exclude_rows: Any, n_queries: int, device: torch.device
) -> torch.Tensor | None:
    """``exclude_rows`` (array or tensor of B ints, -1 = none) as int64 on ``device``."""
    if exclude_rows is None:
        return None
    ex = torch.as_tensor(
        np.asarray(exclude_rows) if not torch.is_tensor(exclude_rows) else exclude_rows
    )
    if ex.shape != (n_queries,) or ex.dtype.is_floating_point or ex.dtype == torch.bool:
        raise KnnlmError(f"exclude_rows must be integers of shape ({n_queries},)")
    return ex.to(device=device, dtype=torch.int64)


def drop_rows(
    dist: torch.Tensor, rows: torch.Tensor, excl: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's excluded row made a missing entry (-1 / +inf) and moved to the end; the
    order of the others is kept."""
    hit = (rows == excl[:, None]) & (excl[:, None] >= 0)
    dist = dist.masked_fill(hit, float("inf"))
    rows = rows.masked_fill(hit, -1)
    o = torch.argsort(hit.to(torch.uint8), dim=1, stable=True)
    return dist.gather(1, o), rows.gather(1, o)
