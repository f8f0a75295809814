"""Appendix E in the reproduction: one stage, the hurdle on Macondo and on the run's corpus,
in its own group (the second process takes it)."""

from __future__ import annotations

from pathlib import Path

from knnlm.experiments.hurdle.run import run_hurdle
from knnlm.experiments.hurdle.settings import hurdle_settings
from knnlm.experiments.reproduce_config import ReproduceConfig
from knnlm.experiments.stages import AnalysisStages, Done, Stage


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


def _settings(cfg: ReproduceConfig, done: Done) -> dict:
    return {"corpus": done["corpus"]["corpus"]}


def _run(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_hurdle(cfg, done["corpus"]["corpus"], art)


STAGES = AnalysisStages(
    lambda cfg, done: {"hurdle": done["hurdle"]},
    after=lambda cfg: [
        Stage("hurdle", _run, deps=("corpus",), group="hurdle", from_results=_settings)
    ],
)
