"""Perplexity of the LM, the kNN-LM and the LM + MLP memory, from one scoring pass.

Perplexity is token-weighted: exp(total NLL / scored tokens), every target token of the split
scored exactly once with as much left context as the window allows (``knnlm.data.windows``).
The per-token log-probs come from ``knnlm.token_scores``; the neighbour cache format lives in
``knnlm.neighbour_cache``, the self-exclusion rule in ``knnlm.retrieval.exclusion``;
continuation scoring (Macondo) in ``knnlm.continuations``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.data.corpus import Corpus, describe_corpus, load_tokens
from knnlm.errors import KnnlmError
from knnlm.forward_pass import WindowSettings, check_context_len, score_stream
from knnlm.lm.loading import LoadedLM
from knnlm.locking import locks
from knnlm.neighbour_cache import NeighbourCache, claim_cache
from knnlm.retrieval.combiner import perplexity
from knnlm.retrieval.datastore import Datastore, corpus_fingerprint, open_datastore
from knnlm.retrieval.exclusion import is_own_stream, should_exclude
from knnlm.retrieval.gate import Gate, check_gate_for, load_gate
from knnlm.retrieval.memory import (
    check_memory_for,
    load_memory,
    memory_storage,
    storage_report,
)
from knnlm.retrieval.retriever import MIX_FLAGS, KnnSettings, MixSettings, Retriever
from knnlm.settings import Settings, build, flag
from knnlm.token_scores import TokenScores, score_tokens


def open_inputs(
    datastore: str | Path | Datastore | None, cache: str | Path | None, knn: KnnSettings
) -> Datastore | None:
    """Check what needs no model (kNN settings, the cache target) and open the datastore.

    Callers run it before loading a model, so a mistake costs nothing; ``evaluate`` runs it too.
    """
    if cache is not None:
        if datastore is None:
            raise KnnlmError("--cache needs --datastore (it stores the retrieved neighbours)")
        claim_cache(cache)
    if datastore is not None and not isinstance(datastore, Datastore):
        datastore = open_datastore(datastore)
    if cache is not None and datastore.counts is not None:
        raise KnnlmError(
            f"datastore {datastore.path} is pruned: a neighbour cache does not keep its counts "
            "(weights in p_knn), so knnlm sweep would score it wrongly; evaluate without --cache"
        )
    return datastore


@dataclass(frozen=True)
class EvalSettings(Settings):
    """Every setting of one perplexity run: the split, the windows, the batch size, the text
    column of an ``hf:`` corpus, the search (``knn``) and what is mixed in (``mix``).

    Written whole into the results (``settings["eval"]``); ``EvalSettings.from_dict`` rebuilds
    it. Example: ``EvalSettings("test", WindowSettings(1024, 512), knn=KnnSettings(k=16),
    mix=MixSettings(knn_weight=0.3))``.
    """

    split: str = "valid"
    window: WindowSettings = WindowSettings(1024, 1024)
    batch_size: int = 8
    text_field: str = "text"
    knn: KnnSettings = KnnSettings()
    mix: MixSettings = MixSettings()


def evaluate(
    lm: LoadedLM,
    corpus: Corpus,
    split: str = "valid",
    *,
    context_len: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
    knn: KnnSettings | None = None,
    knn_weight: float = 0.25,
    knn_temperature: float = 1.0,
    memory: str | Path | None = None,
    memory_weight: float = 0.25,
    gate: str | Path | Gate | None = None,
    retrieval_rate: float = 1.0,
    gate_weight: str = "fixed",
    pointers: float | None = None,
    **where: Any,
) -> dict:
    """:func:`run_eval` with the settings as keywords (named as the CLI's flags when wrong):
    ``knn`` how to search, the others :class:`MixSettings`' fields (``knn_temperature`` its
    ``temperature``); ``stride`` None is ``context_len`` here. ``where``: run_eval's
    ``datastore``, ``cache``, ``key_type``, ``progress``, ``overlap``.
    Example: ``evaluate(lm, "data/wikitext-2", context_len=512, datastore="runs/ds")``.
    """
    stride = context_len if stride is None else stride
    window = build(WindowSettings, flag(), context_len=context_len, stride=stride)
    mix = build(MixSettings, MIX_FLAGS, knn_weight=knn_weight, temperature=knn_temperature,
                memory=memory, memory_weight=memory_weight, gate=gate,
                retrieval_rate=retrieval_rate, gate_weight=gate_weight,
                pointers=pointers)  # fmt: skip
    settings = EvalSettings(split, window, batch_size, text_field, knn or KnnSettings(), mix)
    return run_eval(lm, corpus, settings, **where)


@locks("cache", "neighbour cache")
def run_eval(
    lm: LoadedLM,
    corpus: Corpus,
    settings: EvalSettings,
    *,
    datastore: str | Path | Datastore | None = None,
    cache: str | Path | None = None,
    key_type: str | None = None,
    progress: bool = True,
    overlap: bool | None = None,
) -> dict:
    """LM perplexity; plus kNN-LM with ``datastore`` and LM + MLP memory with
    ``settings.mix.memory``; the windows as given (None filled from the model).

    ``settings.mix.gate`` (adaptive retrieval, :mod:`knnlm.retrieval.gate`) searches only the
    share ``retrieval_rate`` of the tokens it scores highest; the others keep p_lm exactly.
    ``pointers`` (RetoMaton, :mod:`knnlm.retrieval.pointers`): a token whose previous token's
    neighbours leave at least this many pointers reads them instead of searching.

    ``key_type`` is the memory's key type when no datastore is given (default ffn_input).
    ``overlap`` runs the LM forward of batch i+1 while batch i is searched (default: when the
    model is on an accelerator and a datastore is given; on a CPU both would share the cores).
    The numbers are identical either way: batches arrive in their original order.
    """
    window, knn, mix = settings.window.for_model(lm.model), settings.knn, settings.mix
    context_len, stride, split = window.context_len, window.stride, settings.split
    check_context_len(lm.model, context_len)
    ds = open_inputs(datastore, cache, knn)
    gate_obj = open_gate(mix, ds, cache)
    check_pointers(mix, ds, cache)
    ids = load_tokens(lm.tokenizer, corpus, split, settings.text_field)
    eval_fp = corpus_fingerprint(ids)
    # The user's settings are checked before the searcher is set up (it may log a notice).
    if ds is not None:
        ds.check_compatible(lm)
    exclude, warnings = _exclusion(ds, knn.exclude_self, eval_fp)
    if mix.memory is not None:
        check_memory_for(mix.memory, lm)
    mem = load_memory(mix.memory, device=str(lm.device)) if mix.memory is not None else None
    retriever = Retriever(lm, ds, knn, checked=True) if ds is not None else None
    if gate_obj is not None:
        check_gate_for(gate_obj, lm.fingerprint, ds.dim)
    # Keys are needed for retrieval and for the memory (trained on ffn_input keys by default).
    if retriever is not None:
        key_type = retriever.key_type
    elif mem is not None:
        key_type = key_type or "ffn_input"
    writer = None
    if cache is not None:
        meta = dict(model_fingerprint=lm.fingerprint, datastore=str(ds.path), datastore_n=ds.n,
                    corpus=describe_corpus(corpus), split=split, corpus_fingerprint=eval_fp,
                    context_len=context_len, stride=stride, recompute=knn.recompute,
                    exclude_self=exclude)  # fmt: skip
        writer = NeighbourCache(cache, len(ids) - 1, knn.k, meta)
    if overlap is None:
        overlap = ds is not None and lm.device.type != "cpu"
    stream = score_stream(lm.model, ids, context_len, stride, batch_size=settings.batch_size,
                          key_type=key_type, want_lm=True, progress=progress,
                          desc=f"eval {split}", want_stats=gate_obj is not None)  # fmt: skip
    scores = score_tokens(stream, retriever=retriever, mix=mix, exclude_self=exclude, memory=mem,
                          gate=gate_obj, overlap=overlap)  # fmt: skip
    nll, n_tokens, elapsed, t_search = _sum_nll(scores, writer)
    if writer is not None:
        writer.finish()
    parts = dict(eval_fp=eval_fp, retriever=retriever, exclude=exclude, gate=gate_obj)
    return _eval_result(lm, corpus, settings, window, nll, n_tokens, elapsed, t_search,
                        warnings, parts)  # fmt: skip


def _eval_result(lm: LoadedLM, corpus: Corpus, settings: EvalSettings, window: WindowSettings,
                 nll: dict, n_tokens: int, elapsed: float, t_search: float, warnings: list[str],
                 parts: dict) -> dict:  # fmt: skip
    """The results dict of :func:`run_eval` (the keys of ``knnlm eval --json``)."""
    mix, retriever, gate_obj = settings.mix, parts["retriever"], parts["gate"]
    searched = nll.pop("searched")
    out = {"model": lm.name, "model_fingerprint": lm.fingerprint,
           "corpus": describe_corpus(corpus),
           "split": settings.split, "context_len": window.context_len, "stride": window.stride,
           "batch_size": settings.batch_size}  # fmt: skip
    result = _result(out, nll, n_tokens, elapsed, warnings)
    # Every setting of the run, whole (EvalSettings.from_dict rebuilds it), windows as used.
    out["eval"] = {**settings.to_dict(), "window": window.to_dict()}
    if retriever is not None:
        ds = retriever.ds
        own = is_own_stream(ds, parts["eval_fp"])
        out.update(_knn_settings(retriever, mix, parts["exclude"], own))
        result["knnlm"] = {"perplexity": perplexity(nll["knnlm"], n_tokens),
                           "nll_sum": nll["knnlm"]}  # fmt: skip
        result["timing"]["search_seconds"] = t_search
        result["knnlm"]["retrieval_share"] = searched / max(n_tokens, 1)  # tokens searched
        if mix.pointers is not None:
            out["pointers"] = mix.pointers  # RetoMaton's threshold
            result["knnlm"]["searches_saved"] = 1.0 - searched / max(n_tokens, 1)
        if gate_obj is not None:
            out.update(gate=gate_obj.config.get("path"), gate_kind=gate_obj.kind,
                       retrieval_rate=mix.retrieval_rate, gate_weight=mix.gate_weight)  # fmt: skip
    if mix.memory is not None:
        out.update(memory=str(mix.memory), memory_weight=mix.memory_weight)
        result["mlp"] = {"perplexity": perplexity(nll["mlp"], n_tokens), "nll_sum": nll["mlp"]}
        ds = retriever.ds if retriever is not None else None
        result["storage"] = storage_report(ds, memory_storage(mix.memory))
    return result


def open_gate(mix: MixSettings, ds: Datastore | None, cache: object) -> Gate | None:
    """The gate of ``mix``, loaded, and checked before any work: it needs a datastore and
    cannot fill a cache (its own settings were checked where ``mix`` was built)."""
    gate = mix.gate
    if gate is None:
        return None
    if ds is None:
        raise KnnlmError("--gate needs --datastore (it decides which tokens search it)")
    if cache is not None:
        raise KnnlmError("--gate and --cache do not combine: a cache holds every token's search")
    gate = gate if isinstance(gate, Gate) else load_gate(gate)
    if mix.gate_weight == "learned" and gate.kind != "mlp":
        raise KnnlmError(f"--gate-weight learned needs an mlp gate; this one is {gate.kind}")
    return gate


def check_pointers(mix: MixSettings, ds: Datastore | None, cache: object) -> None:
    """RetoMaton pointers need a datastore whose row r + 1 follows row r (not pruned), and
    do not fill a cache (it holds every token's search); the gate rule is ``mix``'s own."""
    if mix.pointers is None:
        return
    if ds is None:
        raise KnnlmError("--pointers needs --datastore (they point into it)")
    if cache is not None:
        raise KnnlmError(
            "--pointers and --cache do not combine: a cache holds every token's search"
        )
    if ds.counts is not None:
        raise KnnlmError(
            f"datastore {ds.path} is pruned: its row r + 1 does not follow row r, so --pointers "
            "cannot follow it; use the unpruned store"
        )


def _exclusion(ds: Datastore | None, mode: str, eval_fp: str) -> tuple[bool, list[str]]:
    """Whether targets drop their own row, and the warning when they could but do not
    (``ds`` already checked against the model)."""
    if ds is None:
        return False, []
    exclude = should_exclude(ds, mode, eval_fp)
    if not exclude and is_own_stream(ds, eval_fp):
        return exclude, [
            f"the evaluated text is the datastore's own ({ds.path}) and --exclude-self is "
            "no: every target can retrieve its own entry, so the kNN-LM perplexity is too good"
        ]
    return exclude, []


def _sum_nll(
    scores: Iterator[TokenScores], writer: NeighbourCache | None
) -> tuple[dict[str, float], int, float, float]:
    """Total NLL per model (and ``searched``: queries searched), scored tokens, seconds, and
    seconds spent searching."""
    nll = {"lm": 0.0, "knnlm": 0.0, "mlp": 0.0, "searched": 0}
    n_tokens = 0
    t_search = 0.0
    t0 = time.perf_counter()
    for s in scores:
        lm_lp = s.lm
        nll["lm"] -= float(lm_lp.double().sum())
        if s.knnlm is not None:
            t_search += s.search_seconds
            nll["searched"] += s.searched
            nll["knnlm"] -= float(s.knnlm.double().sum())
            if writer is not None:
                nb = s.neighbours
                writer.write(s.batch.first_row, lm_log_prob=s.lm_cpu.numpy(),
                             targets=s.targets_cpu.numpy().astype(np.int32),
                             ids=nb.rows.cpu().numpy(), dists=nb.distances.cpu().numpy(),
                             values=nb.values.cpu().numpy().astype(np.int32))  # fmt: skip
        if s.lm_memory is not None:
            nll["mlp"] -= float(s.lm_memory.double().sum())
        n_tokens += len(s.batch.targets)
    return nll, n_tokens, time.perf_counter() - t0, t_search


def _result(
    settings: dict, nll: dict[str, float], n_tokens: int, elapsed: float, warnings: list[str]
) -> dict:
    return {
        "settings": settings,
        "tokens": n_tokens,
        "lm": {"perplexity": perplexity(nll["lm"], n_tokens), "nll_sum": nll["lm"]},
        "timing": {"seconds": elapsed, "tokens_per_s": n_tokens / max(elapsed, 1e-9)},
        "warnings": warnings,
    }


def _knn_settings(retriever: Retriever, mix: MixSettings, exclude: bool, own_stream: bool) -> dict:
    ds, knn, search = retriever.ds, retriever.knn, retriever.backend.describe()
    return {
        "datastore": str(ds.path),
        "datastore_n": ds.n,
        "key_type": ds.meta["key_type"],
        "k": knn.k,
        "knn_weight": mix.knn_weight,
        "temperature": mix.temperature,
        "recompute": knn.recompute,
        "nprobe": knn.nprobe,
        "exclude_self": exclude,  # applied: each target dropped its own row (p - 1)
        "exclude_self_mode": knn.exclude_self,
        "own_stream": own_stream,
        # the FAISS index kind, or "exact (torch)"; the backend's own description beside it
        "index": search["index"] if search["search"] == "faiss" else f"exact ({search['engine']})",
        "search": search,
    }
