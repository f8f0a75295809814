"""An equal-compute control for Section 5's MLP memory.

Any extra model trained on the same tokens and interpolated with the LM at a weight tuned on
valid tends to help an under-trained LM. The control continues training the whole LM on the
train split for the MLP's number of optimiser steps and tokens per step (its tokens), then is
interpolated with the LM exactly like the MLP: (1 - w) p_lm + w p_control, w chosen on valid
from the MLP's weight grid, read on test. The MLP's gain is credited to "an MLP that maps keys
to values" only where it also beats this control.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.data.corpus import load_tokens, read_split, tokenize_text
from knnlm.experiments.stats import bootstrap_interval
from knnlm.forward_pass import score_stream
from knnlm.lm.loading import load_lm
from knnlm.lm.train import TrainConfig, model_from_pretrained, train
from knnlm.retrieval.combiner import interpolate, perplexity
from knnlm.token_scores import score_tokens


def _target_log_probs(lm: Any, ids: np.ndarray, context_len: int, stride: int | None):
    batches = score_stream(lm.model, ids, context_len, stride, progress=False)
    return torch.cat([s.lm_cpu.float() for s in score_tokens(batches)])


def train_control(
    model_dir: str, corpus: str, out: Path, *, steps: int, batch_tokens: int, context_len: int,
    lr: float, seed: int,
) -> dict:  # fmt: skip
    """Continue training the LM at ``model_dir`` for ``steps`` steps of ``batch_tokens`` tokens
    (whole blocks of ``context_len``) on the train split; saved to ``out``."""
    model, tok = model_from_pretrained(model_dir, "cpu")  # trainable (load_lm freezes)
    ids = tokenize_text(tok, read_split(corpus, "train"))
    batch = max(1, batch_tokens // context_len)
    res = train(
        model, tok, ids,
        TrainConfig(lr=lr, batch_size=batch, max_steps=steps, warmup_ratio=0.0, seed=seed,
                    data_seed=seed + 1000, context_len=context_len, checkpoint_every=None),
        out, progress=False,
    )  # fmt: skip
    return {"steps": res.steps, "tokens_per_step": batch * context_len, "lr": lr,
            "final_loss": res.final_loss, "seconds": res.seconds,
            "what": "the whole LM, training continued on the train split"}  # fmt: skip


def control_perplexities(
    lm: Any, control_dir: Path, corpus: str, lm_lp: dict[str, torch.Tensor],
    weights: Sequence[float], context_len: int, stride: int | None,
    against: torch.Tensor | None = None,
) -> dict:  # fmt: skip
    """LM + control interpolated, its weight chosen on valid; ``lm_lp[split]`` the LM's
    per-token log-probs of the split, in stream order. With ``against`` (LM + MLP's per-token
    test log-probs), the per-token gain of LM + MLP over LM + control, bootstrapped."""
    ctrl = load_lm(str(control_dir), device=str(lm.device))
    grid: dict[str, list[float]] = {}
    alone: dict[str, float] = {}
    c_test = None
    for split in ("valid", "test"):
        ids = load_tokens(ctrl.tokenizer, corpus, split)
        c_lp = _target_log_probs(ctrl, ids, context_len, stride)
        if c_lp.shape != lm_lp[split].shape:
            raise ValueError("the control scored other tokens than the LM")
        n = len(c_lp)
        if split == "test":
            c_test = c_lp
        alone[split] = perplexity(-float(c_lp.double().sum()), n)
        grid[split] = [perplexity(-float(interpolate(lm_lp[split], c_lp, w).double().sum()), n)
                       for w in weights]  # fmt: skip
    best = int(np.argmin(grid["valid"]))
    gain = None
    if against is not None and c_test is not None:
        gain = token_gain(against, interpolate(lm_lp["test"], c_test, float(weights[best])))
    return {
        "gain_tokens": gain,
        "weight": float(weights[best]),
        "weight_tuned_on": "valid",
        "valid": {"control": grid["valid"][best], "control_alone": alone["valid"]},
        "test": {"control": grid["test"][best], "control_alone": alone["test"]},
        "weight_sweep": {"weights": list(weights), **grid},
    }


def token_gain(model_lp: torch.Tensor, base_lp: torch.Tensor) -> dict[str, Any]:
    """The per-token gain log p_model - log p_base over the scored test tokens (its mean is
    log(base perplexity / model perplexity)), with its seeded bootstrap bounds."""
    diff = (model_lp.double() - base_lp.double()).cpu().numpy()
    return bootstrap_interval(diff, "test tokens").as_dict()
