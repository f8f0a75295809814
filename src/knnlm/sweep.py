"""Re-score cached neighbours over a grid of knn_weight x temperature x k, without searching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError
from knnlm.neighbour_cache import load_cache
from knnlm.retrieval.combiner import interpolate, perplexity, prefix_log_probs


def sweep(
    cache: str | Path,
    weights: list[float],
    temperatures: list[float],
    ks: list[int] | None = None,
    chunk_rows: int = 16384,
    progress: bool = True,
) -> dict:
    """Perplexity for every (k, weight, temperature); neighbours are read from ``cache``.

    Cached neighbours are sorted by distance, so the first k columns are the k nearest.
    """
    c = load_cache(cache)
    k_cached = int(c["meta"]["k"])
    ks = ks or [k_cached]
    if max(ks) > k_cached or min(ks) < 1:
        raise KnnlmError(f"k must be in [1, {k_cached}] (the cached k)")
    for w in weights:
        if not 0.0 <= w <= 1.0:
            raise KnnlmError(f"knn weights must be in [0, 1], got {w}")
    if any(t <= 0 for t in temperatures):
        raise KnnlmError("temperatures must be positive")
    n = int(c["meta"]["n"])
    nll = np.zeros((len(ks), len(weights), len(temperatures)))
    lm_nll = 0.0
    for lo in tqdm(range(0, n, chunk_rows), disable=not progress, desc="sweep", unit="chunk"):
        hi = min(lo + chunk_rows, n)
        lm_lp = torch.from_numpy(np.array(c["lm_log_prob"][lo:hi], dtype=np.float32))
        targets = torch.from_numpy(np.array(c["targets"][lo:hi], dtype=np.int64))
        dists = torch.from_numpy(np.array(c["dists"][lo:hi], dtype=np.float32))
        ids = torch.from_numpy(np.array(c["ids"][lo:hi], dtype=np.int64))
        vals = torch.from_numpy(np.array(c["values"][lo:hi], dtype=np.int64))
        lm_nll -= float(lm_lp.double().sum())
        knn = prefix_log_probs(dists, ids, vals, targets, ks, temperatures)
        for ki, k in enumerate(ks):
            for ti, t in enumerate(temperatures):
                for wi, w in enumerate(weights):
                    lp = interpolate(lm_lp, knn[(int(k), float(t))], w)
                    nll[ki, wi, ti] -= float(lp.double().sum())
    ppl = np.vectorize(lambda x: perplexity(x, n))(nll)
    best = np.unravel_index(np.nanargmin(ppl), ppl.shape)
    return {
        "cache": str(cache),
        "settings": c["meta"],
        "tokens": n,
        "lm": {"perplexity": perplexity(lm_nll, n), "nll_sum": lm_nll},
        "ks": ks,
        "weights": weights,
        "temperatures": temperatures,
        "perplexity": ppl.tolist(),  # [k][weight][temperature]
        "best": {
            "k": ks[best[0]],
            "knn_weight": weights[best[1]],
            "temperature": temperatures[best[2]],
            "perplexity": float(ppl[best]),
        },
    }
