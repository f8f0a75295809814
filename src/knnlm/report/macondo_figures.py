"""Section 4's Table 5 and figures: Figure 1/3 during fine-tuning and the per-seed gains, and
the files of a stand-alone Macondo run (:func:`render_macondo`).

:func:`table5` reads ``results["macondo"]`` of the results contract, so the stand-alone
Macondo run and the reproduction print the same table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D

from knnlm.errors import KnnlmError
from knnlm.experiments.macondo.run import FIGURE_CURVES, FIGURE_GROUPS, TABLE, contract_view
from knnlm.experiments.stats import mean_std_rows
from knnlm.fileio import write_text_atomic
from knnlm.report import figures as F
from knnlm.report.drawing import COLORS, plt, save_pyplot, seed_matrix
from knnlm.report.figures import arr, int_keys, line_marker, new_figure, save
from knnlm.report.tables import fmt_pm, markdown_table, settings_line

_COLUMNS = (
    ("train", "lm", "LM, training sentences"),
    ("test", "lm", "LM, test"),
    ("test", "knnlm", "kNN-LM, test"),
    ("test", "mlp", "LM + MLP, test"),
)


def table5(macondo: Mapping[str, Any]) -> str:
    """Table 5: one row per number of children n; mean ± sample std over seeds of the mean
    natural-log likelihood of each child's name, for the LM on its training sentences and for
    the LM, kNN-LM and LM + MLP on the test sentences, beside log(1/n).

    A model a run did not score (e.g. no MLP) shows "–".
    """
    per = macondo.get("per_seed")
    if not per:
        raise KnnlmError("Table 5 needs macondo.per_seed with at least one seed")
    ns = macondo.get("n_values") or sorted({int(n) for p in per for n in p["test"]["lm"]})
    rows = []
    for n in ns:
        row: list[Any] = [int(n), -math.log(int(n))]
        for split, model, _ in _COLUMNS:
            row.append(fmt_pm([((p.get(split) or {}).get(model) or {}).get(str(n)) for p in per]))
        rows.append(row)
    return markdown_table(
        ["children (n)", "log(1/n)", *(c[2] for c in _COLUMNS)],
        rows,
        align=["r"] * (2 + len(_COLUMNS)),
    )


def plot_figure1(
    curves: Mapping[str, Any],
    path: str | os.PathLike,
    final_mlp: Mapping[Any, float] | None = None,
    title: str | None = None,
    final_knn: Mapping[Any, float] | None = None,
) -> Path:
    """Figures 1 and 3: test log-likelihood of the children's names over fine-tuning steps.

    One colour per number of children n, averaged over seeds: solid = LM, dotted = kNN-LM,
    dash-dot = LM + MLP memory (when ``curves`` has "mlp"), dashed horizontal = log(1/n), the
    best a perfect model can do. ``final_mlp`` ({n: mean}) marks the MLP's value at the last
    step when only the final model was scored with it; ``final_knn`` likewise marks the
    dev-tuned kNN-LM (the curves' kNN-LM is at the run's default setting).
    """
    if not isinstance(curves, Mapping):
        raise KnnlmError("curves must be a mapping with 'steps' and 'lm'")
    x = arr(curves.get("steps"), "curves.steps")
    if len(x) == 0:
        raise KnnlmError("curves.steps is empty: nothing to plot")
    lm = int_keys(curves.get("lm") or {}, "curves.lm")
    fig = new_figure((7.2, 4.8))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10"]
    styles = (("lm", "-", "LM"), ("knnlm", ":", "kNN-LM"), ("mlp", "-.", "LM + MLP"))
    drawn = set()
    for i, (n, _) in enumerate(lm):
        color = cmap(i % 10)
        for key, ls, _label in styles:
            series = (curves.get(key) or {}).get(str(n))
            if series is None:
                continue
            mean, _ = mean_std_rows(seed_matrix(series, len(x), f"curves.{key}.{n}"))
            ax.plot(x, mean, ls=ls, color=color, marker=line_marker(len(x)),
                    label=f"n = {n}" if key == "lm" else None)  # fmt: skip
            drawn.add(key)
        for final, marker, tag in ((final_mlp, "^", "mlp_final"), (final_knn, "*", "knn_final")):
            v = None if final is None else final.get(str(n), final.get(n))
            if v is not None:
                ax.plot([x[-1]], [v], marker=marker, ls="none", color=color, ms=8)
                drawn.add(tag)
        ax.axhline(-math.log(n), color=color, ls="--", lw=0.8, alpha=0.7)
    style = [Line2D([], [], color="gray", ls=ls, label=label)
             for key, ls, label in styles if key in drawn]  # fmt: skip
    if "mlp_final" in drawn:
        style.append(Line2D([], [], color="gray", ls="none", marker="^",
                            label="LM + MLP (final model)"))  # fmt: skip
    if "knn_final" in drawn:
        style.append(Line2D([], [], color="gray", ls="none", marker="*",
                            label="kNN-LM, dev-tuned (final model)"))  # fmt: skip
    style.append(Line2D([], [], color="gray", ls="--", lw=0.8, label="perfect: log(1/n)"))
    first = ax.legend(loc="lower right", fontsize="small", title="children")
    ax.add_artist(first)
    ax.legend(handles=style, loc="upper left", fontsize="small")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test log-likelihood of the child's name")
    ax.set_title(title or "Macondo: children's names during fine-tuning (mean over seeds)")
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_macondo_gains(macondo: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Per n: augmented minus LM test log-likelihood, one dot per seed, mean ± sample std."""
    per = macondo["per_seed"]
    ns = [str(n) for n in macondo["n_values"]]
    models = [m for m in ("knnlm", "mlp") if all(m in p["test"] for p in per)]
    if not per or not models:
        raise KnnlmError("no per-seed kNN-LM or MLP test log-likelihoods to draw")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(ns), dtype=float)
    for j, (model, label) in enumerate(zip(models, ("kNN-LM - LM", "LM+MLP - LM"), strict=False)):
        g = np.array([[p["test"][model][n] - p["test"]["lm"][n] for n in ns] for p in per])
        off = x + (j - 0.5 * (len(models) - 1)) * 0.25
        for row in g:
            ax.plot(off, row, ".", color=COLORS[j], alpha=0.6)
        sd = g.std(0, ddof=1) if len(g) > 1 else np.zeros(len(ns))
        ax.errorbar(off, g.mean(0), yerr=sd, fmt="o", color=COLORS[j], capsize=4,
                    label=f"{label} (mean ± sample std; dots: {len(per)} seeds)")  # fmt: skip
    ax.axhline(0.0, color="black", lw=1)
    ax.set_xticks(x, [f"n={n}" for n in ns])
    ax.set_ylabel("test log-likelihood gain over the LM (nats)")
    ax.set_title("Macondo: gain over the fine-tuned LM, per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_pyplot(fig, path)


def render_macondo(out: str | Path, results: Mapping[str, Any]) -> None:
    """``table5.md``, ``figure1.png`` and (with curves) ``figure3.png`` of a Macondo run."""
    out = Path(out).expanduser()
    settings = results["settings"]
    n_seeds = len(settings["seeds"])
    model = settings["model"] or f"{settings['scratch_architecture']} GPT-2 trained from scratch"
    md = [
        "# Macondo: log-likelihood of the child's name (Table 5)",
        "",
        table5(contract_view(results)),
        "",
        f"Model: {model}; preset {settings['preset']}; mean ± sample std over {n_seeds} seed(s).",
        "",
        f"Reproduced: {results['reproduced']['summary']}",
        "",
        "Settings: "
        + settings_line({k: v for k, v in settings.items() if k != "knn_weight_convention"}),
        "",
    ]
    write_text_atomic(out / TABLE, "\n".join(md))
    F.plot_macondo_groups(
        results["groups"], out / FIGURE_GROUPS, title=f"Macondo: {model} ({n_seeds} seeds)"
    )
    if results.get("curves"):
        c = results["curves"]
        F.plot_macondo_curves(
            c["steps"],
            {n: {"lm": g["lm"], "knnlm": g.get("knnlm")} for n, g in c["groups"].items()},
            out / FIGURE_CURVES,
            title=f"Macondo during fine-tuning: {model}",
        )
