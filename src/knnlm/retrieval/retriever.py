"""A datastore checked against the LM, searched with the kNN settings: keys in, p_knn out.

Every consumer (perplexity, continuation scoring, the projection, generation) retrieves the
same way through :class:`Retriever`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.combiner import knn_log_probs, knn_target_log_prob
from knnlm.retrieval.datastore import Datastore, open_datastore
from knnlm.retrieval.gate import Gate
from knnlm.retrieval.pointers import row_distances
from knnlm.retrieval.search.choose import open_backend
from knnlm.retrieval.search.protocol import Neighbours, SearchBackend, gather_rows, search_choices
from knnlm.settings import Settings, flag, require


@dataclass(frozen=True)
class KnnSettings(Settings):
    """How the datastore is searched (how p_knn is mixed in is :class:`MixSettings`'); checked
    once, here.

    ``k`` neighbours per query, ``search`` a backend name
    (:mod:`knnlm.retrieval.search.protocol`; ``nprobe`` is FAISS's), ``recompute`` exact
    distances for a FAISS index, ``exclude_self`` auto | yes | no.
    Example: ``KnnSettings(k=16, search="exact")``.
    """

    k: int = 1024
    recompute: bool = True
    nprobe: int | None = None
    exclude_self: str = "auto"  # auto | yes | no
    search: str = "auto"

    def __post_init__(self) -> None:
        require(isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1, "k",
                f"must be a whole number of at least 1, got {self.k!r}")  # fmt: skip
        require(self.exclude_self in ("auto", "yes", "no"), "exclude_self",
                f"must be auto, yes or no, got {self.exclude_self!r}")  # fmt: skip
        require(self.search in search_choices(), "search",
                f"must be one of {', '.join(search_choices())}, got {self.search!r}")  # fmt: skip


# How the CLI and the Python API name the fields they set.
KNN_FLAGS = flag({"k": "--k"})
KNN_ARGS: dict[str, str] = {}


@dataclass(frozen=True)
class MixSettings(Settings):
    """What is mixed with the LM and how: p_knn at ``knn_weight`` (the paper's lambda is
    1 - knn_weight) with the softmax ``temperature`` over -distance, the MLP memory
    (``memory`` folder, ``memory_weight`` on it), a retrieval gate (``gate``: a folder or a
    loaded ``Gate``; it searches the share ``retrieval_rate`` of the tokens it ranks highest,
    at ``knn_weight`` or, ``gate_weight="learned"``, at the weight an mlp gate predicts) and
    RetoMaton ``pointers`` (a threshold). Example: ``MixSettings(knn_weight=0.3,
    memory="runs/mem", memory_weight=0.3)``.
    """

    knn_weight: float = 0.25
    temperature: float = 1.0
    memory: str | Path | None = None
    memory_weight: float = 0.25
    gate: str | Path | Gate | None = None
    retrieval_rate: float = 1.0
    gate_weight: str = "fixed"  # fixed | learned
    pointers: float | None = None

    def __post_init__(self) -> None:
        require(0.0 <= self.knn_weight <= 1.0, "knn_weight",
                f"must be in [0, 1], got {self.knn_weight}")  # fmt: skip
        require(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        require(0.0 <= self.memory_weight <= 1.0, "memory_weight",
                f"must be in [0, 1], got {self.memory_weight}")  # fmt: skip
        require(0.0 <= self.retrieval_rate <= 1.0, "retrieval_rate",
                f"must be in [0, 1], got {self.retrieval_rate}")  # fmt: skip
        require(self.gate_weight in ("fixed", "learned"), "gate_weight",
                f"must be fixed or learned, got {self.gate_weight!r}")  # fmt: skip
        no_gate = self.gate is None
        require(not (no_gate and self.gate_weight == "learned"), "gate_weight",
                "learned needs <<gate>> (an mlp gate predicts the weight)")  # fmt: skip
        require(not (no_gate and self.retrieval_rate != 1.0), "retrieval_rate",
                "needs <<gate>> (the gate decides which tokens)")  # fmt: skip
        p = self.pointers
        require(p is None or p >= 1, "pointers", f"must be at least 1 (or inf), got {p}")
        require(p is None or no_gate, "pointers",
                "and <<gate>> do not combine: each decides which tokens search")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """As written into results: a loaded gate as its folder."""
        d = super().to_dict()
        if isinstance(self.gate, Gate):
            d["gate"] = self.gate.config.get("path")
        return d


# How the CLI and the Python API name the fields they set (the rest as the fields).
MIX_FLAGS = flag({"temperature": "--knn-temperature"})
MIX_ARGS = {"temperature": "knn_temperature"}


class Retriever:
    """A datastore checked against the LM and searched by the backend ``knn.search`` names,
    on the LM's device (:mod:`knnlm.retrieval.search.choose`)."""

    def __init__(
        self, lm: LoadedLM, datastore: str | Path | Datastore, knn: KnnSettings,
        checked: bool = False,
    ):  # fmt: skip
        """``checked``: the caller has already run ``datastore.check_compatible(lm)``."""
        self.ds = datastore if isinstance(datastore, Datastore) else open_datastore(datastore)
        if not checked:
            self.ds.check_compatible(lm)
        self.knn = knn
        self.vocab_size = lm.adapter.vocab_size
        self.key_type = self.ds.meta["key_type"]
        check_values(self.ds, self.vocab_size)
        # A pruned datastore: each row weighs the number of entries merged into it.
        self.counts = None if self.ds.counts is None else torch.from_numpy(self.ds.counts)
        self.backend: SearchBackend = open_backend(
            self.ds.path, knn.search, device=lm.device, nprobe=knn.nprobe, recompute=knn.recompute
        )

    def search(self, keys: torch.Tensor, exclude_rows: Any = None) -> Neighbours:
        """Neighbours of ``keys``, on their device; ``exclude_rows`` drops each query's own
        datastore entry."""
        return self.backend.search(keys, self.knn.k, exclude_rows=exclude_rows)

    def row_distances(self, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(m, k) exact distances (CPU, float32) of ``keys`` to the stored ``rows`` (-1: +inf):
        the backend's own routine when it has one (FAISS: re-ranking's parallel pass), else
        gathered from the datastore's keys (RetoMaton's pointed-to rows)."""
        own = getattr(self.backend, "row_distances", None)
        if own is not None:
            return own(keys, rows.cpu())
        return row_distances(self.ds.keys, keys.float().cpu(), rows.cpu(), self.backend.metric)

    def target_log_prob(
        self, nb: Neighbours, targets: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """log p_knn(target) per query at ``temperature`` (``MixSettings.temperature``), on the
        neighbours' device."""
        t = targets.to(nb.rows.device)
        return knn_target_log_prob(
            nb.distances, nb.rows, nb.values, t, temperature, self.row_counts(nb)
        )

    def log_probs(self, nb: Neighbours, vocab_size: int, temperature: float) -> torch.Tensor:
        """Full log p_knn over the vocabulary at ``temperature``, (n, vocab_size), on the
        neighbours' device."""
        return knn_log_probs(
            nb.distances, nb.rows, nb.values, vocab_size, temperature, self.row_counts(nb)
        )

    def row_counts(self, nb: Neighbours) -> torch.Tensor | None:
        """(B, k) entries each neighbour stands for (pruned store), None when unpruned."""
        if self.counts is None:
            return None
        self.counts = self.counts.to(nb.rows.device)
        return gather_rows(self.counts, nb.rows)


def check_values(ds: Datastore, vocab_size: int) -> None:
    """Every stored value must be a token of the model's vocabulary (checked once, in blocks)."""
    step = 1 << 24
    for s in range(0, ds.n, step):
        v = np.asarray(ds.values[s : s + step])
        bad = v[(v < 0) | (v >= vocab_size)]
        if bad.size:
            raise KnnlmError(
                f"datastore {ds.path} holds the value {int(bad[0])}, outside the model's "
                f"vocabulary of {vocab_size} tokens (values.npy corrupt or from another tokenizer)"
            )
