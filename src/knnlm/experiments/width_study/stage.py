"""Section 3 at other widths in the reproduction (``--width-study``): one stage per width
other than the run's own LM's, whose row is read off the projection."""

from __future__ import annotations

from pathlib import Path

from knnlm.experiments.reproduce_config import ReproduceConfig
from knnlm.experiments.stages import AnalysisStages, Done, Stage
from knnlm.experiments.width_study.run import stage_width, width_row
from knnlm.lm.presets import get_preset


def widths(cfg: ReproduceConfig) -> list[int]:
    return sorted({int(x) for x in cfg.width_study or ()})


def own_width(cfg: ReproduceConfig) -> int | None:
    """The width of the run's own LM (its row of the width study), when it trains one."""
    return get_preset(cfg.lm_preset).n_embd if cfg.model is None else None


def _run(cfg: ReproduceConfig, done: Done, art: Path, seed: int, d: int) -> dict:
    return stage_width(cfg, d, seed, done["corpus"], art)


def _stages(cfg: ReproduceConfig) -> list[Stage]:
    at0 = {"seed": cfg.seeds[0]}
    return [Stage(f"width-{d}", _run, deps=("corpus",), fixed=at0 | {"d": d},
                  args=at0 | {"d": d}) for d in widths(cfg) if d != own_width(cfg)]  # fmt: skip


def _results(cfg: ReproduceConfig, done: Done) -> dict:
    """Section 3 at each width of ``cfg.width_study``; the run's own LM is its width's row."""
    if not cfg.width_study:
        return {}
    main = done["projection"]
    rows = [
        width_row(d, main) | {"tuned": main.get("tuned"), "main_lm": True}
        if d == own_width(cfg)
        else done[f"width-{d}"]
        for d in widths(cfg)
    ]
    return {"width_study": {"seed": cfg.seeds[0], "preset": cfg.lm_preset, "rows": rows}}


STAGES = AnalysisStages(_results, after=_stages)
