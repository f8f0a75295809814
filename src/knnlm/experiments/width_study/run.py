"""Section 3 against model width: LMs that differ only in d, each projected to convergence.

The paper makes claim (b) on a d = 1024 model; a 64-dimensional z cannot express every
distribution over thousands of tokens. The trend of the share of the LM -> kNN-LM gap that
f(z*) closes, and of the converged KL, over d (e.g. 64, 128, 256) says whether a "not held"
here is the bottleneck of a small model or a disagreement with the paper. Each width trains
an LM of the run's preset with ``n_embd = d`` and ``n_inner = 4 d`` (same seed, tokenizer,
corpus and schedule), builds its datastore, tunes the kNN-LM on valid and solves Eq. 2 on the
test positions exactly as the main run does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from knnlm.data.corpus import read_split, tokenize_text
from knnlm.errors import KnnlmError
from knnlm.experiments.natural_text import stage as nt
from knnlm.experiments.projection.stage import stage_projection
from knnlm.experiments.reproduce_config import ReproduceConfig
from knnlm.experiments.stats import seed_interval, share_interval
from knnlm.lm.presets import get_preset
from knnlm.lm.train import train
from knnlm.lm.train_config import TrainConfig


def stage_width_lm(cfg: ReproduceConfig, d: int, seed: int, corpus: str, tok_dir: str,
                   art: Path) -> dict:  # fmt: skip
    """The run's LM preset at width ``d``, trained like :func:`natural_text.stage_lm`."""
    base = get_preset(cfg.lm_preset)
    if d % base.n_head:
        raise KnnlmError(f"width {d} is not a multiple of the preset's {base.n_head} heads")
    preset = replace(base, n_embd=d, n_inner=4 * d)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(preset.model_config(len(tok), tok, cfg.context_len))
    ids = tokenize_text(tok, read_split(corpus, "train"))
    res = train(
        model, tok, ids,
        TrainConfig(lr=preset.lr, batch_size=preset.batch_size,
                    epochs=cfg.lm_epochs or preset.epochs, max_steps=cfg.lm_max_steps,
                    warmup_ratio=preset.warmup_ratio, weight_decay=preset.weight_decay,
                    seed=seed, context_len=cfg.context_len, checkpoint_every=None),
        art / "model", progress=False,
    )  # fmt: skip
    return {"model": str(art / "model"), "d": d, "params": sum(p.numel() for p in
            model.parameters()), "final_loss": res.final_loss, "steps": res.steps}  # fmt: skip


def stage_width(cfg: ReproduceConfig, d: int, seed: int, data: dict, art: Path) -> dict:
    """One width: LM, datastore, valid-tuned kNN-LM, converged projection (one row)."""
    corpus = data["corpus"]
    for sub in ("lm", "ds", "knn", "proj"):
        (art / sub).mkdir(parents=True, exist_ok=True)
    lm = stage_width_lm(cfg, d, seed, corpus, data["tokenizer"], art / "lm")
    ds = nt.stage_datastore(cfg, seed, lm["model"], corpus, art / "ds")
    knn = nt.stage_knnlm(cfg, lm["model"], corpus, ds["datastore"], art / "knn", seed=seed)
    proj = stage_projection(cfg, seed, lm["model"], corpus, ds["datastore"], knn["tuned"],
                               art / "proj", lr_study=False)  # fmt: skip
    return width_row(d, proj) | {"params": lm["params"], "tuned": knn["tuned"]}


def width_row(d: int, proj: dict[str, Any]) -> dict:
    """The numbers the width table and figure read off one projection result."""
    lm, knn = proj["lm"]["perplexity"], proj["knnlm"]["perplexity"]
    conv = proj["converged"]
    row: dict[str, Any] = {"d": d, "lm": lm, "knnlm": knn, "positions": proj["positions"]}
    for key in ("proj_f", "proj_fg"):
        q = conv[key]
        row[key] = {
            "perplexity": q["perplexity"],
            "share": None if lm == knn else (lm - q["perplexity"]) / (lm - knn),
            "kl_mean": q["kl_mean"],
            "kl_init_mean": q["kl_init_mean"],
            "at_tolerance": q["at_tolerance"],
        }
        logps = (proj["lm"].get("target_logp"), q.get("target_logp"),
                 proj["knnlm"].get("target_logp"))  # fmt: skip
        if lm != knn and all(v is not None for v in logps):
            row[key]["share_interval"] = share_interval(*logps).as_dict()
    return row


def rows_over_seeds(per_seed: list[tuple[int, dict[str, Any]]]) -> dict:
    """One width's row over its LM seeds: the first seed's row as it stands, and for each of
    f and f∘g the share of the gap per seed with, over 2 or more seeds, its mean and one-sided
    t bounds over seeds (``share_over_seeds``)."""
    seeds = [s for s, _ in per_seed]
    row = dict(per_seed[0][1])
    if len(per_seed) < 2:
        return row
    row["seeds"] = seeds
    for key in ("proj_f", "proj_fg"):
        shares = [r[key]["share"] for _, r in per_seed]
        row[key] = dict(row[key]) | {"share_per_seed": shares}
        if all(x is not None for x in shares):
            row[key]["share_over_seeds"] = seed_interval(shares).as_dict()
    return row
