"""Self-exclusion by position: evaluating the datastore's own text with any window layout.

Every target position p >= 1 of a stream is scored once, in stream order, so its datastore row
is p - 1 whatever the context length and stride. The references here are independent of the
package's scoring pass and search: keys come from a forward hook on the last block's ln_2
(the ``ffn_input`` key) and neighbours from a brute-force numpy search over ``keys.npy``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from knnlm.data.windows import make_windows
from knnlm.errors import KnnlmError

BUILD = dict(context_len=32, stride=8)  # datastore layout
EVAL = dict(context_len=24, stride=5)  # another layout for the same split
K, WEIGHT, TEMP = 8, 0.4, 2.0


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from knnlm.lm.loading import load_lm

    return load_lm(str(tiny_lm_dir), device="cpu")


@pytest.fixture(scope="module")
def ds_dir(lm, tiny_corpus, tmp_path_factory):
    from knnlm.retrieval.datastore import build_datastore

    out = tmp_path_factory.mktemp("excl") / "ds"
    return build_datastore(
        lm, str(tiny_corpus), "valid", out, batch_size=4, progress=False, **BUILD
    )


def _reference_records(lm, ids: np.ndarray, context_len: int, stride: int):
    """(positions, ffn_input keys, log p_lm(target)) per target, one window at a time."""
    model = lm.model
    captured = {}
    hook = model.transformer.h[-1].ln_2.register_forward_hook(
        lambda _m, _a, out: captured.__setitem__("key", out)
    )
    pos, keys, lm_lp = [], [], []
    try:
        with torch.no_grad():
            for w in make_windows(len(ids), context_len, stride):
                x = torch.as_tensor(ids[w.begin : w.end])[None]
                logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
                targets = np.arange(w.score_from, w.end)
                cols = targets - 1 - w.begin
                pos.append(targets)
                keys.append(captured["key"][0, cols].float().numpy())
                lm_lp.append(logp[cols, ids[targets]].numpy())
    finally:
        hook.remove()
    return np.concatenate(pos), np.concatenate(keys), np.concatenate(lm_lp)


def _brute_force(ds_keys, ds_values, queries, targets, exclude_rows):
    """Squared-L2 k nearest rows (own row dropped) and log p_knn(target), in float64."""
    d = ((queries[:, None, :].astype(np.float64) - ds_keys[None].astype(np.float64)) ** 2).sum(-1)
    if exclude_rows is not None:
        d[np.arange(len(d)), exclude_rows] = np.inf
    nn = np.argsort(d, axis=1, kind="stable")[:, :K]
    nd = np.take_along_axis(d, nn, axis=1)
    logits = -nd / TEMP
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    p_knn = (w * (ds_values[nn] == targets[:, None])).sum(1)
    return nn, p_knn


def test_target_position_maps_to_row_p_minus_1_for_every_layout():
    """The scored targets of any layout are 1..n-1, once each, in stream order."""
    n = 97
    for context_len in (2, 3, 7, 16, 32):
        for stride in sorted({1, 2, max(1, context_len // 3), context_len}):
            pos = np.concatenate(
                [np.arange(w.score_from, w.end) for w in make_windows(n, context_len, stride)]
            )
            np.testing.assert_array_equal(pos, np.arange(1, n))


def test_same_split_other_layout_excludes_own_row(lm, ds_dir, tiny_corpus, tmp_path):
    from knnlm.data.corpus import load_tokens
    from knnlm.evaluate import evaluate
    from knnlm.neighbour_cache import load_cache
    from knnlm.retrieval.retriever import KnnSettings

    cache = tmp_path / "cache"
    res = evaluate(
        lm, str(tiny_corpus), "valid", datastore=ds_dir, cache=cache, batch_size=3,
        knn=KnnSettings(k=K), knn_weight=WEIGHT, knn_temperature=TEMP, progress=False, **EVAL,
    )  # fmt: skip
    assert res["settings"]["exclude_self"] is True
    assert res["settings"]["own_stream"] is True and res["warnings"] == []

    ids = load_tokens(lm.tokenizer, str(tiny_corpus), "valid")
    pos, queries, lm_lp = _reference_records(lm, ids, **EVAL)
    np.testing.assert_array_equal(pos, np.arange(1, len(ids)))
    ds_keys = np.load(ds_dir / "keys.npy").astype(np.float32)
    ds_values = np.load(ds_dir / "values.npy")
    # The datastore row of position p holds the token at p: row p - 1 is the target's own.
    np.testing.assert_array_equal(ds_values, ids[1:])
    own = pos - 1

    # No target retrieved its own row (the neighbours the evaluation actually used).
    c = load_cache(cache)
    used = np.asarray(c["ids"])
    assert used.shape == (len(pos), K)
    assert not (used == own[:, None]).any()

    # The check can fail: without exclusion many targets find their own row among the k
    # nearest even under another layout (about 30% here with a random tiny model; a trained
    # model finds it first, at distance ~0).
    nn_all, _ = _brute_force(ds_keys, ds_values, queries, ids[pos], None)
    assert (nn_all == own[:, None]).any(1).mean() > 0.15

    # Same neighbour sets as the brute force that drops row p - 1.
    nn, p_knn = _brute_force(ds_keys, ds_values, queries, ids[pos], own)
    same_set = (np.sort(nn, 1) == np.sort(used, 1)).all(1)
    assert same_set.mean() > 0.98  # float16 keys: a rare tie at the k-th place may swap

    # kNN-LM perplexity against the reference: log((1-w) p_lm + w p_knn), token-weighted.
    mixed = np.log((1 - WEIGHT) * np.exp(lm_lp) + WEIGHT * p_knn)
    ref_ppl = float(np.exp(-mixed.mean()))
    ref_lm = float(np.exp(-lm_lp.mean()))
    assert res["tokens"] == len(pos)
    assert res["lm"]["perplexity"] == pytest.approx(ref_lm, rel=1e-5)
    assert res["knnlm"]["perplexity"] == pytest.approx(ref_ppl, rel=1e-3)
    # ... and visibly different from the reference that keeps the own row.
    _, p_leak = _brute_force(ds_keys, ds_values, queries, ids[pos], None)
    leak_ppl = float(np.exp(-np.log((1 - WEIGHT) * np.exp(lm_lp) + WEIGHT * p_leak).mean()))
    assert leak_ppl < 0.9 * ref_ppl


def test_modes_yes_no_and_other_text(lm, ds_dir, tiny_corpus, tmp_path):
    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings

    def run(split, mode):
        return evaluate(
            lm, str(tiny_corpus), split, datastore=ds_dir, progress=False, batch_size=8,
            knn=KnnSettings(k=K, exclude_self=mode), knn_weight=WEIGHT, knn_temperature=TEMP,
            **EVAL,
        )  # fmt: skip

    yes, auto, no = run("valid", "yes"), run("valid", "auto"), run("valid", "no")
    assert yes["settings"]["exclude_self"] is True
    assert yes["knnlm"]["perplexity"] == pytest.approx(auto["knnlm"]["perplexity"], rel=1e-9)
    assert no["settings"]["exclude_self"] is False
    assert no["knnlm"]["perplexity"] < auto["knnlm"]["perplexity"]
    assert len(no["warnings"]) == 1 and "own" in no["warnings"][0]
    other = run("test", "auto")
    assert other["settings"]["exclude_self"] is False and other["warnings"] == []
    with pytest.raises(KnnlmError, match="exclude-self yes"):
        run("test", "yes")
    json.dumps(no)  # the result stays JSON-serialisable


def test_projection_excludes_own_row_under_other_layout(lm, ds_dir, tiny_corpus):
    """The projection retrieves on a stream too: over every position, its kNN-LM perplexity
    equals the evaluation's (checked above against the brute force that drops row p - 1)."""
    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings, MixSettings
    from tiny import project

    knn, mix = KnnSettings(k=K), MixSettings(knn_weight=WEIGHT, temperature=TEMP)
    res = project(
        lm, str(tiny_corpus), ds_dir, "valid", knn=knn, mix=mix, max_positions=None,
        fixed_steps=1, solve_batch=4096, progress=False, **EVAL,
    )  # fmt: skip
    ev = evaluate(lm, str(tiny_corpus), "valid", datastore=ds_dir, knn=knn, knn_weight=WEIGHT,
                  knn_temperature=TEMP, progress=False, **EVAL)  # fmt: skip
    assert res["positions"] == ev["tokens"]
    assert res["knnlm"]["perplexity"] == pytest.approx(ev["knnlm"]["perplexity"], rel=1e-4)
    assert res["settings"]["exclude_self"] is True


def test_exclusion_through_an_ivfpq_index(lm, ds_dir, tiny_corpus, tmp_path):
    """Approximate search too: no target's neighbours hold its own row."""
    import shutil

    from knnlm.evaluate import evaluate
    from knnlm.neighbour_cache import load_cache
    from knnlm.retrieval.retriever import KnnSettings
    from knnlm.retrieval.search.index_build import build_index

    ds = tmp_path / "ds"
    shutil.copytree(ds_dir, ds)
    build_index(ds, kind="ivfpq", nlist=4, pq_m=4, nprobe=2, progress=False)
    res = evaluate(
        lm, str(tiny_corpus), "valid", datastore=ds, cache=tmp_path / "cache", batch_size=8,
        knn=KnnSettings(k=K, nprobe=2), progress=False, **EVAL,
    )  # fmt: skip
    assert res["settings"]["exclude_self"] is True and res["settings"]["index"] == "ivfpq"
    ids = np.asarray(load_cache(tmp_path / "cache")["ids"])
    own = np.arange(ids.shape[0])  # target p = row + 1, own datastore row p - 1
    assert not (ids == own[:, None]).any()
    assert (ids >= 0).all()  # k columns remain after dropping the own row
