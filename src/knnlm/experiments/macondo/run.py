"""The Macondo over-specification experiment (paper Section 4, Figures 1 and 3, Table 5).

For each seed (:mod:`knnlm.experiments.macondo.seed`): generate Macondo with the tokenizer of
the model being fine-tuned, fine-tune it on the training sentences ("[villager], who [desc],
is the parent of [child]", one example each), build a datastore over the same sentences with
the fine-tuned model, train the MLP memory on it, and score every test example
("[villager], is the parent of" -> " [child]") with the LM, the kNN-LM and LM + MLP memory.
A model that generalises from the over-specified training sentences gives each of a parent's
n children log(1/n); the paper finds the LM far below that and the kNN-LM closer.

Settings and presets: :mod:`knnlm.experiments.macondo.settings`. Aggregation over seeds:
:mod:`knnlm.experiments.macondo.aggregate`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from knnlm.experiments.macondo.aggregate import (
    aggregate_curves,
    aggregate_groups,
    reproduced,
)
from knnlm.experiments.macondo.seed import run_seed
from knnlm.experiments.macondo.settings import MacondoSettings
from knnlm.experiments.parallel import map_jobs
from knnlm.fileio import claim_work_dir, write_json_atomic
from knnlm.lm.loading import pick_device, torch_threads
from knnlm.locking import locks

# The run's results; the report layer draws the table and figures from them.
RESULTS = "results.json"
TABLE = "table5.md"
FIGURE_GROUPS = "figure1.png"
FIGURE_CURVES = "figure3.png"


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------
def _seed_job(seed: int, seed_dir: Path, settings: MacondoSettings, progress: bool) -> dict:
    """One seed in a worker process (top level, so it can be sent there)."""
    return run_seed(seed, seed_dir, settings, progress=progress)


def torch_threads_now() -> int:
    return torch.get_num_threads()


@locks("out", "Macondo run")
def run_macondo(
    settings: MacondoSettings, out: str | Path, *, progress: bool = True
) -> dict[str, Any]:
    """Run the Macondo experiment for every seed of ``settings`` and write
    ``out/results.json`` (the report layer draws Table 5 and the figures from it); returns the
    results dict written there. ``settings.workers`` > 1 runs the seeds in that many processes.
    """
    record = settings.as_dict()
    # Resumes a run of ours; a folder of the user's own files is refused, untouched.
    out = claim_work_dir(Path(out).expanduser(), "macondo_run")
    t0 = time.perf_counter()
    per_seed = _run_seeds(settings, out, progress)
    results = _results(per_seed, record, seconds=time.perf_counter() - t0)
    write_json_atomic(out / RESULTS, results)
    return results


def _run_seeds(settings: MacondoSettings, out: Path, progress: bool) -> list[dict[str, Any]]:
    """Each seed's results, in the order of ``settings.seeds``."""
    threads = settings.run_preset.cpu_threads
    if settings.workers > 1 and len(settings.seeds) > 1:
        # Seeds are independent (each its own folder): one process per seed, ``workers`` at once.
        jobs = [(s, out / f"seed-{s}", settings, False) for s in settings.seeds]
        return map_jobs(_seed_job, jobs, settings.workers, threads or torch_threads_now())
    per_seed = []
    with torch_threads(threads if pick_device(settings.device).type == "cpu" else None):
        for s in tqdm(settings.seeds, desc="macondo seeds", unit="seed", disable=not progress):
            per_seed.append(run_seed(s, out / f"seed-{s}", settings, progress=progress))
    return per_seed


# What results.json keeps of each seed's results (the examples stay in the seed's folder).
PER_SEED_KEYS = (
    "seed",
    "groups",
    "tuning",
    "train_groups_lm",
    "memory",
    "curve",
    "dataset",
    "datastore_size",
    "search",
    "train",
    "seconds",
    "examples",
)


def _results(per_seed: list[dict[str, Any]], record: dict[str, Any], seconds: float) -> dict:
    """The run's results from its seeds' (``record``: the settings as recorded)."""
    groups = aggregate_groups([r["groups"] for r in per_seed])
    curves = aggregate_curves([r["curve"] for r in per_seed]) if record["eval_every"] else None
    results: dict[str, Any] = {
        "groups": groups,
        "per_seed": [{key: r.get(key) for key in PER_SEED_KEYS} for r in per_seed],
        "settings": record,
        "reproduced": reproduced(groups),
        "seconds": seconds,
        "files": {"table": TABLE, "figure1": FIGURE_GROUPS},
    }
    if curves is not None:
        results["curves"] = curves
        results["files"]["figure3"] = FIGURE_CURVES
    return results


def contract_view(res: Mapping[str, Any]) -> dict[str, Any]:
    """The results contract's ``macondo`` section from a :func:`run_macondo` result: per seed,
    mean log p(child) per n on the test sentences (LM, kNN-LM, LM + MLP memory) and the LM's on
    the training sentences; curves [seed][step] per n over fine-tuning."""
    keys = [str(n) for n in sorted(int(n) for n in res["groups"])]
    per_seed = []
    for r in res["per_seed"]:
        g = r["groups"]
        per_seed.append(
            {
                "seed": r["seed"],
                "test": {
                    m: {n: g[n].get(m) for n in keys}
                    for m in ("lm", "knnlm", "mlp", "knnlm_default")
                    if all(g[n].get(m) is not None for n in keys)
                },
                "test_examples": _test_examples(r.get("examples")),
                "train": {"lm": {n: r["train_groups_lm"][n] for n in keys}},
                "tuned": (r.get("tuning") or {}).get("tuned"),
                "dataset": r.get("dataset"),
                "datastore_size": r.get("datastore_size"),
                "memory": r.get("memory"),
                "fine_tuning": r.get("train"),
            }
        )
    return {
        "seeds": list(res["settings"]["seeds"]),
        "n_values": [int(n) for n in keys],
        "per_seed": per_seed,
        "curves": _macondo_curves(res["per_seed"], keys),
    }


def _test_examples(examples: Any) -> dict[str, list] | None:
    """The children the verdict reads, one list per field (the bootstrap's units under 3
    seeds): n, and each model's log p(child)."""
    rows = [e for e in examples or [] if e.get("split", "test") == "test"]
    if not rows:
        return None
    out: dict[str, list] = {"n": [int(e["n_children"]) for e in rows]}
    for model in ("lm", "knnlm", "mlp", "knnlm_default"):
        if all(e.get(model) is not None for e in rows):
            out[model] = [float(e[model]) for e in rows]
    return out


def _macondo_curves(per_seed: list[dict], keys: list[str]) -> dict | None:
    """Figure 1/3 curves: steps shared by every seed; [seed][step] per n, LM and kNN-LM."""
    curves = [r.get("curve") or [] for r in per_seed]
    if not all(curves):
        return None
    steps = sorted(set.intersection(*({int(e["step"]) for e in c} for c in curves)))
    by_step = [{int(e["step"]): e for e in c} for c in curves]
    out: dict[str, Any] = {"steps": steps}
    # Which test parents the curves average: the verdict's (dev share left out) or all.
    marks = {e.get("parents") for c in curves for e in c}
    out["parents"] = marks.pop() if len(marks) == 1 else None
    for model in ("lm", "knnlm"):
        if any(seed[s].get(model) is None for seed in by_step for s in steps):
            out[model] = None
            continue
        out[model] = {n: [[seed[s][model][n] for s in steps] for seed in by_step] for n in keys}
    return out


def cli_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` contract: mean log-likelihoods (natural log) per n, settings, verdict."""
    return {
        "groups": {
            n: {key: g[key] for key in ("lm", "knnlm", "perfect", "lm_std", "knnlm_std")}
            for n, g in results["groups"].items()
        },
        "settings": results["settings"],
        "reproduced": results["reproduced"],
        "seconds": results["seconds"],
    }
