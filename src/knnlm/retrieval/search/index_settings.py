"""The settings of one index build (:class:`IndexSettings`), checked once where they are
built; :func:`knnlm.retrieval.search.index_build.make_index` takes them whole and index.json
records what they resolved to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from knnlm.retrieval.search.conventions import KINDS, METRICS
from knnlm.settings import Settings, flag, require


@dataclass(frozen=True)
class IndexSettings(Settings):
    """How to index a datastore's keys.

    ``kind``: ``"flat"`` (exact) or ``"ivfpq"`` (``nlist`` lists, PQ with ``pq_m`` bytes of
    ``pq_bits`` bits, trained on ``train_size`` seeded rows; None: the library's defaults);
    a ``factory`` string (any ``faiss.index_factory`` one) makes it ``"factory"``. ``nprobe``
    is stored as the search default; ``pca=D`` puts a PCA to D dims in front. ``add_chunk``
    rows are read at a time, an IVF-PQ build checkpoints every ``checkpoint_every`` chunks.
    Example: ``IndexSettings("ivfpq", nlist=64, nprobe=8)``.
    """

    kind: str = "flat"
    metric: str = "l2"
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int = 8
    nprobe: int | None = None
    train_size: int | None = None
    add_chunk: int = 1_000_000
    seed: int = 0
    use_gpu: bool | str = "auto"
    checkpoint_every: int = 10
    factory: str | None = None
    pca: int | None = None

    def __post_init__(self) -> None:
        if self.factory is not None:  # a factory string says its own transforms
            require(self.pca is None, "pca",
                    'cannot be combined with <<factory>>; write "PCA<D>,..." in it')  # fmt: skip
            object.__setattr__(self, "kind", "factory")
        require(self.kind in KINDS, "kind",
                f"must be one of {', '.join(KINDS)}, got {self.kind!r}")  # fmt: skip
        require(self.kind != "factory" or bool(self.factory), "factory",
                "must be given for kind 'factory' (a faiss.index_factory string)")  # fmt: skip
        require(self.metric in METRICS, "metric",
                f"must be one of {', '.join(METRICS)}, got {self.metric!r}")  # fmt: skip
        for name in ("add_chunk", "nprobe", "checkpoint_every"):
            v = getattr(self, name)
            ok = v is None or (
                isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1
            )
            require(ok, name, f"must be a positive integer, got {v!r}")
        require(self.use_gpu in (True, False, "auto"), "use_gpu",
                f"must be True, False or 'auto', got {self.use_gpu!r}")  # fmt: skip


# How the CLI names the fields it sets (knnlm datastore index).
INDEX_FLAGS = flag({"kind": "--type", "pq_m": "--pq-bytes"})
