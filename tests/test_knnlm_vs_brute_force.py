"""The kNN-LM engine against an independent brute-force kNN-LM (numpy, exact, explicit loops)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens
from knnlm.data.windows import make_windows
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.lm.loading import load_lm
from knnlm.retrieval.combiner import interpolate, knn_log_probs, knn_target_log_prob
from knnlm.retrieval.datastore import open_datastore
from knnlm.retrieval.retriever import KnnSettings, MixSettings
from knnlm.sweep import sweep
from tiny import SMALL_CTX, SMALL_STRIDE, quiet_datastore, save_tiny_model, small_datastore

CTX, STRIDE = SMALL_CTX, SMALL_STRIDE


def _reference_records(model, ids, ctx, stride):
    """Per target: (ffn_input key, log p_lm(target)) from a forward over exactly its context."""
    block = model.transformer.h[-1]
    keys, lps, targets = [], [], []
    grabbed = {}
    handle = block.ln_2.register_forward_hook(lambda m, a, o: grabbed.__setitem__("k", o))
    with torch.no_grad():
        for w in make_windows(len(ids), ctx, stride):
            for t in range(w.score_from, w.end):
                x = torch.tensor(ids[w.begin : t])[None]
                logits = model(x).logits[0, -1].double()
                lps.append(float(torch.log_softmax(logits, -1)[ids[t]]))
                keys.append(grabbed["k"][0, -1].double().numpy())
                targets.append(int(ids[t]))
    handle.remove()
    return np.array(keys), np.array(lps), np.array(targets)


def _reference_knnlm_nll(q_keys, q_lps, q_targets, ds_keys, ds_values, k, w, temp, exclude=False):
    """Total NLL of the kNN-LM; ``exclude`` drops datastore row i from query i's neighbours
    (query i is the datastore's own row i when the evaluated stream is the datastore's)."""
    nll = 0.0
    for i in range(len(q_targets)):
        d = ((ds_keys - q_keys[i]) ** 2).sum(1)  # squared L2 to every datastore row
        if exclude:
            d[i] = np.inf
        order = [j for j in np.argsort(d, kind="stable")[:k] if np.isfinite(d[j])]
        logits = [-d[j] / temp for j in order]
        m = max(logits)
        z = sum(math.exp(x - m) for x in logits)
        p_knn = sum(
            math.exp(x - m) / z
            for x, j in zip(logits, order, strict=True)
            if ds_values[j] == q_targets[i]
        )
        p = (1 - w) * math.exp(q_lps[i]) + w * p_knn
        nll -= math.log(p)
    return nll


@pytest.mark.parametrize("key_dtype,rtol", [("float32", 1e-5), ("float16", 1e-3)])
def test_knnlm_perplexity_matches_brute_force(lm, small_corpus, tmp_path, key_dtype, rtol):
    ds_dir = small_datastore(lm, small_corpus, tmp_path / "ds", batch_size=3, key_dtype=key_dtype)
    ds = open_datastore(ds_dir)
    train_ids = load_tokens(lm.tokenizer, str(small_corpus), "train")
    valid_ids = load_tokens(lm.tokenizer, str(small_corpus), "valid")
    ref_keys, _, ref_vals = _reference_records(lm.model, train_ids, CTX, STRIDE)
    # The stored datastore equals the independent keys and values.
    np.testing.assert_array_equal(np.asarray(ds.values), ref_vals)
    np.testing.assert_allclose(
        np.asarray(ds.keys, dtype=np.float64), ref_keys, rtol=rtol, atol=rtol
    )

    q_keys, q_lps, q_targets = _reference_records(lm.model, valid_ids, CTX, STRIDE)
    k, w, temp = 6, 0.3, 2.0
    ref_nll = _reference_knnlm_nll(
        q_keys, q_lps, q_targets, np.asarray(ds.keys, dtype=np.float64), ref_vals, k, w, temp
    )
    res = evaluate(
        lm,
        str(small_corpus),
        "valid",
        context_len=CTX,
        stride=STRIDE,
        batch_size=2,
        datastore=ds_dir,
        knn=KnnSettings(k=k),
        knn_weight=w,
        knn_temperature=temp,
        progress=False,
    )
    assert res["tokens"] == len(q_targets) == len(valid_ids) - 1
    assert res["lm"]["nll_sum"] == pytest.approx(-q_lps.sum(), rel=1e-5)
    ref_ppl = math.exp(ref_nll / len(q_targets))
    assert res["knnlm"]["perplexity"] == pytest.approx(ref_ppl, rel=rtol)
    assert res["knnlm"]["perplexity"] != pytest.approx(res["lm"]["perplexity"], rel=1e-4)


def test_weight_zero_is_lm_and_k_larger_than_datastore(lm, small_corpus, tmp_path):
    ds_dir = quiet_datastore(lm, small_corpus, tmp_path / "ds", context_len=CTX)
    n = open_datastore(ds_dir).n
    kw = dict(context_len=CTX, datastore=ds_dir, progress=False)
    res0 = evaluate(lm, str(small_corpus), "valid", knn=KnnSettings(k=4), knn_weight=0.0, **kw)
    assert res0["knnlm"]["perplexity"] == res0["lm"]["perplexity"]
    # k > N retrieves the whole datastore, exactly as k = N does (missing ids are masked).
    big = evaluate(lm, str(small_corpus), "valid", knn=KnnSettings(k=n + 50), knn_weight=0.5, **kw)
    all_n = evaluate(lm, str(small_corpus), "valid", knn=KnnSettings(k=n), knn_weight=0.5, **kw)
    assert big["knnlm"]["perplexity"] == pytest.approx(all_n["knnlm"]["perplexity"], rel=1e-9)
    assert big["knnlm"]["perplexity"] != pytest.approx(big["lm"]["perplexity"], rel=1e-3)


def test_p_knn_sums_to_one_and_masks_missing():
    rng = np.random.default_rng(0)
    dists = torch.tensor(rng.random((5, 7)), dtype=torch.float32)
    ids = torch.tensor(rng.integers(0, 50, (5, 7)))
    ids[0, 3:] = -1  # fewer than k found
    ids[1, :] = -1  # nothing found
    values = torch.tensor(rng.integers(0, 11, (5, 7)))
    values[0, 3:] = 10**6  # garbage behind -1 must never be used as an index
    lp = knn_log_probs(dists, ids, values, vocab_size=11)
    sums = lp.exp().sum(-1)
    torch.testing.assert_close(sums[[0, 2, 3, 4]], torch.ones(4))
    assert sums[1] == 0
    targets = torch.tensor([values[0, 0].item(), 0, 3, values[3, 1].item(), 5])
    fast = knn_target_log_prob(dists, ids, values, targets)
    torch.testing.assert_close(fast, lp.gather(1, targets[:, None]).squeeze(1))
    # No neighbour carries the target: the mixture falls back to (1-w) p_lm, never nan.
    mixed = interpolate(torch.tensor([-2.0]), torch.tensor([float("-inf")]), 0.25)
    assert mixed.item() == pytest.approx(-2.0 + math.log(0.75))


@pytest.mark.parametrize("temperature", [10.0, 1.0, 0.05])
def test_p_knn_target_far_below_the_nearest_stays_exact(temperature):
    """A target neighbour whose weight underflows float32 next to the nearest keeps its exact
    log-probability (numpy, float64, in log space), and counts weigh in as log(count)."""
    rng = np.random.default_rng(1)
    n, k = 64, 32
    dists = rng.random((n, k)) * 200
    ids = rng.integers(0, 1000, (n, k))
    ids[:4, 20:] = -1
    values = rng.integers(0, 6, (n, k))
    counts = rng.integers(1, 5, (n, k))
    targets = rng.integers(0, 8, n)  # 6, 7: no neighbour carries them
    logits = -dists / temperature + np.log(counts)
    logits[ids < 0] = -np.inf
    hit = np.where(values == targets[:, None], logits, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.logaddexp.reduce(hit, axis=1) - np.logaddexp.reduce(logits, axis=1)
    got = knn_target_log_prob(
        torch.tensor(dists, dtype=torch.float32), torch.tensor(ids), torch.tensor(values),
        torch.tensor(targets), temperature, torch.tensor(counts),
    ).double().numpy()  # fmt: skip
    finite = np.isfinite(ref)
    assert (np.isfinite(got) == finite).all()
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-4)
    if temperature < 1:
        assert ref[finite].min() < -200  # the case that underflows a one-pass float32 sum


def test_datastore_resume_is_byte_identical(lm, small_corpus, tmp_path):
    kw = dict(context_len=CTX, stride=STRIDE, batch_size=2, checkpoint_every=2)
    straight = quiet_datastore(lm, small_corpus, tmp_path / "a", **kw)

    # Interrupted right after the checkpoint at 4 batches: batch 4 was never written, so a
    # resume that skipped it would leave its rows empty.
    def boom(done):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quiet_datastore(lm, small_corpus, tmp_path / "b", on_batch=boom, **kw)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial").is_dir()
    with pytest.raises(KnnlmError, match="incomplete"):
        open_datastore(tmp_path / "b")
    resumed_from = []
    quiet_datastore(lm, small_corpus, tmp_path / "b", on_batch=resumed_from.append, **kw)
    assert resumed_from[0] == 5  # it resumed at batch 4, neither before nor after
    for f in ("keys.npy", "values.npy"):
        assert (straight / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_datastore_from_other_model_is_refused(lm, small_corpus, tmp_path, tiny_tokenizer):
    ds_dir = quiet_datastore(lm, small_corpus, tmp_path / "ds", context_len=CTX)
    other = load_lm(str(save_tiny_model(tmp_path / "other", tiny_tokenizer, seed=1)))
    with pytest.raises(KnnlmError, match="another model"):
        evaluate(
            other, str(small_corpus), "valid", context_len=CTX, datastore=ds_dir, progress=False
        )
    ds = open_datastore(ds_dir)
    ds.check_compatible(lm)  # its own model passes
    # Each check alone: the LM differs from the build in exactly one respect.
    with pytest.raises(KnnlmError, match="another model"):
        ds.check_compatible(dataclasses.replace(lm, fingerprint="sha256:0000"))
    with pytest.raises(KnnlmError, match="another tokenizer"):
        ds.check_compatible(dataclasses.replace(lm, tokenizer_fingerprint="sha256:0000"))
    # Keys that truly have another size (a d=48 Llama, same tokenizer), from an LM that
    # claims the same model: only the dimension check can refuse it.
    wide = load_lm(str(save_tiny_model(tmp_path / "wide", tiny_tokenizer, "llama", hidden=48)))
    wide_dir = quiet_datastore(wide, small_corpus, tmp_path / "wide_ds", context_len=CTX)
    wide_ds = open_datastore(wide_dir)
    assert np.asarray(wide_ds.keys).shape[1] == 48
    same_name = dataclasses.replace(lm, fingerprint=wide_ds.meta["model_fingerprint"])
    with pytest.raises(KnnlmError, match="size"):
        wide_ds.check_compatible(same_name)


def test_bad_knn_settings_rejected(lm, small_corpus, tmp_path):
    # Refused where they are built, before any work.
    for kind, bad in ((MixSettings, dict(knn_weight=1.5)), (KnnSettings, dict(k=0)),
                      (MixSettings, dict(temperature=0))):  # fmt: skip
        with pytest.raises(KnnlmError, match=f"^{next(iter(bad))} must be"):
            kind(**bad)


def test_exclude_self_on_training_split(lm, small_corpus, tmp_path):
    # stride < context: every key but the first few has a long, unique context.
    ds_dir = small_datastore(lm, small_corpus, tmp_path / "ds")
    kw = dict(context_len=CTX, stride=STRIDE, datastore=ds_dir, progress=False)
    inc = evaluate(
        lm,
        str(small_corpus),
        "train",
        knn=KnnSettings(k=1, exclude_self="no"),
        knn_weight=1.0,
        **kw,
    )
    # Each query finds itself at distance 0: p_knn(target) = 1 everywhere.
    assert inc["knnlm"]["perplexity"] == pytest.approx(1.0)
    k, w, temp = 4, 0.5, 2.0
    exc = evaluate(
        lm,
        str(small_corpus),
        "train",
        knn=KnnSettings(k=k, exclude_self="auto"),
        knn_weight=w,
        knn_temperature=temp,
        **kw,
    )
    assert exc["settings"]["exclude_self"] is True
    # Against a brute-force kNN-LM in which query i (datastore row i) never sees row i.
    ds = open_datastore(ds_dir)
    ids = load_tokens(lm.tokenizer, str(small_corpus), "train")
    q_keys, q_lps, q_targets = _reference_records(lm.model, ids, CTX, STRIDE)
    ds_keys = np.asarray(ds.keys, dtype=np.float64)
    args = (q_keys, q_lps, q_targets, ds_keys, np.asarray(ds.values), k, w, temp)
    ref_exc = math.exp(_reference_knnlm_nll(*args, exclude=True) / len(q_targets))
    ref_inc = math.exp(_reference_knnlm_nll(*args, exclude=False) / len(q_targets))
    assert exc["knnlm"]["perplexity"] == pytest.approx(ref_exc, rel=1e-5)
    assert ref_exc > 1.5 * ref_inc  # the reference tells the two apart


def test_sweep_from_cache_equals_direct_eval(lm, small_corpus, tmp_path):
    ds_dir = quiet_datastore(lm, small_corpus, tmp_path / "ds", context_len=CTX)
    kw = dict(context_len=CTX, datastore=ds_dir, progress=False)
    evaluate(lm, str(small_corpus), "valid", knn=KnnSettings(k=8), cache=tmp_path / "cache", **kw)
    ks, weights, temps = [4, 8], [0.1, 0.5], [1.0, 3.0]
    grid = sweep(tmp_path / "cache", weights, temps, ks=ks, progress=False)
    # Every cell against its own fresh evaluation (a search per cell, no cache).
    cells = []
    for ki, k in enumerate(ks):
        for wi, w in enumerate(weights):
            for ti, t in enumerate(temps):
                direct = evaluate(
                    lm,
                    str(small_corpus),
                    "valid",
                    knn=KnnSettings(k=k),
                    knn_weight=w,
                    knn_temperature=t,
                    **kw,
                )
                got = grid["perplexity"][ki][wi][ti]
                assert got == pytest.approx(direct["knnlm"]["perplexity"], rel=1e-6), (k, w, t)
                cells.append(got)
    assert len(set(np.round(cells, 9))) == len(cells)  # every setting matters
    assert grid["lm"]["perplexity"] == pytest.approx(direct["lm"]["perplexity"], rel=1e-6)
