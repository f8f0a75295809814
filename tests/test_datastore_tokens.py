"""The datastore's token stream (tokens.npy) is part of the artifact: it is in the folder the
build swaps in, not written after, so a kill can never leave a datastore without it."""

from __future__ import annotations

import numpy as np

from knnlm.data.corpus import load_tokens
from knnlm.retrieval.datastore import TOKENS, build_datastore


def test_the_swapped_in_datastore_holds_its_token_stream(lm, small_corpus, tmp_path):
    seen = []

    def on_batch(done: int) -> None:  # the target must not exist before the swap
        seen.append((tmp_path / "ds").exists())

    out = build_datastore(lm, small_corpus, "train", tmp_path / "ds", context_len=24, stride=8,
                          progress=False, on_batch=on_batch)  # fmt: skip
    assert seen and not any(seen)
    want = load_tokens(lm.tokenizer, small_corpus, "train")
    got = np.load(out / TOKENS, allow_pickle=False)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert not list(tmp_path.glob("*.partial")) and not list(out.glob(".*.tmp"))
