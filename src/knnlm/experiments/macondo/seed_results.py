"""One Macondo seed's results: its scores per test example and what ``results.json`` holds.

The verdict's groups read only the parents that did not choose the settings (a ``tune``
grid's dev share left out); every example is listed with its split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.data.macondo import perfect_log_likelihood
from knnlm.experiments.macondo.aggregate import group_means
from knnlm.experiments.macondo.seed_data import SeedData
from knnlm.fileio import read_json
from knnlm.retrieval.search.choose import resolve_search


@dataclass
class SeedScores:
    """Per test example log p(child | prompt): LM, kNN-LM and LM + MLP memory (at the tuned
    settings with a grid); ``keep`` marks the examples the verdict reads (not the dev share)."""

    lm: np.ndarray
    knnlm: np.ndarray
    keep: np.ndarray
    train_groups: dict[str, float]  # the LM's per-n means on the training sentences
    mlp: np.ndarray | None = None
    mlp_raw: np.ndarray | None = None  # log p_mem(child), before the interpolation
    memory: dict[str, Any] | None = None  # the MLP memory's training and weight
    tuning: dict[str, Any] | None = None
    knnlm_default: np.ndarray | None = None  # the kNN-LM at the run's k, w, T when a grid tunes


def seed_results(
    seed: int,
    key: dict[str, Any],
    seed_dir: Path,
    data: SeedData,
    scores: SeedScores,
    done: Mapping[str, Any],
    times: dict[str, float],
) -> dict[str, Any]:
    """The seed's results (written to its ``results.json``)."""
    datastore = seed_dir / "datastore"
    return {
        "seed": seed,
        "settings": key,
        "dataset": data.ds.meta["counts"],
        "datastore_size": _datastore_n(datastore),
        "search": search_used(key["search"], datastore),
        "groups": _verdict_groups(scores, data.ns),
        "tuning": scores.tuning,
        "train_groups_lm": scores.train_groups,
        "memory": scores.memory,
        "curve": done["curve"],
        "train": done["train"],
        "seconds": times,
        "examples": _examples(data, scores),
    }


def _verdict_groups(scores: SeedScores, ns: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per n, the mean log-likelihoods of the children of the parents not used to choose the
    settings (the verdict's groups), with log(1/n) and the count."""
    keep = scores.keep
    ns_kept = [n for n, k in zip(ns, keep, strict=True) if k]
    lm_groups = group_means(scores.lm[keep], ns_kept)
    knn_groups = group_means(scores.knnlm[keep], ns_kept)
    mem_groups = group_means(scores.mlp[keep], ns_kept) if scores.mlp is not None else {}
    default = scores.knnlm_default
    def_groups = group_means(default[keep], ns_kept) if default is not None else {}
    return {
        n: {
            "lm": lm_groups[n],
            "knnlm": knn_groups[n],
            "mlp": mem_groups.get(n),
            "knnlm_default": def_groups.get(n),
            "perfect": perfect_log_likelihood(int(n)),
            "count": ns_kept.count(int(n)),
        }
        for n in lm_groups
    }


def _examples(data: SeedData, scores: SeedScores) -> list[dict[str, Any]]:
    """Per test example: who, the prompt and continuation, the three log-likelihoods, and
    whether it chose the settings (dev) or is read by the verdict (test)."""
    mlp = [None] * len(data.test) if scores.mlp is None else scores.mlp
    default = [None] * len(data.test) if scores.knnlm_default is None else scores.knnlm_default
    return [
        {
            "villager": r["villager"],
            "child": r["child"],
            "n_children": int(r["n_children"]),
            "prompt": r["prompt"],
            "continuation": c,
            "lm": float(a),
            "knnlm": float(b),
            "mlp": None if m is None else float(m),
            "knnlm_default": None if d is None else float(d),
            "split": "test" if k else "dev",
        }
        for r, c, a, b, m, d, k in zip(
            data.test,
            data.conts,
            scores.lm,
            scores.knnlm,
            mlp,
            default,
            scores.keep,
            strict=True,
        )
    ]


def search_used(search: str, datastore: Path) -> dict[str, str]:
    """The backend ``search`` asked for and the one that searched this datastore."""
    return {"requested": search, "used": resolve_search(search, datastore)}


def _datastore_n(path: Path) -> int:
    meta = read_json(path / "meta.json") or {}
    return int(meta.get("n", 0))
