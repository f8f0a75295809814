"""Section 5 in the reproduction: per LM seed, the MLP memory trained on that seed's datastore
(until its held-out loss stops improving, under the step cap), its weight chosen on valid and
read on test, and the control."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from knnlm.data.corpus import load_tokens
from knnlm.experiments.mlp_memory.control import control_perplexities, token_gain, train_control
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.experiments.mlp_memory.train import stopped_improving, train_memory
from knnlm.experiments.natural_text.stage import seed_inputs
from knnlm.experiments.reproduce_config import ReproduceConfig
from knnlm.experiments.stages import AnalysisStages, Done, Stage
from knnlm.forward_pass import score_stream
from knnlm.lm.loading import load_lm
from knnlm.lm.presets import get_preset
from knnlm.retrieval.combiner import interpolate, perplexity
from knnlm.retrieval.datastore import open_datastore
from knnlm.retrieval.memory import load_memory, memory_storage, storage_report
from knnlm.token_scores import score_tokens


def _token_log_probs(lm, corpus: str, split: str, cfg: ReproduceConfig, mem, key_type: str):
    """Per scored token: log p_lm(target) and log p_mem(target), one scoring pass read
    through the per-token scorer."""
    ids = load_tokens(lm.tokenizer, corpus, split)
    batches = score_stream(
        lm.model, ids, cfg.context_len, cfg.stride, key_type=key_type, progress=False
    )
    lm_out, mem_out = [], []
    for scores in score_tokens(batches, memory=mem):
        lm_out.append(scores.lm_cpu.float())
        mem_out.append(scores.memory.float().cpu())
    return torch.cat(lm_out), torch.cat(mem_out)


def _control(cfg, seed, model, corpus, lm, lm_lp, steps, weights, art, mlp_test) -> dict:
    """Section 5's equal-compute control (:mod:`knnlm.experiments.mlp_memory.control`)."""
    lr = get_preset(cfg.lm_preset).lr if cfg.model is None else 1e-4
    info = train_control(
        model, corpus, art / "control", steps=steps, batch_tokens=cfg.memory_batch_tokens,
        context_len=cfg.context_len, lr=lr, seed=seed,
    )  # fmt: skip
    res = control_perplexities(lm, art / "control", corpus, lm_lp, weights, cfg.context_len,
                               cfg.stride, against=mlp_test)  # fmt: skip
    shutil.rmtree(art / "control")  # a copy of the LM; the numbers are kept
    return {"train": info, **res}


def stage_memory(
    cfg: ReproduceConfig, seed: int, model: str, corpus: str, ds: str, knn_res: dict, art: Path
) -> dict:
    """Section 5: the MLP memory trained on the datastore, interpolated like p_knn; its weight
    chosen on valid, read on test. The kNN-LM numbers are the ``knnlm`` stage's."""
    lm = load_lm(model)
    store = open_datastore(ds)
    tr, stop = _train_memory(cfg, seed, lm, store, art, corpus)
    mem = load_memory(art / "memory", device=str(lm.device))
    weights = sorted({float(w) for w in cfg.memory_weights})
    ppl, lm_by_split, mem_test = _memory_grids(cfg, lm, corpus, mem, store.meta["key_type"],
                                               weights)  # fmt: skip
    best = int(np.argmin(ppl["valid"]["grid"]))
    mlp_test = interpolate(lm_by_split["test"], mem_test, weights[best])
    control = (
        _control(cfg, seed, model, corpus, lm, lm_by_split, tr.steps, weights, art, mlp_test)
        if cfg.memory_control
        else None
    )
    return {
        "control": control,
        "seed": seed,
        "weight": weights[best],
        "weight_tuned_on": "valid",
        "valid": {"tokens": ppl["valid"]["tokens"], "lm": ppl["valid"]["lm"],
                  "mlp": ppl["valid"]["grid"][best]},
        "test": {"tokens": ppl["test"]["tokens"], "lm": ppl["test"]["lm"],
                 "knnlm_tuned": knn_res["test"]["knnlm_tuned"],
                 "mlp": ppl["test"]["grid"][best],
                 # (d) under 3 seeds: a bootstrap over the scored test tokens
                 "gain_tokens": token_gain(mlp_test, lm_by_split["test"])},
        "weight_sweep": {"weights": weights, "valid": ppl["valid"]["grid"],
                         "test": ppl["test"]["grid"]},
        "storage": storage_report(store, memory_storage(art / "memory")),
        "train": {"steps": tr.steps, "final_loss": tr.final_loss, "seconds": tr.seconds,
                  **stop},
    }  # fmt: skip


def memory_settings(cfg: ReproduceConfig, seed: int) -> MemoryTrainSettings:
    """The MLP memory's training in the reproduction, whole: ``memory_max_steps`` its cap
    (with ``memory_eval_every`` it is trained in chunks up to it)."""
    return MemoryTrainSettings(
        hidden=cfg.memory_hidden, lr=cfg.memory_lr, batch_tokens=cfg.memory_batch_tokens,
        epochs=cfg.memory_epochs, max_steps=cfg.memory_max_steps, seed=seed,
    )  # fmt: skip


def _train_memory(cfg: ReproduceConfig, seed: int, lm, store, art: Path, corpus: str):
    """The MLP memory on the datastore's (key, value) pairs, saved in ``art / "memory"``.

    With ``cfg.memory_eval_every``, training continues in chunks of that many steps (training
    is a function of the settings and the step, so chunks resume exactly) until the MLP's loss
    on the valid split's (key, target) pairs stops improving, or the epochs / the step cap
    ``memory_max_steps`` end it. Returns (the training result, the stopping record)."""

    whole = memory_settings(cfg, seed)

    def run(max_steps: int | None):
        # A chunk of the whole run: training is a function of the settings and the step.
        settings = whole if max_steps == whole.max_steps else replace(whole, max_steps=max_steps)
        return train_memory(
            store.keys, store.values, lm.adapter.output_embedding.detach(), art / "memory",
            settings, progress=False, datastore={"path": str(store.path), "n": store.n},
        )  # fmt: skip

    every = cfg.memory_eval_every
    if not every:
        tr = run(whole.max_steps)
        return tr, {"stopped": f"after {tr.steps} steps (no held-out check)", "heldout": []}
    keys, targets = _valid_pairs(lm, corpus, cfg, store.meta["key_type"])
    cap = math.ceil(store.n / cfg.memory_batch_tokens) * cfg.memory_epochs
    cap = cap if cfg.memory_max_steps is None else min(cap, cfg.memory_max_steps)
    curve: list[dict] = []
    steps = 0
    while steps < cap:
        tr = run(min(cap, steps + every))
        steps = tr.steps
        mem = load_memory(art / "memory", device=str(lm.device))
        with torch.no_grad():
            loss = -float(mem.target_log_prob(keys, targets).double().mean())
        curve.append({"step": steps, "valid_loss": loss})
        if stopped_improving([c["valid_loss"] for c in curve]):
            return tr, {"stopped": f"held-out loss stopped improving at step {steps}",
                        "heldout": curve}  # fmt: skip
    why = "the step cap" if cfg.memory_max_steps is not None and cap == cfg.memory_max_steps \
        else "the epochs"  # fmt: skip
    trend = "still improving" if len(curve) > 1 else "one check, no trend"
    return tr, {"stopped": f"{why} ({cap} steps) reached, held-out loss {trend}",
                "heldout": curve}  # fmt: skip


def _valid_pairs(lm, corpus: str, cfg: ReproduceConfig, key_type: str):
    """The valid split's (key, target) pairs: the MLP's held-out set."""
    ids = load_tokens(lm.tokenizer, corpus, "valid")
    keys, targets = [], []
    for b in score_stream(lm.model, ids, cfg.context_len, cfg.stride, key_type=key_type,
                          want_lm=False, progress=False):  # fmt: skip
        keys.append(b.keys.float())
        targets.append(b.targets)
    return torch.cat(keys), torch.cat(targets)


def _memory_grids(cfg: ReproduceConfig, lm, corpus: str, mem, key_type: str,
                  weights: list[float]) -> tuple[dict[str, dict], dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    """Per split: the LM's perplexity and LM + memory's at each weight; the LM's per-token
    log-probs (the control reuses them); the memory's per-token test log-probs."""
    ppl: dict[str, dict] = {}
    lm_by_split: dict[str, torch.Tensor] = {}
    for split in ("valid", "test"):
        lm_lp, mem_lp = _token_log_probs(lm, corpus, split, cfg, mem, key_type)
        lm_by_split[split] = lm_lp
        n = len(lm_lp)
        ppl[split] = {
            "tokens": n,
            "lm": perplexity(-float(lm_lp.double().sum()), n),
            "grid": [perplexity(-float(interpolate(lm_lp, mem_lp, w).double().sum()), n)
                     for w in weights],
        }  # fmt: skip
    return ppl, lm_by_split, mem_lp


def _run_memory(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    model, corpus, ds = seed_inputs(done, seed)
    return stage_memory(cfg, seed, model, corpus, ds, done[f"knnlm-{seed}"], art)


def _seed_stages(seed: int) -> list[Stage]:
    one = {"seed": seed}
    return [Stage(f"memory-{seed}", _run_memory, deps=(f"datastore-{seed}", f"knnlm-{seed}"),
                  fixed=one, args=one, group=f"seed-{seed}")]  # fmt: skip


def _results(cfg: ReproduceConfig, done: Done) -> dict:
    seeds = cfg.seeds
    keep = ("seed", "weight", "valid", "test", "weight_sweep", "train", "control")
    return {"memory": {
        "seeds": seeds,
        "per_seed": [{k: done[f"memory-{s}"].get(k) for k in keep} for s in seeds],
        "storage": done[f"memory-{seeds[0]}"]["storage"],
        # The first seed's training, whole (the others differ only in their seed), the grid.
        "settings": {"memory": memory_settings(cfg, seeds[0]).to_dict(),
                     "weights": cfg.memory_weights, "weight_tuned_on": "valid"},  # fmt: skip
    }}  # fmt: skip


STAGES = AnalysisStages(_results, per_seed=_seed_stages)
