"""Macondo: a synthetic test of generalisation from over-specified text (paper Section 4, App. B).

Villagers have unique full names; some are parents of 1..5 children whose first names are
single tokens. Every training sentence about a parent-child pair carries one causally
irrelevant attribute clause ("[villager], who [desc], is the parent of [child]"); the test
sentence drops it ("[villager], is the parent of [child]"). A model that generalises gives each
of a parent's n children probability 1/n, i.e. log-likelihood log(1/n).

Macondo-Conv (``conv=True``) is the chat version used with hosted fine-tuning: 125 parents
with 2 children each, "User: Who is the child of [villager], the one who [desc]? Assistant:
[child]."

Attributes are data (``knnlm.data.macondo_attributes``): a list of ``Attribute`` records (name,
clause template, sampler). Each villager gets one fixed value per attribute, sampled once, so
every sentence about a villager agrees with every other.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from knnlm.data.macondo_attributes import (
    DEFAULT_ATTRIBUTES,
    Attribute,
    SampleContext,
    check_attributes,
)
from knnlm.data.names import (
    NameList,
    TokenizerView,
    default_given_names,
    default_surnames,
    resolve_names,
    single_token_names,
)
from knnlm.errors import KnnlmError

FORMAT = "knnlm-macondo"
FORMAT_VERSION = 1

TRAIN_PROMPT = "{villager}, who {desc}, is the parent of"
TEST_PROMPT = "{villager}, is the parent of"
CONV_TRAIN_QUESTION = "Who is the child of {villager}, the one who {desc}?"
CONV_TEST_QUESTION = "Who is the child of {villager}?"
# The text right before the child: the single-token test encodes the child after it.
CHILD_CONTEXT = {False: "of", True: "Assistant:"}


# --- the dataset --------------------------------------------------------------------------


@dataclass
class MacondoDataset:
    """Records are dicts; ``villagers`` holds every villager's attributes and children."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    meta: dict[str, Any]
    villagers: list[dict[str, Any]] = field(default_factory=list)


def perfect_log_likelihood(n_children: int) -> float:
    """What a perfect model gives each child of a parent with ``n_children`` children."""
    return math.log(1.0 / n_children)


MAX_SENTENCES = 10_000_000  # far beyond the paper's 1,500; a typo must not fill the memory


def _sizes(
    conv: bool,
    n_villagers: int | None,
    n_parents_per_count: int | None,
    min_children: int | None,
    max_children: int | None,
    sentences_per_pair: int,
) -> tuple[int, int, list[int]]:
    """Resolve the defaults of each variant and check the sizes fit together."""
    if conv:  # 125 villagers, every one a parent of 2
        lo = 2 if min_children is None else min_children
        hi = 2 if max_children is None else max_children
        n_villagers = 125 if n_villagers is None else n_villagers
        if n_parents_per_count is None:
            n_parents_per_count = n_villagers // max(1, hi - lo + 1)
    else:
        lo = 1 if min_children is None else min_children
        hi = 5 if max_children is None else max_children
        n_villagers = 500 if n_villagers is None else n_villagers
        n_parents_per_count = 20 if n_parents_per_count is None else n_parents_per_count
    for name, v in [
        ("n_villagers", n_villagers),
        ("n_parents_per_count", n_parents_per_count),
        ("min_children", lo),
        ("sentences_per_pair", sentences_per_pair),
    ]:
        if not isinstance(v, int) or v < 1:
            raise KnnlmError(f"{name} must be a positive integer, got {v!r}")
    if hi < lo:
        raise KnnlmError(f"max_children ({hi}) is below min_children ({lo})")
    n_parents = (hi - lo + 1) * n_parents_per_count  # counted before the list is built
    if n_parents > n_villagers:
        raise KnnlmError(
            f"{n_parents} parents ({n_parents_per_count} for each of {lo}..{hi} children) "
            f"do not fit among {n_villagers} villagers"
        )
    sentences = n_parents * (lo + hi) // 2 * sentences_per_pair
    if sentences > MAX_SENTENCES:
        raise KnnlmError(
            f"{sentences:,} training sentences ({sentences_per_pair} per parent-child pair) is "
            f"more than the {MAX_SENTENCES:,} this generator writes; lower sentences_per_pair"
        )
    counts = [n for n in range(lo, hi + 1) for _ in range(n_parents_per_count)]
    if n_villagers < 2:
        raise KnnlmError("at least 2 villagers are needed (friends are other villagers)")
    return n_villagers, n_parents_per_count, counts


def _tokenizer_label(info: dict[str, Any] | None) -> str:
    if info is None:
        return "the whitespace rule"
    return f"tokenizer {info.get('name') or info.get('fingerprint')}"


def generate_macondo(
    seed: int = 0,
    tokenizer: TokenizerView | None = None,
    given_names: Any = None,
    surnames: Any = None,
    attributes: Sequence[Attribute] | None = None,
    n_villagers: int | None = None,
    n_parents_per_count: int | None = None,
    max_children: int | None = None,
    sentences_per_pair: int = 5,
    conv: bool = False,
    min_children: int | None = None,
) -> MacondoDataset:
    """Generate Macondo (defaults: 500 villagers, 20 parents with each of 1..5 children, 5
    sentences per pair) or Macondo-Conv (``conv=True``: 125 villagers with 2 children each).

    ``tokenizer``: the single-token check's view of the tokenizer in use
    (``knnlm.lm.tokenizer.tokenizer_view`` of a HF tokenizer, a local model/tokenizer directory
    or ``"tiktoken-gpt2"``), or ``None`` (children's names are then only required to be single
    words). ``given_names`` /
    ``surnames``: name file path(s) or a :class:`NameList`; ``None`` uses the built-in Census
    lists of the ``names`` package. Same arguments and seed give the same dataset.
    """
    n_villagers, per_count, counts = _sizes(
        conv, n_villagers, n_parents_per_count, min_children, max_children, sentences_per_pair
    )
    attrs = check_attributes(DEFAULT_ATTRIBUTES if attributes is None else attributes)
    given: NameList = resolve_names(given_names, default_given_names)
    sur: NameList = resolve_names(surnames, default_surnames)
    rng = random.Random(seed)
    # One rng, drawn in this order: children, villagers, attributes, parents, sentences.
    children, n_candidates = _pick_children(rng, tokenizer, given, sum(counts), conv)
    full = _pick_villagers(rng, given, sur, set(children), n_villagers)
    names = [f"{g} {s}" for g, s in full]
    values = _sample_attributes(rng, attrs, names)
    parents = rng.sample(range(n_villagers), len(counts))
    kids_of: dict[int, list[str]] = {}
    start = 0
    for p, n in zip(parents, counts, strict=True):
        kids_of[p] = children[start : start + n]
        start += n
    train, test = _sentences(rng, parents, names, kids_of, values, attrs, conv,
                             sentences_per_pair)  # fmt: skip
    villagers = [
        {
            "name": names[i],
            "given_name": full[i][0],
            "surname": full[i][1],
            "attributes": values[i],
            "children": kids_of.get(i, []),
        }
        for i in range(n_villagers)
    ]
    by_count = {str(n): counts.count(n) for n in sorted(set(counts))}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": "macondo-conv" if conv else "macondo",
        "conv": conv,
        "seed": seed,
        "counts": {
            "villagers": n_villagers,
            "parents": len(counts),
            "children": len(children),
            "train": len(train),
            "test": len(test),
            "parents_by_n_children": by_count,
        },
        "sentences_per_pair": sentences_per_pair,
        "templates": _templates(conv),
        "attributes": [{"name": a.name, "template": a.template} for a in attrs],
        "names": {
            "given_names": given.source,
            "surnames": sur.source,
            "single_token_candidates": n_candidates,
            "child_context": CHILD_CONTEXT[conv],
        },
        "tokenizer": None if tokenizer is None else tokenizer.info,
        "perfect_log_likelihood": {n: perfect_log_likelihood(int(n)) for n in by_count},
    }
    return MacondoDataset(train=train, test=test, meta=meta, villagers=villagers)


def _pick_children(
    rng: random.Random, tokenizer: TokenizerView | None, given: NameList, n_kids: int, conv: bool
) -> tuple[list[str], int]:
    """Distinct single-token children's names (the scarce resource, so drawn first), and how
    many given names were candidates."""
    candidates = single_token_names(tokenizer, given.names, CHILD_CONTEXT[conv])
    if len(candidates) < n_kids:
        label = _tokenizer_label(None if tokenizer is None else tokenizer.info)
        raise KnnlmError(
            f"only {len(candidates)} of {len(given)} given names are single tokens under "
            f"{label}, but {n_kids} distinct children's names are needed; "
            "pass a longer given-name list, another tokenizer, or fewer parents"
        )
    return rng.sample(candidates, n_kids), len(candidates)


def _pick_villagers(
    rng: random.Random, given: NameList, sur: NameList, taken: set[str], n_villagers: int
) -> list[tuple[str, str]]:
    """Distinct (given name, surname) pairs. No villager shares a given name (or surname) with
    a child: the child's name must identify the child alone."""
    pool = [n for n in given.names if n not in taken]
    sur_pool = [s for s in sur.names if s not in taken]
    if len(pool) * len(sur_pool) < n_villagers:
        raise KnnlmError(
            f"{len(pool)} given names x {len(sur_pool)} surnames left after choosing the "
            f"children give fewer than {n_villagers} distinct full names"
        )
    picks = rng.sample(range(len(pool) * len(sur_pool)), n_villagers)
    return [(pool[i // len(sur_pool)], sur_pool[i % len(sur_pool)]) for i in picks]


def _sample_attributes(
    rng: random.Random, attrs: Sequence[Attribute], names: list[str]
) -> list[dict[str, str]]:
    """Each villager's value of every attribute, in villager order (samplers may read the
    values drawn so far)."""
    values: list[dict[str, str]] = []
    for i in range(len(names)):
        vals: dict[str, str] = {}
        for a in attrs:
            vals[a.name] = str(a.sampler(SampleContext(rng, i, names, MappingProxyType(vals))))
            if "\n" in a.render(vals[a.name]):
                raise KnnlmError(f"attribute {a.name!r} produced a line break")
        values.append(vals)
    return values


def _sentences(
    rng: random.Random,
    parents: list[int],
    names: list[str],
    kids_of: dict[int, list[str]],
    values: list[dict[str, str]],
    attrs: Sequence[Attribute],
    conv: bool,
    sentences_per_pair: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train records (one random attribute clause each) and test records, shuffled so that a
    stream of consecutive lines does not put a sibling's sentence in the next one's context."""
    train, test = [], []
    for p in parents:
        villager, kids = names[p], kids_of[p]
        for child in kids:
            for _ in range(sentences_per_pair):
                a = rng.choice(attrs)
                desc = a.render(values[p][a.name])
                rec = _record(villager, child, kids, conv, desc)
                rec.update(attribute=a.name, desc=desc)
                train.append(rec)
            rec = _record(villager, child, kids, conv, None)
            rec["children"] = list(kids)
            test.append(rec)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _templates(conv: bool) -> dict[str, str]:
    if conv:
        return {
            "train": f"User: {CONV_TRAIN_QUESTION} Assistant: {{child}}.",
            "test": f"User: {CONV_TEST_QUESTION} Assistant: {{child}}.",
        }
    return {"train": f"{TRAIN_PROMPT} {{child}}", "test": f"{TEST_PROMPT} {{child}}"}


def _record(
    villager: str, child: str, kids: list[str], conv: bool, desc: str | None
) -> dict[str, Any]:
    """``prompt`` is the text before the child, so evaluation can score the child after it."""
    if conv:
        template = CONV_TEST_QUESTION if desc is None else CONV_TRAIN_QUESTION
        question = template.format(villager=villager, desc=desc)
        prompt = f"User: {question} Assistant:"
        text = f"{prompt} {child}."
    else:
        template = TEST_PROMPT if desc is None else TRAIN_PROMPT
        prompt = template.format(villager=villager, desc=desc)
        text = f"{prompt} {child}"
    rec: dict[str, Any] = {"text": text, "prompt": prompt}
    if conv:
        rec["question"] = question
    rec.update(villager=villager, child=child, n_children=len(kids))
    return rec


def non_single_token_children(ds: MacondoDataset, tokenizer: TokenizerView) -> list[str]:
    """Children's names that are not one token under ``tokenizer`` (empty when all are)."""
    kids = sorted({r["child"] for r in ds.test})
    ok = set(single_token_names(tokenizer, kids, CHILD_CONTEXT[bool(ds.meta.get("conv"))]))
    return [k for k in kids if k not in ok]


# --- files --------------------------------------------------------------------------------


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _chat(records: Sequence[Mapping[str, Any]]) -> str:
    """The chat fine-tuning format of hosted APIs: one {"messages": [...]} per line."""
    return _jsonl(
        [
            {
                "messages": [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": r["child"]},
                ]
            }
            for r in records
        ]
    )


def _is_dataset_dir(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_macondo(ds: MacondoDataset, out_dir: str | Path) -> Path:
    """Write ``train/test.jsonl``, ``train/test.txt``, ``villagers.jsonl``, ``meta.json``
    (and ``train/test_chat.jsonl`` for Macondo-Conv) into a temporary directory, then rename
    it to ``out_dir``. An existing Macondo directory is replaced; anything else is kept."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise KnnlmError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_dataset_dir(out):
        raise KnnlmError(f"{out} is a non-empty directory that is not a Macondo dataset")
    files = {
        "train.jsonl": _jsonl(ds.train),
        "test.jsonl": _jsonl(ds.test),
        "train.txt": "".join(r["text"] + "\n" for r in ds.train),
        "test.txt": "".join(r["text"] + "\n" for r in ds.test),
        "villagers.jsonl": _jsonl(ds.villagers),
        "meta.json": json.dumps(ds.meta, indent=2, ensure_ascii=False) + "\n",
    }
    if ds.meta.get("conv"):
        files["train_chat.jsonl"] = _chat(ds.train)
        files["test_chat.jsonl"] = _chat(ds.test)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KnnlmError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    tag = uuid.uuid4().hex[:8]
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    old = out.with_name(f".{out.name}.old-{tag}")
    try:
        tmp.mkdir()
        for name, text in files.items():
            with open(tmp / name, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
        if out.exists():
            out.rename(old)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise KnnlmError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KnnlmError(f"cannot read {path}: {exc}") from None
    try:
        return [json.loads(ln) for ln in lines if ln.strip()]
    except ValueError as exc:
        raise KnnlmError(f"{path} is not valid JSON lines: {exc}") from None


def load_macondo(path: str | Path) -> MacondoDataset:
    """Read a directory written by :func:`write_macondo`."""
    d = Path(path).expanduser()
    if not (d / "meta.json").is_file():
        raise KnnlmError(f"{d} is not a Macondo dataset directory (no meta.json)")
    if not _is_dataset_dir(d):
        raise KnnlmError(f"{d}/meta.json does not describe a Macondo dataset")
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    for name in ("train.jsonl", "test.jsonl"):
        if not (d / name).is_file():
            raise KnnlmError(f"{d} has no {name}")
    villagers = _read_jsonl(d / "villagers.jsonl") if (d / "villagers.jsonl").is_file() else []
    return MacondoDataset(
        train=_read_jsonl(d / "train.jsonl"),
        test=_read_jsonl(d / "test.jsonl"),
        meta=meta,
        villagers=villagers,
    )
