"""The natural-text part of the reproduction (Section 2), which Sections 3 and 5 build on.

``corpus``: the text and a tokenizer; per LM seed: train the LM (the baseline), build its
datastore over the train split, evaluate LM and kNN-LM on valid and test with cached
neighbours, choose (weight, temperature) on valid from the cache and read both the paper's
setting and the tuned one on test. The MLP memory (``mlp_memory/stage.py``) and the
projection (``projection/stage.py``) read these stages' results.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from knnlm.data import wikitext2
from knnlm.data.corpus import read_split, tokenize_text
from knnlm.errors import KnnlmError
from knnlm.evaluate import EvalSettings, run_eval
from knnlm.experiments.hurdle.settings import corpus_loss_fn
from knnlm.experiments.reproduce_config import PAPER_SETTING, ReproduceConfig
from knnlm.experiments.stages import AnalysisStages, Done, Stage
from knnlm.fileio import write_json_atomic
from knnlm.forward_pass import WindowSettings
from knnlm.lm.loading import load_lm
from knnlm.lm.presets import get_preset
from knnlm.lm.tokenizer import save_tokenizer
from knnlm.lm.train import model_from_preset, train
from knnlm.lm.train_config import TrainConfig
from knnlm.lm.train_data import train_tokenizer_for_corpus
from knnlm.retrieval.datastore import DatastoreSettings, make_datastore, open_datastore
from knnlm.retrieval.retriever import KnnSettings, MixSettings
from knnlm.retrieval.search.index_build import make_index
from knnlm.retrieval.search.index_settings import IndexSettings
from knnlm.sweep import sweep


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
    stride = cfg.context_len if cfg.stride is None else cfg.stride
    settings = DatastoreSettings("train", WindowSettings(cfg.context_len, stride))
    path = make_datastore(lm, corpus, art / "ds", settings, progress=False)
    out = {"datastore": str(path)}
    if cfg.index:
        t0 = time.perf_counter()
        index = IndexSettings(kind=cfg.index, nlist=cfg.index_nlist, seed=seed,
                              train_size=cfg.index_train_size,
                              nprobe=cfg.nprobe)  # None: the library default  # fmt: skip
        make_index(path, index, progress=False)
        out["index_seconds"] = time.perf_counter() - t0
    ds = open_datastore(path)
    out.update(n=ds.n, dim=ds.dim, key_type=ds.meta["key_type"], bytes=ds.storage_bytes())
    return out


def knn_settings(cfg: ReproduceConfig) -> KnnSettings:
    """How the reproduction searches (how p_knn is mixed in is the stage's MixSettings)."""
    return KnnSettings(nprobe=cfg.nprobe, k=cfg.k, search=cfg.search)


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
    knn = knn_settings(cfg)
    paper = MixSettings(
        knn_weight=PAPER_SETTING["knn_weight"], temperature=PAPER_SETTING["temperature"]
    )
    window = WindowSettings(cfg.context_len, cfg.context_len if cfg.stride is None else cfg.stride)
    splits: dict[str, dict] = {}
    grids: dict[str, dict] = {}
    for split in ("valid", "test"):
        cache = art / f"cache-{split}"
        res = run_eval(lm, corpus, EvalSettings(split, window, knn=knn, mix=paper),
                       datastore=ds, cache=cache, progress=False)  # fmt: skip
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


def seed_inputs(done: Done, seed: int) -> tuple[str, str, str]:
    """One LM seed's model, the corpus, and that LM's datastore."""
    return (
        done[f"lm-{seed}"]["model"],
        done["corpus"]["corpus"],
        done[f"datastore-{seed}"]["datastore"],
    )


def _run_corpus(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_corpus(cfg, art)


def _run_lm(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    corpus = done["corpus"]
    return stage_lm(cfg, seed, corpus["corpus"], corpus["tokenizer"], art)


def _run_datastore(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    return stage_datastore(cfg, seed, done[f"lm-{seed}"]["model"], done["corpus"]["corpus"], art)


def _run_knnlm(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    model, corpus, ds = seed_inputs(done, seed)
    return stage_knnlm(cfg, model, corpus, ds, art, seed=seed)


def _seed_stages(seed: int) -> list[Stage]:
    """Section 2 for one LM seed: lm, datastore, knnlm."""
    one, group = {"seed": seed}, f"seed-{seed}"
    return [
        Stage(f"lm-{seed}", _run_lm, deps=("corpus",), fixed=one, args=one, group=group),
        Stage(f"datastore-{seed}", _run_datastore, deps=(f"lm-{seed}",), args=one, group=group),
        Stage(f"knnlm-{seed}", _run_knnlm, deps=(f"datastore-{seed}",), args=one, group=group),
    ]


def _results(cfg: ReproduceConfig, done: Done) -> dict:
    seeds = cfg.seeds
    first = done[f"knnlm-{seeds[0]}"]
    knnlm = {
        "seeds": seeds,
        "paper_setting": dict(PAPER_SETTING),
        "per_seed": [
            {"seed": s, **{k: done[f"knnlm-{s}"][k] for k in ("tuned", "valid", "test", "figure")}}
            for s in seeds
        ],
        "sweep": first["sweep"],
        "figure": first["figure"],
        "settings": first["settings"],
    }
    return {
        "corpus": done["corpus"],
        "lm": [done[f"lm-{s}"] for s in seeds],
        "datastore": [done[f"datastore-{s}"] for s in seeds],
        "knnlm": knnlm,
    }


STAGES = AnalysisStages(
    _results, before=lambda cfg: [Stage("corpus", _run_corpus)], per_seed=_seed_stages
)
