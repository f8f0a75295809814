"""Indexes from a FAISS ``index_factory`` string (any layout FAISS names)."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.conventions import f32
from knnlm.retrieval.search.faiss_lib import faiss, faiss_metric


def build_factory(
    keys: np.ndarray, factory: str, metric: str, train_size: int | None, seed: int,
    chunk: int, progress: bool,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """``faiss.index_factory(d, factory, metric)`` trained on a seeded sample, keys added."""
    n, d = keys.shape
    try:
        index = faiss.index_factory(d, factory, faiss_metric(metric))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise KnnlmError(f"FAISS cannot build the index {factory!r}: {msg}") from e
    size = min(n, train_size or 100_000)
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        index.train(f32(keys[rows]))
    for s in tqdm(range(0, n, chunk), desc="factory index", disable=not progress):
        index.add(f32(keys[s : s + chunk]))
    info = {"factory": factory, "faiss_class": type(index).__name__, "train_size": size}
    ivf = _ivf_or_none(index)
    info.update(nlist=None if ivf is None else int(ivf.nlist), pq_m=None, pq_bits=None)
    return index, info


def _ivf_or_none(index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None
