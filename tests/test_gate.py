"""Adaptive retrieval: skipped tokens keep p_lm exactly, searched ones get the kNN-LM's p."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.forward_pass import WindowSettings, score_stream
from knnlm.retrieval.datastore import open_datastore
from knnlm.retrieval.gate import load_gate
from knnlm.retrieval.gate_train import GateSettings, train_gate
from knnlm.retrieval.retriever import KnnSettings, MixSettings
from tiny import SMALL_CTX, SMALL_STRIDE, small_datastore, write_corpus

CTX, STRIDE = SMALL_CTX, SMALL_STRIDE
KNN, MIX = KnnSettings(k=8), MixSettings(knn_weight=0.4, temperature=5.0)
MIXED = dict(knn_weight=MIX.knn_weight, knn_temperature=MIX.temperature)  # evaluate's keywords
WINDOW = WindowSettings(CTX, STRIDE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The small corpus's train split, with a longer valid split and a test split."""
    d = tmp_path_factory.mktemp("gate_corpus")
    return write_corpus(d, train=(25, 10), valid=(12, 11), test=(8, 12))


@pytest.fixture(scope="module")
def ds(lm, corpus, tmp_path_factory):
    return small_datastore(lm, corpus, tmp_path_factory.mktemp("gate_ds") / "ds")


@pytest.fixture(scope="module")
def gate_dir(lm, corpus, ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "g"
    settings = GateSettings(knn=KNN, mix=MIX, window=WINDOW, epochs=3, hidden=16, layers=3)
    train_gate(lm, ds, str(corpus), out, settings, progress=False)
    return out


def _records(lm, corpus):
    """Per test token: key, LM stats, log p_lm(target), target."""
    ids = load_tokens(lm.tokenizer, str(corpus), "test")
    out = {"keys": [], "stats": [], "lp": [], "tgt": []}
    for b in score_stream(lm.model, ids, CTX, STRIDE, want_stats=True, progress=False):
        out["keys"].append(b.keys.float())
        out["stats"].append(b.lm_stats)
        out["lp"].append(b.lm_log_prob.double())
        out["tgt"].append(b.targets)
    return {k: torch.cat(v) for k, v in out.items()}


def _numpy_knnlm(rec, ds_dir) -> np.ndarray:
    """Per token log p of the kNN-LM, by brute force over the datastore."""
    store = open_datastore(ds_dir)
    keys, values = np.asarray(store.keys, np.float64), np.asarray(store.values)
    q = rec["keys"].double().numpy()
    d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1, kind="stable")[:, : KNN.k]
    logit = -np.take_along_axis(d, nearest, 1) / MIX.temperature
    p = np.exp(logit - logit.max(1, keepdims=True))
    hit = values[nearest] == rec["tgt"].numpy()[:, None]
    p_knn = (p * hit).sum(1) / p.sum(1)
    w = MIX.knn_weight
    return np.log((1 - w) * np.exp(rec["lp"].numpy()) + w * p_knn)


def test_gated_tokens_are_lm_or_knnlm_exactly(lm, corpus, ds, gate_dir):
    gate = load_gate(gate_dir)
    rec = _records(lm, corpus)
    ref = _numpy_knnlm(rec, ds)
    lm_lp = rec["lp"].numpy()
    kw = dict(context_len=CTX, stride=STRIDE, progress=False, datastore=ds, knn=KNN, **MIXED)
    n = len(lm_lp)
    for rate in (0.0, 0.25, 0.5, 1.0):
        res = evaluate(lm, str(corpus), "test", gate=gate_dir, retrieval_rate=rate, **kw)
        keep = gate.keep(rec["keys"], rec["stats"], rate).numpy()
        want = np.where(keep, ref, lm_lp)
        assert res["knnlm"]["nll_sum"] == pytest.approx(-want.sum(), rel=1e-6)
        assert res["knnlm"]["retrieval_share"] == keep.mean()
    full = evaluate(lm, str(corpus), "test", **kw)
    one = evaluate(lm, str(corpus), "test", gate=gate_dir, retrieval_rate=1.0, **kw)
    zero = evaluate(lm, str(corpus), "test", gate=gate_dir, retrieval_rate=0.0, **kw)
    assert one["knnlm"]["nll_sum"] == full["knnlm"]["nll_sum"]
    assert zero["knnlm"]["nll_sum"] == zero["lm"]["nll_sum"]
    assert zero["knnlm"]["retrieval_share"] == 0.0 and one["knnlm"]["retrieval_share"] == 1.0
    half = gate.keep(rec["keys"], rec["stats"], 0.5).numpy()
    assert 0 < half.sum() < n  # the gate really splits the tokens
    assert math.isfinite(gate.config["held_out_mixture_nll"])


def test_a_gate_records_its_settings_whole(gate_dir):
    config = load_gate(gate_dir).config
    written = GateSettings.from_dict(config["settings"]["gate"])
    assert written == GateSettings(knn=KNN, mix=MIX, window=WINDOW, epochs=3, hidden=16, layers=3)
    assert (config["hidden"], config["layers"]) == (16, 3)  # the network's shape, read back


def test_entropy_gate_retrieves_the_unsure_tokens(lm, corpus, ds, tmp_path):
    train_gate(lm, ds, str(corpus), tmp_path / "e", GateSettings(kind="entropy", knn=KNN,
               mix=MIX, window=WINDOW), progress=False)  # fmt: skip
    gate = load_gate(tmp_path / "e")
    rec = _records(lm, corpus)
    keep = gate.keep(rec["keys"], rec["stats"], 0.5)
    ent = rec["stats"][:, 0]
    assert keep.any() and not keep.all()
    assert ent[keep].min() >= ent[~keep].max()


def test_gate_mistakes_are_one_line(lm, corpus, ds, gate_dir, tmp_path):
    kw = dict(context_len=CTX, stride=STRIDE, progress=False)
    with pytest.raises(KnnlmError, match="held-out"):
        train_gate(
            lm,
            ds,
            str(corpus),
            tmp_path / "g",
            GateSettings(split="train", knn=KNN, mix=MIX, window=WINDOW),
            progress=False,
        )
    with pytest.raises(KnnlmError, match="retrieval-rate"):
        evaluate(lm, str(corpus), "test", datastore=ds, gate=gate_dir, retrieval_rate=1.5, **kw)
    with pytest.raises(KnnlmError, match="needs --gate"):
        evaluate(lm, str(corpus), "test", datastore=ds, retrieval_rate=0.5, **kw)
    with pytest.raises(KnnlmError, match="no retrieval gate"):
        evaluate(lm, str(corpus), "test", datastore=ds, gate=tmp_path / "none", **kw)


def test_per_token_skipped_equal_lm_and_kept_equal_knnlm(lm, corpus, ds, gate_dir):
    """Token by token: skipped = log p_lm bit for bit, kept = the full kNN-LM (1e-6)."""
    from knnlm.retrieval.retriever import Retriever
    from knnlm.token_scores import score_tokens

    gate, retriever = load_gate(gate_dir), Retriever(lm, ds, KNN)
    ids = load_tokens(lm.tokenizer, str(corpus), "test")

    def stream():
        return score_stream(lm.model, ids, CTX, STRIDE, want_stats=True, progress=False)

    full = torch.cat([s.knnlm for s in score_tokens(stream(), retriever=retriever, mix=MIX)])
    half = replace(MIX, gate=gate, retrieval_rate=0.5)
    parts = list(score_tokens(stream(), retriever=retriever, mix=half, gate=gate))
    gated = torch.cat([s.knnlm for s in parts])
    lm_lp = torch.cat([s.lm_cpu for s in parts])
    keep = torch.cat([gate.keep(s.batch.keys, s.batch.lm_stats, 0.5) for s in parts])
    assert 0 < int(keep.sum()) < keep.numel()
    assert sum(s.searched for s in parts) == int(keep.sum())
    assert torch.equal(gated[~keep], lm_lp[~keep])
    torch.testing.assert_close(gated[keep], full[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(gated[keep], lm_lp[keep])  # searched tokens really changed


def test_learned_weight_uses_the_gates_prediction(lm, corpus, ds, gate_dir, tmp_path):
    """Searched tokens mix with the gate's predicted weight w_i: numpy brute force."""
    gate = load_gate(gate_dir)
    rec = _records(lm, corpus)
    kw = dict(context_len=CTX, stride=STRIDE, progress=False, datastore=ds, knn=KNN, **MIXED)
    res = evaluate(lm, str(corpus), "test", gate=gate_dir, retrieval_rate=0.5,
                   gate_weight="learned", **kw)  # fmt: skip
    keep = gate.keep(rec["keys"], rec["stats"], 0.5).numpy()
    w = gate.scores(rec["keys"], rec["stats"]).double().numpy()
    store = open_datastore(ds)
    keys, values = np.asarray(store.keys, np.float64), np.asarray(store.values)
    d = ((rec["keys"].double().numpy()[:, None, :] - keys[None]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1, kind="stable")[:, : KNN.k]
    logit = -np.take_along_axis(d, nearest, 1) / MIX.temperature
    p = np.exp(logit - logit.max(1, keepdims=True))
    p_knn = (p * (values[nearest] == rec["tgt"].numpy()[:, None])).sum(1) / p.sum(1)
    p_lm = np.exp(rec["lp"].numpy())
    want = np.where(keep, np.log((1 - w) * p_lm + w * p_knn), np.log(p_lm))
    assert res["knnlm"]["nll_sum"] == pytest.approx(-want.sum(), rel=1e-6)
    fixed = evaluate(lm, str(corpus), "test", gate=gate_dir, retrieval_rate=0.5, **kw)
    assert fixed["knnlm"]["nll_sum"] != pytest.approx(res["knnlm"]["nll_sum"], rel=1e-6)
    train_gate(lm, ds, str(corpus), tmp_path / "e", GateSettings(kind="entropy", knn=KNN,
               mix=MIX, window=WINDOW), progress=False)  # fmt: skip
    with pytest.raises(KnnlmError, match="mlp gate"):
        evaluate(lm, str(corpus), "test", gate=tmp_path / "e", gate_weight="learned", **kw)
