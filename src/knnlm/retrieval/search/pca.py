"""PCA keys (He et al., EMNLP 2021): a FAISS ``PCAMatrix`` in front of the index.

The index then stores and compares ``D``-dimensional projections of the keys; queries keep the
model's full dimension d (``IndexPreTransform`` projects them), and exact re-ranking, when on,
recomputes distances from the full keys in the datastore. The PCA is trained on a seeded random
sample of the keys; with ``D = d`` it is a rotation about the mean, which preserves L2 distances
(up to rounding), so the search is unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.faiss_lib import faiss

# PCA needs far fewer points than IVF-PQ: the covariance of d dims settles with ~100 d samples.
PCA_SAMPLE_PER_DIM = 256


def check_pca(pca: int | None, dim: int) -> int | None:
    """The output dimension, or None for no PCA; a bad value is a one-line error."""
    if pca is None:
        return None
    if not isinstance(pca, (int, np.integer)) or isinstance(pca, bool) or not 1 <= pca <= dim:
        raise KnnlmError(f"--pca must be an integer in 1..{dim} (the key dimension), got {pca!r}")
    return int(pca)


def pca_sample_size(n: int, dim: int) -> int:
    return min(n, max(PCA_SAMPLE_PER_DIM * dim, 10_000))


def train_pca(sample: np.ndarray, out_dim: int) -> Any:
    """A FAISS PCAMatrix d -> out_dim trained on float32 ``sample`` (no whitening)."""
    pca = faiss.PCAMatrix(sample.shape[1], out_dim)
    pca.train(np.ascontiguousarray(sample, dtype=np.float32))
    return pca


def base_index(index: Any) -> Any:
    """The index behind a PCA pre-transform (the index itself when there is none)."""
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


def with_pca(pca: Any, index: Any) -> Any:
    """``index`` (over D-dim vectors) behind ``pca``: it takes d-dim vectors to add and search."""
    return faiss.IndexPreTransform(pca, index)
