"""Figures that draw what the verdicts read: per-seed gains and gaps, and the Eq. 2 solves.

Beside the paper-style figures (:mod:`knnlm.report.seed_figures`): the kNN-LM (and MLP)
minus LM gain per n with each seed drawn (claims (c), (c')), the per-seed gap curves of
Appendix E with the half of training the claim reads (claim (e)), and KL against step for the
paper's stopping rule and the converged solve (claim (b)).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from knnlm.errors import KnnlmError  # noqa: E402

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    return _save(fig, path)


def plot_hurdle_gaps(
    curve: Mapping[str, Any], higher_is_better: bool, first_part: float, ylabel: str,
    path: str | os.PathLike,
) -> Path:  # fmt: skip
    """Per seed, the advantage of the model without the last MLP at each evaluation (positive:
    ahead), with the part of training claim (e) reads shaded."""
    steps = np.asarray(curve["steps"], dtype=float)
    a = np.asarray(curve["with_mlp"], dtype=float)
    b = np.asarray(curve["without_mlp"], dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != steps.size:
        raise KnnlmError("with_mlp and without_mlp must be (seeds, steps) tables of equal shape")
    gap = (b - a) if higher_is_better else (a - b)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    last = float(steps.max()) if steps.size else 0.0
    if last > 0:
        ax.axvspan(0, first_part * last, color="grey", alpha=0.15, label="the half claim (e) reads")
    for i, row in enumerate(gap):
        ax.plot(steps, row, color=COLORS[i % len(COLORS)], alpha=0.7, label=f"seed {i}")
    ax.plot(steps, gap.mean(0), color="black", lw=2, label="mean over seeds")
    ax.axhline(0.0, color="black", lw=1, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title("Without minus with the last MLP (positive: without is ahead)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bands(ax: Any, bands: Mapping[str, Sequence[float]], label: str, color: str, ls: str) -> None:
    y = np.asarray(bands["mean"], dtype=float)
    x = np.arange(1, y.size + 1)
    ax.plot(x, y, color=color, ls=ls, label=f"{label}: mean")
    ax.fill_between(x, bands["q25"], bands["q75"], color=color, alpha=0.15,
                    label=f"{label}: quartiles")  # fmt: skip


def plot_kl_solves(p: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """KL[f(z) ‖ p_knnlm] against step, mean and quartiles over positions: the paper's stopping
    rule (Adam) and the converged solve (L-BFGS iterations), through f and through f∘g."""
    conv = p.get("converged") or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, (key, name) in zip(axes, (("proj_f", "through f"), ("proj_fg", "through f∘g")),
                               strict=True):  # fmt: skip
        drawn = False
        for src, label, color, ls in ((p.get(key, {}), "paper's rule (Adam)", COLORS[0], "-"),
                                      (conv.get(key, {}), "converged (L-BFGS)", COLORS[1], "--")):  # fmt: skip
            bands = src.get("kl_curve_bands")
            if bands and bands.get("mean"):
                _bands(ax, bands, label, color, ls)
                drawn = True
        if not drawn:
            raise KnnlmError(f"no KL curves recorded for {key}")
        start = conv.get(key, {}).get("kl_init_mean", p.get(key, {}).get("kl_init_mean"))
        if start is not None:
            ax.axhline(start, color="grey", ls=":", label=f"start (mean {start:.4f})")
        ax.axhline(0.1, color="black", lw=1, label="the paper's 0.1")
        ax.set_xscale("log")
        ax.set_xlabel("step (Adam update / L-BFGS iteration)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL[f(z) ‖ p_knnlm] (nats)")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


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
    return _save(fig, path)
