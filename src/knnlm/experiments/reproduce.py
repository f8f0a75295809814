"""``knnlm reproduce``: every analysis of the paper, end to end.

The pipeline composes the library; it re-implements nothing. Stages (cached, see
:mod:`knnlm.experiments.stages`) in order:

1. ``corpus``: the natural text (the embedded WikiText-2 slice at quick scale) and a tokenizer;
2. per LM seed: ``lm-S``, ``datastore-S``, ``knnlm-S`` (Section 2: tuned on valid, read on
   test), ``memory-S`` (Section 5);
3. ``projection`` / ``projection_lr`` (Section 3, first seed, test split, tuned setting);
4. ``macondo`` (Section 4: the first seed's LM fine-tuned on Macondo, one dataset per seed);
5. ``hurdle`` (Appendix E: Figure 4 on Macondo, Figure 5 on the natural text).

``results.json`` follows the contract the report's claims read (``knnlm``, ``projection``,
``memory``, ``macondo``, ``hurdle``, ``not_run``, ``config``, ``stages``, ``wall_seconds``,
``provenance``: versions, commit, machine and UTC times, see :mod:`knnlm.provenance`).
This module computes and saves; the report layer draws the figures, the claims and the
report from those results.
Settings and scales: :mod:`knnlm.experiments.reproduce_config`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from knnlm.experiments import natural_text as nt
from knnlm.experiments.hurdle import run_hurdle
from knnlm.experiments.hurdle_setup import hurdle_settings
from knnlm.experiments.macondo import contract_view, run_macondo
from knnlm.experiments.macondo_settings import MacondoSettings
from knnlm.experiments.parallel import pool, submit
from knnlm.experiments.reproduce_config import PAPER_SETTING, ReproduceConfig
from knnlm.experiments.stages import Pipeline, StageDisplay
from knnlm.fileio import claim_work_dir, write_json_atomic
from knnlm.lm.loading import pick_device, torch_threads
from knnlm.locking import locks
from knnlm.provenance import provenance, utc_now

__all__ = ["reproduce", "not_run"]


def stage_macondo(cfg: ReproduceConfig, model: str | None, art: Path) -> dict:
    """Section 4: fine-tune ``model`` on Macondo, one dataset per seed generated with its
    tokenizer; per-n log-likelihood of the children (LM, kNN-LM, LM + MLP memory) on the test
    sentences, the LM's on the training sentences, and curves over fine-tuning steps."""
    settings = MacondoSettings.from_preset(
        cfg.macondo_preset,
        model=model,
        seeds=[cfg.seed + s for s in range(cfg.macondo_seeds)],
        k=cfg.k,
        knn_weight=PAPER_SETTING["knn_weight"],
        temperature=PAPER_SETTING["temperature"],
        epochs=cfg.macondo_epochs,
        lr=cfg.macondo_lr,
        eval_every=cfg.macondo_eval_every,
        sizes=cfg.macondo_sizes,
        memory=cfg.macondo_memory,
        tune=cfg.macondo_tune,
        workers=cfg.workers,
    )
    res = run_macondo(settings, art, progress=False)
    out = contract_view(res)
    out.update(
        groups=res["groups"],
        reproduced=res["reproduced"],
        settings=res["settings"],
        seconds=res["seconds"],
        figure1=str(art / res["files"]["figure1"]),
        table5=str(art / res["files"]["table"]),
    )
    if "figure3" in res["files"]:
        out["figure3"] = str(art / res["files"]["figure3"])
    return out


def stage_hurdle(cfg: ReproduceConfig, corpus: str | None, art: Path) -> dict:
    """Appendix E: with vs without the last MLP, Macondo log-likelihood (Figure 4) and the
    natural-text training loss (Figure 5), per seed, step 0 recorded."""
    settings = hurdle_settings(
        "full" if cfg.scale == "paper" else "quick",
        seeds=tuple(cfg.seed + s for s in range(cfg.hurdle_seeds)),
        steps=cfg.hurdle_steps,
        eval_every=cfg.hurdle_eval_every,
        corpus=corpus,
        corpus_max_chars=cfg.hurdle_corpus_max_chars,
        **cfg.hurdle_sizes,
    )
    res = run_hurdle(settings, art, progress=False)
    w, wo = res["with_mlp"], res["without_mlp"]
    loss = None
    if w.get("loss_eval_steps"):
        loss = {
            "steps": w["loss_eval_steps"],
            "with_mlp": w["loss_eval_per_seed"],
            "without_mlp": wo["loss_eval_per_seed"],
            "measured_on": "a fixed sample of training blocks (same for both variants)",
        }
    return {
        "seeds": res["settings"]["seeds"],
        "loglik": {
            "steps": w["steps"],
            "with_mlp": w["loglik_per_seed"],
            "without_mlp": wo["loglik_per_seed"],
        },
        "loss": loss,
        "figure4": str(art / "figure4.png"),
        "figure5": str(art / "figure5.png") if res["settings"]["corpus"] else None,
        "summary": res["summary"],
        "params": res["params"],
        "settings": res["settings"],
        "wall_seconds": res["wall_seconds"],
    }


def not_run(cfg: ReproduceConfig) -> list[dict]:
    """What the paper has and this run does not, why, and the command that would do it."""
    out = [
        {
            "what": "Figure 2: GPT-3.5 Turbo fine-tuned on Macondo-Conv",
            "why": "a hosted chat model fine-tuned through the OpenAI API: needs an account, "
            "network access and paid fine-tuning; nothing here can reach it",
            "command": "knnlm macondo generate --conv --seed S --out macondo-conv-S  # S = 0..4; "
            "fine-tune on its chat JSONL through the API and read the test loss",
        },
    ]
    if cfg.scale != "paper":
        out += [
            {
                "what": "Figures 1 and 3 with GPT-2 XL and Mistral-7B (Section 4, App. C.1)",
                "why": "needs the pretrained weights (no model hub here) and a GPU",
                "command": "knnlm macondo run --model gpt2-xl --preset paper-gpt2 --seeds 5 "
                "--eval-every 1000 --out macondo-gpt2xl  # and --model "
                "mistralai/Mistral-7B-v0.1 --preset paper-mistral",
            },
            {
                "what": "Sections 2, 3, 5 at paper scale (WikiText-103, 16-layer LM, k=1024)",
                "why": "WikiText-103 (540 MB) and the 247M-parameter LM need a GPU and days of "
                "CPU time; this run uses "
                + ("the embedded WikiText-2 slice" if cfg.corpus is None else cfg.corpus),
                "command": "knnlm reproduce --preset paper --model PATH_TO_TRAINED_LM --out "
                "reproduction-paper",
            },
        ]
    return out


@locks("out", "reproduction")
def reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool = True) -> dict:
    """Run every stage (or reuse cached ones) and write ``results.json``; the report layer
    writes the report from it. Returns its content."""
    with torch_threads(cfg.torch_threads):
        return _reproduce(cfg, out, progress)


def _pick(cfg: ReproduceConfig, *keys: str) -> dict:
    s = asdict(cfg)
    return {k: s[k] for k in keys}


def _stage_corpus(pipe: Pipeline, cfg: ReproduceConfig) -> dict:
    return pipe.run(
        "corpus",
        _pick(cfg, "corpus", "embedded_chars", "model", "lm_preset", "tokenizer_vocab"),
        [],
        lambda art: nt.stage_corpus(cfg, art),
    )


def _seed_chain(pipe: Pipeline, cfg: ReproduceConfig, data: dict, seed: int) -> dict:
    """Sections 2 and 5 for one LM seed: lm, datastore, knnlm, memory."""
    corpus, tok_dir = data["corpus"], data["tokenizer"]
    lm_res = pipe.run(
        f"lm-{seed}",
        _pick(cfg, "model", "lm_preset", "lm_epochs", "lm_max_steps", "context_len")
        | {"seed": seed},
        ["corpus"],
        lambda art: nt.stage_lm(cfg, seed, corpus, tok_dir, art),
    )
    model = lm_res["model"]
    ds_res = pipe.run(
        f"datastore-{seed}",
        _pick(cfg, "context_len", "stride", "index", "index_nlist", "index_train_size"),
        [f"lm-{seed}"],
        lambda art: nt.stage_datastore(cfg, seed, model, corpus, art),
    )
    ds = ds_res["datastore"]
    knn_res = pipe.run(
        f"knnlm-{seed}",
        _pick(cfg, "k", "nprobe", "search", "sweep_weights", "sweep_temperatures"),
        [f"datastore-{seed}"],
        lambda art: nt.stage_knnlm(cfg, model, corpus, ds, art, seed=seed),
    )
    mem_res = pipe.run(
        f"memory-{seed}",
        _pick(cfg, "memory_hidden", "memory_epochs", "memory_lr", "memory_batch_tokens",
              "memory_max_steps", "memory_weights", "memory_control") | {"seed": seed},
        [f"datastore-{seed}", f"knnlm-{seed}"],
        lambda art: nt.stage_memory(cfg, seed, model, corpus, ds, knn_res, art),
    )  # fmt: skip
    return {"lm": lm_res, "datastore": ds_res, "knnlm": knn_res, "memory": mem_res}


def _stage_hurdle(pipe: Pipeline, cfg: ReproduceConfig, corpus: str) -> dict:
    return pipe.run(
        "hurdle",
        _pick(cfg, "hurdle_seeds", "hurdle_steps", "hurdle_eval_every", "hurdle_sizes",
              "hurdle_corpus_max_chars", "seed") | {"corpus": corpus},
        ["corpus"],
        lambda art: stage_hurdle(cfg, corpus, art),
    )  # fmt: skip


def _worker(cfg: ReproduceConfig, out: Path, seeds: list[int]) -> list[str]:
    """The second process's share: Appendix E and some LM seeds, into the same stage cache
    (each stage its own files); returns the stages it ran. The main process reads them back."""
    with torch_threads(cfg.torch_threads):
        pipe = Pipeline(out)
        data = _stage_corpus(pipe, cfg)  # cached by the main process: read, not rerun
        _stage_hurdle(pipe, cfg, data["corpus"])
        for seed in seeds:
            _seed_chain(pipe, cfg, data, seed)
    return [n for n, rec in pipe.records.items() if not rec.cached]


def _reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool) -> dict:
    # Resumes a reproduction of ours; a folder of the user's own files is refused, untouched.
    out = claim_work_dir(Path(out).expanduser(), "reproduction")
    t_start = time.perf_counter()
    started = utc_now()
    display = StageDisplay(progress)
    pipe = Pipeline(out, on_stage=display.update)
    seeds = cfg.seeds
    pipe.total = 1 + 4 * len(seeds) + 4
    # With 2 workers a second process takes Appendix E and every other LM seed from seed 1.
    theirs = seeds[1::2] if cfg.workers > 1 else []
    ex = pool(1) if cfg.workers > 1 else None
    try:
        data = _stage_corpus(pipe, cfg)
        job = submit(ex, _worker, (cfg, out, theirs), cfg.torch_threads) if ex else None
        per_seed = {s: _seed_chain(pipe, cfg, data, s) for s in seeds if s not in theirs}
        proj, macondo = _sections_3_4(pipe, cfg, data, seeds[0], per_seed[seeds[0]])
        width = _width_study(pipe, cfg, data, seeds[0], proj["projection"])
        ran_there = job.result() if job else []
        per_seed |= {s: _seed_chain(pipe, cfg, data, s) for s in theirs}
        per_seed = {s: per_seed[s] for s in seeds}
        hurdle = _stage_hurdle(pipe, cfg, data["corpus"])
        for name in ran_there:  # computed in this invocation, by the other process
            pipe.records[name].cached = False
        results = _assemble(cfg, data, per_seed, proj, macondo, hurdle)
        if width is not None:
            results["width_study"] = width
        results["stages"] = pipe.stage_times()
        results["wall_seconds"] = time.perf_counter() - t_start
        results["workers"] = {"processes": cfg.workers, "second_process_ran": ran_there}
        # Outside every stage key: a resumed run on another machine still reuses its stages.
        results["provenance"] = provenance(
            started=started, threads=torch.get_num_threads(), device=str(pick_device())
        )
        write_json_atomic(out / "results.json", results)
    finally:
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
        display.close()
    return json.loads((out / "results.json").read_text())


def _width_study(pipe: Pipeline, cfg: ReproduceConfig, data: dict, seed0: int, main: dict):
    """Section 3 at each width of ``cfg.width_study``; the run's own LM is its width's row."""
    if not cfg.width_study:
        return None
    from knnlm.experiments.width_study import stage_width, width_row
    from knnlm.lm.presets import get_preset

    own = get_preset(cfg.lm_preset).n_embd if cfg.model is None else None
    rows = []
    for d in sorted({int(x) for x in cfg.width_study}):
        if d == own:
            rows.append(width_row(d, main) | {"tuned": main.get("tuned"), "main_lm": True})
            continue
        rows.append(pipe.run(
            f"width-{d}",
            _pick(cfg, "lm_preset", "lm_epochs", "lm_max_steps", "context_len", "stride", "k",
                  "sweep_weights", "sweep_temperatures", "projection_positions",
                  "projection_converged_max_steps") | {"seed": seed0, "d": d},
            ["corpus"],
            lambda art, d=d: stage_width(cfg, d, seed0, data, art),
        ))  # fmt: skip
    return {"seed": seed0, "preset": cfg.lm_preset, "rows": rows}


def _sections_3_4(pipe: Pipeline, cfg: ReproduceConfig, data: dict, seed0: int, first: dict):
    """Section 3 (first LM seed) and Section 4 (that LM fine-tuned on Macondo)."""
    model0, ds0 = first["lm"]["model"], first["datastore"]["datastore"]
    tuned0 = first["knnlm"]["tuned"]
    proj = {}
    for name, lr_study in (("projection", False), ("projection_lr", True)):
        proj[name] = pipe.run(
            name,
            _pick(cfg, "projection_positions", "projection_max_steps",
                  "projection_converged_max_steps") | {"seed": seed0},
            [f"knnlm-{seed0}"],
            lambda art, lr_study=lr_study: nt.stage_projection(
                cfg, seed0, model0, data["corpus"], ds0, tuned0, art, lr_study=lr_study
            ),
        )  # fmt: skip
    # Section 4 fine-tunes the first LM of this run (the paper fine-tunes GPT-2); at paper
    # scale it is the given --model or GPT-2 XL.
    mac_model = model0 if cfg.scale != "paper" else cfg.model
    macondo = pipe.run(
        "macondo",
        _pick(cfg, "macondo_seeds", "macondo_preset", "macondo_epochs", "macondo_lr",
              "macondo_sizes", "macondo_eval_every", "macondo_memory", "macondo_tune", "k",
              "seed") | {"model": mac_model},
        [f"lm-{seed0}"] if mac_model == model0 else [],
        lambda art: stage_macondo(cfg, mac_model, art),
    )  # fmt: skip
    return proj, macondo


def _assemble(cfg, data, per_seed, proj, macondo, hurdle) -> dict:
    """results.json in the contract's shape (lists per seed, in the order of ``seeds``)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    knn = [per_seed[s]["knnlm"] for s in seeds]
    mem = [per_seed[s]["memory"] for s in seeds]
    return {
        "config": asdict(cfg),
        "corpus": data,
        "lm": [per_seed[s]["lm"] for s in seeds],
        "datastore": [per_seed[s]["datastore"] for s in seeds],
        "knnlm": {
            "seeds": seeds,
            "paper_setting": dict(PAPER_SETTING),
            "per_seed": [
                {
                    "seed": s,
                    "tuned": r["tuned"],
                    "valid": r["valid"],
                    "test": r["test"],
                    "figure": r["figure"],
                }
                for s, r in zip(seeds, knn, strict=True)
            ],
            "sweep": first["knnlm"]["sweep"],
            "figure": first["knnlm"]["figure"],
            "settings": first["knnlm"]["settings"],
        },
        "projection": {"lr_0.1": proj["projection"], "lr_0.001": proj["projection_lr"]},
        "memory": {
            "seeds": seeds,
            "per_seed": [
                {
                    k: r.get(k)
                    for k in ("seed", "weight", "valid", "test", "weight_sweep", "train", "control")
                }
                for r in mem
            ],
            "storage": first["memory"]["storage"],
            "settings": {
                "hidden": cfg.memory_hidden,
                "epochs": cfg.memory_epochs,
                "lr": cfg.memory_lr,
                "batch_tokens": cfg.memory_batch_tokens,
                "max_steps": cfg.memory_max_steps,
                "weights": cfg.memory_weights,
                "weight_tuned_on": "valid",
            },  # fmt: skip
        },
        "macondo": macondo,
        "hurdle": hurdle,
        "not_run": not_run(cfg),
    }
