"""A synthetic ``results.json`` in the shape ``knnlm reproduce`` writes, and a checker of that shape.

``make_results()`` is the fixture the claims and report tests start from (every claim held);
``assert_contract(results)`` checks the keys and per-seed shapes the report reads, so the real
pipeline's output can be held to the same shape as this fixture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
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


def _proj(lm: float, knn: float, f: float, fg: float, kl: float, steps: int) -> dict:
    def stats(ppl: float, kl_mean: float, capped: int = 3) -> dict:
        return {"perplexity": ppl, "kl_mean": kl_mean, "kl_median": kl_mean / 2,
                "kl_init_mean": 0.3, "kl_removed": 1 - kl_mean / 0.3, "at_tolerance": 300,
                "steps_mean": 40.0, "steps_max": steps, "capped": capped}  # fmt: skip

    def per_position(ppl: float) -> list[float]:
        # 300 positions whose mean log-probability is -log(ppl), with a spread.
        return [-math.log(ppl) + 0.5 * ((i % 5) - 2) for i in range(300)]

    out = {
        "split": "test",
        "seed": 0,
        "positions": 300,
        "lm": {"perplexity": lm},
        "knnlm": {"perplexity": knn},
        "proj_f": stats(f, kl) | {"target_logp": per_position(f)},
        "proj_fg": stats(fg, 1.5 * kl) | {"target_logp": per_position(fg)},
        "max_steps": steps,
        "figure": None,
    }
    # The converged solve (claim (b) reads it) with its two sensitivity rows.
    out["converged"] = {
        "method": "L-BFGS",
        "proj_f": stats(f - 0.1, 0.8 * kl, 0),
        "proj_fg": stats(fg - 0.1, 0.8 * kl, 0),
        "proj_f_lm_head": stats(f, kl, 0),
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
        "settings": {"epochs": 20},
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
        "settings": {"hidden": 1024, "epochs": 10},
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
            "lm": {"model": "artifacts/lm/model"},
            "knnlm": _knnlm(),
            "projection": {
                "lr_0.1": _proj(40.0, 36.0, 36.2, 35.9, 0.04, 500),
                "lr_0.001": _proj(40.0, 36.0, 38.5, 39.6, 0.3, 100),
            },
            "memory": _memory(),
            "macondo": _macondo(),
            "hurdle": _hurdle(),
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


# ----------------------------------------------------------------------------- shape check


def _has(d: Any, keys: str, where: str) -> None:
    assert isinstance(d, Mapping), f"{where} is not a mapping"
    for k in keys.split():
        assert k in d, f"{where} lacks {k!r}"


def _seeds_rows(rows: Any, n_seeds: int, n_steps: int, where: str) -> None:
    assert len(rows) == n_seeds, f"{where}: {len(rows)} rows for {n_seeds} seeds"
    for row in rows:
        assert len(row) == n_steps, f"{where}: a row has {len(row)} values for {n_steps} steps"


def assert_contract(r: Mapping[str, Any]) -> None:
    """The keys the report reads, per section present (a missing section is allowed)."""
    if r.get("knnlm"):
        k = r["knnlm"]
        _has(k, "seeds paper_setting per_seed", "knnlm")
        assert len(k["per_seed"]) == len(k["seeds"])
        for p in k["per_seed"]:
            _has(p, "seed tuned valid test", "knnlm.per_seed[]")
            _has(p["tuned"], "knn_weight temperature tuned_on", "knnlm.per_seed[].tuned")
            for split in ("valid", "test"):
                _has(p[split], "tokens lm knnlm_paper knnlm_tuned", f"knnlm.per_seed[].{split}")
    if r.get("projection"):
        for key in ("lr_0.1", "lr_0.001"):
            p = r["projection"][key]
            _has(p, "split seed positions lm knnlm proj_f proj_fg max_steps", key)
            for name in ("proj_f", "proj_fg"):
                _has(p[name], "perplexity kl_mean kl_median steps_mean steps_max capped", name)
        conv = r["projection"]["lr_0.1"]["converged"]
        for name in ("proj_f", "proj_fg", "proj_f_lm_head", "proj_f_target_first"):
            _has(conv[name], "perplexity kl_mean kl_init_mean kl_removed at_tolerance", name)
        low = r["projection"]["lr_0.001"]
        assert len(low["proj_f"]["target_logp"]) == len(low["proj_fg"]["target_logp"])
    if r.get("memory"):
        m = r["memory"]
        _has(m, "seeds per_seed storage", "memory")
        _has(m["storage"], "memory_bytes memory_bytes_without_shared_W datastore_bytes "
             "index_bytes", "memory.storage")  # fmt: skip
        for p in m["per_seed"]:
            _has(p, "seed weight valid test control", "memory.per_seed[]")
            _has(p["test"], "lm knnlm_tuned mlp", "memory.per_seed[].test")
            _has(p["control"]["test"], "control", "memory.per_seed[].control.test")
    if r.get("macondo"):
        m = r["macondo"]
        _has(m, "seeds n_values per_seed curves", "macondo")
        ns = {str(n) for n in m["n_values"]}
        for p in m["per_seed"]:
            for model in ("lm", "knnlm", "mlp"):
                assert set(p["test"][model]) == ns, f"macondo test {model} keys"
            assert set(p["train"]["lm"]) == ns
            if p.get("tuned"):  # retrieval chosen on a dev share of the parents
                _has(p["tuned"], "k temperature knn_weight tuned_on", "macondo.per_seed[].tuned")
        c = m["curves"]
        for model in ("lm", "knnlm"):
            for n in ns:
                _seeds_rows(c[model][n], len(m["seeds"]), len(c["steps"]), f"curves.{model}.{n}")
    if r.get("hurdle"):
        h = r["hurdle"]
        _has(h, "seeds loglik loss", "hurdle")
        for key in ("loglik", "loss"):
            if h[key] is not None:
                for side in ("with_mlp", "without_mlp"):
                    _seeds_rows(h[key][side], len(h["seeds"]), len(h[key]["steps"]), key)
    for row in (r.get("width_study") or {}).get("rows", []):
        _has(row, "d lm knnlm proj_f proj_fg", "width_study.rows[]")
        _has(row["proj_f"], "perplexity share kl_mean kl_init_mean", "width_study.rows[].proj_f")
    if r.get("provenance"):
        p = r["provenance"]
        _has(p, "packages python git cpu_model cpu_count torch_threads device started_utc "
             "ended_utc", "provenance")  # fmt: skip
        _has(p["packages"], " ".join(PROVENANCE_PACKAGES), "provenance.packages")
        _has(p["git"], "commit dirty", "provenance.git")
        assert p["started_utc"] <= p["ended_utc"], "provenance: ends before it starts"
        assert "hostname" not in p and "host" not in p, "provenance records no host name"
    for item in r.get("not_run", []):
        _has(item, "what why command", "not_run[]")
