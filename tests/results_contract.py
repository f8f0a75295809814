"""A synthetic ``results.json`` in the shape ``knnlm reproduce`` writes.

``make_results()`` is the fixture the claims and report tests start from (every claim held).
The shape itself (keys and per-seed shapes the report reads) and its checker live in
:mod:`knnlm.experiments.results_schema`; the tests hold this fixture and the real pipeline's
output to it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

SEEDS = [0, 1, 2]
N_VALUES = [1, 2, 3, 4, 5]


def _knnlm() -> dict:
    per = []
    for i, s in enumerate(SEEDS):
        per.append(
            {
                "seed": s,
                "tuned": {"knn_weight": 0.3, "temperature": 2.0 + i, "tuned_on": "valid"},
                "valid": {"tokens": 5000, "lm": 60.0 + i, "knnlm_paper": 57.0 + i,
                          "knnlm_tuned": 55.0 + i},
                "test": {"tokens": 5200, "lm": 62.0 + i, "knnlm_paper": 59.5 + i,
                         "knnlm_tuned": 57.0 + i},
            }
        )  # fmt: skip
    return {
        "seeds": list(SEEDS),
        "paper_setting": {"knn_weight": 0.25, "temperature": 1.0},
        "per_seed": per,
        "sweep": {},
        "figure": None,
        "settings": {"k": 256, "context_len": 64},
    }


def per_position(ppl: float, spread: float = 0.5) -> list[float]:
    """300 positions whose mean log-probability is -log(ppl), with a spread."""
    return [-math.log(ppl) + spread * ((i % 5) - 2) for i in range(300)]


def set_ppl(solve: dict, ppl: float, spread: float = 0.5) -> None:
    """A solve's perplexity and its per-position log-probabilities, kept consistent."""
    solve["perplexity"] = ppl
    solve["target_logp"] = per_position(ppl, spread)


def _proj(lm: float, knn: float, f: float, fg: float, kl: float, steps: int) -> dict:
    def stats(ppl: float, kl_mean: float, capped: int = 3) -> dict:
        return {"perplexity": ppl, "kl_mean": kl_mean, "kl_median": kl_mean / 2,
                "kl_init_mean": 0.3, "kl_removed": 1 - kl_mean / 0.3, "at_tolerance": 300,
                "steps_mean": 40.0, "steps_max": steps, "capped": capped}  # fmt: skip

    out = {
        "split": "test",
        "seed": 0,
        "positions": 300,
        "lm": {"perplexity": lm, "target_logp": per_position(lm)},
        "knnlm": {"perplexity": knn, "target_logp": per_position(knn)},
        "proj_f": stats(f, kl) | {"target_logp": per_position(f)},
        "proj_fg": stats(fg, 1.5 * kl) | {"target_logp": per_position(fg)},
        "max_steps": steps,
        "figure": None,
    }
    # The converged solve (claim (b) reads it) with its two sensitivity rows.
    out["converged"] = {
        "method": "L-BFGS",
        "proj_f": stats(f - 0.1, 0.8 * kl, 0) | {"target_logp": per_position(f - 0.1)},
        "proj_fg": stats(fg - 0.1, 0.8 * kl, 0) | {"target_logp": per_position(fg - 0.1)},
        "proj_f_lm_head": stats(f, kl, 0) | {"target_logp": per_position(f)},
        "proj_f_target_first": stats(f - 0.2, 0.5 * kl, 0),
    }
    return out


def _macondo() -> dict:
    per = []
    for i, s in enumerate(SEEDS):
        lm = {str(n): -math.log(n) - 2.0 - 0.1 * i for n in N_VALUES}
        knn = {str(n): v + 0.8 + 0.05 * i for n, v in zip(N_VALUES, lm.values(), strict=True)}
        mlp = {str(n): v + 0.4 for n, v in zip(N_VALUES, lm.values(), strict=True)}
        train = {str(n): -math.log(n) - 0.1 for n in N_VALUES}
        per.append({"seed": s, "test": {"lm": lm, "knnlm": knn, "mlp": mlp},
                    "train": {"lm": train}})  # fmt: skip
    steps = [0, 50, 100, 150, 200]
    curves: dict[str, Any] = {"steps": steps, "lm": {}, "knnlm": {}}
    for n in N_VALUES:
        curves["lm"][str(n)] = [
            [-8 + (6 - math.log(n)) * t / 200 - 2 * (t / 200) - 0.1 * i for t in steps]
            for i in range(len(SEEDS))
        ]
        curves["knnlm"][str(n)] = [[v + 0.8 for v in row] for row in curves["lm"][str(n)]]
    return {
        "seeds": list(SEEDS),
        "n_values": list(N_VALUES),
        "per_seed": per,
        "curves": curves,
        "figure1": None,
        "settings": {
            "epochs": 20,
            "k": 256,
            "knn_weight": 0.25,
            "temperature": 1.0,
            "macondo": {"n_parents_per_count": 6},
        },
    }


def _memory() -> dict:
    per = [
        {"seed": s, "weight": 0.25, "valid": {"lm": 60.0 + i, "mlp": 58.5 + i},
         "test": {"lm": 62.0 + i, "knnlm_tuned": 57.0 + i, "mlp": 60.0 + i},
         "control": {"weight": 0.3, "test": {"control": 61.0 + i, "control_alone": 63.0 + i}}}
        for i, s in enumerate(SEEDS)
    ]  # fmt: skip
    return {
        "seeds": list(SEEDS),
        "per_seed": per,
        "storage": {
            "memory_bytes": 3_000_000,
            "memory_bytes_without_shared_W": 1_000_000,
            "datastore_bytes": 90_000_000,
            "index_bytes": 10_000_000,
        },  # fmt: skip
        "settings": {"hidden": 1024, "epochs": 10, "lr": 1e-3},
    }


def _curve(steps: list[int], lead: float, higher: bool) -> dict:
    """Two models that meet at step 0; the one without the last MLP leads by ``lead`` early."""
    sign = 1 if higher else -1
    T = steps[-1]
    with_mlp, without = [], []
    for i in range(len(SEEDS)):
        base = [sign * 3 * t / T + 0.05 * i - (0 if higher else -5) for t in steps]
        with_mlp.append(base)
        # Ahead in the first half, level by the end.
        without.append(
            [b + sign * lead * math.sin(math.pi * t / T) for b, t in zip(base, steps, strict=True)]
        )
    return {"steps": list(steps), "with_mlp": with_mlp, "without_mlp": without}


def _hurdle() -> dict:
    steps = [0, 100, 200, 300, 400, 500, 600, 700, 800]
    return {
        "seeds": list(SEEDS),
        "loglik": _curve(steps, 0.5, True),
        "loss": _curve(steps, 0.3, False),
        "figure4": None,
        "figure5": None,
    }


PROVENANCE_PACKAGES = ("knnlm", "torch", "transformers", "tokenizers", "numpy", "faiss",
                       "safetensors", "datasets", "peft")  # fmt: skip


def _width() -> dict:
    """Two widths whose shares of the gap do not overlap: the rise is shown."""

    def row(d: int, share: float) -> dict:
        iv = {
            "mean": share,
            "lower": share - 0.05,
            "upper": share + 0.05,
            "n": 300,
            "sd": 0.3,
            "over": "positions",
            "method": "seeded paired bootstrap over 300 positions",
        }
        q = {
            "perplexity": 40 - 4 * share,
            "share": share,
            "kl_mean": 0.1,
            "kl_init_mean": 0.2,
            "at_tolerance": 300,
            "share_interval": iv,
        }
        shares = [share - 0.02, share, share + 0.02]
        # t(0.95, 2) 2.92 x sd 0.02 / sqrt(3) = 0.0337
        over = {
            "mean": share,
            "lower": share - 0.0337,
            "upper": share + 0.0337,
            "n": 3,
            "sd": 0.02,
            "over": "seeds",
            "method": "one-sided t bounds over 3 seeds",
        }
        q |= {"share_per_seed": shares, "share_over_seeds": over}
        return {"d": d, "lm": 40.0, "knnlm": 36.0, "positions": 300, "proj_f": q, "proj_fg": q,
                "seeds": [0, 1, 2]}  # fmt: skip

    return {"seed": 0, "seeds": [0, 1, 2], "preset": "tiny",
            "rows": [row(64, 0.4), row(128, 0.7), row(256, 0.85)]}  # fmt: skip


def _provenance() -> dict:
    return {
        "packages": {name: "1.0" for name in PROVENANCE_PACKAGES},
        "python": "3.11.7",
        "implementation": "cpython",
        "platform": "Linux-x86_64",
        "git": {"commit": "0" * 40, "dirty": False},
        "cpu_model": "A CPU",
        "cpu_count": 2,
        "torch_threads": 1,
        "device": "cpu",
        "started_utc": "2026-01-01T00:00:00+00:00",
        "ended_utc": "2026-01-01T00:05:00+00:00",
    }


def make_results() -> dict:
    """A complete results dict for three seeds in which every claim holds."""
    return copy.deepcopy(
        {
            "config": {"scale": "quick", "corpus": None},
            "lm": [
                {
                    "model": f"artifacts/lm-{s}/model",
                    "trained": True,
                    "seed": s,
                    "valid_loss": {
                        "steps": [400, 450, 500, 550, 600],
                        "loss": [5.20, 5.15, 5.12, 5.11, 5.105],
                        "measured_on": "32 fixed blocks of the valid split",
                    },
                }
                for s in SEEDS
            ],  # fmt: skip
            "knnlm": _knnlm(),
            "projection": {
                "lr_0.1": _proj(40.0, 36.0, 36.2, 35.9, 0.04, 500),
                "lr_0.001": _proj(40.0, 36.0, 38.5, 39.6, 0.3, 100),
            },
            "memory": _memory(),
            "macondo": _macondo(),
            "hurdle": _hurdle(),
            "width_study": _width(),
            "not_run": [
                {
                    "what": "Figure 2: GPT-3.5-turbo fine-tuned on Macondo-Conv",
                    "why": "needs a hosted chat model",
                    "command": "knnlm macondo export-conv",
                },
            ],  # fmt: skip
            "stages": {"lm": {"seconds": 12.5, "cached": False}},
            "wall_seconds": 100.0,
            "provenance": _provenance(),
        }
    )
