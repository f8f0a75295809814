"""Corpus sources: a WikiText-style directory, a single text file, or a HF ``datasets`` spec.

A corpus spec is a string:

- ``DIR``                 a directory holding ``train.txt``, ``valid.txt``, ``test.txt``
                          (``wiki.{split}.tokens`` / ``wiki.{split}.raw`` are accepted too)
- ``FILE``                one text file; it serves every split that is asked for
- ``hf:NAME[:CONFIG]``    a Hugging Face dataset, e.g. ``hf:wikitext:wikitext-103-raw-v1``
- ``hf:json:PATTERN``     local data files through HF ``datasets`` (builders ``json``, ``csv``,
  ``hf:text:PATTERN``     ``text``, ``parquet``); ``{split}`` in PATTERN is replaced by the split

In Python a corpus may also be a list of strings (one document or line each) or a
``datasets.Dataset`` (its text column) / ``datasets.DatasetDict`` (the split asked for); a
list or a ``Dataset`` is one text that serves every split.

Splits are tokenized line by line and concatenated into one token stream; the result is the
same wherever the text came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError

SPLIT_ALIASES = {"valid": ("valid", "validation", "val"), "train": ("train",), "test": ("test",)}
_LOCAL_BUILDERS = ("json", "csv", "text", "parquet")

# A path or spec string, a list of strings, or a datasets.Dataset / DatasetDict.
Corpus = str | Path | Sequence[str] | Any


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KnnlmError(
            f"{path} is not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r})"
        ) from None


def _split_file(directory: Path, split: str) -> Path:
    for alias in SPLIT_ALIASES.get(split, (split,)):
        for name in (f"{alias}.txt", f"wiki.{alias}.tokens", f"wiki.{alias}.raw"):
            if (directory / name).is_file():
                return directory / name
    raise KnnlmError(f"corpus directory {directory} has no {split}.txt")


def _read_hf(spec: str, split: str, text_field: str) -> str:
    try:
        import datasets
    except ImportError:  # an optional part of the install
        raise KnnlmError(
            "reading hf: corpora needs the 'datasets' package: pip install 'knnlm[hf]'"
        ) from None
    parts = spec[3:].split(":", 1)
    name = parts[0]
    arg = parts[1] if len(parts) > 1 else None
    try:
        if name in _LOCAL_BUILDERS:
            if not arg:
                raise KnnlmError(f"{spec!r}: the {name} builder needs a data file pattern")
            files = arg.replace("{split}", split)
            if not Path(files).exists():
                raise KnnlmError(f"data file {files} does not exist")
            ds = datasets.load_dataset(name, data_files={split: files}, split=split)
        else:
            ds = None
            for alias in SPLIT_ALIASES.get(split, (split,)):
                try:
                    ds = datasets.load_dataset(name, arg, split=alias)
                    break
                except ValueError:
                    continue
            if ds is None:
                raise KnnlmError(f"dataset {spec!r} has no split {split!r}")
    except KnnlmError:
        raise
    except Exception as exc:  # the hub raises many kinds; all mean "cannot load"
        raise KnnlmError(f"cannot load dataset {spec!r}: {str(exc).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise KnnlmError(
            f"dataset {spec!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})"
        )
    return _join_rows(ds[text_field])


def _join_rows(rows: Sequence[Any]) -> str:
    """One line (or more) per row: each row ends with a newline."""
    if not all(isinstance(r, str) for r in rows):
        raise KnnlmError("a corpus list must hold strings only")
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def _read_dataset(ds: Any, split: str, text_field: str) -> str:
    """The text of an in-memory ``datasets.Dataset`` (or the split of a ``DatasetDict``)."""
    if isinstance(ds, Mapping):
        found = next((a for a in SPLIT_ALIASES.get(split, (split,)) if a in ds), None)
        if found is None:
            raise KnnlmError(f"the DatasetDict has no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[found]
    if text_field not in ds.column_names:
        raise KnnlmError(
            f"the dataset has no column {text_field!r} (columns: {', '.join(ds.column_names)})"
        )
    return _join_rows(ds[text_field])


def describe_corpus(spec: Corpus) -> str:
    """A short string naming ``spec`` for metadata and results (paths and specs as given)."""
    if isinstance(spec, (str, Path)):
        return str(spec)
    if isinstance(spec, Sequence):
        return f"<list of {len(spec)} strings>"
    return f"<{type(spec).__name__} of {len(spec)} rows>"


def pick_split(spec: Corpus, split: str | None, default: str, arg: str = "split") -> str:
    """The split to read: ``default`` when none was given; one clear line (naming ``arg``)
    when one was given for a single text file, which has no splits.

    Example: ``pick_split("data/wikitext-2", None, "valid")`` is ``"valid"``.
    """
    if split is None:
        return default
    if isinstance(spec, (str, Path)) and not str(spec).startswith("hf:"):
        path = Path(spec).expanduser()
        if path.is_file():
            raise KnnlmError(
                f"{arg} {split!r} was given, but the corpus {spec} is a single text file, which "
                "has no splits (give a folder with train.txt / valid.txt / test.txt)"
            )
    return split


def read_split(spec: Corpus, split: str, text_field: str = "text") -> str:
    """The text of one split; raises ``KnnlmError`` for missing, empty or non-UTF-8 input.

    Example: ``read_split(["a first line", "a second"], "train")`` is
    ``"a first line\\na second\\n"``.
    """
    if not isinstance(spec, (str, Path)):
        if isinstance(spec, Sequence):
            text = _join_rows(spec)
        elif hasattr(spec, "column_names") or isinstance(spec, Mapping):
            text = _read_dataset(spec, split, text_field)
        else:
            raise KnnlmError(
                f"a corpus is a path, an hf: spec, a list of strings or a datasets.Dataset, "
                f"not {type(spec).__name__}"
            )
        where = describe_corpus(spec)
    elif str(spec).startswith("hf:"):
        text = _read_hf(spec, split, text_field)
        where = spec
    else:
        spec = str(spec)
        path = Path(spec).expanduser()
        if not path.exists():
            raise KnnlmError(f"corpus {spec} does not exist")
        file = _split_file(path, split) if path.is_dir() else path
        text = _decode(file)
        where = str(file)
    if not text.strip():
        raise KnnlmError(f"corpus {where} ({split}) is empty")
    return text


def tokenize_text(tokenizer, text: str, batch_lines: int = 4096) -> np.ndarray:
    """Token ids of ``text`` as one int64 stream, tokenized line by line (newlines kept)."""
    lines = text.splitlines(keepends=True)
    chunks: list[np.ndarray] = []
    for i in range(0, len(lines), batch_lines):
        enc = tokenizer(lines[i : i + batch_lines], add_special_tokens=False)["input_ids"]
        chunks.extend(np.asarray(ids, dtype=np.int64) for ids in enc if ids)
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    if ids.size < 2:
        raise KnnlmError("the corpus split has fewer than two tokens: nothing to score")
    return ids


def load_tokens(tokenizer, spec: Corpus, split: str, text_field: str = "text") -> np.ndarray:
    return tokenize_text(tokenizer, read_split(spec, split, text_field))
