"""The paper's figures drawn from ``results.json``: Figure 1/3 (Macondo log-likelihood during
fine-tuning) and Figures 4/5 (with vs without the last MLP), averaged over seeds.

Inputs are the per-seed curves of the results contract (``[[value per step] per seed]``); a
ragged, empty or mismatched curve is refused with a :class:`KnnlmError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D

from knnlm.errors import KnnlmError
from knnlm.experiments.stats import mean_std_rows
from knnlm.report.claims import HURDLE_FIRST_PART
from knnlm.report.figures import arr, int_keys, line_marker, new_figure, plot_hurdle, save


def seed_matrix(rows: Any, n_steps: int, name: str) -> np.ndarray:
    """(seeds, steps) float array from one list per seed; refuses ragged or empty input."""
    if rows is None:
        raise KnnlmError(f"{name} is missing")
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise KnnlmError(f"{name} must be a non-empty list with one list of values per seed")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise KnnlmError(f"{name}[{i}] must be a list of values, one per step")
        a = arr(row, f"{name}[{i}]")
        if len(a) != n_steps:
            raise KnnlmError(f"{name}[{i}] has {len(a)} values but there are {n_steps} steps")
        out.append(a)
    return np.stack(out)


def plot_figure1(
    curves: Mapping[str, Any],
    path: str | os.PathLike,
    final_mlp: Mapping[Any, float] | None = None,
    title: str | None = None,
) -> Path:
    """Figures 1 and 3: test log-likelihood of the children's names over fine-tuning steps.

    One colour per number of children n, averaged over seeds: solid = LM, dotted = kNN-LM,
    dash-dot = LM + MLP memory (when ``curves`` has "mlp"), dashed horizontal = log(1/n), the
    best a perfect model can do. ``final_mlp`` ({n: mean}) marks the MLP's value at the last
    step when only the final model was scored with it.
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
        if final_mlp is not None and final_mlp.get(str(n), final_mlp.get(n)) is not None:
            v = final_mlp.get(str(n), final_mlp.get(n))
            ax.plot([x[-1]], [v], marker="^", ls="none", color=color, ms=7)
            drawn.add("mlp_final")
        ax.axhline(-math.log(n), color=color, ls="--", lw=0.8, alpha=0.7)
    style = [Line2D([], [], color="gray", ls=ls, label=label)
             for key, ls, label in styles if key in drawn]  # fmt: skip
    if "mlp_final" in drawn:
        style.append(Line2D([], [], color="gray", ls="none", marker="^",
                            label="LM + MLP (final model)"))  # fmt: skip
    style.append(Line2D([], [], color="gray", ls="--", lw=0.8, label="perfect: log(1/n)"))
    first = ax.legend(loc="lower right", fontsize="small", title="children")
    ax.add_artist(first)
    ax.legend(handles=style, loc="upper left", fontsize="small")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test log-likelihood of the child's name")
    ax.set_title(title or "Macondo: children's names during fine-tuning (mean over seeds)")
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_hurdle_runs(
    curve: Mapping[str, Any],
    ylabel: str,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Figures 4 and 5: with vs without the last MLP, mean ± sample std over seeds.

    ``curve`` is {"steps", "with_mlp": [[per step] per seed], "without_mlp": [...]}. The
    first part of training that claim (e) reads, (0, T/2], is shaded.
    """
    if not isinstance(curve, Mapping):
        raise KnnlmError("the hurdle curve must be a mapping with steps, with_mlp, without_mlp")
    x = arr(curve.get("steps"), "steps")
    if len(x) == 0:
        raise KnnlmError("steps is empty: nothing to plot")
    a = seed_matrix(curve.get("with_mlp"), len(x), "with_mlp")
    b = seed_matrix(curve.get("without_mlp"), len(x), "without_mlp")
    if a.shape != b.shape:
        raise KnnlmError(f"with_mlp has {a.shape[0]} seeds but without_mlp has {b.shape[0]}")
    (ma, sa), (mb, sb) = mean_std_rows(a), mean_std_rows(b)
    last = float(np.nanmax(x))
    window = (0.0, HURDLE_FIRST_PART * last) if last > 0 else None
    head = title or ""
    head += f" (mean ± std over {a.shape[0]} seeds)" if a.shape[0] > 1 else ""
    return plot_hurdle(x, ma, sa, mb, sb, ylabel, path, head.strip() or None, window=window)
