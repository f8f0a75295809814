"""Pieces every report section uses: the seeds note, per-seed values, figures and settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.lm.presets import get_preset
from knnlm.report.tables import fmt_number, settings_table


def seeds_note(per_seed: Sequence[Mapping[str, Any]]) -> str:
    n = len(per_seed)
    names = ", ".join(str(p.get("seed", i)) for i, p in enumerate(per_seed))
    if n == 1:
        return f"one seed ({names}), so no spread"
    return f"mean ± sample std over {n} seeds ({names})"


def values_text(xs: Sequence[Any], fmt: str = "g") -> str:
    """One value if every seed agrees, else the per-seed values joined by " / "."""
    shown = [fmt_number(x, fmt) for x in xs]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def figure_md(figs: Mapping[str, Any], key: str, alt: str) -> str:
    return f"![{alt}]({figs[key]})\n\n" if figs.get(key) else ""


def settings_md(s: Mapping[str, Any] | None) -> str:
    return f"Settings:\n\n{settings_table(s)}\n\n" if s else ""


def lm_description(r: Mapping[str, Any]) -> str:
    """The run's natural-text LM in a few words ("a 2-layer, 64-wide LM trained here on the
    embedded WikiText-2 slice"), for the claims' scale column."""
    cfg = r.get("config") or {}
    if cfg.get("model"):
        lm = f"the pretrained {cfg['model']}"
    else:
        try:
            p = get_preset(str(cfg.get("lm_preset")))
            lm = f"a {p.n_layer}-layer, {p.n_embd}-wide LM trained here"
        except KnnlmError:
            lm = "the LM trained here"
    corpus = "the embedded WikiText-2 slice" if cfg.get("corpus") is None else cfg["corpus"]
    return f"{lm} on {corpus}"
