"""A datastore checked against the LM, searched with the kNN settings: keys in, p_knn out.

Every consumer (perplexity, continuation scoring, the projection, generation) retrieves the
same way through :class:`Retriever`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.datastore import Datastore, open_datastore
from knnlm.retrieval.knn import knn_log_probs, knn_target_log_prob


@dataclass
class KnnSettings:
    k: int = 1024
    knn_weight: float = 0.25
    temperature: float = 1.0
    recompute: bool = True
    nprobe: int | None = None
    exclude_self: str = "auto"  # auto | yes | no

    def validate(self) -> None:
        if not 0.0 <= self.knn_weight <= 1.0:
            raise KnnlmError(f"--knn-weight must be in [0, 1], got {self.knn_weight}")
        if self.k < 1:
            raise KnnlmError(f"--k must be at least 1, got {self.k}")
        if self.temperature <= 0:
            raise KnnlmError(f"--knn-temperature must be positive, got {self.temperature}")
        if self.exclude_self not in ("auto", "yes", "no"):
            raise KnnlmError("--exclude-self must be auto, yes or no")


def neighbour_values(ds: Datastore, ids: np.ndarray) -> np.ndarray:
    """Values of the retrieved ids; -1 ids read row 0 and are masked by the caller."""
    return np.asarray(ds.values[np.where(ids < 0, 0, ids).ravel()]).reshape(ids.shape)


@dataclass
class Neighbours:
    """The k neighbours of each query: distances, datastore ids (-1 = none) and values."""

    dists: np.ndarray  # (n, k) float32
    ids: np.ndarray  # (n, k) int64
    values: np.ndarray  # (n, k) int32

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self.dists),
            torch.from_numpy(self.ids),
            torch.from_numpy(self.values.astype(np.int64)),
        )


class Retriever:
    def __init__(self, lm: LoadedLM, datastore: str | Path | Datastore, knn: KnnSettings):
        from knnlm.retrieval.search import Searcher

        knn.validate()
        self.ds = datastore if isinstance(datastore, Datastore) else open_datastore(datastore)
        self.ds.check_compatible(lm)
        self.knn = knn
        self.vocab_size = lm.adapter.vocab_size
        self.key_type = self.ds.meta["key_type"]
        self.searcher = Searcher(
            self.ds.path, k_max=knn.k, nprobe=knn.nprobe, recompute=knn.recompute
        )

    def search(self, keys: torch.Tensor, exclude_rows: np.ndarray | None = None) -> Neighbours:
        """Neighbours of ``keys``; ``exclude_rows`` drops each query's own datastore entry."""
        dists, ids = self.searcher.search(
            keys.float().cpu().numpy(), self.knn.k, exclude_ids=exclude_rows
        )
        values = neighbour_values(self.ds, ids)
        found = values[ids >= 0]
        if found.size and (found.min() < 0 or found.max() >= self.vocab_size):
            bad = int(found[(found < 0) | (found >= self.vocab_size)][0])
            raise KnnlmError(
                f"datastore {self.ds.path} holds the value {bad}, outside the model's vocabulary "
                f"of {self.vocab_size} tokens (values.npy corrupt or from another tokenizer)"
            )
        return Neighbours(dists, ids, values)

    def target_log_prob(self, nb: Neighbours, targets: torch.Tensor) -> torch.Tensor:
        """log p_knn(target) per query, on the CPU."""
        return knn_target_log_prob(*nb.tensors(), targets.cpu(), self.knn.temperature)

    def log_probs(self, nb: Neighbours, vocab_size: int) -> torch.Tensor:
        """Full log p_knn over the vocabulary, (n, vocab_size), on the CPU."""
        return knn_log_probs(*nb.tensors(), vocab_size, self.knn.temperature)
