"""PNG figures in the style of the paper's Figures 1, 3, 4 and 5, plus sweep and KL plots.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
pyplot, so they work headless and leave no open figures behind. Every function writes its PNG
atomically (temporary name, then rename) and returns the path.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Non-interactive backend, unless an interactive session already chose one through pyplot:
# nothing here uses pyplot, so the choice only matters for the user's own plots.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from knnlm.errors import KnnlmError  # noqa: E402
from knnlm.report.tables import fmt_number  # noqa: E402

DPI = 120
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


# ----------------------------------------------------------------------------- helpers


def new_figure(size: tuple[float, float] = (6.4, 4.4)) -> Figure:
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG through a temporary name; the figure is released afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    return path


def arr(values: Any, name: str) -> np.ndarray:
    """A 1-D float array; None entries become NaN (matplotlib leaves a gap)."""
    if values is None:
        raise KnnlmError(f"{name} is missing")
    try:
        a = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    except (TypeError, ValueError):
        raise KnnlmError(f"{name} must be a sequence of numbers") from None
    if a.ndim != 1:
        raise KnnlmError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _same_len(x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    if len(x) == 0:
        raise KnnlmError(f"{xname} is empty: nothing to plot")
    if len(x) != len(y):
        raise KnnlmError(f"{yname} has {len(y)} points but {xname} has {len(x)}")


def line_marker(n: int) -> str | None:
    """Markers only where a line alone would be invisible (a single point)."""
    return "o" if n < 2 else None


def int_keys(d: Mapping[Any, Any], name: str) -> list[tuple[int, Any]]:
    """Items of a mapping keyed by number of children (JSON gives string keys)."""
    try:
        items = sorted(((int(k), v) for k, v in d.items()), key=lambda p: p[0])
    except (TypeError, ValueError):
        raise KnnlmError(f"{name} must be keyed by the number of children (1..5)") from None
    if not items:
        raise KnnlmError(f"{name} is empty: nothing to plot")
    if any(n < 1 for n, _ in items):
        raise KnnlmError(f"{name}: the number of children must be >= 1")
    return items


def _get(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key)
    return float("nan") if v is None else float(v)


def _finish(
    fig: Figure, ax: Any, path: str | os.PathLike, xlabel: str, ylabel: str, title: str | None
) -> Path:
    """The common ending of a one-axes figure: labels, title (if any), grid, legend, saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


# ----------------------------------------------------------------------------- Macondo


def plot_macondo_groups(
    groups: Mapping[Any, Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Figure 1: test log-likelihood of the child's name against the number of children.

    ``groups[n]`` holds "lm", "lm_std", "knnlm", "knnlm_std", "perfect" (log(1/n)) and
    optionally "mlp", "mlp_std". Solid = LM, dotted = kNN-LM, dash-dot = MLP; error bars are
    standard deviations; a short black bar at each n marks the perfect model's log(1/n).
    """
    items = int_keys(groups, "groups")
    ns = np.array([n for n, _ in items], dtype=float)
    fig = new_figure()
    ax = fig.add_subplot()
    series = (("lm", "LM", "-", "o"), ("knnlm", "kNN-LM", ":", "s"), ("mlp", "LM + MLP", "-.", "^"))
    for i, (key, label, ls, marker) in enumerate(series):
        if not any(g.get(key) is not None for _, g in items):
            continue  # e.g. no MLP run
        y = np.array([_get(g, key) for _, g in items])
        err = np.array([_get(g, f"{key}_std") for _, g in items])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.errorbar(ns, y, yerr=err, ls=ls, marker=marker, color=_COLORS[i], capsize=3, label=label)
    perfect = np.array(
        [_get(g, "perfect") if g.get("perfect") is not None else -math.log(n) for n, g in items]
    )
    ax.hlines(perfect, ns - 0.3, ns + 0.3, colors="black", lw=2, label="perfect: log(1/n)")
    ax.set_xticks(ns)
    ax.set_xlim(ns.min() - 0.5, ns.max() + 0.5)
    return _finish(fig, ax, path, "number of children", "log-likelihood of the child's name",
                   title or "Macondo: log-likelihood by number of children")  # fmt: skip


def plot_macondo_curves(
    steps: Sequence[float],
    curves: Mapping[Any, Mapping[str, Sequence[float] | None]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Figure 3: log-likelihood against training step, one colour per number of children.

    ``curves[n]`` holds "lm" and optionally "knnlm" (one value per step). Solid = LM,
    dotted = kNN-LM, dashed horizontal line = log(1/n).
    """
    x = arr(steps, "steps")
    items = int_keys(curves, "curves")
    fig = new_figure((7.2, 4.8))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10"]
    any_knn = False
    for i, (n, c) in enumerate(items):
        color = cmap(i % 10)
        lm = arr(c.get("lm"), f"curves[{n}]['lm']")
        _same_len(x, lm, "steps", f"curves[{n}]['lm']")
        ax.plot(
            x,
            lm,
            "-",
            color=color,
            marker=line_marker(len(x)),
            label=f"{n} child" + "ren" * (n > 1),
        )
        if c.get("knnlm") is not None:
            knn = arr(c["knnlm"], f"curves[{n}]['knnlm']")
            _same_len(x, knn, "steps", f"curves[{n}]['knnlm']")
            ax.plot(x, knn, ":", color=color, marker=line_marker(len(x)))
            any_knn = True
        ax.axhline(-math.log(n), color=color, ls="--", lw=0.8, alpha=0.7)
    # Second legend explaining the line styles; the colours are in the first.
    style = [Line2D([], [], color="gray", ls="-", label="LM")]
    if any_knn:
        style.append(Line2D([], [], color="gray", ls=":", label="kNN-LM"))
    style.append(Line2D([], [], color="gray", ls="--", lw=0.8, label="perfect: log(1/n)"))
    first = ax.legend(loc="lower right", fontsize="small")
    ax.add_artist(first)
    ax.legend(handles=style, loc="upper left", fontsize="small")
    ax.set_xlabel("training step")
    ax.set_ylabel("log-likelihood of the child's name")
    ax.set_title(title or "Macondo: log-likelihood during training")
    ax.grid(alpha=0.3)
    return save(fig, path)


# ----------------------------------------------------------------------------- hurdle


def _band(ax: Any, x: np.ndarray, mean: np.ndarray, std: Any, name: str, **kw: Any) -> None:
    _same_len(x, mean, "steps", f"{name} mean")
    ax.plot(x, mean, marker=line_marker(len(x)), **kw)
    if std is not None:
        s = arr(std, f"{name} std")
        _same_len(x, s, "steps", f"{name} std")
        ax.fill_between(x, mean - s, mean + s, color=kw.get("color"), alpha=0.2, lw=0)


def plot_hurdle(
    steps: Sequence[float],
    with_mlp_mean: Sequence[float],
    with_mlp_std: Sequence[float] | None,
    without_mlp_mean: Sequence[float],
    without_mlp_std: Sequence[float] | None,
    ylabel: str,
    path: str | os.PathLike,
    title: str | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Figures 4/5: a metric during training with and without the last MLP (std bands).

    ``window`` (first, last step) shades the part of training a verdict reads.
    """
    x = arr(steps, "steps")
    fig = new_figure()
    ax = fig.add_subplot()
    if window is not None:
        ax.axvspan(
            window[0], window[1], color="0.9", lw=0, label="first half of training (claim e)"
        )
    _band(
        ax,
        x,
        arr(with_mlp_mean, "with_mlp"),
        with_mlp_std,
        "with_mlp",
        color=_COLORS[0],
        label="with last MLP",
    )
    _band(
        ax,
        x,
        arr(without_mlp_mean, "without_mlp"),
        without_mlp_std,
        "without_mlp",
        color=_COLORS[1],
        label="without last MLP",
    )
    return _finish(fig, ax, path, "training step", ylabel, title)


# ----------------------------------------------------------------------------- sweep


def plot_sweep_heatmap(
    weights: Sequence[float],
    temperatures: Sequence[float],
    ppl: Any,
    path: str | os.PathLike,
    title: str | None = None,
    lm_ppl: float | None = None,
) -> Path:
    """Perplexity over a (kNN weight x temperature) grid; the best cell is outlined.

    ``ppl[i, j]`` is the perplexity at ``weights[i]`` and ``temperatures[j]``. Non-finite
    cells are shown grey. With ``lm_ppl`` the colours diverge around the LM's perplexity
    (green better, red worse); values far from it saturate rather than squash the scale.
    """
    w = arr(weights, "weights")
    t = arr(temperatures, "temperatures")
    grid = np.asarray(ppl, dtype=float)
    if grid.shape != (len(w), len(t)):
        raise KnnlmError(
            f"ppl has shape {grid.shape}, expected (len(weights), len(temperatures)) = "
            f"({len(w)}, {len(t)})"
        )
    finite = np.isfinite(grid)
    if not finite.any():
        raise KnnlmError("the sweep has no finite perplexity to plot")
    best = np.unravel_index(np.where(finite, grid, np.inf).argmin(), grid.shape)
    norm, cmap = _sweep_colours(grid[finite], lm_ppl)
    fig = new_figure((max(4.8, 0.9 * len(t) + 2.5), max(3.6, 0.5 * len(w) + 2.0)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    fig.colorbar(im, ax=ax, label="perplexity", extend="both")
    if grid.size <= 400:  # annotations stay legible
        _annotate_cells(ax, grid, finite, cmap, norm, best)
    bi, bj = best
    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
    ax.set_xticks(range(len(t)), [fmt_number(v, "g") for v in t])
    ax.set_yticks(range(len(w)), [fmt_number(v, "g") for v in w])
    ax.set_xlabel("temperature")
    ax.set_ylabel("kNN weight")
    text = (
        f"best {fmt_number(grid[bi, bj], '.2f')} at weight {fmt_number(w[bi], 'g')}, "
        f"temperature {fmt_number(t[bj], 'g')}"
    )
    if lm_ppl is not None:
        text += f"; LM {fmt_number(lm_ppl, '.2f')}"
    ax.set_title(f"{title}\n{text}" if title else text, fontsize=10)
    return save(fig, path)


def _sweep_colours(vals: np.ndarray, lm_ppl: float | None) -> tuple[Normalize, Any]:
    """The heatmap's (norm, colour map) over the finite perplexities ``vals``."""
    lo = float(vals.min())
    if lm_ppl is not None and math.isfinite(lm_ppl):
        # Green = better than the LM, red = worse, symmetric around it: a few diverged
        # cells (weight near 1) saturate instead of flattening the interesting region.
        d = max(lm_ppl - lo, 0.01 * abs(lm_ppl), 1e-6)
        norm = Normalize(lm_ppl - d, lm_ppl + d)
        cmap = matplotlib.colormaps["RdYlGn_r"]
    else:
        top = float(np.quantile(vals, 0.75))  # same reason: outliers saturate
        norm = Normalize(lo, top if top > lo else float(vals.max()) if vals.max() > lo else lo + 1)
        cmap = matplotlib.colormaps["viridis_r"]
    return norm, cmap.with_extremes(bad="lightgray")


def _annotate_cells(ax: Any, grid: np.ndarray, finite: np.ndarray, cmap: Any, norm: Normalize,
                    best: tuple[int, int]) -> None:  # fmt: skip
    """Each cell's perplexity, in white on dark cells, the best one in bold."""
    for i, j in np.ndindex(grid.shape):
        v = grid[i, j]
        r, g, b, _ = cmap(norm(v)) if finite[i, j] else (0.83, 0.83, 0.83, 1.0)
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(
            j,
            i,
            fmt_number(v, ".1f"),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if dark else "black",
            fontweight="bold" if (i, j) == best else "normal",
        )


# ----------------------------------------------------------------------------- projection KL


def _positive_range(a: np.ndarray) -> tuple[float, float] | None:
    pos = a[a > 0]
    return (float(pos.min()), float(pos.max())) if pos.size else None


def plot_kl_hist(
    kl_f: Sequence[float],
    kl_fg: Sequence[float],
    path: str | os.PathLike,
    title: str | None = None,
    bound: float | None = None,
) -> Path:
    """Histogram of per-position KL[f(z*) || p_knnlm] (Eq. 2's objective at its solution)
    for the projections through f and f∘g; ``bound`` draws the paper's mean-KL line.

    The x axis is logarithmic when the positive values span more than two decades (zeros are
    then drawn at the smallest positive value). Dashed lines mark the means.
    """
    a = arr(kl_f, "kl_f")
    b = arr(kl_fg, "kl_fg")
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 and b.size == 0:
        raise KnnlmError("kl_f and kl_fg hold no finite values: nothing to plot")
    both = np.concatenate([a, b])
    rng = _positive_range(both)
    log_x = rng is not None and both.min() >= 0 and rng[1] / rng[0] > 100
    if log_x:
        lo, hi = rng
        a, b = np.maximum(a, lo), np.maximum(b, lo)
        bins = np.geomspace(lo, hi * 1.0001, 50)
    else:
        lo, hi = float(both.min()), float(both.max())
        if hi <= lo:  # a single value (or all equal): give the bar some width
            lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
        bins = np.linspace(lo, hi, 41)
    fig = new_figure()
    ax = fig.add_subplot()
    for vals, label, color in ((a, "through f", _COLORS[0]), (b, "through f∘g", _COLORS[1])):
        if vals.size == 0:
            continue
        mean = float(vals.mean())
        ax.hist(
            vals,
            bins=bins,
            histtype="stepfilled",
            alpha=0.35,
            color=color,
            label=f"{label} (mean {fmt_number(mean, '.4f')})",
        )
        ax.hist(vals, bins=bins, histtype="step", color=color)
        ax.axvline(mean, color=color, ls="--", lw=1)
    if bound is not None:
        ax.axvline(bound, color="black", lw=1.5, label=f"the paper's bound on the mean ({bound:g})")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("KL[f(z*) ‖ p_knnlm] per position (nats); dashed: means")
    ax.set_ylabel("positions")
    ax.set_title(f"Per-position KL ({title})" if title else "Per-position KL at the solution")
    ax.legend()
    return save(fig, path)


def _as_curve(curve: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) from {step: value}, [(step, value), ...] or [value, ...] (step = index)."""
    if isinstance(curve, Mapping):
        if "steps" in curve and "values" in curve:
            x, y = arr(curve["steps"], f"{name} steps"), arr(curve["values"], f"{name} values")
        else:
            try:
                pairs = sorted((float(k), v) for k, v in curve.items())
            except (TypeError, ValueError):
                raise KnnlmError(f"{name} must map step -> value") from None
            x = np.array([p[0] for p in pairs])
            y = arr([p[1] for p in pairs], name)
    else:
        seq = list(curve)
        if seq and isinstance(seq[0], (tuple, list)) and len(seq[0]) == 2:
            x, y = arr([p[0] for p in seq], f"{name} steps"), arr([p[1] for p in seq], name)
        else:
            y = arr(seq, name)
            x = np.arange(len(y), dtype=float)
    _same_len(x, y, f"{name} steps", name)
    return x, y


def plot_kl_steps(
    curve_f: Any,
    curve_fg: Any,
    path: str | os.PathLike,
    lr: float | None = None,
    title: str | None = None,
) -> Path:
    """Mean KL[f(z) || p_knnlm] against optimisation step, through f and f∘g (Appendix E).

    A curve is {step: mean KL}, {"steps": [...], "values": [...]}, a list of (step, value)
    pairs, or a plain list of values (one per step, starting at 0). The y axis is logarithmic
    when the positive values span more than two decades.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    ys = []
    for curve, label, color in (
        (curve_f, "through f", _COLORS[0]),
        (curve_fg, "through f∘g", _COLORS[1]),
    ):
        x, y = _as_curve(curve, label)
        ax.plot(x, y, color=color, marker=line_marker(len(x)), label=label)
        ys.append(y[np.isfinite(y)])
    rng = _positive_range(np.concatenate(ys))
    if rng is not None and np.concatenate(ys).min() > 0 and rng[1] / rng[0] > 100:
        ax.set_yscale("log")
    head = title or "Projection: mean KL during optimisation"
    head += f" (lr={fmt_number(lr, 'g')})" if lr is not None else ""
    return _finish(
        fig, ax, path, "optimisation step", "mean KL[f(z) ‖ p_knnlm] over positions (nats)", head
    )


# ----------------------------------------------------------------------------- generic


def plot_loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str | os.PathLike,
    label: str = "loss",
    title: str | None = None,
    ylabel: str = "loss",
) -> Path:
    """One curve of a metric against training step."""
    x = arr(steps, "steps")
    y = arr(losses, "losses")
    _same_len(x, y, "steps", "losses")
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(x, y, color=_COLORS[0], marker=line_marker(len(x)), label=label)
    return _finish(fig, ax, path, "training step", ylabel, title)
