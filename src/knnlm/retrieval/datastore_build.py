"""Writing a kNN datastore: the on-disk format's constants and the builders.

A build writes into ``<out>.partial/`` and renames it to ``<out>`` when complete. Rows are
written with positioned writes (no growing in-memory buffer, no mapping of the whole file),
so peak memory does not grow with corpus length. Progress is recorded every few batches;
rerunning the same command resumes from there. Under ``torch.distributed`` (``torchrun`` or
``accelerate launch``) each rank scores a contiguous block of batches and writes its rows at
their final offsets; the result is byte-identical to a single-process build because batch
boundaries are fixed by the window layout, not by the number of processes.

:class:`knnlm.retrieval.datastore.Datastore` opens what these functions write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from knnlm.data.corpus import Corpus, describe_corpus, load_tokens
from knnlm.data.windows import make_windows
from knnlm.errors import KnnlmError
from knnlm.fileio import (
    ARTIFACT_KEY,
    NpyRowWriter,
    claim_target,
    fingerprint,
    fsync_dir,
    read_json,
    read_meta,
    swap_in,
    temp_dir,
    write_json_atomic,
)
from knnlm.forward_pass import (
    WindowSettings,
    check_context_len,
    rows_before,
    score_examples,
    score_stream,
    window_batches,
)
from knnlm.lm.loading import LoadedLM, dtype_name
from knnlm.locking import locks
from knnlm.retrieval.datastore_settings import DatastoreSettings
from knnlm.settings import build, flag

FORMAT_VERSION = 1
KIND = "datastore"  # the artifact marker in meta.json
META = "meta.json"
SETTINGS_KEY = "settings"  # meta.json's settings objects, whole: {"datastore": {...}}
TOKENS = "tokens.npy"  # the scored token stream: row r's context ends at r, its target r+1
KEY_DTYPES = {"float16": np.float16, "float32": np.float32}


def corpus_fingerprint(ids: np.ndarray) -> str:
    return fingerprint(np.ascontiguousarray(ids, dtype=np.int64))


def _built_with(out: Path, settings: dict) -> bool | None:
    """True: a finished datastore with these settings is at ``out``; False: one with other
    settings; None: none."""
    old = read_json(out / META)
    if old is None:
        return None
    return _same_build(old, settings)


def _same_build(old: dict, new: dict) -> bool:
    """Whether ``old`` (a meta.json or a build's settings.json) records the build ``new``
    describes: every key of ``new`` but the settings object, which datastores built before
    it was written lack (and whose ``checkpoint_every`` does not change a row)."""
    return all(old.get(k) == v for k, v in new.items() if k != SETTINGS_KEY)


def write_tokens(path: Path, ids: np.ndarray) -> None:
    """Save the token stream in ``path`` through a temporary name (neighbours read it)."""
    tmp = path / f".{TOKENS}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(ids, dtype=np.int32), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / TOKENS)


def _finish(partial: Path, out: Path, meta: dict, ids: np.ndarray | None = None) -> None:
    """tokens.npy and meta.json (with the marker) first, then drop the progress files, then
    swap in: the finished datastore arrives whole, its token stream (``ids``; none for a
    datastore of independent examples) included.

    A crash anywhere here leaves a partial whose meta.json matches the settings: the rerun
    only swaps it in, and no finished rows are lost.
    """
    if ids is not None and not (partial / TOKENS).is_file():
        write_tokens(partial, ids)
    write_json_atomic(partial / META, meta)
    for f in [*partial.glob("progress-*.json"), partial / "settings.json"]:
        f.unlink(missing_ok=True)
    swap_in(partial, out, KIND, META)


def _check_keys_finite(keys: torch.Tensor, key_type: str, key_dtype: str) -> None:
    """float16 holds values up to 65504; larger keys would become inf and poison the index."""
    if key_dtype == "float16" and not bool(torch.isfinite(keys.to(torch.float16)).all()):
        bad = "non-finite" if not bool(torch.isfinite(keys).all()) else "beyond float16 range"
        raise KnnlmError(
            f"{key_type} keys have {bad} values that float16 cannot store; "
            "rebuild with --key-dtype float32"
        )
    if key_dtype == "float32" and not bool(torch.isfinite(keys).all()):
        raise KnnlmError(f"{key_type} keys have non-finite values (the model produced inf/nan)")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def datastore_meta(
    lm: LoadedLM, source: dict, *, batch_size: int, key_type: str, key_dtype: str, n: int
) -> dict:
    """The metadata every datastore records (meta.json, and the settings a rebuild compares).

    ``source`` says what was scored, in this order: corpus, split, corpus_fingerprint,
    context_len, stride (None for independent examples).
    """
    return {
        ARTIFACT_KEY: KIND,
        "format_version": FORMAT_VERSION,
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "model_dtype": dtype_name(lm.model),
        "tokenizer_fingerprint": lm.tokenizer_fingerprint,
        **source,
        "batch_size": batch_size,
        "key_type": key_type,
        "key_dtype": key_dtype,
        "value_dtype": "int32",
        "dim": lm.adapter.hidden_size,
        "n": n,
    }


def build_datastore(
    lm: LoadedLM,
    corpus: Corpus,
    split: str,
    out: str | Path,
    *,
    context_len: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    key_type: str = "ffn_input",
    key_dtype: str = "float16",
    text_field: str = "text",
    checkpoint_every: int = 50,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """:func:`make_datastore` with the :class:`DatastoreSettings` as keywords (named as the
    CLI's flags when wrong); ``stride`` None is ``context_len`` here.
    Example: ``build_datastore(lm, "data/wikitext-2", "train", "runs/ds", context_len=512)``.
    """
    stride = context_len if stride is None else stride
    window = build(WindowSettings, flag(), context_len=context_len, stride=stride)
    settings = build(DatastoreSettings, flag(), split=split, window=window,
                     batch_size=batch_size, key_type=key_type, key_dtype=key_dtype,
                     text_field=text_field, checkpoint_every=checkpoint_every)  # fmt: skip
    return make_datastore(lm, corpus, out, settings, overwrite=overwrite, progress=progress,
                          on_batch=on_batch)  # fmt: skip


@locks("out", "datastore")
def make_datastore(
    lm: LoadedLM,
    corpus: Corpus,
    out: str | Path,
    settings: DatastoreSettings,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Score ``settings.split`` of ``corpus`` with ``lm`` and write (key, next token) for every
    position; the windows as given (None filled from the model).

    ``on_batch(batches_done)`` is called after each batch (tests use it to interrupt a build).
    Returns the datastore path; a finished datastore with the same settings is reused, one
    with other settings is replaced only with ``overwrite`` (and only once the new one is
    complete), and a folder that is not a datastore is refused before any work. meta.json
    holds ``settings`` whole (``settings.datastore``, windows as used) beside the keys every
    reader reads.
    """
    window = settings.window.for_model(lm.model)
    context_len, stride, split = window.context_len, window.stride, settings.split
    check_context_len(lm.model, context_len)
    out = Path(out)
    claim_target(out, KIND, META)
    ids = load_tokens(lm.tokenizer, corpus, split, settings.text_field)
    windows = make_windows(len(ids), context_len, stride)
    batches = window_batches(windows, settings.batch_size)
    source = {"corpus": describe_corpus(corpus), "split": split,
              "corpus_fingerprint": corpus_fingerprint(ids),
              "context_len": context_len, "stride": stride}  # fmt: skip
    meta = datastore_meta(lm, source, batch_size=settings.batch_size, key_type=settings.key_type,
                          key_dtype=settings.key_dtype, n=int(rows_before(windows)[-1]))  # fmt: skip
    meta[SETTINGS_KEY] = {"datastore": {**settings.to_dict(), "window": window.to_dict()}}
    rank, world = _dist()
    built = _built_with(out, meta)
    if built:
        return out
    if built is False and not overwrite:
        raise KnnlmError(
            f"{out} holds a datastore with other settings; pass overwrite=True (--overwrite)"
        )
    partial, finished = _open_partial(out, meta, rank)
    if finished:  # a crash cut the last step short: the rows are all there
        if rank == 0:
            _finish(partial, out, read_json(partial / META), ids)
        _barrier()
        return out
    # Contiguous blocks of batches per rank; the batch layout itself never changes.
    per_rank = -(-len(batches) // world)
    span = (rank * per_rank, min((rank + 1) * per_rank, len(batches)))
    _write_rows(lm, ids, partial, meta, span, rank=rank, world=world, progress=progress,
                checkpoint_every=settings.checkpoint_every, on_batch=on_batch)  # fmt: skip
    _barrier()
    if rank == 0:
        meta = dict(meta, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), world_size=world)
        _finish(partial, out, meta, ids)
    _barrier()
    return out


def _open_partial(out: Path, settings: dict, rank: int) -> tuple[Path, bool]:
    """The build's ``<out>.partial`` folder, with its key and value files preallocated when
    the build starts afresh; and whether a finished build only waits to be swapped in."""
    partial = Path(str(out) + ".partial")
    settings_file = partial / "settings.json"
    # Decided by every rank before rank 0 touches the folder.
    finished = _built_with(partial, settings) is True
    fresh = not finished and not _same_build(read_json(settings_file) or {}, settings)
    _barrier()
    if rank == 0:
        partial = temp_dir(out, KIND, META, fresh=fresh)
    _barrier()
    if finished:
        return partial, True
    if rank == 0 and fresh:
        n, dim, dtype = settings["n"], settings["dim"], KEY_DTYPES[settings["key_dtype"]]
        NpyRowWriter(partial / "keys.npy", (n, dim), dtype, True).close()
        NpyRowWriter(partial / "values.npy", (n,), np.int32, True).close()
        fsync_dir(partial)
        write_json_atomic(settings_file, settings)
    _barrier()
    return partial, False


def _write_rows(
    lm: LoadedLM,
    ids: np.ndarray,
    partial: Path,
    settings: dict,
    span: tuple[int, int],
    *,
    rank: int,
    world: int,
    progress: bool,
    checkpoint_every: int,
    on_batch: Callable[[int], None] | None,
) -> None:
    """Score batches [a, b) of the fixed layout into the preallocated files, resuming after
    the last batch this rank recorded; rows reach the disk before the progress counting them."""
    n, dim, key_type, key_dtype = (settings[k] for k in ("n", "dim", "key_type", "key_dtype"))
    key_writer = NpyRowWriter(partial / "keys.npy", (n, dim), KEY_DTYPES[key_dtype], False)
    value_writer = NpyRowWriter(partial / "values.npy", (n,), np.int32, False)
    a, b = span
    progress_file = partial / f"progress-{rank}-of-{world}.json"
    start = a
    if progress_file.is_file():
        start = max(a, int(read_meta(progress_file, f"datastore {partial}")["batches_done"]))
    torch_dtype = torch.float16 if key_dtype == "float16" else torch.float32
    done = start
    try:
        if start < b:
            for batch in score_stream(
                lm.model,
                ids,
                settings["context_len"],
                settings["stride"],
                batch_size=settings["batch_size"],
                key_type=key_type,
                want_lm=False,
                batch_range=(start, b),
                progress=progress and rank == 0,
                desc=f"datastore {settings['split']}",
            ):
                _check_keys_finite(batch.keys, key_type, key_dtype)
                keys = batch.keys.to(torch_dtype).cpu().numpy()
                key_writer.write(batch.first_row, keys)
                value_writer.write(batch.first_row, batch.targets.cpu().numpy().astype(np.int32))
                done += 1
                if (done - start) % checkpoint_every == 0:
                    os.fsync(key_writer.fd)
                    os.fsync(value_writer.fd)
                    write_json_atomic(progress_file, {"batches_done": done})
                if on_batch is not None:
                    on_batch(done)
    finally:
        key_writer.close()
        value_writer.close()
    write_json_atomic(progress_file, {"batches_done": done})


@locks("out", "datastore")
def build_example_datastore(
    lm: LoadedLM,
    texts: list[str],
    out: str | Path,
    *,
    key_type: str = "ffn_input",
    key_dtype: str = "float16",
    batch_size: int = 32,
    add_eos: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Datastore over independent examples (e.g. Macondo training sentences), same format.

    Each example is scored on its own (no context from its neighbours in the file), as the
    examples are seen in fine-tuning; with ``add_eos`` the tokenizer's EOS ends each example.
    A datastore with other settings at ``out`` is replaced only with ``overwrite``.
    """
    if not texts:
        raise KnnlmError("no examples to store")
    if key_dtype not in KEY_DTYPES:
        raise KnnlmError(f"key dtype must be float16 or float32, not {key_dtype!r}")
    out = Path(out)
    claim_target(out, KIND, META)
    eos = [lm.tokenizer.eos_token_id] if add_eos and lm.tokenizer.eos_token_id is not None else []
    examples = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in texts]
    n = sum(len(e) - 1 for e in examples)
    dim = lm.adapter.hidden_size
    source = {"corpus": "examples", "split": "examples",
              "corpus_fingerprint": fingerprint("\n".join(texts).encode()),
              "context_len": None, "stride": None}  # fmt: skip
    meta = datastore_meta(lm, source, batch_size=batch_size, key_type=key_type,
                          key_dtype=key_dtype, n=n)  # fmt: skip
    meta.update(examples=len(examples), add_eos=add_eos)
    built = _built_with(out, meta)
    if built:
        return out
    if built is False and not overwrite:
        raise KnnlmError(f"{out} holds a datastore with other settings; pass overwrite=True")
    partial = temp_dir(out, KIND, META, fresh=True)
    kw = NpyRowWriter(partial / "keys.npy", (n, dim), KEY_DTYPES[key_dtype], True)
    vw = NpyRowWriter(partial / "values.npy", (n,), np.int32, True)
    torch_dtype = torch.float16 if key_dtype == "float16" else torch.float32
    try:
        for batch in score_examples(
            lm.model,
            examples,
            batch_size=batch_size,
            key_type=key_type,
            want_lm=False,
            progress=progress,
            desc="datastore examples",
        ):
            _check_keys_finite(batch.keys, key_type, key_dtype)
            kw.write(batch.first_row, batch.keys.to(torch_dtype).cpu().numpy())
            vw.write(batch.first_row, batch.targets.cpu().numpy().astype(np.int32))
    finally:
        kw.close()
        vw.close()
    _finish(partial, out, dict(meta, created=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    return out
