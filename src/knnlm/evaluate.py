"""Perplexity of the LM, the kNN-LM and the LM + MLP memory, from one scoring pass.

Perplexity is token-weighted: exp(total NLL / scored tokens), every target token of the split
scored exactly once with as much left context as the window allows (``knnlm.data.windows``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from knnlm.data.corpus import Corpus, describe_corpus, load_tokens
from knnlm.data.windows import resolve_stride
from knnlm.errors import KnnlmError
from knnlm.fileio import (
    ARTIFACT_KEY,
    NpyRowWriter,
    check_npy,
    claim_target,
    read_meta,
    swap_in,
    temp_dir,
    write_json_atomic,
)
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.datastore import Datastore, corpus_fingerprint, open_datastore
from knnlm.retrieval.knn import interpolate, perplexity
from knnlm.retrieval.pipeline import prefetch
from knnlm.retrieval.retriever import KnnSettings, Retriever
from knnlm.scoring import check_context_len, score_stream


def _should_exclude(ds: Datastore, mode: str, eval_fp: str, *_layout: object) -> bool:
    """Whether each target drops its own datastore row (``mode``: auto, yes or no).

    Every target position p >= 1 of a stream is scored exactly once, in stream order, so the
    datastore row of position p is p - 1 whatever the context length and stride: exclusion
    needs only the evaluated stream to be the datastore's own (equal corpus fingerprints).
    Datastores of independent examples have no stream rows and are never excluded by position.
    (Extra positional arguments, the old context length / stride, are accepted and ignored.)
    """
    same = is_own_stream(ds, eval_fp)
    if mode == "yes" and not same:
        raise KnnlmError(
            f"--exclude-self yes needs the token stream the datastore {ds.path} was built on "
            f"({ds.meta.get('corpus')} {ds.meta.get('split')}); this text differs"
        )
    return mode == "yes" or (mode == "auto" and same)


def is_own_stream(ds: Datastore, eval_fp: str) -> bool:
    """True when ``eval_fp`` is the fingerprint of the stream the datastore was built on."""
    stream_built = ds.meta.get("context_len") is not None
    return stream_built and ds.meta.get("corpus_fingerprint") == eval_fp


def own_rows(positions: np.ndarray) -> np.ndarray:
    """Datastore row of each target position of the datastore's own stream: p - 1."""
    return np.asarray(positions, dtype=np.int64) - 1


CACHE_KIND = "neighbour_cache"  # the artifact marker in a cache's meta.json


class _Cache:
    """Per scored token: LM log-prob of the target and the k neighbours (ids, dists, values).

    Written into ``<out>.partial`` and swapped in when complete; ``out`` must be new, empty,
    or a cache this toolkit wrote (a folder with the user's files is refused, untouched).
    """

    KIND = CACHE_KIND

    def __init__(self, out: Path, n: int, k: int, meta: dict):
        self.out = Path(out)
        claim_target(self.out, self.KIND, "meta.json", what="neighbour cache")
        self.partial = temp_dir(self.out, self.KIND, "meta.json", fresh=True)
        self.meta = dict(meta, n=n, k=k, **{ARTIFACT_KEY: self.KIND})
        self.writers = {
            name: NpyRowWriter(self.partial / f"{name}.npy", (n, *shape), dtype, True)
            for name, (shape, dtype) in _cache_layout(k).items()
        }

    def write(self, row: int, **arrays: np.ndarray) -> None:
        for name, arr in arrays.items():
            self.writers[name].write(row, arr)

    def finish(self) -> None:
        for w in self.writers.values():
            w.close()
        write_json_atomic(self.partial / "meta.json", self.meta)
        swap_in(self.partial, self.out, self.KIND, "meta.json")


def _cache_layout(k: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Per-row shape and dtype of each cache array."""
    return {
        "lm_log_prob": ((), np.float32),
        "targets": ((), np.int32),
        "ids": ((k,), np.int64),
        "dists": ((k,), np.float32),
        "values": ((k,), np.int32),
    }


def open_inputs(
    datastore: str | Path | Datastore | None, cache: str | Path | None, knn: KnnSettings
) -> Datastore | None:
    """Check what needs no model (kNN settings, the cache target) and open the datastore.

    Callers run it before loading a model, so a mistake costs nothing; ``evaluate`` runs it too.
    """
    knn.validate()
    if cache is not None:
        if datastore is None:
            raise KnnlmError("--cache needs --datastore (it stores the retrieved neighbours)")
        claim_target(cache, CACHE_KIND, "meta.json", what="neighbour cache")
    if datastore is None or isinstance(datastore, Datastore):
        return datastore
    return open_datastore(datastore)


def evaluate(
    lm: LoadedLM,
    corpus: Corpus,
    split: str = "valid",
    *,
    context_len: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
    datastore: str | Path | None = None,
    knn: KnnSettings | None = None,
    memory: str | Path | None = None,
    memory_weight: float = 0.25,
    cache: str | Path | None = None,
    key_type: str | None = None,
    progress: bool = True,
    overlap: bool | None = None,
) -> dict:
    """LM perplexity; plus kNN-LM with ``datastore`` and LM + MLP memory with ``memory``.

    ``key_type`` is the memory's key type when no datastore is given (default ffn_input).
    ``overlap`` runs the LM forward of batch i+1 while batch i is searched (default: when the
    model is on an accelerator and a datastore is given; on a CPU both would share the cores).
    The numbers are identical either way: batches arrive in their original order.
    """
    stride = resolve_stride(context_len, stride)
    check_context_len(lm.model, context_len)
    knn = knn or KnnSettings()
    ds = open_inputs(datastore, cache, knn)
    if not 0.0 <= memory_weight <= 1.0:
        raise KnnlmError(f"--memory-weight must be in [0, 1], got {memory_weight}")
    ids = load_tokens(lm.tokenizer, corpus, split, text_field)
    eval_fp = corpus_fingerprint(ids)

    # The user's settings are checked before the searcher is set up (it may log a notice).
    retriever = None
    exclude = False
    warnings: list[str] = []
    if ds is not None:
        ds.check_compatible(lm)
        exclude = _should_exclude(ds, knn.exclude_self, eval_fp)
        if not exclude and is_own_stream(ds, eval_fp):
            warnings.append(
                f"the evaluated text is the datastore's own ({ds.path}) and --exclude-self is "
                "no: every target can retrieve its own entry, so the kNN-LM perplexity is too good"
            )
    mem = None
    if memory is not None:
        from knnlm.retrieval.memory import load_memory

        mem = load_memory(memory, device=str(lm.device))
    if ds is not None:
        retriever = Retriever(lm, ds, knn)
    # Keys are needed for retrieval and for the memory (trained on ffn_input keys by default).
    if retriever is not None:
        key_type = retriever.key_type
    elif mem is not None:
        key_type = key_type or "ffn_input"

    n_total = len(ids) - 1
    writer = None
    if cache is not None:
        writer = _Cache(
            Path(cache),
            n_total,
            knn.k,
            {
                "model_fingerprint": lm.fingerprint,
                "datastore": str(ds.path),
                "datastore_n": ds.n,
                "corpus": describe_corpus(corpus),
                "split": split,
                "corpus_fingerprint": eval_fp,
                "context_len": context_len,
                "stride": stride,
                "recompute": knn.recompute,
                "exclude_self": exclude,
            },
        )

    nll = {"lm": 0.0, "knnlm": 0.0, "mlp": 0.0}
    n_tokens = 0
    t_search = 0.0
    if overlap is None:
        overlap = ds is not None and lm.device.type != "cpu"
    stream = score_stream(
        lm.model,
        ids,
        context_len,
        stride,
        batch_size=batch_size,
        key_type=key_type,
        want_lm=True,
        progress=progress,
        desc=f"eval {split}",
    )
    t0 = time.perf_counter()
    for batch, host in prefetch(_with_host_copies(stream, ds is not None), depth=int(overlap)):
        lm_lp = batch.lm_log_prob
        n = len(batch.targets)
        nll["lm"] -= float(lm_lp.double().sum())
        if ds is not None:
            own = own_rows(batch.positions) if exclude else None
            ts = time.perf_counter()
            nb = retriever.search(host["keys"], exclude_rows=own)
            t_search += time.perf_counter() - ts
            knn_lp = retriever.target_log_prob(nb, host["targets"])
            mixed = interpolate(host["lm_log_prob"], knn_lp, knn.knn_weight)
            nll["knnlm"] -= float(mixed.double().sum())
            if writer is not None:
                writer.write(
                    batch.first_row,
                    lm_log_prob=host["lm_log_prob"].numpy(),
                    targets=host["targets"].numpy().astype(np.int32),
                    ids=nb.ids,
                    dists=nb.dists,
                    values=nb.values.astype(np.int32),
                )
        if mem is not None:
            with torch.no_grad():
                mem_lp = mem.target_log_prob(batch.keys.float(), batch.targets)
            nll["mlp"] -= float(interpolate(lm_lp, mem_lp, memory_weight).double().sum())
        n_tokens += n
    elapsed = time.perf_counter() - t0
    if writer is not None:
        writer.finish()

    result: dict = {
        "settings": {
            "model": lm.name,
            "model_fingerprint": lm.fingerprint,
            "corpus": describe_corpus(corpus),
            "split": split,
            "context_len": context_len,
            "stride": stride,
            "batch_size": batch_size,
        },
        "tokens": n_tokens,
        "lm": {"perplexity": perplexity(nll["lm"], n_tokens), "nll_sum": nll["lm"]},
        "timing": {"seconds": elapsed, "tokens_per_s": n_tokens / max(elapsed, 1e-9)},
        "warnings": warnings,
    }
    if ds is not None:
        result["settings"].update(
            datastore=str(ds.path),
            datastore_n=ds.n,
            key_type=ds.meta["key_type"],
            k=knn.k,
            knn_weight=knn.knn_weight,
            temperature=knn.temperature,
            recompute=knn.recompute,
            nprobe=knn.nprobe,
            exclude_self=exclude,  # applied: each target dropped its own row (p - 1)
            exclude_self_mode=knn.exclude_self,
            own_stream=is_own_stream(ds, eval_fp),
            index=retriever.searcher.index.kind
            if retriever.searcher.index is not None
            else "exact (no index)",
        )
        result["knnlm"] = {
            "perplexity": perplexity(nll["knnlm"], n_tokens),
            "nll_sum": nll["knnlm"],
        }
        result["timing"]["search_seconds"] = t_search
    if mem is not None:
        from knnlm.retrieval.memory import memory_storage

        result["settings"].update(memory=str(memory), memory_weight=memory_weight)
        result["mlp"] = {"perplexity": perplexity(nll["mlp"], n_tokens), "nll_sum": nll["mlp"]}
        result["storage"] = storage_report(ds, memory_storage(memory))
    return result


def _with_host_copies(stream, want: bool):
    """Each batch with CPU copies of what retrieval reads, made in the producing thread.

    With ``prefetch`` the copy then waits only for its own batch's forward: a copy asked for by
    the consumer would queue on the device behind the next batch's forward and undo the overlap.
    """
    for b in stream:
        host = {}
        if want:
            host = {
                "keys": b.keys.float().cpu(),
                "targets": b.targets.cpu(),
                "lm_log_prob": b.lm_log_prob.cpu(),
            }
        yield b, host


def storage_report(ds: Datastore | None, mem_storage: dict) -> dict:
    """Bytes on disk, measured from the files, and the datastore / memory ratio."""
    out = dict(mem_storage)
    if ds is not None:
        out["datastore_bytes"] = ds.storage_bytes()
        index = ds.path / "index.faiss"
        out["index_bytes"] = index.stat().st_size if index.is_file() else 0
        out["ratio_datastore_to_memory"] = (out["datastore_bytes"] + out["index_bytes"]) / max(
            out["memory_bytes"], 1
        )
    return out


def load_cache(path: str | Path) -> dict:
    """A neighbour cache written by ``evaluate(cache=...)``; files checked before mapping."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise KnnlmError(f"no neighbour cache at {path}; create one with knnlm eval --cache")
    what = f"neighbour cache {path}"
    meta = read_meta(path / "meta.json", what)
    try:
        n, k = int(meta["n"]), int(meta["k"])
    except (KeyError, TypeError, ValueError):
        raise KnnlmError(f"{what}: meta.json lacks a valid n or k") from None
    arrays = {}
    for name, (shape, dtype) in _cache_layout(k).items():
        check_npy(path / f"{name}.npy", (n, *shape), dtype, what)
        arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    return {"meta": meta, **arrays}


def continuation_log_probs(
    lm: LoadedLM,
    prompts: list[str],
    continuations: list[str],
    *,
    datastore: str | Path | Datastore | None = None,
    knn: KnnSettings | None = None,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """log p(first token of continuation | prompt) per example, for the LM and the kNN-LM.

    Used for Macondo: prompt "[villager], is the parent of", continuation " [child]" (a
    single-token name). Each example is scored alone, with no outside context. The scored
    token is read off the tokenization of prompt + continuation when the prompt's tokens are
    its prefix (SentencePiece tokenizers may split a leading space into its own token when
    the continuation is encoded alone).
    """
    from knnlm.scoring import score_examples

    if len(prompts) != len(continuations):
        raise KnnlmError("prompts and continuations differ in number")
    knn = knn or KnnSettings()
    knn.validate()
    tok = lm.tokenizer
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
    retriever = Retriever(lm, datastore, knn) if datastore is not None else None
    key_type = retriever.key_type if retriever is not None else None
    lm_out, knn_out = [], []
    for batch in score_examples(
        lm.model, examples, batch_size=batch_size, key_type=key_type, score_from=starts
    ):
        lm_lp = batch.lm_log_prob.cpu()
        lm_out.append(lm_lp.numpy())
        if retriever is not None:
            knn_lp = retriever.target_log_prob(retriever.search(batch.keys), batch.targets)
            knn_out.append(interpolate(lm_lp, knn_lp, knn.knn_weight).numpy())
    result = {"lm": np.concatenate(lm_out)}
    if retriever is not None:
        result["knnlm"] = np.concatenate(knn_out)
    return result
