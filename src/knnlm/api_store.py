"""``knnlm.Datastore``: build, load, index and describe a kNN datastore from Python.

A thin, stable face over :mod:`knnlm.retrieval.datastore` and
:mod:`knnlm.retrieval.search.index_build`; the CLI's ``datastore`` commands go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from knnlm.data.corpus import Corpus, load_tokens
from knnlm.errors import KnnlmError
from knnlm.forward_pass import default_window
from knnlm.retrieval.datastore import (
    TOKENS,
    build_datastore,
    corpus_fingerprint,
    open_datastore,
    write_tokens,
)
from knnlm.retrieval.datastore import Datastore as StoredDatastore
from knnlm.retrieval.search.conventions import INDEX_META
from knnlm.retrieval.search.index_build import build_index, index_summary

if TYPE_CHECKING:
    from knnlm.lm.loading import LoadedLM


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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

    def __init__(self, stored: StoredDatastore):
        """Wrap an opened datastore; ``Datastore.load(path)`` is the usual way in."""
        self.stored = stored

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        """Open a finished datastore (sizes checked against its meta.json).

        Example: ``ds = Datastore.load("runs/ds")``.
        """
        return cls(open_datastore(path))

    @classmethod
    def build(
        cls,
        knn_lm: Any,
        corpus: Corpus,
        out: str | Path,
        *,
        split: str = "train",
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

        ``corpus`` is a path, an ``hf:`` spec, a list of strings or a ``datasets.Dataset``
        (``split`` picks the split of folders and ``hf:`` corpora). ``context_len`` defaults
        to the model's maximum positions, ``stride`` to half of it. Resumable; a finished
        datastore with the same settings is reused. Example::

            ds = Datastore.build(knn_lm, "data/wikitext-2", "runs/ds", context_len=256)
        """
        lm: LoadedLM = knn_lm.lm
        context_len, stride = default_window(lm.model, context_len, stride)
        path = build_datastore(
            lm, corpus, split, out, context_len=context_len, stride=stride,
            batch_size=batch_size, key_type=key_type, key_dtype=key_dtype,
            text_field=text_field, overwrite=overwrite, progress=progress,
        )  # fmt: skip
        ds = cls.load(path)
        if _rank() == 0 and not (ds.path / TOKENS).is_file():
            ids = load_tokens(lm.tokenizer, corpus, split, text_field)
            write_tokens(ds.path, ids)  # a datastore built before tokens.npy was part of it
        return ds

    # -- what it is --------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The datastore's folder; e.g. ``Path("runs/ds")``."""
        return self.stored.path

    @property
    def meta(self) -> dict:
        """The datastore's meta.json (fingerprints, settings); e.g. ``ds.meta["key_type"]``."""
        return self.stored.meta

    def __len__(self) -> int:
        return self.stored.n

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Datastore({str(self.path)!r}, n={self.stored.n}, dim={self.stored.dim}, "
            f"key_type={m['key_type']!r}, model={m['model']!r})"
        )

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
        build_index(
            self.path, kind=type, metric=metric, nlist=nlist, pq_m=pq_bytes, pq_bits=pq_bits,
            nprobe=nprobe, train_size=train_size, seed=seed, progress=progress,
        )  # fmt: skip
        return self

    def info(self) -> dict[str, Any]:
        """Size, key type, model, corpus, index and bytes on disk, as a dict.

        Example: ``Datastore.load("runs/ds").info()["bytes"]``.
        """
        m = self.meta
        has_index = (self.path / INDEX_META).is_file()
        files = [f for f in self.path.iterdir() if f.is_file()]
        return {
            "path": str(self.path),
            "n": self.stored.n,
            "dim": self.stored.dim,
            "key_type": m["key_type"],
            "key_dtype": m["key_dtype"],
            "model": m["model"],
            "model_fingerprint": m["model_fingerprint"],
            "model_dtype": m.get("model_dtype"),
            "corpus": m["corpus"],
            "split": m["split"],
            "context_len": m["context_len"],
            "stride": m["stride"],
            "index": index_summary(self.path) if has_index else None,
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
