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
from knnlm.experiments.stats import MIN_SEEDS
from knnlm.report.analysis import Analysis, Claim, FigureSink, get_path
from knnlm.report.drawing import COLORS, plt, save_pyplot
from knnlm.report.section_parts import figure_md
from knnlm.report.tables import fmt_number, markdown_table
from knnlm.report.verdicts import HELD, INCONCLUSIVE, NOT_HELD, UNTESTABLE, verdict


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


# The width trend, our check beyond the paper (which ran one width, d = 1024): does the share of
# the LM -> kNN-LM gap f(z*) closes rise with d? Minimum effect: a rise of 10 points of the gap
# from the smallest to the largest width, a tenth of what the claim's 80% reads.
WIDTH_MIN_RISE = 0.1
CLAIM_W = (
    "(b-width) our check: the share of the gap f(z*) closes rises with the model's width, toward "
    "the paper's d = 1024"
)
CRITERION_W = (
    "not the paper's; from the converged solves of LMs differing only in d, the share of the gap "
    "f(z*) closes at the smallest and the largest width, each with one-sided 95% bounds (t bounds "
    f"over LM seeds where a width has {MIN_SEEDS} or more, else a seeded bootstrap over "
    "positions); held if the largest width's lower bound lies above the smallest's upper bound; "
    "not held if even the largest width's upper bound minus the smallest's lower bound "
    f"is under {100 * WIDTH_MIN_RISE:g} points (minimum effect: a tenth of the claim's 80%); "
    "inconclusive otherwise. The KL bound of 0.1 says nothing at a width whose starting KL is "
    "already near it"
)


def _pct(x: Any) -> str:
    return _f(None if x is None else 100 * x, ".0f") + "%"


def row_share(row: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any] | None, str]:
    """f(z*)'s share of the gap at one width: over seeds (mean, t bounds) where the row has
    MIN_SEEDS or more, else the first seed's with its bootstrap bounds over positions."""
    f = row["proj_f"]
    over = f.get("share_over_seeds")
    if over and over.get("n", 0) >= MIN_SEEDS:
        return over["mean"], over, "seeds"
    return f["share"], f.get("share_interval"), "positions"


def claim_width(r: Mapping[str, Any]) -> dict:
    w = r["width_study"]
    rows = sorted(w["rows"], key=lambda row: row["d"])
    reads = [row_share(row) for row in rows]
    cells = "; ".join(
        f"d={row['d']}: {_pct(share)}"
        + (f" [{_pct(iv['lower'])}, {_pct(iv['upper'])}] over {iv['n']} {over}" if iv else "")
        + f", KL {_f(row['proj_f']['kl_mean'], '.4f')} from {_f(row['proj_f']['kl_init_mean'], '.4f')}"
        for row, (share, iv, over) in zip(rows, reads, strict=True)
    )  # fmt: skip
    shares = [share for share, _, _ in reads]
    monotone = all(
        a is not None and b is not None and b >= a for a, b in zip(shares, shares[1:], strict=False)
    )
    by_seeds = all(over == "seeds" for _, _, over in reads)
    evidence = (
        f"share of the gap f(z*) closes, one-sided 95% bounds: {cells}; "
        f"{'monotone' if monotone else 'not monotone'} in d. "
        + (f"Mean and t bounds over LM seeds {w.get('seeds')} at every width (the KL: seed "
           f"{w.get('seed')})" if by_seeds else
           f"Fewer than {MIN_SEEDS} LM seeds at some width: there the bootstrap over positions "
           f"of seed {w.get('seed')}, which covers the positions, not the seeds")
    )  # fmt: skip
    lo, hi = reads[0][1], reads[-1][1]
    if len(rows) < 2 or not lo or not hi:
        status = UNTESTABLE
        evidence += "; needs two widths with per-position records or seeds"
    elif hi["lower"] > lo["upper"]:
        status = HELD
    elif hi["upper"] - lo["lower"] < WIDTH_MIN_RISE:
        status = NOT_HELD
    else:
        status = INCONCLUSIVE
    return verdict(CLAIM_W, status, CRITERION_W, evidence,
                   scale="paper: one width, d = 1024; here: d = "
                   + ", ".join(str(row["d"]) for row in rows))  # fmt: skip


def _share_cell(q: Mapping[str, Any]) -> str | None:
    """The share of the gap: the mean over seeds with its bounds, where the row has seeds."""
    iv = q.get("share_over_seeds")
    if iv:
        return f"{_pct(iv['mean'])} [{_pct(iv['lower'])}, {_pct(iv['upper'])}], {iv['n']} seeds"
    return None if q["share"] is None else _pct(q["share"])


def width_text(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    """Section 3 against model width (``reproduce --width-study``), or why it is absent."""
    w = r.get("width_study")
    if not w or not w.get("rows"):
        return ("Width study: not run (`knnlm reproduce --width-study 64,128,256`; the paper's "
                "claim is made at d = 1024).\n\n")  # fmt: skip
    rows = [
        [row["d"], row.get("params"), row["lm"], row["knnlm"]]
        + [_share_cell(row[k]) for k in ("proj_f", "proj_fg")]
        + [row["proj_f"]["kl_mean"], row["proj_f"]["kl_init_mean"]]
        for row in w["rows"]
    ]  # fmt: skip
    table = markdown_table(
        ["d", "parameters", "LM", "kNN-LM", "f(z*) closes", "f∘g(z*) closes", "KL f(z*)",
         "starting KL"],
        rows, floatfmt=["", "", ".2f", ".2f", "", "", ".4f", ".4f"], align=["r"] * 8,
    )  # fmt: skip
    return (
        f"**Width study.** The run's LM preset at each width d (LM seeds "
        f"{', '.join(str(x) for x in w.get('seeds') or [w.get('seed')])}; the KL columns: seed "
        f"{w.get('seed')}), each "
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
ANALYSIS = Analysis(
    key="width_study",
    title="Width study",
    findings=(Claim(CLAIM_W, CRITERION_W, claim_width),),
    evidence_figures=_evidence_figures,
)
