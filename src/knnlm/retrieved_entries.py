"""What was retrieved: the datastore entries behind one kNN-LM prediction, as readable text."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.lm.adapters import Adapter
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.combiner import knn_weights
from knnlm.retrieval.retriever import Retriever


@torch.no_grad()
def query_key(lm: LoadedLM, text: str, key_type: str, context_len: int) -> torch.Tensor:
    """The key of the position after ``text`` (its last ``context_len`` tokens), shape (1, d)."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][-context_len:]
    if not ids:
        raise KnnlmError("the text is empty: there is no position to query")
    with lm.adapter.capture() as store:
        lm.model(input_ids=torch.tensor([ids], device=lm.device))
    return Adapter.key_from(store, key_type)[:, -1]


def find_neighbours(
    lm: LoadedLM, retriever: Retriever, tokens: np.ndarray, text: str, context_tokens: int = 32,
    *, temperature: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """The k entries retrieved for the token after ``text``, nearest first, as dicts; their
    weights at p_knn's ``temperature`` (``MixSettings.temperature``).

    Row r of the datastore holds the key of the context ending at token r of ``tokens`` and
    the value ``tokens[r + 1]``. ``weight`` is each entry's share of p_knn
    (:func:`knnlm.retrieval.combiner.knn_weights`).
    """
    meta = retriever.ds.meta
    key = query_key(lm, text, retriever.key_type, int(meta["context_len"]))
    nb = retriever.search(key)
    found = (nb.rows[0] >= 0).cpu().numpy()
    ids = nb.rows[0].cpu().numpy()[found]
    dists = nb.distances[0].float().cpu().numpy()[found].astype(np.float64)
    values = nb.values[0].cpu().numpy()[found]
    counts = retriever.row_counts(nb)  # a pruned store: each entry weighs its count
    weights = knn_weights(nb.distances, nb.rows, temperature, counts)
    weights = weights[0].cpu().numpy()[found]
    # A pruned store's row stands at its first position in the unpruned token stream.
    positions = retriever.ds.positions
    tok = lm.tokenizer
    out = []
    for row, dist, weight, value in zip(ids, dists, weights, values, strict=True):
        pos = int(row) if positions is None else int(positions[int(row)])
        start = max(0, pos + 1 - context_tokens)
        out.append(
            {
                "row": int(row),
                "context": tok.decode(np.asarray(tokens[start : pos + 1]).tolist()),
                "target": tok.decode([int(value)]),
                "distance": float(dist),
                "weight": float(weight),
            }
        )
    return out
