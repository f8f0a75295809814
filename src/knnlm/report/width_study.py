"""Section 3 against model width (``knnlm reproduce --width-study``): the share of the
LM -> kNN-LM gap the converged projection closes at each width d (the paper: d = 1024).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.report.analysis import Analysis, FigureSink, get_path
from knnlm.report.drawing import COLORS, plt, save_pyplot
from knnlm.report.section_parts import figure_md
from knnlm.report.tables import fmt_number, markdown_table


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


def width_trend(r: Mapping[str, Any]) -> str:
    rows = (r.get("width_study") or {}).get("rows") or []
    if not rows:
        return ". Width study: not run"
    cells = ", ".join(
        f"d={row['d']}: {_f(None if row['proj_f']['share'] is None else 100 * row['proj_f']['share'], '.0f')}%"
        for row in rows
    )
    return (
        f". Width study, share of the gap f(z*) closes (converged; the paper's d = 1024): {cells}"
    )


def width_text(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    """Section 3 against model width (``reproduce --width-study``), or why it is absent."""
    w = r.get("width_study")
    if not w or not w.get("rows"):
        return ("Width study: not run (`knnlm reproduce --width-study 64,128,256`; the paper's "
                "claim is made at d = 1024).\n\n")  # fmt: skip
    rows = [
        [row["d"], row.get("params"), row["lm"], row["knnlm"]]
        + [None if row[k]["share"] is None else f"{_f(100 * row[k]['share'], '.0f')}%"
           for k in ("proj_f", "proj_fg")]
        + [row["proj_f"]["kl_mean"], row["proj_f"]["kl_init_mean"]]
        for row in w["rows"]
    ]  # fmt: skip
    table = markdown_table(
        ["d", "parameters", "LM", "kNN-LM", "f(z*) closes", "f∘g(z*) closes", "KL f(z*)",
         "starting KL"],
        rows, floatfmt=["", "", ".2f", ".2f", "", "", ".4f", ".4f"], align=["r"] * 8,
    )  # fmt: skip
    return (
        f"**Width study.** The run's LM preset at each width d (LM seed {w.get('seed')}), each "
        "with its own datastore and valid-tuned kNN-LM, Eq. 2 solved to convergence on its "
        f"test positions (the paper: d = 1024).\n\n{table}\n\n"
        + figure_md(figs, "width", "share of the gap closed and KL against width")
    )


def plot_width(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Section 3 against width: share of the LM -> kNN-LM gap closed and converged mean KL."""
    if not rows:
        raise KnnlmError("no widths to draw")
    d = [r["d"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.0))
    for j, (key, name) in enumerate((("proj_f", "f(z*)"), ("proj_fg", "f∘g(z*)"))):
        share = [np.nan if r[key]["share"] is None else 100 * r[key]["share"] for r in rows]
        a1.plot(d, share, "o-", color=COLORS[j], label=name)
        a2.plot(d, [r[key]["kl_mean"] for r in rows], "o-", color=COLORS[j], label=name)
    a2.plot(d, [r["proj_f"]["kl_init_mean"] for r in rows], "s:", color="grey",
            label="starting KL (the LM)")  # fmt: skip
    a1.axhline(80, color="black", lw=1, label="claim (b): 80%")
    a2.axhline(0.1, color="black", lw=1, label="the paper's 0.1")
    for ax, ylabel in ((a1, "share of the LM -> kNN-LM gap closed (%)"),
                       (a2, "mean KL[f(z*) ‖ p_knnlm] (nats)")):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(d, [str(x) for x in d])
        ax.set_xlabel("model width d (the paper: 1024)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Eq. 2 solved to convergence, LMs differing only in width")
    return save_pyplot(fig, path)


def _evidence_figures(r: Mapping[str, Any], sink: FigureSink) -> None:
    if get_path(r, "width_study", "rows"):
        sink.draw(
            "width", "projection_width.png", lambda p: plot_width(r["width_study"]["rows"], p)
        )


# The width study is shown inside Section 3's section.
ANALYSIS = Analysis(key="width_study", title="Width study", evidence_figures=_evidence_figures)
