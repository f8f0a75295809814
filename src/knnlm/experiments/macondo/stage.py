"""Section 4 in the reproduction: one stage, Macondo on the first LM of the run (at paper
scale the given --model or GPT-2 XL)."""

from __future__ import annotations

from pathlib import Path

from knnlm.experiments.macondo.run import contract_view, run_macondo
from knnlm.experiments.macondo.settings import MacondoSettings
from knnlm.experiments.reproduce_config import PAPER_SETTING, ReproduceConfig
from knnlm.experiments.stages import AnalysisStages, Done, Stage


def stage_macondo(
    cfg: ReproduceConfig, model: str | None, art: Path, sizes: dict | None = None
) -> dict:
    """Section 4: fine-tune ``model`` on Macondo, one dataset per seed generated with its
    tokenizer; per-n log-likelihood of the children (LM, kNN-LM, LM + MLP memory) on the test
    sentences, the LM's on the training sentences, and curves over fine-tuning steps.
    ``sizes`` replaces ``cfg.macondo_sizes`` (the second size's stage)."""
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
        sizes=cfg.macondo_sizes if sizes is None else sizes,
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


def _model(cfg: ReproduceConfig, done: Done) -> str | None:
    """Section 4 fine-tunes the first LM of this run (the paper fine-tunes GPT-2); at paper
    scale it is the given --model or GPT-2 XL."""
    return done[f"lm-{cfg.seeds[0]}"]["model"] if cfg.scale != "paper" else cfg.model


def _settings(cfg: ReproduceConfig, done: Done) -> dict:
    return {"model": _model(cfg, done)}


def _deps(cfg: ReproduceConfig) -> tuple[str, ...]:
    """The first LM's stage, when Section 4 fine-tunes that LM (at paper scale: when it is the
    given --model, which that stage passes through)."""
    return (f"lm-{cfg.seeds[0]}",) if cfg.scale != "paper" or cfg.model is not None else ()


def _run(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_macondo(cfg, _model(cfg, done), art)


def _run_small(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_macondo(cfg, _model(cfg, done), art, sizes=cfg.macondo_small_sizes)


def _stages(cfg: ReproduceConfig) -> list[Stage]:
    """``macondo``, and at corpus scale ``macondo-small`` (the quick scale's Macondo size)."""
    return [
        Stage("macondo", _run, deps=_deps(cfg), from_results=_settings),
        *([Stage("macondo-small", _run_small, deps=_deps(cfg), from_results=_settings)]
          if cfg.macondo_small_sizes else []),
    ]  # fmt: skip


def _results(cfg: ReproduceConfig, done: Done) -> dict:
    out = {"macondo": done["macondo"]}
    if "macondo-small" in done:
        out["macondo_small"] = done["macondo-small"]
    return out


STAGES = AnalysisStages(_results, after=_stages)
