"""kNN-LM generation against a hand-built interpolation of the LM and a brute-force p_knn."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from knnlm.generation import KnnLogitsProcessor
from knnlm.retrieval.datastore import open_datastore
from knnlm.retrieval.retriever import KnnSettings, MixSettings, Retriever
from tiny import quiet_datastore, run_cli

CTX = 32


@pytest.fixture(scope="module")
def setup(lm, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ds"
    ds_dir = quiet_datastore(lm, tiny_corpus, out, context_len=CTX, key_dtype="float32")
    ds = open_datastore(ds_dir)
    return lm, ds_dir, np.asarray(ds.keys, dtype=np.float64), np.asarray(ds.values)


def _last_key_and_logits(model, ids: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """The ffn_input key (output of the last block's ln_2) and the logits at the last position."""
    grabbed = {}
    block = model.transformer.h[-1]
    handle = block.ln_2.register_forward_hook(lambda m, a, o: grabbed.__setitem__("k", o))
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    handle.remove()
    return grabbed["k"][:, -1].double().numpy(), logits


def _reference_mix(lm_logits, q, keys, values, vocab, k, w, temp) -> np.ndarray:
    """log((1 - w) p_lm + w p_knn) per row, p_knn from brute-force squared L2 over all keys."""
    out = []
    for row, qi in zip(lm_logits.double().numpy(), q, strict=True):
        p_lm = np.exp(row - row.max())
        p_lm /= p_lm.sum()
        d = ((keys - qi) ** 2).sum(1)
        nn = np.argsort(d, kind="stable")[:k]
        wts = np.exp(-(d[nn] - d[nn].min()) / temp)
        wts /= wts.sum()
        p_knn = np.zeros(vocab)
        np.add.at(p_knn, values[nn], wts)
        out.append(np.log((1 - w) * p_lm + w * p_knn))
    return np.array(out)


def test_processor_scores_equal_hand_built_interpolation(setup):
    lm, ds_dir, keys, values = setup
    k, w, temp = 8, 0.4, 2.0
    retriever = Retriever(lm, ds_dir, KnnSettings(k=k))
    prompts = ["the village river was", "a baker of the old market"]
    enc = [lm.tokenizer(p)["input_ids"] for p in prompts]
    width = min(len(e) for e in enc)
    ids = torch.tensor([e[:width] for e in enc])
    with lm.adapter.capture() as store:
        proc = KnnLogitsProcessor(store, retriever, mix=MixSettings(knn_weight=w, temperature=temp))
        with torch.no_grad():
            scores = lm.model(ids).logits[:, -1]
        got = proc(ids, scores.clone())
    q, ref_logits = _last_key_and_logits(lm.model, ids)
    torch.testing.assert_close(scores, ref_logits)
    want = _reference_mix(ref_logits, q, keys, values, scores.shape[-1], k, w, temp)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)
    # The mixture is not the LM alone: the processor changed the ranking somewhere.
    lm_lp = torch.log_softmax(scores.double(), -1).numpy()
    assert np.abs(want - lm_lp).max() > 0.1


def _greedy_reference(lm, prompt, keys, values, steps, k, w, temp) -> tuple[list, list]:
    """Greedy continuations of ``prompt``: (kNN-LM tokens, LM-only tokens), token by token."""
    vocab = lm.adapter.vocab_size
    outs = []
    for weight in (w, 0.0):
        ids = lm.tokenizer(prompt)["input_ids"]
        new = []
        for _ in range(steps):
            q, logits = _last_key_and_logits(lm.model, torch.tensor([ids]))
            mix = _reference_mix(logits, q, keys, values, vocab, k, weight, temp)
            nxt = int(np.argmax(mix[0]))
            ids.append(nxt)
            new.append(nxt)
        outs.append(new)
    return outs[0], outs[1]


def test_cli_generate_equals_greedy_reference(setup, tiny_lm_dir, monkeypatch, capsys):
    lm, ds_dir, keys, values = setup
    prompt, steps, k, w = "the village", 6, 8, 0.9
    knn_new, lm_new = _greedy_reference(lm, prompt, keys, values, steps, k, w, 1.0)
    assert knn_new != lm_new  # the reference tells kNN-LM and LM decoding apart
    tok = lm.tokenizer
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--model", tiny_lm_dir,
                             "--datastore", ds_dir, "--k", k, "--knn-weight", w,
                             "--prompt", prompt, "--max-new-tokens", steps)  # fmt: skip
    assert code == 0, err
    assert out.rstrip("\n") == prompt + tok.decode(knn_new, skip_special_tokens=True)


def _greedy_pointer_reference(model, ids, keys, values, k, w, temp, threshold, steps):
    """Greedy decoding step by step: search (brute force) at the first step or where fewer
    than ``threshold`` successors of the last step's matching neighbours survive."""
    pointed, searched = [], 0
    for step in range(steps):
        q, logits = _last_key_and_logits(model, ids)
        d = ((keys - q[0]) ** 2).sum(1)
        if step == 0 or len(pointed) < threshold:
            rows = np.argsort(d, kind="stable")[:k]
            searched += 1
        else:
            rows = np.array(pointed)
        row = logits[0].double().numpy()
        p_lm = np.exp(row - row.max())
        p_lm /= p_lm.sum()
        wts = np.exp(-(d[rows] - d[rows].min()) / temp)
        p_knn = np.zeros(len(p_lm))
        np.add.at(p_knn, values[rows], wts / wts.sum())
        nxt = int(np.argmax((1 - w) * p_lm + w * p_knn))
        pointed = [r + 1 for r in rows if values[r] == nxt and r + 1 < len(values)]
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return ids, searched


def test_generation_with_pointers_equals_its_loop_reference(setup):
    from knnlm.generation import attach_processor, generate

    lm, ds_dir, keys, values = setup
    prompt = "the old house by the river"
    enc = lm.tokenizer(prompt, return_tensors="pt")
    knn, mix = KnnSettings(k=8), MixSettings(knn_weight=0.5, temperature=1.0)
    want, searched = _greedy_pointer_reference(lm.model, enc["input_ids"], keys, values, 8, 0.5,
                                               1.0, threshold=2, steps=12)  # fmt: skip
    with attach_processor(lm, ds_dir, knn, replace(mix, pointers=2)) as proc:
        from transformers import LogitsProcessorList

        out = lm.model.generate(**enc, logits_processor=LogitsProcessorList([proc]),
                                max_new_tokens=12, do_sample=False,
                                pad_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
    assert out[0].tolist() == want[0].tolist()
    assert proc.searches == searched < proc.queries == 12  # pointers saved some searches
    # a threshold of infinity is the plain kNN-LM
    plain = generate(lm, [prompt], ds_dir, knn, mix, max_new_tokens=8)
    inf = replace(mix, pointers=float("inf"))
    assert generate(lm, [prompt], ds_dir, knn, inf, max_new_tokens=8) == plain
