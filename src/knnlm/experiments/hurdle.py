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
report layer, and summarised: does the model without the last MLP lead early (mean gap over
the first half of training, per logged step), and which variant first reaches a threshold
half-way from the starting value to the best value either reached. Each (part, seed, variant) run is cached in
``out/runs/`` and skipped on a rerun with the same settings.

Tokenizers: a byte-level BPE trained on the Macondo text (train + test sentences; children's
names must come out as single tokens, which is checked) for (a), one trained on the corpus's
train split for (b).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from knnlm.errors import KnnlmError
from knnlm.experiments.hurdle_setup import (
    FULL,
    QUICK,
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
from knnlm.lm.loading import torch_threads
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
    from knnlm.lm.train import train

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
# summaries
# ---------------------------------------------------------------------------------------
def compare_curves(
    steps: Sequence[float],
    with_mlp: Sequence[float],
    without_mlp: Sequence[float],
    higher_is_better: bool,
    per_seed: tuple[list[list[float]], list[list[float]]] | None = None,
) -> dict:
    """Who leads, from mean curves on shared steps. ``gap`` > 0 means without_mlp is ahead.

    - ``gap_by_step``: (without - with), sign-flipped for a loss;
    - ``mean_gap_first_half``: the trapezoid area of the gap over steps <= half of the last
      step, divided by that span (the average lead; the single point when only one);
    - ``threshold``: half-way from the first logged value (mean of both) to the best value
      either curve reached; ``first_step_reaching`` per variant (None when never).
    """
    x = np.asarray(steps, dtype=np.float64)
    a, b = np.asarray(with_mlp, dtype=np.float64), np.asarray(without_mlp, dtype=np.float64)
    if not (len(x) == len(a) == len(b)) or len(x) == 0:
        raise KnnlmError("curves to compare need one value per step, and at least one step")
    sign = 1.0 if higher_is_better else -1.0

    def early_gap(aa: np.ndarray, bb: np.ndarray) -> float:
        gap = sign * (bb - aa)
        early = x <= x[-1] / 2
        if early.sum() < 2:
            return float(gap[early].mean()) if early.any() else float(gap[0])
        span = x[early][-1] - x[early][0]
        xs, gs = x[early], gap[early]
        return float(np.sum((gs[1:] + gs[:-1]) * np.diff(xs)) / 2 / span)

    gap = sign * (b - a)
    start = (a[0] + b[0]) / 2
    best = max(a.max(), b.max()) if higher_is_better else min(a.min(), b.min())
    threshold = float(start + 0.5 * (best - start))

    def first_reach(c: np.ndarray) -> float | None:
        hit = np.nonzero(sign * (c - threshold) >= 0)[0]
        return float(x[hit[0]]) if len(hit) else None

    early = x <= x[-1] / 2
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
    out["without_mlp_ahead_early"] = out["mean_gap_first_half"] > 0
    if per_seed is not None:
        gaps = [early_gap(np.asarray(w), np.asarray(wo)) for w, wo in zip(*per_seed, strict=True)]
        out["mean_gap_first_half_per_seed"] = gaps
        out["seeds_without_mlp_ahead_early"] = int(sum(g > 0 for g in gaps))
    return out


def _sentence(name: str, cmp: dict, n_seeds: int) -> str:
    lead = "without" if cmp["without_mlp_ahead_early"] else "with"
    reach = cmp["first_step_reaching"]
    seeds = cmp.get("seeds_without_mlp_ahead_early")
    seed_txt = f"; without_mlp ahead in {seeds}/{n_seeds} seeds" if seeds is not None else ""
    return (
        f"{name}: the model {lead} the last MLP leads over the first half "
        f"(mean gap {cmp['mean_gap_first_half']:+.4f}{seed_txt}); threshold "
        f"{cmp['threshold']:.4f} first reached at step {reach['without_mlp']} without vs "
        f"{reach['with_mlp']} with the last MLP"
    )


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------
@locks("out", "hurdle run")
def run_hurdle(
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    preset: str | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    corpus: str | None = None,
    *,
    quick: bool = False,
    lr: float | None = None,
    batch_size: int | None = None,
    macondo_seed: int = 0,
    n_villagers: int | None = None,
    n_parents_per_count: int | None = None,
    max_children: int | None = None,
    macondo_vocab_size: int = 16000,
    corpus_vocab_size: int | None = None,
    corpus_max_chars: int | None = None,
    checkpoint_every: int | None = None,
    keep_models: bool = False,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    on_model: ModelHook | None = None,
) -> dict:
    """Run Appendix E and write ``out/hurdle.json`` (the report layer draws its figures).

    ``quick`` switches the defaults to a tiny model and a few hundred steps (CPU, a minute or
    two); explicit arguments still win. ``corpus`` adds part (b) on its train split
    (``corpus_max_chars`` keeps only its beginning; --quick keeps 1.5M characters).
    ``on_model(part, seed, variant, model)`` is called on each model before it trains (to
    attach hooks); ``keep_models`` keeps each trained model under ``out/runs/``.
    ``checkpoint_every`` (default: 1000 steps, none with --quick) lets an interrupted run
    resume mid-way on a rerun with the same settings.
    ``threads`` sets torch's CPU threads for the run (--quick: 1, since tiny matrices gain
    nothing from more and several threads thrash on a busy machine).
    Returns the results dict (also written to ``hurdle.json``).
    """
    args = dict(locals())
    threads = args.pop("threads") or (1 if quick else None)
    with torch_threads(threads):
        return _run_hurdle(**args)


def _run_hurdle(
    out: str | Path,
    seeds: Sequence[int],
    preset: str | None,
    steps: int | None,
    eval_every: int | None,
    corpus: str | None,
    *,
    quick: bool,
    lr: float | None,
    batch_size: int | None,
    macondo_seed: int,
    n_villagers: int | None,
    n_parents_per_count: int | None,
    max_children: int | None,
    macondo_vocab_size: int,
    corpus_vocab_size: int | None,
    corpus_max_chars: int | None,
    checkpoint_every: int | None,
    keep_models: bool,
    device: str | None,
    progress: bool,
    on_model: ModelHook | None,
) -> dict:
    from knnlm.lm.loading import pick_device, tokenizer_fingerprint
    from knnlm.lm.train_config import TrainConfig

    t0 = time.perf_counter()
    base = QUICK if quick else FULL
    arch = resolve_preset(preset or base["preset"])
    steps = steps or base["steps"]
    eval_every = eval_every or base["eval_every"]
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise KnnlmError(f"give at least one seed, each once (got {seeds})")
    if steps < 1 or eval_every < 1:
        raise KnnlmError(f"steps and eval_every must be positive, got {steps} and {eval_every}")
    if eval_every > steps:
        raise KnnlmError(f"eval_every ({eval_every}) exceeds the number of steps ({steps})")
    if checkpoint_every is None:
        checkpoint_every = base["checkpoint_every"]
    if corpus is not None and corpus_max_chars is None:
        corpus_max_chars = base["corpus_max_chars"]
    corpus_text = None
    if corpus is not None:
        # Read before part (a) trains, so a wrong path stops the run first; part (b) uses it.
        from knnlm.data.corpus import read_split

        corpus_text = read_split(corpus, "train")
    # Resumes a run of ours; a folder of the user's own files is refused, untouched.
    out = claim_work_dir(Path(out).expanduser(), "hurdle_run")
    dev = pick_device(device)
    train_settings = {
        "lr": lr if lr is not None else arch.lr,
        "batch_size": batch_size or arch.batch_size,
        "steps": steps,
        "eval_every": eval_every,
        "warmup_ratio": arch.warmup_ratio,
        "weight_decay": arch.weight_decay,
    }

    def config(seed: int, context_len: int) -> TrainConfig:
        return TrainConfig(
            lr=train_settings["lr"],
            batch_size=train_settings["batch_size"],
            max_steps=steps,
            warmup_ratio=arch.warmup_ratio,
            weight_decay=arch.weight_decay,
            seed=seed,
            data_seed=seed,  # both variants of a seed: the same batches in the same order
            context_len=context_len,
            checkpoint_every=checkpoint_every,
            eval_every=eval_every,
            log_every=eval_every,
        )

    def part_runs(part, tokenizer, data, context_len, on_eval, data_fp) -> dict:
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for seed in seeds:
            for variant in VARIANTS:
                key = {
                    "format_version": FORMAT_VERSION,
                    "part": part,
                    "variant": variant,
                    "seed": seed,
                    "preset": arch.to_json(),
                    "context_len": context_len,
                    "train": train_settings,
                    "data": data_fp,
                    "tokenizer": tokenizer_fingerprint(tokenizer),
                }

                def model_fn(seed=seed, variant=variant) -> nn.Module:
                    model = build_model(
                        arch,
                        tokenizer,
                        seed,
                        drop_last_mlp=variant == "without_mlp",
                        context_len=context_len,
                    )
                    if on_model is not None:
                        on_model(part, seed, variant, model)
                    return model

                runs[variant].append(
                    _run_cached(
                        out / "runs" / f"{part}-seed{seed}-{variant}.json",
                        key,
                        model_fn,
                        tokenizer,
                        data,
                        config(seed, context_len),
                        on_eval,
                        keep_model=keep_models,
                        progress=progress,
                        device=dev,
                    )
                )
        return runs

    # (a) Macondo, trained on its test sentences.
    sizes = {
        k: v
        for k, v in (
            ("n_villagers", n_villagers),
            ("n_parents_per_count", n_parents_per_count),
            ("max_children", max_children),
        )
        if v is not None
    }
    ds, mtok = macondo_for_hurdle(macondo_seed, macondo_vocab_size, **sizes)
    texts = [r["text"] for r in ds.test]
    ctx = min(arch.context_len, 64)  # a sentence is ~10 tokens; no need for a long context
    mac = part_runs(
        "macondo",
        mtok,
        texts,
        ctx,
        macondo_eval_fn(mtok, ds.test),
        fingerprint(canonical_json(ds.test)),
    )
    perfect = float(np.mean([math.log(1.0 / r["n_children"]) for r in ds.test]))

    result: dict[str, Any] = {v: {} for v in VARIANTS}
    mac_steps = [e["step"] for e in mac["with_mlp"][0]["evals"]]
    for v in VARIANTS:
        for r in mac[v]:
            if [e["step"] for e in r["evals"]] != mac_steps:
                raise KnnlmError("runs logged different steps; delete out/runs and rerun")
        per_seed = [[e["loglik"] for e in r["evals"]] for r in mac[v]]
        mean, std = mean_std_rows(per_seed)
        loss_seed = [[p["loss"] for p in r["loss_curve"]] for r in mac[v]]
        loss_mean, loss_std = mean_std_rows(loss_seed)
        by_n = {
            n: mean_std_rows([[e["loglik_by_n"][n] for e in r["evals"]] for r in mac[v]])[0]
            for n in mac[v][0]["evals"][0]["loglik_by_n"]
        }
        result[v] = {
            "steps": mac_steps,
            "loglik": mean,
            "loglik_std": std,
            "loglik_per_seed": per_seed,
            "loglik_by_n_children": by_n,
            "macondo_loss_steps": [p["step"] for p in mac[v][0]["loss_curve"]],
            "macondo_loss": loss_mean,
            "macondo_loss_std": loss_std,
            "loss_steps": [],
            "loss": [],
            "loss_std": [],
            "seconds": float(sum(r["seconds"] for r in mac[v])),
        }
    params = {v: int(mac[v][0]["params"]) for v in VARIANTS}
    summary: dict[str, Any] = {
        "loglik": compare_curves(
            mac_steps,
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
    lines = [_sentence("Macondo log-likelihood", summary["loglik"], len(seeds))]

    # (b) A text corpus, trained on its train split.
    corpus_info = None
    if corpus is not None:
        vocab = corpus_vocab_size or arch.tokenizer_vocab_size
        ctok, ids = corpus_tokens(corpus_text, corpus, vocab, corpus_max_chars)
        cctx = arch.context_len
        crun = part_runs(
            "corpus", ctok, ids, cctx, corpus_loss_fn(ids, cctx), corpus_fingerprint(ids)
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
        # Figure 5 and its summary use the loss on fixed training blocks, logged like Figure 4
        # (step 0 included); the windowed loss of the optimiser stays in loss / loss_per_seed.
        ev_steps = result["with_mlp"]["loss_eval_steps"]
        ev = {v: mean_std_rows(result[v]["loss_eval_per_seed"]) for v in VARIANTS}
        summary["loss"] = compare_curves(
            ev_steps,
            ev["with_mlp"][0],
            ev["without_mlp"][0],
            higher_is_better=False,
            per_seed=(
                result["with_mlp"]["loss_eval_per_seed"],
                result["without_mlp"]["loss_eval_per_seed"],
            ),
        )
        lines.append(_sentence("training loss", summary["loss"], len(seeds)))
        corpus_info = {
            "corpus": corpus,
            "max_chars": corpus_max_chars,
            "train_tokens": int(ids.size),
            "vocab_size": len(ctok),
            "context_len": cctx,
            "params": {v: int(crun[v][0]["params"]) for v in VARIANTS},
        }

    summary["without_mlp_ahead_early"] = summary["loglik"]["without_mlp_ahead_early"]
    summary["text"] = lines
    result.update(
        params=params,
        settings={
            "preset": arch.to_json(),
            "quick": quick,
            "seeds": seeds,
            **train_settings,
            "device": str(dev),
            "macondo": {
                "seed": macondo_seed,
                "counts": ds.meta["counts"],
                "train_on": "test sentences",
                "vocab_size": len(mtok),
                "context_len": ctx,
            },
            "corpus": corpus_info,
        },
        summary=summary,
        wall_seconds=time.perf_counter() - t0,
    )
    write_json_atomic(out / RESULT_FILE, result)
    return result
