"""The last-MLP "hurdle" (paper Appendix E, Figures 4 and 5).

For each seed two GPT-2 models are trained from scratch, identical in every setting: one full,
one without the last block's MLP. Both are built from the same seeded initialisation (the
second simply loses that MLP, so every remaining weight is equal) and trained with the same
``data_seed`` (same batches, same order) through :func:`knnlm.lm.train.train`.

(a) Macondo: trained on the TEST sentences ("[villager], is the parent of [child]"), as in the
    paper; every ``eval_every`` steps (and at step 0) the mean log-likelihood of the child
    given the prompt over the same sentences is logged (a perfect model gives log(1/n)).
(b) A text corpus (e.g. WikiText-2), when given: trained on its train split; the training loss
    (mean over each ``eval_every``-step window) is logged.

Curves are averaged over seeds (mean, std), drawn as ``figure4.png`` / ``figure5.png`` by the
report layer, and summarised (:mod:`.curves`): does the model without the last MLP lead early
(mean gap over the first half of training, per logged step), and which variant first reaches
a threshold half-way from the starting value to the best value either reached. Each (part,
seed, variant) run is cached in ``out/runs/`` and skipped on a rerun with the same settings.

Tokenizers: a byte-level BPE trained on the Macondo text (train + test sentences; children's
names must come out as single tokens, which is checked) for (a), one trained on the corpus's
train split for (b).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from knnlm.data.corpus import read_split
from knnlm.errors import KnnlmError
from knnlm.experiments.hurdle.curves import compare_curves, describe_comparison
from knnlm.experiments.hurdle.settings import (
    HurdleSettings,
    build_model,
    corpus_loss_fn,
    corpus_tokens,
    macondo_eval_fn,
    macondo_for_hurdle,
    n_parameters,
    resolve_preset,
)
from knnlm.experiments.stats import mean_std_rows
from knnlm.fileio import canonical_json, claim_work_dir, fingerprint, write_json_atomic
from knnlm.lm.loading import pick_device, tokenizer_fingerprint, torch_threads
from knnlm.lm.presets import Preset
from knnlm.lm.train import train
from knnlm.lm.train_config import TrainConfig
from knnlm.locking import locks
from knnlm.retrieval.datastore import corpus_fingerprint

FORMAT_VERSION = 1
VARIANTS = ("with_mlp", "without_mlp")
RESULT_FILE = "hurdle.json"
ModelHook = Callable[[str, int, str, nn.Module], None]


# ---------------------------------------------------------------------------------------
# one run (cached)
# ---------------------------------------------------------------------------------------
def _run_cached(
    run_file: Path,
    key: dict,
    model_fn: Callable[[], nn.Module],
    tokenizer,
    data: np.ndarray | list[str],
    config,
    on_eval,
    *,
    keep_model: bool,
    progress: bool,
    device: torch.device,
) -> dict:
    """Train one variant unless ``run_file`` already holds a run with the same ``key``."""
    if run_file.is_file():
        try:
            cached = json.loads(run_file.read_text())
        except ValueError:
            cached = {}
        if cached.get("key") == key:
            return cached
    work_dir = run_file.with_suffix("")
    key_file = work_dir / "hurdle_key.json"
    # A checkpoint left by an interrupted run resumes only if it belongs to these settings.
    if work_dir.exists() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
        shutil.rmtree(work_dir)
    write_json_atomic(key_file, key)
    model = model_fn().to(device)
    evals = []
    if on_eval is not None:  # step 0: the shared initialisation, before any update
        model.eval()
        with torch.no_grad():
            evals.append({"step": 0, **on_eval(0, model)})
    result = train(model, tokenizer, data, config, work_dir, on_eval=on_eval, progress=progress)
    record = {
        "key": key,
        "params": n_parameters(model),
        "evals": evals + result.evals,
        "loss_curve": result.loss_curve,
        "seconds": result.seconds,
        "tokens_seen": result.tokens_seen,
    }
    write_json_atomic(run_file, record)
    if not keep_model:
        shutil.rmtree(work_dir, ignore_errors=True)
    return record


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """One hurdle run's settings, resolved: what each step of it reads."""

    settings: HurdleSettings
    arch: Preset
    seeds: list[int]
    train: dict[str, Any]  # training settings, in every run's cache key and in the results
    out: Path
    device: torch.device
    progress: bool
    on_model: ModelHook | None


@locks("out", "hurdle run")
def run_hurdle(
    settings: HurdleSettings,
    out: str | Path,
    *,
    progress: bool = True,
    on_model: ModelHook | None = None,
) -> dict:
    """Run Appendix E with ``settings`` and write ``out/hurdle.json`` (the report layer draws
    its figures).

    ``settings.corpus`` adds part (b) on its train split. ``on_model(part, seed, variant,
    model)`` is called on each model before it trains (to attach hooks). Each trained run is
    cached under ``out/runs/``; a checkpoint (``settings.checkpoint_every``) lets an
    interrupted run resume mid-way on a rerun with the same settings.
    Returns the results dict (also written to ``hurdle.json``).
    """
    with torch_threads(settings.threads):
        return _run_hurdle(settings, out, progress, on_model)


def _run_hurdle(
    settings: HurdleSettings, out: str | Path, progress: bool, on_model: ModelHook | None
) -> dict:
    """Checks, part (a), part (b) when a corpus is set, then the results file."""
    t0 = time.perf_counter()
    arch = resolve_preset(settings.preset)
    seeds = _checked_seeds(settings)
    corpus_text = None
    if settings.corpus is not None:
        # Read before part (a) trains, so a wrong path stops the run first; part (b) uses it.
        corpus_text = read_split(settings.corpus, "train")
    # Resumes a run of ours; a folder of the user's own files is refused, untouched.
    out = claim_work_dir(Path(out).expanduser(), "hurdle_run")
    dev = pick_device(settings.device)
    run = _Run(settings, arch, seeds, _train_settings(settings, arch), out, dev, progress, on_model)

    ds, mtok = macondo_for_hurdle(
        settings.macondo_seed, settings.macondo_vocab_size, **settings.macondo_sizes()
    )
    result, params, summary, ctx = _macondo_part(run, ds, mtok)
    lines = [describe_comparison("Macondo log-likelihood", summary["loglik"], len(seeds))]
    corpus_info = None
    if corpus_text is not None:
        summary["loss"], corpus_info = _corpus_part(run, corpus_text, result)
        lines.append(describe_comparison("training loss", summary["loss"], len(seeds)))
    summary["without_mlp_ahead_early"] = summary["loglik"]["without_mlp_ahead_early"]
    summary["text"] = lines
    result.update(
        params=params,
        settings=_settings_record(run, ds.meta["counts"], len(mtok), ctx, corpus_info),
        summary=summary,
        wall_seconds=time.perf_counter() - t0,
    )
    write_json_atomic(out / RESULT_FILE, result)
    return result


def _checked_seeds(settings: HurdleSettings) -> list[int]:
    """The seeds, once checked with the run's length and logging interval."""
    seeds = [int(s) for s in settings.seeds]
    steps, eval_every = settings.steps, settings.eval_every
    if not seeds or len(set(seeds)) != len(seeds):
        raise KnnlmError(f"give at least one seed, each once (got {seeds})")
    if steps < 1 or eval_every < 1:
        raise KnnlmError(f"steps and eval_every must be positive, got {steps} and {eval_every}")
    if eval_every > steps:
        raise KnnlmError(f"eval_every ({eval_every}) exceeds the number of steps ({steps})")
    return seeds


def _train_settings(settings: HurdleSettings, arch: Preset) -> dict[str, Any]:
    return {
        "lr": settings.lr if settings.lr is not None else arch.lr,
        "batch_size": settings.batch_size or arch.batch_size,
        "steps": settings.steps,
        "eval_every": settings.eval_every,
        "warmup_ratio": arch.warmup_ratio,
        "weight_decay": arch.weight_decay,
    }


def _settings_record(
    run: _Run, counts: Any, macondo_vocab: int, macondo_ctx: int, corpus_info: dict | None
) -> dict:
    """The ``settings`` of the results: the run's settings as resolved."""
    return {
        "preset": run.arch.to_json(),
        "quick": run.settings.quick,
        "seeds": run.seeds,
        **run.train,
        "device": str(run.device),
        "macondo": {
            "seed": run.settings.macondo_seed,
            "counts": counts,
            "train_on": "test sentences",
            "vocab_size": macondo_vocab,
            "context_len": macondo_ctx,
        },
        "corpus": corpus_info,
    }


# -- training both variants of every seed ----------------------------------------------------


def _train_config(run: _Run, seed: int, context_len: int) -> TrainConfig:
    return TrainConfig(
        lr=run.train["lr"],
        batch_size=run.train["batch_size"],
        max_steps=run.settings.steps,
        warmup_ratio=run.arch.warmup_ratio,
        weight_decay=run.arch.weight_decay,
        seed=seed,
        data_seed=seed,  # both variants of a seed: the same batches in the same order
        context_len=context_len,
        checkpoint_every=run.settings.checkpoint_every,
        eval_every=run.settings.eval_every,
        log_every=run.settings.eval_every,
    )


def _new_model(
    run: _Run, part: str, tokenizer, seed: int, variant: str, context_len: int
) -> nn.Module:
    """The seed's shared initialisation, without the last MLP for ``without_mlp``."""
    model = build_model(
        run.arch, tokenizer, seed, drop_last_mlp=variant == "without_mlp", context_len=context_len
    )
    if run.on_model is not None:
        run.on_model(part, seed, variant, model)
    return model


def _part_runs(
    run: _Run, part: str, tokenizer, data, context_len: int, on_eval, data_fp: str
) -> dict[str, list[dict]]:
    """Both variants of every seed trained on ``data`` (cached): variant -> one record a seed."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in run.seeds:
        for variant in VARIANTS:
            key = {
                "format_version": FORMAT_VERSION,
                "part": part,
                "variant": variant,
                "seed": seed,
                "preset": run.arch.to_json(),
                "context_len": context_len,
                "train": run.train,
                "data": data_fp,
                "tokenizer": tokenizer_fingerprint(tokenizer),
            }
            runs[variant].append(
                _run_cached(
                    run.out / "runs" / f"{part}-seed{seed}-{variant}.json",
                    key,
                    partial(_new_model, run, part, tokenizer, seed, variant, context_len),
                    tokenizer,
                    data,
                    _train_config(run, seed, context_len),
                    on_eval,
                    keep_model=run.settings.keep_models,
                    progress=run.progress,
                    device=run.device,
                )
            )
    return runs


# -- (a) Macondo, trained on its test sentences ----------------------------------------------


def _macondo_part(run: _Run, ds, tokenizer) -> tuple[dict[str, Any], dict, dict[str, Any], int]:
    """Part (a): (curves by variant, parameters by variant, summary, context length)."""
    texts = [r["text"] for r in ds.test]
    ctx = min(run.arch.context_len, 64)  # a sentence is ~10 tokens; no need for a long context
    mac = _part_runs(
        run,
        "macondo",
        tokenizer,
        texts,
        ctx,
        macondo_eval_fn(tokenizer, ds.test),
        fingerprint(canonical_json(ds.test)),
    )
    perfect = float(np.mean([math.log(1.0 / r["n_children"]) for r in ds.test]))
    steps = [e["step"] for e in mac["with_mlp"][0]["evals"]]
    result: dict[str, Any] = {v: _macondo_curves(mac[v], steps) for v in VARIANTS}
    params = {v: int(mac[v][0]["params"]) for v in VARIANTS}
    summary: dict[str, Any] = {
        "loglik": compare_curves(
            steps,
            result["with_mlp"]["loglik"],
            result["without_mlp"]["loglik"],
            higher_is_better=True,
            per_seed=(
                result["with_mlp"]["loglik_per_seed"],
                result["without_mlp"]["loglik_per_seed"],
            ),
        ),
        "loss": None,
    }
    summary["loglik"]["perfect"] = perfect
    return result, params, summary, ctx


def _macondo_curves(runs: list[dict], steps: list[int]) -> dict[str, Any]:
    """One variant's Macondo curves over its seeds (mean, std, per seed)."""
    for r in runs:
        if [e["step"] for e in r["evals"]] != steps:
            raise KnnlmError("runs logged different steps; delete out/runs and rerun")
    per_seed = [[e["loglik"] for e in r["evals"]] for r in runs]
    mean, std = mean_std_rows(per_seed)
    loss_mean, loss_std = mean_std_rows([[p["loss"] for p in r["loss_curve"]] for r in runs])
    by_n = {
        n: mean_std_rows([[e["loglik_by_n"][n] for e in r["evals"]] for r in runs])[0]
        for n in runs[0]["evals"][0]["loglik_by_n"]
    }
    return {
        "steps": steps,
        "loglik": mean,
        "loglik_std": std,
        "loglik_per_seed": per_seed,
        "loglik_by_n_children": by_n,
        "macondo_loss_steps": [p["step"] for p in runs[0]["loss_curve"]],
        "macondo_loss": loss_mean,
        "macondo_loss_std": loss_std,
        "loss_steps": [],
        "loss": [],
        "loss_std": [],
        "seconds": float(sum(r["seconds"] for r in runs)),
    }


# -- (b) a text corpus, trained on its train split -------------------------------------------


def _corpus_part(run: _Run, text: str, result: dict[str, Any]) -> tuple[dict, dict]:
    """Part (b): adds each variant's loss curves to ``result``; returns (loss summary, the
    corpus's record for the settings)."""
    st = run.settings
    vocab = st.corpus_vocab_size or run.arch.tokenizer_vocab_size
    ctok, ids = corpus_tokens(text, st.corpus, vocab, st.corpus_max_chars)
    ctx = run.arch.context_len
    crun = _part_runs(
        run, "corpus", ctok, ids, ctx, corpus_loss_fn(ids, ctx), corpus_fingerprint(ids)
    )
    loss_steps = [p["step"] for p in crun["with_mlp"][0]["loss_curve"]]
    for v in VARIANTS:
        per_seed = [[p["loss"] for p in r["loss_curve"]] for r in crun[v]]
        mean, std = mean_std_rows(per_seed)
        result[v].update(
            loss_eval_steps=[e["step"] for e in crun[v][0]["evals"]],
            loss_eval_per_seed=[[e["loss"] for e in r["evals"]] for r in crun[v]],
            loss_steps=loss_steps,
            loss=mean,
            loss_std=std,
            loss_per_seed=per_seed,
            seconds=result[v]["seconds"] + float(sum(r["seconds"] for r in crun[v])),
        )
    info = {
        "corpus": st.corpus,
        "max_chars": st.corpus_max_chars,
        "train_tokens": int(ids.size),
        "vocab_size": len(ctok),
        "context_len": ctx,
        "params": {v: int(crun[v][0]["params"]) for v in VARIANTS},
    }
    return _loss_summary(result), info


def _loss_summary(result: dict[str, Any]) -> dict:
    """Figure 5's summary: the loss on fixed training blocks, logged like Figure 4 (step 0
    included); the windowed loss of the optimiser stays in loss / loss_per_seed."""
    ev = {v: mean_std_rows(result[v]["loss_eval_per_seed"]) for v in VARIANTS}
    return compare_curves(
        result["with_mlp"]["loss_eval_steps"],
        ev["with_mlp"][0],
        ev["without_mlp"][0],
        higher_is_better=False,
        per_seed=(
            result["with_mlp"]["loss_eval_per_seed"],
            result["without_mlp"]["loss_eval_per_seed"],
        ),
    )
