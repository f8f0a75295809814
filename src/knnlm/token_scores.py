"""The per-token scorer: from the scoring pass, each target's LM, kNN and memory log-probs.

Every consumer that needs log-probabilities of scored targets (perplexity, continuation
scoring, the neighbour cache) reads them from :func:`score_tokens`, so retrieval, self-exclusion
and the interpolations are written once. Batches stay batches: one row per target, no loop over
tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from knnlm.forward_pass import ScoredBatch
from knnlm.prefetch import prefetch
from knnlm.retrieval.combiner import combine
from knnlm.retrieval.exclusion import own_rows
from knnlm.retrieval.gate import Gate
from knnlm.retrieval.memory import MemoryMLP
from knnlm.retrieval.pointers import pointer_neighbours
from knnlm.retrieval.retriever import MixSettings, Neighbours, Retriever


@dataclass
class TokenScores:
    """Log-probabilities of one batch of scored targets (row i = target i of ``batch``).

    ``lm`` and the memory's tensors stay on the model's device; the ``*_cpu`` copies and the
    kNN log-probs are on the CPU; ``neighbours`` on the search backend's device (the model's
    for exact search on a GPU, where the queries never leave it). kNN fields are None without a retriever, memory fields without a
    memory.
    """

    batch: ScoredBatch  # positions, targets, keys, first_row of the scoring pass
    lm: torch.Tensor  # log p_lm(target)
    lm_cpu: torch.Tensor
    targets_cpu: torch.Tensor
    neighbours: Neighbours | None = None
    knn: torch.Tensor | None = None  # log p_knn(target)
    knnlm: torch.Tensor | None = None  # log of (1 - knn_weight) p_lm + knn_weight p_knn
    memory: torch.Tensor | None = None  # log p_memory(target)
    lm_memory: torch.Tensor | None = None  # log of (1 - memory_weight) p_lm + w p_memory
    search_seconds: float = 0.0
    searched: int = 0  # queries searched (fewer than the targets when a gate skips some)


def score_tokens(
    batches: Iterable[ScoredBatch],
    *,
    retriever: Retriever | None = None,
    mix: MixSettings = MixSettings(),
    exclude_self: bool = False,
    memory: MemoryMLP | None = None,
    gate: Gate | None = None,
    overlap: bool = False,
) -> Iterator[TokenScores]:
    """Score each batch of ``batches`` (``forward_pass.score_stream`` or ``score_examples`` with
    ``want_lm`` and the keys the retriever or memory needs), mixed as ``mix`` says.

    p_knn at ``mix.temperature`` is mixed in at ``mix.knn_weight``; ``memory`` (``mix.memory``
    loaded) at ``mix.memory_weight``. ``exclude_self``: each target drops its own datastore row
    (positions of the datastore's own stream, ``retrieval.exclusion``). ``overlap`` produces
    batch i+1 (the LM forward) in a background thread while batch i is searched; the results
    are identical either way. ``gate`` (``mix.gate`` loaded; batches scored ``want_stats``)
    searches only the share ``mix.retrieval_rate`` of the targets it scores highest; the others
    keep p_lm exactly (:mod:`knnlm.retrieval.gate`). ``mix.gate_weight`` learned interpolates
    the searched ones with the gate's predicted p_knn weight instead of ``knn_weight`` (an
    ``mlp`` gate). ``mix.pointers`` (a threshold) follows RetoMaton pointers and searches only
    where fewer survive (:mod:`knnlm.retrieval.pointers`).
    """
    # host copies of the keys only for a search on the host (FAISS, or exact on the CPU)
    want_keys = retriever is not None and retriever.backend.device.type == "cpu"
    table = None
    for batch, host in prefetch(_with_host_copies(batches, want_keys), depth=int(overlap)):
        scores = TokenScores(batch, batch.lm_log_prob, host["lm_log_prob"], host["targets"])
        if retriever is not None and gate is not None:
            # the gate runs once, where the keys are; only its decisions come to the host
            keep, weight = gate.decide(batch.keys.float(), batch.lm_stats, mix.retrieval_rate,
                                       want_scores=mix.gate_weight == "learned")  # fmt: skip
            _add_gated_knn(
                scores, retriever, mix, host.get("keys", batch.keys), exclude_self, keep, weight
            )
        elif retriever is not None and mix.pointers is not None:
            if table is None:  # the datastore's values as int64, once per pass
                table = torch.from_numpy(np.asarray(retriever.ds.values, dtype=np.int64))
            keys = host.get("keys", batch.keys)
            _add_pointer_knn(scores, retriever, mix, keys, exclude_self, table)
        elif retriever is not None:
            _add_knn(scores, retriever, mix, host.get("keys", batch.keys), exclude_self)
        if memory is not None:
            _add_memory(scores, memory, mix.memory_weight)
        yield scores


def _with_host_copies(batches: Iterable[ScoredBatch], want_keys: bool):
    """Each batch with CPU copies of what retrieval reads, made in the producing thread.

    With ``prefetch`` the copy then waits only for its own batch's forward: a copy asked for by
    the consumer would queue on the device behind the next batch's forward and undo the overlap.
    """
    for b in batches:
        host = {"targets": b.targets.cpu(), "lm_log_prob": b.lm_log_prob.cpu()}
        if want_keys:
            host["keys"] = b.keys.float().cpu()
        yield b, host


def _add_knn(
    scores: TokenScores, retriever: Retriever, mix: MixSettings, keys: torch.Tensor, exclude: bool
) -> None:
    batch = scores.batch
    own = own_rows(batch.positions) if exclude else None
    ts = time.perf_counter()
    nb = retriever.search(keys, exclude_rows=own)
    scores.search_seconds = time.perf_counter() - ts
    scores.neighbours = nb
    targets = _targets_on(scores, nb.rows.device)
    scores.knn = retriever.target_log_prob(nb, targets, mix.temperature).cpu()
    scores.knnlm = combine(scores.lm_cpu, scores.knn, mix.knn_weight)
    scores.searched = len(scores.targets_cpu)


def _add_pointer_knn(
    scores: TokenScores, retriever: Retriever, mix: MixSettings, keys: torch.Tensor,
    exclude: bool, values: torch.Tensor,
) -> None:  # fmt: skip
    """The kNN-LM with RetoMaton pointers: searched only where fewer than ``mix.pointers``
    pointers survive; the others read the pointed-to rows at their exact distances."""
    own = torch.from_numpy(own_rows(scores.batch.positions)) if exclude else None
    seconds = [0.0]

    def search(tok: torch.Tensor) -> Neighbours:
        ts = time.perf_counter()
        ex = None if own is None else own[tok].numpy()
        nb = retriever.search(keys[tok.to(keys.device)], exclude_rows=ex).to("cpu")
        seconds[0] += time.perf_counter() - ts
        return nb

    def distances(tok: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ts = time.perf_counter()  # the pointed-to rows' distances are retrieval work too
        out = retriever.row_distances(keys[tok.to(keys.device)], rows)
        seconds[0] += time.perf_counter() - ts
        return out

    nb, searched = pointer_neighbours(scores.targets_cpu, retriever.knn.k, mix.pointers, values,
                                      search, distances, own)  # fmt: skip
    scores.search_seconds, scores.searched, scores.neighbours = seconds[0], int(searched.sum()), nb
    scores.knn = retriever.target_log_prob(nb, scores.targets_cpu, mix.temperature).cpu()
    scores.knnlm = combine(scores.lm_cpu, scores.knn, mix.knn_weight)


def _add_gated_knn(
    scores: TokenScores, retriever: Retriever, mix: MixSettings, keys: torch.Tensor,
    exclude: bool, keep: torch.Tensor, weight: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """p_lm exactly where ``keep`` is False; the kNN-LM where it is True, searching only those
    (with ``knn_weight``, or the per-token ``weight`` when given)."""
    rows = torch.nonzero(keep).squeeze(1)
    scores.searched = int(rows.numel())
    knn = torch.empty(0)
    if scores.searched:
        own = own_rows(scores.batch.positions)[rows.numpy()] if exclude else None
        ts = time.perf_counter()
        nb = retriever.search(keys[rows.to(keys.device)], exclude_rows=own)
        scores.search_seconds = time.perf_counter() - ts
        targets = _targets_on(scores, nb.rows.device)
        knn = retriever.target_log_prob(nb, targets[rows.to(targets.device)], mix.temperature)
        knn = knn.cpu()
    w = mix.knn_weight if weight is None else weight
    scores.knnlm = combine(scores.lm_cpu, knn, w, rows)


def _targets_on(scores: TokenScores, device: torch.device) -> torch.Tensor:
    """The targets where the neighbours are: the scoring pass's own tensor when it is on that
    device (no upload per batch), else the host copy."""
    on_device = scores.batch.targets
    return on_device if on_device.device == device else scores.targets_cpu


def _add_memory(scores: TokenScores, mem: MemoryMLP, memory_weight: float) -> None:
    batch, lm_lp = scores.batch, scores.lm
    with torch.no_grad():
        mem_lp = mem.target_log_prob(batch.keys.float(), batch.targets)
    scores.memory = mem_lp
    scores.lm_memory = combine(lm_lp, mem_lp, memory_weight)
