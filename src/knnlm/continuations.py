"""Continuation scoring: log p(first token of a continuation | its prompt), each example alone.

Macondo's sentences ("[villager], is the parent of" + " [child]") and the hurdle's name lists
are scored here, from ``scoring.score_examples`` through the per-token scorer, for the LM, the
kNN-LM and the MLP memory; :func:`continuation_neighbours` keeps the retrieved neighbours
instead, so a grid of k and temperature is re-scored from one search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.forward_pass import score_examples
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.datastore import Datastore
from knnlm.retrieval.memory import MemoryMLP
from knnlm.retrieval.retriever import KnnSettings, MixSettings, Retriever
from knnlm.token_scores import score_tokens


def continuation_log_probs(
    lm: LoadedLM,
    prompts: list[str],
    continuations: list[str],
    *,
    datastore: str | Path | Datastore | None = None,
    knn: KnnSettings | None = None,
    batch_size: int = 32,
    mix: MixSettings | None = None,
    memory: MemoryMLP | None = None,
    key_type: str | None = None,
) -> dict[str, np.ndarray]:
    """log p(first token of continuation | prompt) per example, for the LM, the kNN-LM (with
    ``datastore``, searched as ``knn`` says, p_knn mixed in at ``mix``'s weight and
    temperature: ``knnlm``) and the MLP memory (with ``memory``: ``memory`` alone and
    ``lm_memory``, interpolated with ``mix.memory_weight``).

    Used for Macondo: prompt "[villager], is the parent of", continuation " [child]" (a
    single-token name). Each example is scored alone, with no outside context. The scored
    token is read off the tokenization of prompt + continuation when the prompt's tokens are
    its prefix (SentencePiece tokenizers may split a leading space into its own token when
    the continuation is encoded alone). ``key_type`` is the memory's key type when no datastore
    is given (default ffn_input).
    """
    if len(prompts) != len(continuations):
        raise KnnlmError("prompts and continuations differ in number")
    knn = knn or KnnSettings()
    examples, starts = _continuation_examples(lm.tokenizer, prompts, continuations)
    retriever = Retriever(lm, datastore, knn) if datastore is not None else None
    if retriever is not None:
        key_type = retriever.key_type
    elif memory is not None:
        key_type = key_type or "ffn_input"
    else:
        key_type = None
    batches = score_examples(
        lm.model, examples, batch_size=batch_size, key_type=key_type, score_from=starts
    )
    out: dict[str, list[np.ndarray]] = {"lm": [], "knnlm": [], "memory": [], "lm_memory": []}
    scores = score_tokens(batches, retriever=retriever, mix=mix or MixSettings(), memory=memory)
    for s in scores:
        out["lm"].append(s.lm_cpu.numpy())
        if retriever is not None:
            out["knnlm"].append(s.knnlm.numpy())
        if memory is not None:
            out["memory"].append(s.memory.float().cpu().numpy())
            out["lm_memory"].append(s.lm_memory.float().cpu().numpy())
    return {key: np.concatenate(v) for key, v in out.items() if v}


def _continuation_examples(
    tok: Any, prompts: list[str], continuations: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Per example the prompt's token ids plus the continuation's first, and where it starts."""
    examples, starts = [], []
    for p, c in zip(prompts, continuations, strict=True):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        if not p_ids or not c_ids:
            raise KnnlmError(f"empty prompt or continuation: {p!r} / {c!r}")
        full = tok(p + c, add_special_tokens=False)["input_ids"]
        first = (
            full[len(p_ids)] if full[: len(p_ids)] == p_ids and len(full) > len(p_ids) else c_ids[0]
        )
        examples.append(p_ids + [first])
        starts.append(len(p_ids))
    return examples, starts


def continuation_neighbours(
    lm: LoadedLM,
    prompts: list[str],
    continuations: list[str],
    *,
    datastore: str | Path | Datastore,
    knn: KnnSettings,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per example (CPU tensors, example order): ``lm`` log p_lm of the continuation's first
    token, ``targets`` that token, and its ``knn.k`` neighbours nearest first (``dists``,
    ``ids``, ``values``; ``counts`` for a pruned store), as :func:`continuation_log_probs`
    retrieves them; :func:`knnlm.retrieval.combiner.prefix_log_probs` re-scores them."""
    if len(prompts) != len(continuations):
        raise KnnlmError("prompts and continuations differ in number")
    examples, starts = _continuation_examples(lm.tokenizer, prompts, continuations)
    retriever = Retriever(lm, datastore, knn)
    batches = score_examples(
        lm.model, examples, batch_size=batch_size, key_type=retriever.key_type, score_from=starts
    )
    parts: dict[str, list[torch.Tensor]] = {"lm": [], "targets": [], "dists": [], "ids": [],
                                            "values": [], "counts": []}  # fmt: skip
    for s in score_tokens(batches, retriever=retriever):
        nb = s.neighbours
        counts = retriever.row_counts(nb)
        parts["lm"].append(s.lm_cpu)
        parts["targets"].append(s.targets_cpu)
        parts["dists"].append(nb.distances.cpu())
        parts["ids"].append(nb.rows.cpu())
        parts["values"].append(nb.values.cpu())
        if counts is not None:
            parts["counts"].append(counts.cpu())
    return {key: torch.cat(v) for key, v in parts.items() if v}
