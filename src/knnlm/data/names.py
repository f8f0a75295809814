"""Name lists for the Macondo generator, and the single-token test for children's names.

Sources:

- the built-in default: the 1990 US Census lists shipped with the PyPI package ``names``
  (``dist.male.first``, ``dist.female.first``, ``dist.all.last``; fixed-width
  ``NAME freq cum rank``, upper case);
- user files, one name per line (Mark Kantrowitz's ``male.txt`` / ``female.txt``), the Census
  fixed-width format, or CSV with a ``name`` column (FiveThirtyEight ``new-top-surnames.csv``).

Names are kept only when they are plain ASCII words (``Anne-Marie`` and ``O'Brien`` are
dropped) so that templates stay unambiguous; upper-case names are capitalised (``SMITH`` ->
``Smith``). Every list is deduplicated and sorted, so generation depends only on the seed.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.fileio import short_sha256

# The Census surname list has 88,799 entries, most of them rare; the most common ones read
# like the paper's "most common surnames" list.
DEFAULT_N_SURNAMES = 1000
_NAME_RE = re.compile(r"^[A-Za-z]{2,}$")
_NUMBER_RE = re.compile(r"^[0-9.]+$")


@dataclass(frozen=True)
class NameList:
    """Sorted distinct names with a description of where they came from (kept in meta)."""

    names: tuple[str, ...]
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_names(cls, names: Sequence[str], source: str = "in-memory list") -> NameList:
        clean = _normalise(names)
        return cls(tuple(clean), {"source": source, "count": len(clean)})

    def __len__(self) -> int:
        return len(self.names)


def _normalise(raw: Sequence[str]) -> list[str]:
    out = set()
    for name in raw:
        name = name.strip()
        if not _NAME_RE.match(name):
            continue
        out.add(name.capitalize() if name.isupper() else name)
    return sorted(out)


def _read(path: Path) -> tuple[str, str]:
    """The file's text and a short hash of its bytes (recorded in meta)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KnnlmError(f"cannot read name file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KnnlmError(f"name file {path} is not valid UTF-8 (byte {exc.start})") from None
    return text, short_sha256(data)


def parse_names(text: str, origin: str = "<text>") -> list[str]:
    """Raw names from one file's text: CSV with a ``name`` column, Census fixed-width, or a list."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    if "," in lines[0]:
        reader = csv.DictReader(io.StringIO(text))
        columns = {c.strip().lower(): c for c in (reader.fieldnames or []) if c is not None}
        if "name" not in columns:
            raise KnnlmError(
                f"{origin}: CSV name files need a 'name' column (found {reader.fieldnames})"
            )
        return [row[columns["name"]] or "" for row in reader]
    names = []
    for line in lines:
        fields = line.split()
        # Census fixed width: NAME freq cum rank; anything else with spaces is not one name.
        if len(fields) == 1 or all(_NUMBER_RE.match(f) for f in fields[1:]):
            names.append(fields[0])
    return names


def read_name_files(paths: str | Path | Sequence[str | Path], limit: int | None = None) -> NameList:
    """Union of the names in ``paths`` (each file's first ``limit`` names when given)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise KnnlmError("no name files given")
    raw: list[str] = []
    files = []
    for p in paths:
        path = Path(p).expanduser()
        text, digest = _read(path)
        found = parse_names(text, str(path))
        raw.extend(found[:limit] if limit else found)
        files.append({"path": str(p), "sha256": digest})
    names = _normalise(raw)
    if not names:
        raise KnnlmError(f"no usable names in {', '.join(str(p) for p in paths)}")
    return NameList(tuple(names), {"source": "files", "files": files, "count": len(names)})


def _package_file(name: str) -> Path:
    try:
        path = Path(str(resources.files("names") / name))
    except ModuleNotFoundError:
        raise KnnlmError(
            "the default name lists come from the 'names' package (pip install names); "
            "or pass your own files"
        ) from None
    if not path.is_file():
        raise KnnlmError(f"the 'names' package has no {name}; pass your own name files")
    return path


def _builtin(files: Sequence[str], limit: int | None, what: str) -> NameList:
    lists = read_name_files([_package_file(f) for f in files], limit=limit)
    source = {
        "source": f"PyPI package 'names' (1990 US Census {what})",
        "files": [
            {"path": f"names/{f}", "sha256": d["sha256"]}
            for f, d in zip(files, lists.source["files"], strict=True)
        ],
        "count": len(lists),
    }
    if limit:
        source["per_file_limit"] = limit
    return NameList(lists.names, source)


def default_given_names() -> NameList:
    return _builtin(["dist.male.first", "dist.female.first"], None, "first names")


def default_surnames() -> NameList:
    return _builtin(["dist.all.last"], DEFAULT_N_SURNAMES, "surnames, most common first")


def resolve_names(spec: Any, default: Callable[[], NameList]) -> NameList:
    """A :class:`NameList`, file path(s), or ``None`` for the built-in default."""
    if spec is None:
        return default()
    if isinstance(spec, NameList):
        return spec
    return read_name_files(spec)


# --- tokenizers --------------------------------------------------------------------------


@dataclass
class TokenizerView:
    """The little the generator needs from any tokenizer: batch encoding and the unk id.

    The layer that owns tokenizers builds one (``knnlm.lm.tokenizer.tokenizer_view``), so the
    data layer never loads a tokenizer itself.
    """

    encode_batch: Callable[[list[str]], list[list[int]]]
    unk_id: int | None
    info: dict[str, Any]


def single_token_names(
    view: TokenizerView | None, names: Sequence[str], context: str = "of"
) -> list[str]:
    """The names that are one token, not the unknown token, where they follow ``context + " "``.

    Encoding ``"of Aaron"`` and checking it is ``encode("of")`` plus one id is the same as
    asking whether ``" Aaron"`` is a single token for byte-level BPE (GPT-2, tiktoken), and
    stays right for tokenizers that add a prefix space (SentencePiece). One batch call.
    ``view`` None: every single word counts.
    """
    if view is None:
        return [n for n in names if n and not any(c.isspace() for c in n)]
    if not isinstance(view, TokenizerView):
        raise KnnlmError(
            f"expected a TokenizerView, got {type(view).__name__}: "
            "wrap the tokenizer with knnlm.lm.tokenizer.tokenizer_view"
        )
    names = list(names)
    if not names:
        return []
    encoded = view.encode_batch([context] + [f"{context} {n}" for n in names])
    prefix, rest = encoded[0], encoded[1:]
    k = len(prefix)
    return [
        name
        for name, ids in zip(names, rest, strict=True)
        if len(ids) == k + 1 and ids[:k] == prefix and ids[k] != view.unk_id
    ]
