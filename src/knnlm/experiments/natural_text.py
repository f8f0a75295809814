"""The natural-text part of the reproduction: Sections 2, 3 and 5 of the paper.

Per LM seed: train the LM (Section 2's baseline), build its datastore over the train split,
evaluate LM and kNN-LM on valid and test with cached neighbours, choose (weight, temperature)
on valid from the cache and read both the paper's setting and the tuned one on test; train
the MLP memory on the same datastore (Section 5), choose its weight on valid, read it on test.
Section 3 (Eq. 2) runs on the test split of the first seed at the tuned setting.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from knnlm.data import wikitext2
from knnlm.data.corpus import load_tokens, read_split, tokenize_text
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.experiments.hurdle_setup import corpus_loss_fn
from knnlm.experiments.memory_control import control_perplexities, token_gain, train_control
from knnlm.experiments.mlp_memory import stopped_improving, train_memory
from knnlm.experiments.projection import run_projection
from knnlm.experiments.reproduce_config import PAPER_SETTING, ReproduceConfig
from knnlm.fileio import write_json_atomic
from knnlm.forward_pass import score_stream
from knnlm.lm.loading import load_lm
from knnlm.lm.presets import get_preset
from knnlm.lm.tokenizer import save_tokenizer
from knnlm.lm.train import model_from_preset, train
from knnlm.lm.train_config import TrainConfig
from knnlm.lm.train_data import train_tokenizer_for_corpus
from knnlm.retrieval.combiner import interpolate, perplexity
from knnlm.retrieval.datastore import build_datastore, open_datastore
from knnlm.retrieval.memory import load_memory, memory_storage, storage_report
from knnlm.retrieval.retriever import KnnSettings
from knnlm.retrieval.search.index_build import build_index
from knnlm.sweep import sweep
from knnlm.token_scores import score_tokens


def stage_corpus(cfg: ReproduceConfig, art: Path) -> dict:
    """The corpus (the embedded slice at quick scale) and one BPE tokenizer for every LM seed."""
    if cfg.corpus is None:
        corpus = str(wikitext2.extract(art / "corpus"))
        info = {"name": wikitext2.NAME, "license": wikitext2.LICENSE}
        for split, n in (cfg.embedded_chars or {}).items():
            path = Path(corpus) / f"{split}.txt"
            text = path.read_text(encoding="utf-8")
            cut = text.rfind("\n", 0, n) + 1 or n
            path.write_text(text[:cut], encoding="utf-8")
            info["name"] = f"{wikitext2.NAME}, cut to {cfg.embedded_chars} characters"
    else:
        corpus, info = cfg.corpus, {"name": cfg.corpus}
    out = {"corpus": corpus, "tokenizer": None, **info}
    if cfg.model is None:
        vocab = cfg.tokenizer_vocab or get_preset(cfg.lm_preset).tokenizer_vocab_size
        tok = train_tokenizer_for_corpus(corpus, vocab)
        save_tokenizer(tok, art / "tokenizer")
        out.update(tokenizer=str(art / "tokenizer"), vocab_size=len(tok))
    out["chars"] = {s: len(read_split(corpus, s)) for s in ("train", "valid", "test")}
    return out


# The LM's last evaluations kept (its valid loss over its last steps), on this many blocks.
LM_EVALS_KEPT = 5
LM_VALID_BLOCKS = 32


def stage_lm(cfg: ReproduceConfig, seed: int, corpus: str, tokenizer_dir: str, art: Path) -> dict:
    """Train one LM from scratch on the train split with the shared tokenizer."""
    if cfg.model is not None:
        return {"model": cfg.model, "trained": False, "seed": seed}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    preset = get_preset(cfg.lm_preset)
    ids = tokenize_text(tok, read_split(corpus, "train"))
    model = model_from_preset(cfg.lm_preset, tok, seed=seed, context_len=cfg.context_len)
    every = cfg.lm_eval_every
    on_eval = None
    if every:  # fixed valid blocks; evaluating runs on its own RNG stream: training is unchanged
        valid = tokenize_text(tok, read_split(corpus, "valid"))
        on_eval = corpus_loss_fn(valid, cfg.context_len, n_blocks=LM_VALID_BLOCKS)
    res = train(
        model,
        tok,
        ids,
        TrainConfig(
            lr=preset.lr,
            batch_size=preset.batch_size,
            epochs=cfg.lm_epochs or preset.epochs,
            max_steps=cfg.lm_max_steps,
            warmup_ratio=preset.warmup_ratio,
            weight_decay=preset.weight_decay,
            seed=seed,
            context_len=cfg.context_len,
            checkpoint_every=None,
            eval_every=every,
        ),
        art / "model",
        on_eval=on_eval,
        progress=False,
    )
    last = res.evals[-LM_EVALS_KEPT:]
    return {
        "model": str(art / "model"),
        "trained": True,
        "valid_loss": {
            "steps": [e["step"] for e in last],
            "loss": [e["loss"] for e in last],
            "measured_on": f"{LM_VALID_BLOCKS} fixed blocks of the valid split",
        }
        if last
        else None,
        "seed": seed,
        "preset": cfg.lm_preset,
        "train_tokens": int(ids.size),
        "steps": res.steps,
        "final_loss": res.final_loss,
        "seconds": res.seconds,
        "tokens_per_second": res.tokens_per_second,
    }


def stage_datastore(cfg: ReproduceConfig, seed: int, model: str, corpus: str, art: Path) -> dict:
    lm = load_lm(model)
    path = build_datastore(
        lm, corpus, "train", art / "ds", context_len=cfg.context_len, stride=cfg.stride,
        progress=False,
    )  # fmt: skip
    out = {"datastore": str(path)}
    if cfg.index:
        t0 = time.perf_counter()
        build_index(
            path, kind=cfg.index, nlist=cfg.index_nlist, train_size=cfg.index_train_size,
            nprobe=cfg.nprobe, seed=seed, progress=False,  # None: the library default
        )  # fmt: skip
        out["index_seconds"] = time.perf_counter() - t0
    ds = open_datastore(path)
    out.update(n=ds.n, dim=ds.dim, key_type=ds.meta["key_type"], bytes=ds.storage_bytes())
    return out


def knn_settings(cfg: ReproduceConfig, weight: float, temperature: float):
    return KnnSettings(nprobe=cfg.nprobe, k=cfg.k, knn_weight=weight, temperature=temperature,
                       search=cfg.search)  # fmt: skip


def _grid(cfg: ReproduceConfig) -> tuple[list[float], list[float]]:
    """The sweep grid, always holding the paper's setting."""
    ws = sorted({float(w) for w in cfg.sweep_weights} | {PAPER_SETTING["knn_weight"]})
    ts = sorted({float(t) for t in cfg.sweep_temperatures} | {PAPER_SETTING["temperature"]})
    return ws, ts


def stage_knnlm(
    cfg: ReproduceConfig, model: str, corpus: str, ds: str, art: Path, seed: int | None = None
) -> dict:
    """LM and kNN-LM on valid and test; (weight, T) tuned on valid from cached neighbours."""
    lm = load_lm(model)
    weights, temps = _grid(cfg)
    paper = knn_settings(cfg, PAPER_SETTING["knn_weight"], PAPER_SETTING["temperature"])
    splits: dict[str, dict] = {}
    grids: dict[str, dict] = {}
    for split in ("valid", "test"):
        cache = art / f"cache-{split}"
        res = evaluate(
            lm, corpus, split, context_len=cfg.context_len, stride=cfg.stride, datastore=ds,
            knn=paper, cache=cache, progress=False,
        )  # fmt: skip
        grids[split] = sweep(cache, weights, temps, progress=False)
        splits[split] = res
        shutil.rmtree(cache)  # hundreds of MB; the stage result keeps every number read off it
    ppl_v = np.asarray(grids["valid"]["perplexity"][0])  # [weight][temperature]
    wi, ti = np.unravel_index(int(np.nanargmin(ppl_v)), ppl_v.shape)
    pw, pt = weights.index(PAPER_SETTING["knn_weight"]), temps.index(PAPER_SETTING["temperature"])
    tuned = {"knn_weight": weights[wi], "temperature": temps[ti], "tuned_on": "valid"}
    out = {"tuned": tuned, "paper_setting": dict(PAPER_SETTING)}
    for split in ("valid", "test"):
        ppl = grids[split]["perplexity"][0]
        out[split] = {
            "tokens": splits[split]["tokens"],
            "lm": splits[split]["lm"]["perplexity"],
            "knnlm_paper": ppl[pw][pt],
            "knnlm_tuned": ppl[wi][ti],
        }
        # Same scoring pass, two routes: evaluate's own number at the paper setting must
        # equal the sweep's cell (a check that the cache and the sweep agree).
        direct = splits[split]["knnlm"]["perplexity"]
        if not abs(direct - ppl[pw][pt]) <= 1e-3 * direct:
            raise KnnlmError(f"sweep and evaluate disagree on {split}: {ppl[pw][pt]} vs {direct}")
    # The heatmap's data, beside where the report layer draws it (sweep.png).
    write_json_atomic(
        art / "sweep.json",
        {"weights": weights, "temperatures": temps, "k": cfg.k, "seed": seed,
         "valid": grids["valid"]["perplexity"][0], "lm_ppl": out["valid"]["lm"]},
    )  # fmt: skip
    out.update(
        sweep={"weights": weights, "temperatures": temps, "k": cfg.k,
               "valid": grids["valid"]["perplexity"][0], "test": grids["test"]["perplexity"][0]},
        figure=str(art / "sweep.png"),
        settings=splits["valid"]["settings"],
        timing={s: splits[s]["timing"] for s in splits},
    )  # fmt: skip
    return out


def stage_projection(
    cfg: ReproduceConfig, seed: int, model: str, corpus: str, ds: str, tuned: dict, art: Path,
    *, lr_study: bool,
) -> dict:  # fmt: skip
    """Section 3 on the test split at the valid-tuned setting: Eq. 2 at lr 0.1 with the paper's
    early stop beside the converged solve and its sensitivity rows (Tables 1, 3), or lr 1e-3
    for 100 steps (Appendix E, Table 4)."""
    res = run_projection(
        load_lm(model), corpus, ds, "test", context_len=cfg.context_len, stride=cfg.stride,
        knn=knn_settings(cfg, tuned["knn_weight"], tuned["temperature"]),
        max_positions=min(cfg.projection_positions, 300) if lr_study else cfg.projection_positions,
        seed=seed, lr=1e-3 if lr_study else 0.1, max_steps=cfg.projection_max_steps,
        fixed_steps=100 if lr_study else None, progress=False,
        # The claim reads the converged solve; Table 4's paired test the per-position values.
        converged=not lr_study, converged_max_steps=cfg.projection_converged_max_steps,
        keep_positions=True,  # (b)'s and (b')'s bootstrap over positions
    )  # fmt: skip
    # The figure is drawn there by the report layer, from the per-position KL values
    # (or the KL curve) kept in this result.
    res.update(
        split="test",
        seed=seed,
        max_steps=100 if lr_study else cfg.projection_max_steps,
        tuned=tuned,
        figure=str(art / ("kl_steps.png" if lr_study else "kl_hist.png")),
    )
    return res


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
    """Section 5's equal-compute control (:mod:`knnlm.experiments.memory_control`)."""
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


def _train_memory(cfg: ReproduceConfig, seed: int, lm, store, art: Path, corpus: str):
    """The MLP memory on the datastore's (key, value) pairs, saved in ``art / "memory"``.

    With ``cfg.memory_eval_every``, training continues in chunks of that many steps (training
    is a function of the settings and the step, so chunks resume exactly) until the MLP's loss
    on the valid split's (key, target) pairs stops improving, or the epochs / the step cap
    ``memory_max_steps`` end it. Returns (the training result, the stopping record)."""

    def run(max_steps: int | None):
        return train_memory(
            store.keys, store.values, lm.adapter.output_embedding.detach(), art / "memory",
            hidden=cfg.memory_hidden, lr=cfg.memory_lr, batch_tokens=cfg.memory_batch_tokens,
            epochs=cfg.memory_epochs, max_steps=max_steps, seed=seed, progress=False,
            datastore={"path": str(store.path), "n": store.n},
        )  # fmt: skip

    every = cfg.memory_eval_every
    if not every:
        tr = run(cfg.memory_max_steps)
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
