"""Model families, key types and precisions against references taken from the HF model itself.

Keys are compared with the model's own hidden states (``output_hidden_states``) and the output
of its last attention; perplexities with batch-1 forwards over exactly each context.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knnlm.continuations import continuation_log_probs
from knnlm.data.corpus import load_tokens
from knnlm.data.windows import make_windows
from knnlm.evaluate import evaluate
from knnlm.forward_pass import score_stream, window_batches
from knnlm.lm.loading import load_lm
from knnlm.retrieval.datastore import open_datastore
from tiny import quiet_datastore, save_tiny_model, write_corpus

CTX, STRIDE = 16, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("models_corpus"), train=(12, 21), valid=(7, 22))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_lm(request, tmp_path_factory, tiny_tokenizer):
    path = save_tiny_model(tmp_path_factory.mktemp(request.param), tiny_tokenizer, request.param)
    return load_lm(str(path))


def _last_block_and_attn(model):
    if model.config.model_type == "gpt2":
        block = model.transformer.h[-1]
        return block, block.attn, block.ln_2
    block = model.model.layers[-1]
    return block, block.self_attn, block.post_attention_layernorm


def reference_keys(model, ids, ctx, stride):
    """Per scored target, from a batch-1 forward over its window:

    - block_input: the last block's input (hidden_states[-2]) plus its attention output
    - ffn_input: the last block's MLP norm applied to that
    - final_hidden: the model's last hidden state (after the final norm)
    """
    _, attn, norm2 = _last_block_and_attn(model)
    grabbed = {}

    def hook(_m, _a, out):
        grabbed["attn"] = out[0] if isinstance(out, tuple) else out

    handle = attn.register_forward_hook(hook)
    out = {"block_input": [], "ffn_input": [], "final_hidden": []}
    targets = []
    with torch.no_grad():
        for w in make_windows(len(ids), ctx, stride):
            x = torch.tensor(ids[w.begin : w.end])[None]
            hs = model(x, output_hidden_states=True).hidden_states
            cols = np.arange(w.score_from - w.begin - 1, w.length - 1)
            h = hs[-2][0] + grabbed["attn"][0]
            out["block_input"].append(h[cols].double().numpy())
            out["ffn_input"].append(norm2(h)[cols].double().numpy())
            out["final_hidden"].append(hs[-1][0, cols].double().numpy())
            targets.append(np.asarray(ids[w.score_from : w.end]))
    handle.remove()
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(targets)


@pytest.mark.parametrize("key_type", ["block_input", "ffn_input", "final_hidden"])
def test_datastore_keys_equal_hf_hidden_states(family_lm, corpus, tmp_path, key_type):
    lm = family_lm
    ds_dir = quiet_datastore(lm, corpus, tmp_path / "ds", context_len=CTX, stride=STRIDE,
                             batch_size=3, key_type=key_type, key_dtype="float32")  # fmt: skip
    ds = open_datastore(ds_dir)
    assert ds.meta["key_type"] == key_type
    ids = load_tokens(lm.tokenizer, str(corpus), "train")
    ref, targets = reference_keys(lm.model, ids, CTX, STRIDE)
    np.testing.assert_array_equal(np.asarray(ds.values), targets)
    np.testing.assert_allclose(np.asarray(ds.keys, np.float64), ref[key_type], rtol=1e-4, atol=1e-4)
    # The three key types are different vectors: a key taken elsewhere would not match.
    others = [t for t in ref if t != key_type]
    for t in others:
        assert np.abs(ref[t] - ref[key_type]).max() > 1e-2


def _token_by_token(model, ids, ctx, stride):
    """Per target: log p(target) from a batch-1 forward over exactly its context (float32)."""
    out = []
    with torch.no_grad():
        for w in make_windows(len(ids), ctx, stride):
            for t in range(w.score_from, w.end):
                logits = model(torch.tensor(ids[w.begin : t])[None]).logits[0, -1]
                out.append(float(torch.log_softmax(logits.double(), -1)[ids[t]]))
    return np.array(out)


def test_llama_padded_batches_equal_token_by_token(tmp_path, tiny_tokenizer, corpus):
    lm = load_lm(str(save_tiny_model(tmp_path / "llama", tiny_tokenizer, "llama", seed=3)))
    ids = load_tokens(lm.tokenizer, str(corpus), "valid")
    windows = make_windows(len(ids), CTX, STRIDE)
    # A batch size whose last batch mixes window lengths, so its rows are right-padded.
    bs = next(
        b
        for b in range(2, 9)
        if len({w.length for w in windows[slice(*window_batches(windows, b)[-1])]}) > 1
    )
    res = evaluate(lm, str(corpus), "valid", context_len=CTX, stride=STRIDE, batch_size=bs,
                   progress=False)  # fmt: skip
    ref = _token_by_token(lm.model, ids, CTX, STRIDE)
    assert res["tokens"] == len(ref) == len(ids) - 1
    assert res["lm"]["perplexity"] == pytest.approx(math.exp(-ref.mean()), rel=1e-5)
    # Independent examples of different lengths, padded together in one batch.
    prompts = ["the old village", "a child", "the baker of the green market was", "river"]
    conts = [" house", " born", " quiet", " stone"]
    got = continuation_log_probs(lm, prompts, conts, batch_size=4)["lm"]
    want = []
    with torch.no_grad():
        for p, c in zip(prompts, conts, strict=True):
            p_ids = lm.tokenizer(p, add_special_tokens=False)["input_ids"]
            full = lm.tokenizer(p + c, add_special_tokens=False)["input_ids"]
            assert full[: len(p_ids)] == p_ids
            logits = lm.model(torch.tensor([p_ids])).logits[0, -1]
            want.append(float(torch.log_softmax(logits.double(), -1)[full[len(p_ids)]]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_logits_branch_equals_float32_log_softmax_of_each_window(tiny_lm_dir, corpus):
    lm = load_lm(str(tiny_lm_dir), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    ids = load_tokens(lm.tokenizer, str(corpus), "valid")
    got = np.concatenate([
        b.lm_log_prob.double().numpy()
        for b in score_stream(lm.model, ids, CTX, STRIDE, batch_size=1, key_type=None,
                              progress=False)
    ])  # fmt: skip
    want = []
    with torch.no_grad():
        for w in make_windows(len(ids), CTX, STRIDE):
            logits = lm.model(torch.tensor(ids[w.begin : w.end])[None]).logits[0]
            assert logits.dtype == torch.bfloat16
            lp = torch.log_softmax(logits.float(), -1).double()
            cols = np.arange(w.score_from - w.begin - 1, w.length - 1)
            want.append(lp[cols, ids[w.score_from : w.end]].numpy())
    want = np.concatenate(want)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    res = evaluate(lm, str(corpus), "valid", context_len=CTX, stride=STRIDE, batch_size=1,
                   progress=False)  # fmt: skip
    assert res["lm"]["perplexity"] == pytest.approx(math.exp(-want.mean()), rel=1e-6)
    # bf16 is really in use: the float32 model gives measurably different log-probs.
    f32 = load_lm(str(tiny_lm_dir))
    assert np.abs(_token_by_token(f32.model, ids, CTX, STRIDE) - want).max() > 1e-4


def test_lora_on_llama_trains_every_target_and_merges_by_hand(tmp_path, tiny_tokenizer):
    from knnlm.lm.lora import LORA_DEFAULTS, apply_lora
    from knnlm.lm.train import train
    from knnlm.lm.train_config import TrainConfig

    path = save_tiny_model(tmp_path / "llama", tiny_tokenizer, "llama", seed=4)
    model = apply_lora(load_lm(str(path)).model.requires_grad_(True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    paper = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for target in [*paper, "embed_tokens"]:  # the paper's targets (App. C.1), each adapted
        assert any(f".{target}.lora_" in n for n in trainable), target

    x = torch.arange(30)[None] % len(tiny_tokenizer)
    seen = {}

    def capture(step, m):  # the adapted (unmerged) model after the last step
        seen["logits"] = m(input_ids=x).logits.clone()
        seen["state"] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return {}

    texts = ["the old river is green", "a child was born", "the baker of the market"] * 4
    cfg = TrainConfig(lr=1e-2, batch_size=4, epochs=3, context_len=32, eval_every=100)
    train(model, tiny_tokenizer, texts, cfg, tmp_path / "out", on_eval=capture, progress=False)
    merged = load_lm(str(tmp_path / "out"))
    assert merged.model.config.model_type == "llama"
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    # W + (alpha / r) B A for the last layer's q_proj, by hand from the adapter's tensors.
    st = seen["state"]
    pre = next(k for k in st if k.endswith("layers.1.self_attn.q_proj.base_layer.weight"))
    stem = pre[: -len("base_layer.weight")]
    a, b = st[stem + "lora_A.default.weight"], st[stem + "lora_B.default.weight"]
    scale = LORA_DEFAULTS["lora_alpha"] / LORA_DEFAULTS["r"]
    want = st[pre] + scale * b @ a
    got = merged.model.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (b @ a).abs().max() > 1e-4  # the adapter was trained
    with torch.no_grad():
        out = merged.model(input_ids=x).logits
        original = load_lm(str(path)).model(input_ids=x).logits
    torch.testing.assert_close(out, seen["logits"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, original, atol=1e-3)
