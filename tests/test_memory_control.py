"""Section 5's equal-compute control: steps and tokens as asked, numbers against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens
from knnlm.evaluate import evaluate
from knnlm.experiments.mlp_memory.control import control_perplexities, train_control
from knnlm.forward_pass import score_stream
from knnlm.lm.loading import load_lm

CTX = 16


def _lm_log_probs(lm, corpus, split):
    """The LM's log p(target) per scored token, from the scoring pass evaluate uses (whose
    perplexity tests/test_knnlm_vs_brute_force.py checks against brute force)."""
    ids = load_tokens(lm.tokenizer, corpus, split)
    return torch.cat(
        [b.lm_log_prob.double() for b in score_stream(lm.model, ids, CTX, CTX, progress=False)]
    )


def test_control_trains_the_asked_steps_and_tokens(tiny_lm_dir, tiny_corpus, tmp_path):
    info = train_control(str(tiny_lm_dir), str(tiny_corpus), tmp_path / "ctrl", steps=3,
                         batch_tokens=64, context_len=CTX, lr=1e-3, seed=0)  # fmt: skip
    assert info["steps"] == 3 and info["tokens_per_step"] == 64
    before = load_lm(str(tiny_lm_dir)).model.state_dict()
    after = load_lm(str(tmp_path / "ctrl")).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_a_control_equal_to_the_lm_changes_nothing(tiny_lm_dir, tiny_corpus):
    lm = load_lm(str(tiny_lm_dir))
    ref = {s: _lm_log_probs(lm, str(tiny_corpus), s) for s in ("valid", "test")}
    ev = evaluate(lm, str(tiny_corpus), "test", context_len=CTX, stride=CTX, progress=False)
    assert ev["lm"]["perplexity"] == pytest.approx(
        math.exp(-float(ref["test"].sum()) / len(ref["test"])), rel=1e-5
    )
    lm_lp = {s: v.float() for s, v in ref.items()}
    res = control_perplexities(lm, tiny_lm_dir, str(tiny_corpus), lm_lp, [0.2, 0.5], CTX, CTX)
    # Interpolating a distribution with itself is itself, at any weight.
    want = math.exp(-float(ref["test"].sum()) / len(ref["test"]))
    assert res["test"]["control"] == pytest.approx(want, rel=1e-4)
    assert res["test"]["control_alone"] == pytest.approx(want, rel=1e-4)
    assert np.allclose(res["weight_sweep"]["valid"], res["weight_sweep"]["valid"][0], rtol=1e-5)
    assert res["weight_tuned_on"] == "valid"
