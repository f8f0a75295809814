"""One Macondo seed's data and the model it fine-tunes (Section 4).

The dataset is generated with the tokenizer of the model that is fine-tuned, so every child is
one token under it; from scratch, a byte-level BPE is trained on the training sentences first.
``data_and_model`` writes the dataset to the seed's ``data/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knnlm.data.macondo import (
    MacondoDataset,
    generate_macondo,
    non_single_token_children,
    write_macondo,
)
from knnlm.errors import KnnlmError
from knnlm.experiments.macondo.settings import MacondoSettings
from knnlm.lm.loading import load_tokenizer, pick_device
from knnlm.lm.presets import build_model_from_preset
from knnlm.lm.tokenizer import tokenizer_view, train_bpe_tokenizer
from knnlm.lm.train import model_from_pretrained


@dataclass
class SeedData:
    """One seed's dataset as the run uses it: tokenised by ``tokenizer`` (the fine-tuned
    model's), ``conts[i]`` the continuation whose first token is test example i's child."""

    ds: MacondoDataset
    tokenizer: Any
    conts: list[str]

    @property
    def test(self) -> list[dict[str, Any]]:
        return self.ds.test

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.ds.test]

    @property
    def ns(self) -> list[int]:
        return [int(r["n_children"]) for r in self.ds.test]

    @property
    def train_texts(self) -> list[str]:
        return [r["text"] for r in self.ds.train]


def data_and_model(
    seed: int, seed_dir: Path, settings: MacondoSettings, *, trained: bool
) -> tuple[SeedData, Any]:
    """The seed's dataset (written to ``data/``) and the model to fine-tune (None when
    ``trained``: then only the dataset is rebuilt, deterministic, and the model is on disk)."""
    model = None
    if trained:
        tokenizer = load_tokenizer(str(seed_dir / "model"))
        ds = _make_dataset(seed, None if settings.from_scratch else tokenizer, settings.sizes)
        if settings.from_scratch:
            _label_scratch_tokenizer(ds, tokenizer)
    elif settings.from_scratch:
        ds, tokenizer, model = _scratch_model_and_data(seed, settings)
        model.to(pick_device(settings.device))
    else:
        model, tokenizer = model_from_pretrained(settings.model, settings.device)
        ds = _make_dataset(seed, tokenizer, settings.sizes)
    write_macondo(ds, seed_dir / "data")
    return SeedData(ds, tokenizer, child_continuations(tokenizer, ds.test)), model


def child_continuations(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The continuation string per record whose first token is the child's name token.

    The child's token is read off ``prompt + " " + child``; " child" is the natural
    continuation for byte-level BPE, while SentencePiece tokenizers add their own prefix space
    to a separately encoded "child".
    """
    prompts = [r["prompt"] for r in records]
    spaced = [" " + r["child"] for r in records]
    bare = [r["child"] for r in records]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    full, pre, a, b = (
        enc([p + s for p, s in zip(prompts, spaced, strict=True)]),
        enc(prompts),
        enc(spaced),
        enc(bare),
    )
    out = []
    for i, r in enumerate(records):
        k = len(pre[i])
        if full[i][:k] != pre[i] or len(full[i]) != k + 1:
            raise KnnlmError(
                f"the child's name {r['child']!r} is not one token after {r['prompt']!r} under "
                "this tokenizer"
            )
        want = full[i][k]
        if a[i][:1] == [want]:
            out.append(spaced[i])
        elif b[i][:1] == [want]:
            out.append(bare[i])
        else:
            raise KnnlmError(f"cannot encode the child {r['child']!r} as its own first token")
    return out


def _make_dataset(seed: int, tokenizer: Any, sizes: Mapping[str, Any]) -> MacondoDataset:
    given = {k: v for k, v in sizes.items() if v is not None}  # None: the generator's default
    try:
        view = None if tokenizer is None else tokenizer_view(tokenizer)
        return generate_macondo(seed=seed, tokenizer=view, **given)
    except TypeError as exc:  # an unknown size keyword
        raise KnnlmError(f"bad Macondo size settings {dict(sizes)}: {exc}") from None


def _label_scratch_tokenizer(ds: MacondoDataset, tokenizer: Any) -> None:
    info = tokenizer_view(tokenizer).info
    ds.meta["tokenizer"] = dict(info, name="byte-level BPE trained on this dataset's train split")


def _scratch_model_and_data(seed: int, settings: MacondoSettings):
    """Dataset without a tokenizer, a BPE tokenizer trained on its training sentences, a
    randomly initialised model of the scratch preset."""
    ds = _make_dataset(seed, None, settings.sizes)
    # min_frequency 2 with a vocabulary past saturation: every word seen twice is one token.
    tok = train_bpe_tokenizer(
        [r["text"] + "\n" for r in ds.train],
        settings.run_preset.scratch_vocab_size,
        min_frequency=2,
    )
    bad = non_single_token_children(ds, tokenizer_view(tok))
    if bad:
        raise KnnlmError(
            f"{len(bad)} children's names (e.g. {bad[0]!r}) are not single tokens under the BPE "
            "tokenizer trained on Macondo; raise sentences_per_pair to at least 2"
        )
    _label_scratch_tokenizer(ds, tok)
    architecture = settings.run_preset.scratch_architecture
    model = build_model_from_preset(architecture, tokenizer=tok, seed=seed)
    return ds, tok, model
