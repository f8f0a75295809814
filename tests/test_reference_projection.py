"""The projection (Eq. 2) starts where the paper says, checked against a numpy reference.

Onto f, z starts at g(enc(c)); onto f∘g at enc(c). Both starting points give f(z0) = p_lm, so
the KL at step 0 is KL[p_lm || p_knnlm], computed here from the model's own logits and a
brute-force p_knn over the whole datastore.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens
from knnlm.data.windows import make_windows
from knnlm.retrieval.datastore import open_datastore
from knnlm.retrieval.retriever import KnnSettings, MixSettings
from tiny import project, quiet_datastore, write_corpus

CTX = 16


@pytest.fixture(scope="module")
def setup(lm, tmp_path_factory):
    d = write_corpus(tmp_path_factory.mktemp("proj_corpus"), train=(20, 41), valid=(3, 42))
    ds_dir = quiet_datastore(lm, d, d / "ds", context_len=CTX, key_dtype="float32")
    return lm, str(d), ds_dir


def _reference_kl_at_start(lm, corpus, ds_dir, k, w, temp) -> np.ndarray:
    """KL[p_lm || (1 - w) p_lm + w p_knn] per valid position, float64 numpy."""
    ds = open_datastore(ds_dir)
    keys, values = np.asarray(ds.keys, np.float64), np.asarray(ds.values)
    ids = load_tokens(lm.tokenizer, corpus, "valid")
    grabbed = {}
    hook = lm.model.transformer.h[-1].ln_2.register_forward_hook(
        lambda m, a, o: grabbed.__setitem__("k", o)
    )
    out = []
    with torch.no_grad():
        for win in make_windows(len(ids), CTX):
            logits = lm.model(torch.tensor(ids[win.begin : win.end])[None]).logits[0].double()
            for c in range(win.score_from - win.begin - 1, win.length - 1):
                p_lm = torch.softmax(logits[c], -1).numpy()
                q = grabbed["k"][0, c].double().numpy()
                d = ((keys - q) ** 2).sum(1)
                nn = np.argsort(d, kind="stable")[:k]
                wts = np.exp(-(d[nn] - d[nn].min()) / temp)
                p_knn = np.zeros_like(p_lm)
                np.add.at(p_knn, values[nn], wts / wts.sum())
                mix = (1 - w) * p_lm + w * p_knn
                out.append(float((p_lm * (np.log(p_lm) - np.log(mix))).sum()))
    hook.remove()
    return np.array(out)


def test_kl_at_the_starting_point_is_kl_of_the_lm(setup):
    lm, corpus, ds_dir = setup
    k, w, temp = 8, 0.5, 2.0
    res = project(lm, corpus, ds_dir, context_len=CTX,
                  knn=KnnSettings(k=k), mix=MixSettings(knn_weight=w, temperature=temp),
                  max_positions=None, fixed_steps=1, progress=False)  # fmt: skip
    ref = _reference_kl_at_start(lm, corpus, ds_dir, k, w, temp)
    assert res["positions"] == len(ref)
    assert ref.mean() > 0.05  # the kNN-LM is far from the LM: a wrong start shows
    for name in ("proj_f", "proj_fg"):
        assert res[name]["kl_init_mean"] == pytest.approx(ref.mean(), rel=1e-4), name
