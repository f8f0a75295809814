"""The MLP memory's training data: the datastore's keys and values, checked against the
output embedding, and streamed in seeded batches (the order depends only on (seed, epoch), so a
resumed run sees exactly the batches it would have seen)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError


def check_inputs(keys: Any, values: Any, W: torch.Tensor) -> None:
    """Refuse keys / values / W that do not fit together, in one line each."""
    if getattr(keys, "ndim", None) != 2:
        raise KnnlmError(
            f"keys must be a 2-D array (N, d), got shape {getattr(keys, 'shape', None)}"
        )
    if getattr(values, "ndim", None) != 1:
        raise KnnlmError(
            f"values must be a 1-D array (N,), got shape {getattr(values, 'shape', None)}"
        )
    if keys.shape[0] != values.shape[0]:
        raise KnnlmError(f"{keys.shape[0]} keys but {values.shape[0]} values")
    if keys.shape[0] == 0:
        raise KnnlmError("the datastore is empty: nothing to train the memory model on")
    if not np.issubdtype(keys.dtype, np.floating):
        raise KnnlmError(f"keys must be float16 or float32, got {keys.dtype}")
    if not np.issubdtype(values.dtype, np.integer):
        raise KnnlmError(f"values must be integer token ids, got {values.dtype}")
    if W.ndim != 2 or W.shape[1] != keys.shape[1]:
        raise KnnlmError(
            f"output embedding has shape {tuple(W.shape)} but keys have dimension {keys.shape[1]}"
        )
    # Stream the value range in chunks: 4 bytes per row, cheap next to training.
    vocab, step = W.shape[0], 1 << 22
    for s in range(0, values.shape[0], step):
        chunk = np.asarray(values[s : s + step])
        if chunk.min() < 0 or chunk.max() >= vocab:
            raise KnnlmError(
                f"datastore values fall outside the output vocabulary [0, {vocab}): "
                f"found {int(chunk.min())}..{int(chunk.max())}; wrong LM for this datastore?"
            )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    # int32 where possible halves the memory of the permutation (400 MB for 100M keys).
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(order)
    return order


def train_batches(
    keys: Any, values: Any, batch_tokens: int, seed: int, start: int, total: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 keys, int64 values) of steps ``start..total-1``, gathered row-wise."""
    n = values.shape[0]
    per_epoch = math.ceil(n / batch_tokens)
    order, order_epoch = None, -1
    for step in range(start, total):
        epoch, b = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        idx = np.sort(order[b * batch_tokens : (b + 1) * batch_tokens])
        yield (
            np.asarray(keys[idx], dtype=np.float32),
            np.asarray(values[idx], dtype=np.int64),
        )
