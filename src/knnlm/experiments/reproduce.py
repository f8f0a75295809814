"""``knnlm reproduce``: every analysis of the paper, end to end.

The pipeline composes the library; it re-implements nothing. Stages (cached, see
:mod:`knnlm.experiments.pipeline`) in order:

1. ``corpus``: the natural text (the embedded WikiText-2 slice at quick scale) and a tokenizer;
2. per LM seed: ``lm-S``, ``datastore-S``, ``knnlm-S`` (Section 2: tuned on valid, read on
   test), ``memory-S`` (Section 5);
3. ``projection`` / ``projection_lr`` (Section 3, first seed, test split, tuned setting);
4. ``macondo`` (Section 4: the first seed's LM fine-tuned on Macondo, one dataset per seed);
5. ``hurdle`` (Appendix E: Figure 4 on Macondo, Figure 5 on the natural text).

``results.json`` follows the contract the report's claims read (``knnlm``, ``projection``,
``memory``, ``macondo``, ``hurdle``, ``not_run``, ``config``, ``stages``, ``wall_seconds``).
This module computes and saves; the report layer draws the figures, the claims and the
report from those results.
Settings and scales: :mod:`knnlm.experiments.reproduce_config`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from knnlm.experiments import natural_text as nt
from knnlm.experiments.pipeline import Pipeline, StageDisplay
from knnlm.experiments.reproduce_config import PAPER_SETTING, ReproduceConfig
from knnlm.fileio import claim_work_dir, write_json_atomic
from knnlm.lm.loading import torch_threads

__all__ = ["ReproduceConfig", "reproduce", "not_run"]


def stage_macondo(cfg: ReproduceConfig, model: str | None, art: Path) -> dict:
    """Section 4: fine-tune ``model`` on Macondo, one dataset per seed generated with its
    tokenizer; per-n log-likelihood of the children (LM, kNN-LM, LM + MLP memory) on the test
    sentences, the LM's on the training sentences, and curves over fine-tuning steps."""
    from knnlm.experiments.overspec import contract_view, run_macondo

    res = run_macondo(
        art,
        model=model,
        seeds=[cfg.seed + s for s in range(cfg.macondo_seeds)],
        preset=cfg.macondo_preset,
        k=cfg.k,
        knn_weight=PAPER_SETTING["knn_weight"],
        temperature=PAPER_SETTING["temperature"],
        epochs=cfg.macondo_epochs,
        lr=cfg.macondo_lr,
        eval_every=cfg.macondo_eval_every,
        macondo_kwargs=cfg.macondo_sizes or None,
        memory=cfg.macondo_memory,
        progress=False,
    )
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
    from knnlm.experiments.hurdle import run_hurdle

    res = run_hurdle(
        art,
        seeds=[cfg.seed + s for s in range(cfg.hurdle_seeds)],
        steps=cfg.hurdle_steps,
        eval_every=cfg.hurdle_eval_every,
        corpus=corpus,
        quick=cfg.scale != "paper",
        corpus_max_chars=cfg.hurdle_corpus_max_chars,
        progress=False,
        **{k: v for k, v in cfg.hurdle_sizes.items() if v is not None},
    )
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


def reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool = True) -> dict:
    """Run every stage (or reuse cached ones) and write ``results.json``; the report layer
    writes the report from it. Returns its content."""
    with torch_threads(cfg.torch_threads):
        return _reproduce(cfg, out, progress)


def _reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool) -> dict:
    # Resumes a reproduction of ours; a folder of the user's own files is refused, untouched.
    out = claim_work_dir(Path(out).expanduser(), "reproduction")
    t_start = time.perf_counter()

    display = StageDisplay(progress)
    pipe = Pipeline(out, on_stage=display.update)
    seeds = cfg.seeds
    pipe.total = 1 + 4 * len(seeds) + 4
    s = asdict(cfg)
    pick = lambda *keys: {k: s[k] for k in keys}  # noqa: E731
    try:
        data = pipe.run(
            "corpus",
            pick("corpus", "embedded_chars", "model", "lm_preset", "tokenizer_vocab"),
            [],
            lambda art: nt.stage_corpus(cfg, art),
        )
        corpus, tok_dir = data["corpus"], data["tokenizer"]
        per_seed: dict[int, dict] = {}
        for seed in seeds:
            lm_res = pipe.run(
                f"lm-{seed}",
                pick("model", "lm_preset", "lm_epochs", "lm_max_steps", "context_len")
                | {"seed": seed},
                ["corpus"],
                lambda art, seed=seed: nt.stage_lm(cfg, seed, corpus, tok_dir, art),
            )
            model = lm_res["model"]
            ds_res = pipe.run(
                f"datastore-{seed}",
                pick("context_len", "stride", "index", "index_nlist", "index_train_size"),
                [f"lm-{seed}"],
                lambda art, seed=seed, model=model: nt.stage_datastore(
                    cfg, seed, model, corpus, art
                ),
            )
            ds = ds_res["datastore"]
            knn_res = pipe.run(
                f"knnlm-{seed}",
                pick("k", "nprobe", "search", "sweep_weights", "sweep_temperatures"),
                [f"datastore-{seed}"],
                lambda art, model=model, ds=ds: nt.stage_knnlm(cfg, model, corpus, ds, art),
            )
            mem_res = pipe.run(
                f"memory-{seed}",
                pick("memory_hidden", "memory_epochs", "memory_lr", "memory_batch_tokens",
                     "memory_max_steps", "memory_weights") | {"seed": seed},
                [f"datastore-{seed}", f"knnlm-{seed}"],
                lambda art, seed=seed, model=model, ds=ds, kr=knn_res: nt.stage_memory(
                    cfg, seed, model, corpus, ds, kr, art
                ),
            )  # fmt: skip
            per_seed[seed] = {"lm": lm_res, "datastore": ds_res, "knnlm": knn_res,
                              "memory": mem_res}  # fmt: skip

        first = per_seed[seeds[0]]
        model0, ds0, tuned0 = (
            first["lm"]["model"], first["datastore"]["datastore"], first["knnlm"]["tuned"]
        )  # fmt: skip
        proj = {}
        for name, lr_study in (("projection", False), ("projection_lr", True)):
            proj[name] = pipe.run(
                name,
                pick("projection_positions", "projection_max_steps") | {"seed": seeds[0]},
                [f"knnlm-{seeds[0]}"],
                lambda art, lr_study=lr_study: nt.stage_projection(
                    cfg, seeds[0], model0, corpus, ds0, tuned0, art, lr_study=lr_study
                ),
            )
        # Section 4 fine-tunes the first LM of this run (the paper fine-tunes GPT-2); at paper
        # scale it is the given --model or GPT-2 XL.
        mac_model = model0 if cfg.scale != "paper" else cfg.model
        macondo = pipe.run(
            "macondo",
            pick("macondo_seeds", "macondo_preset", "macondo_epochs", "macondo_lr",
                 "macondo_sizes", "macondo_eval_every", "macondo_memory", "k", "seed")
            | {"model": mac_model},
            [f"lm-{seeds[0]}"] if mac_model == model0 else [],
            lambda art: stage_macondo(cfg, mac_model, art),
        )  # fmt: skip
        hurdle = pipe.run(
            "hurdle",
            pick("hurdle_seeds", "hurdle_steps", "hurdle_eval_every", "hurdle_sizes",
                 "hurdle_corpus_max_chars", "seed") | {"corpus": corpus},
            ["corpus"],
            lambda art: stage_hurdle(cfg, corpus, art),
        )  # fmt: skip
        results = _assemble(cfg, data, per_seed, proj, macondo, hurdle)
        results["stages"] = pipe.stage_times()
        results["wall_seconds"] = time.perf_counter() - t_start
        write_json_atomic(out / "results.json", results)
    finally:
        display.close()
    return json.loads((out / "results.json").read_text())


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
                {k: r[k] for k in ("seed", "weight", "valid", "test", "weight_sweep", "train")}
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
