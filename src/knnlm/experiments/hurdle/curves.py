"""How the two variants' curves of the hurdle (Appendix E) are compared.

One statistic for the early phase, :func:`first_half_gap` (the run's summary and claim (e)
both read it), and the summary of a pair of mean curves, :func:`compare_curves`: the lead by
step, the first half's mean lead, a threshold half-way to the best value and who reaches it
first. Pure numpy on saved numbers; nothing here trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knnlm.errors import KnnlmError

# Appendix E reads "the first 4000 steps" / "the early stage": here the evaluations after step
# 0 (the shared initialisation) up to this share of the last step.
FIRST_PART = 0.5


def first_half_gap(
    steps: Sequence[float],
    with_mlp: Sequence[float],
    without_mlp: Sequence[float],
    higher_is_better: bool,
) -> tuple[float | None, list[float]]:
    """The one first-half statistic of the hurdle, used by the run's summary and by claim
    (e): the arithmetic mean, over the evaluations in (0, FIRST_PART * last step], of the lead
    of the model without the last MLP (positive: ahead). (None, []) when there is none."""
    x = np.asarray(steps, dtype=np.float64)
    gap = (1.0 if higher_is_better else -1.0) * (
        np.asarray(without_mlp, dtype=np.float64) - np.asarray(with_mlp, dtype=np.float64)
    )
    idx = (x > 0) & (x <= FIRST_PART * x.max()) if x.size else x.astype(bool)
    if not idx.any():
        return None, []
    return float(gap[idx].mean()), [float(s) for s in x[idx]]


def compare_curves(
    steps: Sequence[float],
    with_mlp: Sequence[float],
    without_mlp: Sequence[float],
    higher_is_better: bool,
    per_seed: tuple[list[list[float]], list[list[float]]] | None = None,
) -> dict:
    """Who leads, from mean curves on shared steps. ``gap`` > 0 means without_mlp is ahead.

    - ``gap_by_step``: (without - with), sign-flipped for a loss;
    - ``mean_gap_first_half``: :func:`first_half_gap`, the mean lead over the evaluations
      after step 0 up to half of the last step (None when there is none);
    - ``threshold``: half-way from the first logged value (mean of both) to the best value
      either curve reached; ``first_step_reaching`` per variant (None when never).
    """
    x = np.asarray(steps, dtype=np.float64)
    a, b = np.asarray(with_mlp, dtype=np.float64), np.asarray(without_mlp, dtype=np.float64)
    if not (len(x) == len(a) == len(b)) or len(x) == 0:
        raise KnnlmError("curves to compare need one value per step, and at least one step")
    sign = 1.0 if higher_is_better else -1.0

    def early_gap(aa: np.ndarray, bb: np.ndarray) -> float | None:
        return first_half_gap(x, aa, bb, higher_is_better)[0]

    gap = sign * (b - a)
    start = (a[0] + b[0]) / 2
    best = max(a.max(), b.max()) if higher_is_better else min(a.min(), b.min())
    threshold = float(start + 0.5 * (best - start))

    def first_reach(c: np.ndarray) -> float | None:
        hit = np.nonzero(sign * (c - threshold) >= 0)[0]
        return float(x[hit[0]]) if len(hit) else None

    early = (x > 0) & (x <= FIRST_PART * x.max())
    out = {
        "gap_by_step": gap.tolist(),
        "mean_gap_first_half": early_gap(a, b),
        "steps_ahead_first_half": [
            float(s) for s, g in zip(x[early], gap[early], strict=True) if g > 0
        ],
        "fraction_ahead_first_half": float((gap[early] > 0).mean()) if early.any() else 0.0,
        "threshold": threshold,
        "first_step_reaching": {"with_mlp": first_reach(a), "without_mlp": first_reach(b)},
        "final": {"with_mlp": float(a[-1]), "without_mlp": float(b[-1])},
    }
    out["without_mlp_ahead_early"] = (out["mean_gap_first_half"] or 0.0) > 0
    # A lead still there at the last evaluation is an overall lead, not an early-phase one.
    out["lead_at_end"] = bool(gap[-1] > 0)
    if per_seed is not None:
        gaps = [early_gap(np.asarray(w), np.asarray(wo)) for w, wo in zip(*per_seed, strict=True)]
        out["mean_gap_first_half_per_seed"] = gaps
        out["seeds_without_mlp_ahead_early"] = int(sum(g is not None and g > 0 for g in gaps))
    return out


def describe_comparison(name: str, cmp: dict, n_seeds: int) -> str:
    """One line of the run's summary: who leads early, and who reaches the threshold first."""
    lead = "without" if cmp["without_mlp_ahead_early"] else "with"
    reach = cmp["first_step_reaching"]
    seeds = cmp.get("seeds_without_mlp_ahead_early")
    seed_txt = f"; without_mlp ahead in {seeds}/{n_seeds} seeds" if seeds is not None else ""
    gap = cmp["mean_gap_first_half"]
    end = "; the lead lasts to the last evaluation" if cmp.get("lead_at_end") else ""
    return (
        f"{name}: the model {lead} the last MLP leads over the first half "
        f"(mean gap {'none' if gap is None else format(gap, '+.4f')}{seed_txt}{end}); threshold "
        f"{cmp['threshold']:.4f} first reached at step {reach['without_mlp']} without vs "
        f"{reach['with_mlp']} with the last MLP"
    )
