"""Adapters (Eq. 1 split), corpus sources and exact perplexity against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens, read_split
from knnlm.data.windows import make_windows
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.lm.adapters import Adapter
from knnlm.lm.loading import load_lm
from tiny import make_text, save_tiny_model


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2"])
def test_adapter_split_reproduces_model_logits(tmp_path, tiny_tokenizer, model_type):
    lm = load_lm(str(save_tiny_model(tmp_path / model_type, tiny_tokenizer, model_type)))
    ids = torch.tensor([tiny_tokenizer("the village river old house was quiet")["input_ids"]])
    with torch.no_grad(), lm.adapter.capture() as store:
        logits = lm.model(ids).logits
        enc = store["enc"]
        rebuilt = lm.adapter.f_logits(lm.adapter.g(enc))
        # Keys: ffn_input is the input of the last MLP, final_hidden the input of lm_head.
        torch.testing.assert_close(store["ffn_input"], lm.adapter.norm2(enc))
    torch.testing.assert_close(rebuilt, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        lm.adapter.lm_head(store["final_hidden"]), logits, atol=1e-5, rtol=1e-5
    )


def test_a_model_that_is_not_causal_is_refused(tmp_path):
    """BERT loads as a "causal" LM without is_decoder: its perplexity would see the future."""
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=8)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(KnnlmError, match="not causal"):
        load_lm(str(tmp_path))
    with pytest.raises(KnnlmError, match="does not exist"):
        load_lm(str(tmp_path / "missing" / "dir"))


def _independent_ppl(model, ids, ctx, stride):
    """Token by token: each target scored by a full-length forward over exactly its context."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in make_windows(len(ids), ctx, stride):
            for t in range(w.score_from, w.end):
                x = torch.tensor(ids[w.begin : t])[None]
                nll -= float(torch.log_softmax(model(x).logits[0, -1].double(), -1)[ids[t]])
                n += 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("ctx,stride", [(16, 16), (16, 5), (24, 1), (64, 32)])
def test_perplexity_equals_token_by_token(tiny_lm_dir, tmp_path, ctx, stride):
    (tmp_path / "valid.txt").write_text(make_text(8, 3))
    lm = load_lm(str(tiny_lm_dir))
    res = evaluate(lm, str(tmp_path), "valid", context_len=ctx, stride=stride, batch_size=3,
                   progress=False)  # fmt: skip
    ids = load_tokens(lm.tokenizer, str(tmp_path), "valid")
    ref, n = _independent_ppl(lm.model, ids, ctx, stride)
    assert res["tokens"] == n == len(ids) - 1
    assert res["lm"]["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert res["settings"]["context_len"] == ctx and res["settings"]["stride"] == stride


def test_every_target_scored_once_with_most_context():
    for n, ctx, stride in [(100, 10, 10), (100, 10, 3), (7, 32, 8), (2, 2, 1)]:
        windows = make_windows(n, ctx, stride)
        scored = [t for w in windows for t in range(w.score_from, w.end)]
        assert scored == list(range(1, n))
        assert all(w.length <= ctx for w in windows)


def test_corpus_sources(tmp_path, tiny_tokenizer):
    text = make_text(5, 9)
    (tmp_path / "one.txt").write_text(text)
    assert read_split(str(tmp_path / "one.txt"), "valid") == text
    data = tmp_path / "hf"
    data.mkdir()
    with open(data / "valid.jsonl", "w") as fh:
        for line in text.splitlines(keepends=True):
            fh.write(json.dumps({"text": line}) + "\n")
    from_hf = read_split(f"hf:json:{data}/{{split}}.jsonl", "valid")
    assert from_hf == text
    a = load_tokens(tiny_tokenizer, f"hf:json:{data}/{{split}}.jsonl", "valid")
    b = load_tokens(tiny_tokenizer, str(tmp_path / "one.txt"), "valid")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(KnnlmError, match="no column"):
        read_split(f"hf:json:{data}/{{split}}.jsonl", "valid", text_field="body")
    with pytest.raises(KnnlmError, match="does not exist"):
        read_split(f"hf:json:{data}/{{split}}.missing", "valid")


def test_adapter_exposes_output_embedding(tiny_lm_dir):
    lm = load_lm(str(tiny_lm_dir))
    a = Adapter(lm.model)
    assert a.output_embedding.shape == (a.vocab_size, a.hidden_size)
