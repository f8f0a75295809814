"""Helpers of the figures drawn from ``results.json`` (per-seed curves, what the verdicts read).

Curves come as the results contract stores them (``[[value per step] per seed]``); a ragged,
empty or mismatched curve is refused with a :class:`KnnlmError`. The figures of what the
verdicts read are drawn through pyplot (Agg) and saved by :func:`save_pyplot`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from knnlm.errors import KnnlmError  # noqa: E402
from knnlm.report.figures import arr  # noqa: E402

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def save_pyplot(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
