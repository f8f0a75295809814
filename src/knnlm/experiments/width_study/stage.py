"""Section 3 at other widths in the reproduction (``--width-study``): one stage per width
other than the run's own LM's, whose row is read off the projection."""

from __future__ import annotations

from pathlib import Path

from knnlm.experiments.reproduce_config import ReproduceConfig
from knnlm.experiments.stages import AnalysisStages, Done, Stage
from knnlm.experiments.width_study.run import rows_over_seeds, stage_width, width_row
from knnlm.lm.presets import get_preset


def widths(cfg: ReproduceConfig) -> list[int]:
    return sorted({int(x) for x in cfg.width_study or ()})


def own_width(cfg: ReproduceConfig) -> int | None:
    """The width of the run's own LM (its row of the width study), when it trains one."""
    return get_preset(cfg.lm_preset).n_embd if cfg.model is None else None


def width_seeds(cfg: ReproduceConfig) -> list[int]:
    return [cfg.seed + s for s in range(cfg.width_seeds)]


def _stage_name(d: int, seed: int, seed0: int) -> str:
    """``width-D`` for the first seed (the quick run's one), ``width-D-seed-S`` for others."""
    return f"width-{d}" if seed == seed0 else f"width-{d}-seed-{seed}"


def _run(cfg: ReproduceConfig, done: Done, art: Path, seed: int, d: int) -> dict:
    return stage_width(cfg, d, seed, done["corpus"], art)


def _stages(cfg: ReproduceConfig) -> list[Stage]:
    seed0 = cfg.seeds[0]
    return [Stage(_stage_name(d, s, seed0), _run, deps=("corpus",), fixed={"seed": s, "d": d},
                  args={"seed": s, "d": d})
            for d in widths(cfg) for s in width_seeds(cfg)
            if (d, s) != (own_width(cfg), seed0)]  # fmt: skip


def _results(cfg: ReproduceConfig, done: Done) -> dict:
    """Section 3 at each width of ``cfg.width_study``; the run's own LM is its width's row."""
    if not cfg.width_study:
        return {}
    main, seed0 = done["projection"], cfg.seeds[0]
    own = width_row(own_width(cfg) or 0, main) | {"tuned": main.get("tuned"), "main_lm": True}
    rows = [
        rows_over_seeds([(s, own if (d, s) == (own_width(cfg), seed0)
                             else done[_stage_name(d, s, seed0)]) for s in width_seeds(cfg)])
        for d in widths(cfg)
    ]  # fmt: skip
    return {"width_study": {"seed": seed0, "seeds": width_seeds(cfg), "preset": cfg.lm_preset,
                            "rows": rows}}  # fmt: skip


STAGES = AnalysisStages(_results, after=_stages)
