"""The index layer's public names in one place (kept for existing imports).

Building: :mod:`knnlm.retrieval.index_build`; searching: :mod:`knnlm.retrieval.search`;
exact re-ranking: :mod:`knnlm.retrieval.rerank`; shared conventions:
:mod:`knnlm.retrieval.index_common`.
"""

from knnlm.retrieval.index_build import (
    auto_nlist,
    auto_nprobe,
    auto_pq_m,
    build_index,
    index_summary,
    scan_fraction,
)
from knnlm.retrieval.index_common import DISTANCE_NOTE, INDEX_FILE, INDEX_META, open_keys
from knnlm.retrieval.rerank import KeyStore, recompute_distances
from knnlm.retrieval.search import KnnIndex, Searcher, exact_search

__all__ = [
    "DISTANCE_NOTE",
    "INDEX_FILE",
    "INDEX_META",
    "KeyStore",
    "KnnIndex",
    "Searcher",
    "auto_nlist",
    "auto_nprobe",
    "auto_pq_m",
    "build_index",
    "exact_search",
    "index_summary",
    "open_keys",
    "recompute_distances",
    "scan_fraction",
]
