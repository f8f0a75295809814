"""LM + MLP memory perplexity (Section 5) against a numpy forward of the saved weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from knnlm.data.corpus import load_tokens
from knnlm.data.windows import make_windows
from knnlm.evaluate import evaluate
from tiny import quiet_datastore, train_mem, write_corpus

CTX = 16


def _numpy_memory_log_probs(params: dict, z: np.ndarray) -> np.ndarray:
    """log softmax(W (z + LN(MLP(z)))) in float64 from the saved tensors (exact GELU)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    h = z @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    m = h @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    ln = (m - m.mean(-1, keepdims=True)) / np.sqrt(m.var(-1, keepdims=True) + 1e-5)
    logits = (z + ln * p["ln.weight"] + p["ln.bias"]) @ p["output.weight"].T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_lm_plus_memory_perplexity_equals_numpy_forward(lm, tmp_path):
    write_corpus(tmp_path, train=(20, 51), valid=(4, 52))
    ds = quiet_datastore(lm, tmp_path, tmp_path / "ds", context_len=CTX, key_dtype="float32")
    keys = np.load(ds / "keys.npy", mmap_mode="r")
    values = np.load(ds / "values.npy", mmap_mode="r")
    mem = tmp_path / "mem"
    W = lm.adapter.output_embedding.detach()
    train_mem(keys, values, W, mem, hidden=16, lr=1e-2, batch_tokens=128, epochs=2,
                 device="cpu", progress=False)  # fmt: skip
    params = load_file(str(mem / "model.safetensors"))
    # LN affine parameters moved away from (1, 0) in training, so LayerNorm matters.
    assert np.abs(params["ln.weight"] - 1).max() > 1e-3

    # Reference: ffn_input keys and LM log-probs from batch-1 forwards, the memory in numpy.
    ids = load_tokens(lm.tokenizer, str(tmp_path), "valid")
    grabbed = {}
    hook = lm.model.transformer.h[-1].ln_2.register_forward_hook(
        lambda m, a, o: grabbed.__setitem__("k", o)
    )
    lm_lp, mem_lp = [], []
    with torch.no_grad():
        for win in make_windows(len(ids), CTX):
            logits = lm.model(torch.tensor(ids[win.begin : win.end])[None]).logits[0].double()
            cols = np.arange(win.score_from - win.begin - 1, win.length - 1)
            tg = ids[win.score_from : win.end]
            lm_lp.append(torch.log_softmax(logits, -1)[cols, tg].numpy())
            z = grabbed["k"][0, cols].double().numpy()
            mem_lp.append(_numpy_memory_log_probs(params, z)[np.arange(len(tg)), tg])
    hook.remove()
    lm_lp, mem_lp = np.concatenate(lm_lp), np.concatenate(mem_lp)
    w = 0.3
    ref = math.exp(-np.log((1 - w) * np.exp(lm_lp) + w * np.exp(mem_lp)).mean())

    res = evaluate(lm, str(tmp_path), "valid", context_len=CTX, memory=mem, memory_weight=w,
                   progress=False)  # fmt: skip
    assert res["tokens"] == len(lm_lp)
    assert res["lm"]["perplexity"] == pytest.approx(math.exp(-lm_lp.mean()), rel=1e-5)
    assert res["mlp"]["perplexity"] == pytest.approx(ref, rel=1e-5)
    swapped = math.exp(-np.log(w * np.exp(lm_lp) + (1 - w) * np.exp(mem_lp)).mean())
    assert swapped != pytest.approx(ref, rel=1e-3)  # the weight's side matters here
