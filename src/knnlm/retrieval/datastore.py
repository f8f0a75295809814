"""The kNN datastore: one key and one value per scored training position.

Layout of a datastore directory::

    keys.npy     (N, d) float16 (default) or float32
    values.npy   (N,) int32: the next token of each key
    tokens.npy   the scored token stream (row r's context ends at token r, its target r + 1)
    meta.json    model / tokenizer / corpus fingerprints, key type, d, N, dtypes,
                 context length and stride, creation time, format version

A pruned datastore (:mod:`knnlm.retrieval.prune`, ``meta["pruned"]``) adds ``counts.npy``
(N,) int32, the number of original entries each row stands for (a weight in p_knn), and
``positions.npy`` (N,) int64, each row's row number in the unpruned datastore.

:class:`Datastore` (``knnlm.Datastore``) builds, opens, indexes and describes one; the
writing itself is in :mod:`knnlm.retrieval.datastore_build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.data.corpus import Corpus, load_tokens, pick_split
from knnlm.errors import KnnlmError
from knnlm.fileio import check_npy, fingerprint, read_meta, read_stable, recover
from knnlm.forward_pass import WindowSettings
from knnlm.lm.loading import LoadedLM, as_loaded, dtype_name
from knnlm.retrieval.datastore_build import (
    FORMAT_VERSION,
    KEY_DTYPES,
    KIND,
    META,
    TOKENS,
    build_datastore,
    build_example_datastore,
    corpus_fingerprint,
    datastore_meta,
    make_datastore,
    write_tokens,
)
from knnlm.retrieval.datastore_settings import DatastoreSettings
from knnlm.retrieval.search.conventions import INDEX_META
from knnlm.retrieval.search.index_settings import IndexSettings
from knnlm.settings import build

try:  # FAISS is optional: without it a datastore is searched exactly and has no index
    from knnlm.retrieval.search.index_build import index_summary, make_index
except ImportError as _e:
    if _e.name != "faiss":
        raise
    make_index = index_summary = None

__all__ = [
    "FORMAT_VERSION",
    "KEY_DTYPES",
    "KIND",
    "META",
    "TOKENS",
    "Datastore",
    "DatastoreSettings",
    "build_datastore",
    "build_example_datastore",
    "corpus_fingerprint",
    "datastore_meta",
    "datastore_record",
    "make_datastore",
    "open_datastore",
    "write_tokens",
]


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass(repr=False)
class Datastore:
    """A kNN datastore on disk: one (key, next token) pair per scored corpus position.

    Example::

        from knnlm import KnnLM, Datastore
        knn_lm = KnnLM.from_pretrained("gpt2")
        ds = Datastore.build(knn_lm, ["some text", "more text"], "runs/ds")
        ds.index("flat")
        print(ds.info()["n"], len(ds))
        ds = Datastore.load("runs/ds")
    """

    path: Path
    keys: np.ndarray  # memmap (N, d)
    values: np.ndarray  # memmap (N,)
    meta: dict
    counts: np.ndarray | None = None  # (N,) int32 for a pruned datastore, else None
    positions: np.ndarray | None = None  # (N,) int64 rows in the unpruned datastore

    # -- in and out ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        """Open a finished datastore (sizes checked against its meta.json).

        Example: ``ds = Datastore.load("runs/ds")``.
        """
        return open_datastore(path)

    @classmethod
    def build(
        cls,
        knn_lm: Any,
        corpus: Corpus,
        out: str | Path,
        *,
        split: str | None = None,
        context_len: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        key_type: str = "ffn_input",
        key_dtype: str = "float16",
        text_field: str = "text",
        overwrite: bool = False,
        progress: bool = True,
    ) -> Datastore:
        """Score ``corpus`` with ``knn_lm`` and store every position's key and next token.

        ``knn_lm`` is a ``KnnLM``. ``corpus`` is a path, an ``hf:`` spec, a list of strings
        or a ``datasets.Dataset`` (``split``, default ``train``, picks the split of folders
        and ``hf:`` corpora; a single text file has none). ``context_len`` defaults to the model's maximum positions, ``stride`` to
        half of it. Resumable; a finished datastore with the same settings is reused.
        Example::

            ds = Datastore.build(knn_lm, "data/wikitext-2", "runs/ds", context_len=256)
        """
        window = WindowSettings(context_len, stride)
        settings = DatastoreSettings(pick_split(corpus, split, "train"), window, batch_size,
                                     key_type, key_dtype, text_field)  # fmt: skip
        return cls.make(knn_lm, corpus, out, settings, overwrite=overwrite, progress=progress)

    @classmethod
    def make(
        cls,
        knn_lm: Any,
        corpus: Corpus,
        out: str | Path,
        settings: DatastoreSettings,
        *,
        overwrite: bool = False,
        progress: bool = True,
    ) -> Datastore:
        """:meth:`build` with its settings whole (:class:`DatastoreSettings`, checked where
        they were built; the CLI builds them from its flags).

        Example: ``Datastore.make(knn_lm, "data/wikitext-2", "runs/ds", DatastoreSettings())``.
        """
        lm = as_loaded(knn_lm, "knn_lm")
        path = make_datastore(lm, corpus, out, settings, overwrite=overwrite, progress=progress)
        ds = cls.load(path)
        if _rank() == 0 and not (ds.path / TOKENS).is_file():
            ids = load_tokens(lm.tokenizer, corpus, settings.split, settings.text_field)
            write_tokens(ds.path, ids)  # a datastore built before tokens.npy was part of it
        return ds

    def index(
        self,
        type: str = "flat",
        *,
        metric: str = "l2",
        nlist: int | None = None,
        pq_bytes: int | None = None,
        pq_bits: int = 8,
        nprobe: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> Datastore:
        """Build a FAISS index beside the keys (``flat`` exact or ``ivfpq``); returns self.

        Without an index the search is exact (torch); example: ``ds.index("ivfpq")``.
        """
        settings = build(
            IndexSettings, {"kind": "type", "pq_m": "pq_bytes"}, kind=type, metric=metric,
            nlist=nlist, pq_m=pq_bytes, pq_bits=pq_bits, nprobe=nprobe, train_size=train_size,
            seed=seed,
        )  # fmt: skip
        if make_index is None:
            raise KnnlmError("an index needs the faiss package (pip install faiss-cpu)")
        make_index(self.path, settings, progress=progress)
        return self

    # -- what it is ----------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of (key, value) rows; e.g. 74458."""
        return int(self.meta["n"])

    @property
    def dim(self) -> int:
        """Size of a key (the model's hidden size); e.g. 768."""
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Datastore({str(self.path)!r}, n={self.n}, dim={self.dim}, "
            f"key_type={m['key_type']!r}, model={m['model']!r})"
        )

    def storage_bytes(self) -> int:
        """Bytes on disk of keys + values (+ counts when pruned); e.g. ``ds.storage_bytes()``."""
        names = ["keys.npy", "values.npy"] + (["counts.npy"] if self.counts is not None else [])
        return sum((self.path / f).stat().st_size for f in names)

    def info(self) -> dict[str, Any]:
        """Size, key type, model, corpus, index and bytes on disk, as a dict.

        Example: ``Datastore.load("runs/ds").info()["bytes"]``.
        """
        m = self.meta
        has_index = (self.path / INDEX_META).is_file()
        files = [f for f in self.path.iterdir() if f.is_file()]
        index = None
        if has_index:
            index = index_summary(self.path) if index_summary else "present (faiss not installed)"
        return {
            "path": str(self.path),
            "n": self.n,
            "dim": self.dim,
            "key_type": m["key_type"],
            "key_dtype": m["key_dtype"],
            "model": m["model"],
            "model_fingerprint": m["model_fingerprint"],
            "model_dtype": m.get("model_dtype"),
            "corpus": m["corpus"],
            "split": m["split"],
            "context_len": m["context_len"],
            "stride": m["stride"],
            "index": index,
            "bytes": sum(f.stat().st_size for f in files),
            "created": m.get("created"),
        }

    def tokens(self, tokenizer: Any = None, text_field: str = "text") -> np.ndarray:
        """The token stream the rows come from (row r's target is token r + 1).

        Read from ``tokens.npy`` when the build wrote it, else re-read from the corpus named
        in meta.json with ``tokenizer`` and checked against its fingerprint. Example:
        ``knn_lm.tokenizer.decode(ds.tokens()[:20])``.
        """
        if (self.path / TOKENS).is_file():
            return np.load(self.path / TOKENS, mmap_mode="r", allow_pickle=False)
        m = self.meta
        if tokenizer is None or str(m["corpus"]).startswith("<"):
            raise KnnlmError(
                f"datastore {self.path} has no {TOKENS} and its corpus ({m['corpus']}) cannot "
                "be re-read here; rebuild it with Datastore.build or knnlm datastore build"
            )
        ids = load_tokens(tokenizer, m["corpus"], m["split"], text_field)
        if corpus_fingerprint(ids) != m["corpus_fingerprint"]:
            raise KnnlmError(f"the corpus {m['corpus']} changed since datastore {self.path}")
        return ids

    def check_k(self, k: int, arg: str = "k") -> None:
        """Refuse asking for more neighbours than the datastore holds, in one line naming its
        size and the argument ``arg`` (``"--k"`` from the CLI); e.g. ``ds.check_k(1024)``."""
        if k > self.n:
            raise KnnlmError(
                f"{arg}={k} is more neighbours than datastore {self.path} holds ({self.n} entries)"
            )

    def check_compatible(self, lm: LoadedLM, key_type: str | None = None) -> None:
        """Refuse a datastore built with another model, tokenizer or key size.

        Example: ``ds.check_compatible(knn_lm.lm)`` raises ``KnnlmError`` for a foreign one.
        """
        m = self.meta
        if m["dim"] != lm.adapter.hidden_size:
            raise KnnlmError(
                f"datastore {self.path} has keys of size {m['dim']}, the model's hidden size is "
                f"{lm.adapter.hidden_size}"
            )
        if m["tokenizer_fingerprint"] != lm.tokenizer_fingerprint:
            raise KnnlmError(
                f"datastore {self.path} was built with another tokenizer "
                f"({m['tokenizer_fingerprint']} != {lm.tokenizer_fingerprint})"
            )
        dtype = dtype_name(lm.model)
        if m.get("model_dtype") not in (None, dtype):
            raise KnnlmError(
                f"datastore {self.path} was built with the model in {m['model_dtype']}; it is "
                f"loaded in {dtype} now (load it with dtype={m['model_dtype']!r}, in the CLI "
                f"--dtype {m['model_dtype']})"
            )
        if m["model_fingerprint"] != lm.fingerprint:
            raise KnnlmError(
                f"datastore {self.path} was built with another model ({m['model']}, "
                f"{m['model_fingerprint']}); this model is {lm.name} ({lm.fingerprint})"
            )
        if key_type is not None and m["key_type"] != key_type:
            raise KnnlmError(f"datastore {self.path} holds {m['key_type']} keys, not {key_type}")


def datastore_record(ds: Datastore) -> dict:
    """What an artifact trained on ``ds`` keeps about it (to trace and compare)."""
    meta_bytes = (ds.path / META).read_bytes()
    return {
        "path": str(Path(ds.path).resolve()),
        "meta_sha256": fingerprint(meta_bytes),
        "n": ds.n,
        "dim": ds.dim,
        "key_type": ds.meta.get("key_type"),
        "keys_dtype": str(ds.keys.dtype),
        "model": ds.meta.get("model"),
        "model_fingerprint": ds.meta.get("model_fingerprint"),
        "tokenizer_fingerprint": ds.meta.get("tokenizer_fingerprint"),
        "corpus_fingerprint": ds.meta.get("corpus_fingerprint"),
    }


def open_datastore(path: str | Path) -> Datastore:
    """Open a finished datastore; sizes and shapes are checked against meta.json before mapping.

    Opened again when a writer swapped a new datastore in while this one was being read.
    """
    return read_stable(Path(path), _open_once)


def _open_once(path: Path) -> Datastore:
    recover(path, KIND, META)
    if not (path / META).is_file():
        if Path(str(path) + ".partial").is_dir():
            raise KnnlmError(f"datastore {path} is incomplete; rerun the build to resume it")
        raise KnnlmError(f"no datastore at {path} (meta.json missing)")
    what = f"datastore {path}"
    meta = read_meta(path / META, what)
    if meta.get("format_version") != FORMAT_VERSION:
        raise KnnlmError(f"datastore {path} has format version {meta.get('format_version')}")
    try:
        n, dim = int(meta["n"]), int(meta["dim"])
        key_dtype = KEY_DTYPES[meta["key_dtype"]]
    except (KeyError, TypeError, ValueError):
        raise KnnlmError(f"{what}: meta.json lacks a valid n, dim or key_dtype") from None
    check_npy(path / "keys.npy", (n, dim), key_dtype, what)
    check_npy(path / "values.npy", (n,), np.int32, what)
    keys = np.load(path / "keys.npy", mmap_mode="r", allow_pickle=False)
    values = np.load(path / "values.npy", mmap_mode="r", allow_pickle=False)
    counts = positions = None
    if meta.get("pruned"):
        check_npy(path / "counts.npy", (n,), np.int32, what)
        check_npy(path / "positions.npy", (n,), np.int64, what)
        counts = np.load(path / "counts.npy", allow_pickle=False)
        positions = np.load(path / "positions.npy", mmap_mode="r", allow_pickle=False)
    return Datastore(path, keys, values, meta, counts, positions)
