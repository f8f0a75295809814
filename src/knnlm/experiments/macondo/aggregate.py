"""Aggregation of the Macondo experiment: per-n means per seed, then mean and sample std
(ddof=1) over seeds; curves over fine-tuning steps; the paper's effect as a summary line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from knnlm.data.macondo import perfect_log_likelihood
from knnlm.errors import KnnlmError
from knnlm.experiments.stats import mean_std, mean_std_rows


# ---------------------------------------------------------------------------------------
# aggregation (pure functions)
# ---------------------------------------------------------------------------------------
def group_means(
    values: Sequence[float] | np.ndarray, n_children: Sequence[int]
) -> dict[str, float]:
    """Mean of ``values`` over the examples of each number of children, keyed "1", "2", ..."""
    v = np.asarray(values, dtype=np.float64)
    ns = np.asarray(n_children, dtype=np.int64)
    if v.shape != ns.shape:
        raise KnnlmError("values and n_children differ in length")
    return {str(n): float(v[ns == n].mean()) for n in np.unique(ns)}


def aggregate_groups(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """Mean and sample std (:func:`knnlm.experiments.stats.mean_std`: ddof=1, None for one
    seed) over seeds of each per-seed group mean.

    ``per_seed[i][n]`` holds "lm" and optionally "knnlm" and "mlp" (LM + MLP memory) for seed
    i; the result's ``[n]`` holds each with its "_std", "perfect" (log(1/n)) and "seeds".
    """
    if not per_seed:
        raise KnnlmError("no seeds to aggregate")
    ns = sorted({int(n) for groups in per_seed for n in groups})
    out: dict[str, dict] = {}
    for n in ns:
        row: dict[str, Any] = {}
        present = [g[str(n)] for g in per_seed if str(n) in g]
        for key in ("lm", "knnlm", "mlp", "knnlm_default"):
            row[key], row[f"{key}_std"] = mean_std([g.get(key) for g in present])
        row["perfect"] = perfect_log_likelihood(n)
        row["seeds"] = len(present)
        out[str(n)] = row
    return out


def aggregate_curves(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any] | None:
    """Figure 3 curves: per step and n, mean and std over seeds of the per-seed group means.

    ``per_seed[i]`` is seed i's list of {"step", "lm": {n: v}, "knnlm": {n: v} (optional)}.
    Only steps present in every seed are kept.
    """
    if not per_seed or any(not c for c in per_seed):
        return None
    common = set.intersection(*({int(e["step"]) for e in c} for c in per_seed))
    steps = sorted(common)
    if not steps:
        return None
    by_step = [{int(e["step"]): e for e in c} for c in per_seed]
    ns = sorted({int(n) for c in per_seed for e in c for n in e["lm"]})
    groups: dict[str, dict] = {}
    for n in ns:
        row: dict[str, Any] = {"perfect": perfect_log_likelihood(n)}
        for key in ("lm", "knnlm"):
            if any(by_step[0][s].get(key) is None for s in steps):
                row[key] = row[f"{key}_std"] = None
                continue
            m = [[seed[s][key][str(n)] for s in steps] for seed in by_step]
            row[key], row[f"{key}_std"] = mean_std_rows(m)
        groups[str(n)] = row
    return {"steps": steps, "groups": groups}


def reproduced(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Did the paper's effect hold: LM below log(1/n), kNN-LM closer to log(1/n) than the LM?

    The mean log-likelihood of a parent's children is at most log(1/n) for any model (it is
    maximal when they share the mass evenly), so "closer" means "higher".
    """
    per_n: dict[str, dict] = {}
    for n, g in sorted(groups.items(), key=lambda kv: int(kv[0])):
        lm_gap = g["perfect"] - g["lm"]
        knn_gap = None if g.get("knnlm") is None else g["perfect"] - g["knnlm"]
        per_n[n] = {
            "lm_gap": lm_gap,
            "knnlm_gap": knn_gap,
            "lm_below_perfect": bool(lm_gap > 0),
            "knnlm_closer": None if knn_gap is None else bool(knn_gap < lm_gap),
        }
    lm_gap = float(np.mean([r["lm_gap"] for r in per_n.values()]))
    knn_gaps = [r["knnlm_gap"] for r in per_n.values()]
    knn_gap = None if None in knn_gaps else float(np.mean(knn_gaps))
    overall = {
        "lm_gap": lm_gap,
        "knnlm_gap": knn_gap,
        "lm_below_perfect": all(r["lm_below_perfect"] for r in per_n.values()),
        "knnlm_closer": None if knn_gap is None else bool(knn_gap < lm_gap),
    }
    closer_all = knn_gap is not None and all(r["knnlm_closer"] for r in per_n.values())
    held = bool(overall["lm_below_perfect"] and closer_all and overall["knnlm_closer"])
    closer_ns = [n for n, r in per_n.items() if r["knnlm_closer"]]
    if knn_gap is None:
        summary = "not tested: no kNN-LM numbers"
    elif held:
        summary = (
            "yes: the LM is below log(1/n) for every n and the kNN-LM is closer to log(1/n) "
            f"for every n (mean gap {lm_gap:.3f} -> {knn_gap:.3f} nats)"
        )
    else:
        summary = (
            f"no: LM below log(1/n) for every n: {overall['lm_below_perfect']}; kNN-LM closer "
            f"for n in {{{', '.join(closer_ns)}}} of {{{', '.join(per_n)}}}; mean gap LM "
            f"{lm_gap:.3f}, kNN-LM {knn_gap:.3f} nats"
        )
    return {"held": held, "summary": summary, "per_n": per_n, "overall": overall}
