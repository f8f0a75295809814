"""Self-exclusion: when the evaluated stream is the datastore's own, each target drops its row.

Every target position p >= 1 of a stream is scored exactly once, in stream order, so the
datastore row of position p is p - 1 whatever the context length and stride: exclusion needs
only the evaluated stream to be the datastore's own (equal corpus fingerprints). Datastores of
independent examples have no stream rows and are never excluded by position.
"""

from __future__ import annotations

import numpy as np

from knnlm.errors import KnnlmError
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
