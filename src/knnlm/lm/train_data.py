"""Training data: a token stream cut into blocks, or example texts padded per batch.

The batch order depends only on ``data_seed``, the epoch and the number of items (never on the
model), so two models trained with the same ``data_seed`` see the same batches in the same
order. Each dataset carries a fingerprint of its token ids, which a resumed run must share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from knnlm.data.corpus import read_split
from knnlm.errors import KnnlmError
from knnlm.fileio import fingerprint
from knnlm.lm.tokenizer import train_bpe_tokenizer
from knnlm.lm.train_config import TrainConfig


def token_blocks(ids: np.ndarray, context_len: int) -> np.ndarray:
    """Contiguous, non-overlapping blocks of ``context_len`` tokens (the tail is dropped).

    A stream shorter than one block becomes a single shorter block.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise KnnlmError("a token stream must be a 1-d array of integer token ids")
    if ids.size < 2:
        raise KnnlmError("the token stream has fewer than two tokens: nothing to train on")
    n = ids.size // context_len
    if n == 0:
        return ids.astype(np.int64)[None, :]
    return ids[: n * context_len].astype(np.int64).reshape(n, context_len)


def batch_order(n_items: int, batch_size: int, epoch: int, data_seed: int) -> list[np.ndarray]:
    """Item indices of each batch of one epoch: a permutation seeded by (data_seed, epoch)."""
    rng = np.random.default_rng([data_seed, epoch])
    perm = rng.permutation(n_items)
    return [perm[i : i + batch_size] for i in range(0, n_items, batch_size)]


class _Blocks:
    """A token stream as fixed-length blocks; labels equal inputs (the model shifts them)."""

    def __init__(self, ids: np.ndarray, context_len: int):
        self.blocks = token_blocks(ids, context_len)
        self.n_items = len(self.blocks)
        self.fingerprint = fingerprint(self.blocks.tobytes())

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(self.blocks[idx])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


class _Examples:
    """One sequence per example text (eos appended), right-padded to the batch's longest."""

    def __init__(self, texts: Sequence[str], tokenizer, context_len: int):
        if not texts:
            raise KnnlmError("no training examples given")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise KnnlmError("the tokenizer has no eos token to end each example with")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        # Longer examples are cut at the context length (the model cannot see past it).
        self.seqs = [np.asarray(list(ids) + [eos], dtype=np.int64)[:context_len] for ids in enc]
        self.n_items = len(self.seqs)
        self.fingerprint = fingerprint(b"".join(s.tobytes() + b"|" for s in self.seqs))

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        seqs = [self.seqs[i] for i in idx]
        lengths = np.array([len(s) for s in seqs])
        width = int(lengths.max())
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full((len(seqs), width), self.pad, dtype=np.int64)
        ids[mask] = np.concatenate(seqs)
        x = torch.from_numpy(ids)
        m = torch.from_numpy(mask.astype(np.int64))
        return {"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100)}


def make_dataset(data: np.ndarray | Sequence[str], tokenizer, context_len: int):
    """Token stream (np.ndarray of ids) -> blocks; list of texts -> padded examples."""
    if isinstance(data, np.ndarray):
        return _Blocks(data, context_len)
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return _Examples(data, tokenizer, context_len)
    raise KnnlmError("training data must be a numpy array of token ids or a list of texts")


@dataclass(frozen=True)
class StepPlan:
    """Which forward batches make up each optimizer step."""

    n_items: int
    batch_size: int
    grad_accum: int
    data_seed: int
    total_steps: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_items / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    @classmethod
    def create(cls, n_items: int, config: TrainConfig) -> StepPlan:
        per_epoch = math.ceil(math.ceil(n_items / config.batch_size) / config.grad_accum)
        total = config.max_steps if config.max_steps else config.epochs * per_epoch
        return cls(n_items, config.batch_size, config.grad_accum, config.data_seed, total)

    def step_batches(self, start: int = 0) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(step, forward batches of that step) from ``start`` to the last step."""
        epoch, order = -1, []
        for step in range(start, self.total_steps):
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, batch_order(self.n_items, self.batch_size, e, self.data_seed)
            yield step, order[k * self.grad_accum : (k + 1) * self.grad_accum]


def train_tokenizer_for_corpus(
    corpus_spec: str, vocab_size: int, min_frequency: int = 2, *, text: str | None = None
):
    """A byte-level BPE tokenizer trained on the corpus's train split (or on ``text``)."""
    if vocab_size < 257:
        raise KnnlmError(
            f"a byte-level BPE vocabulary needs at least 257 entries, got {vocab_size}"
        )
    if text is None:
        text = read_split(corpus_spec, "train")
    return train_bpe_tokenizer(text.splitlines(keepends=True), vocab_size, min_frequency)
