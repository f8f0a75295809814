"""One seed of the Macondo experiment (Section 4): generate, fine-tune, datastore, score.

The steps, in order: the data and the model (:mod:`.seed_data`), fine-tuning, scoring (LM,
kNN-LM, MLP memory, a ``tune`` grid), the results (:mod:`.seed_results`). The dataset is
generated with the tokenizer of the model that is fine-tuned (so every child is one token under
it) and used both to fine-tune and to evaluate. After fine-tuning: a datastore over the
training sentences (one example each, as seen in fine-tuning), the MLP memory trained on that
datastore (Section 5 / Appendix D: 10 epochs), and per test example log p(child | "[villager],
is the parent of") under the LM, the kNN-LM and LM + MLP memory. The LM's log-likelihood of
the children of the *training* sentences is recorded too, to check that it fitted what it was
fine-tuned on.

Artifacts under ``seed_dir``: ``data/``, ``model/``, ``datastore/``, ``memory/``,
``results.json``. A seed whose ``results.json`` holds the same settings is not rerun; a
finished fine-tuning (``train_done.json``) is reused; an interrupted one resumes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.continuations import continuation_log_probs
from knnlm.experiments.macondo.aggregate import group_means
from knnlm.experiments.macondo.seed_data import SeedData, child_continuations, data_and_model
from knnlm.experiments.macondo.seed_results import SeedScores, seed_results
from knnlm.experiments.macondo.settings import MacondoSettings, upgrade_settings
from knnlm.experiments.macondo.tuning import dev_mask, knn_grid_log_probs, tune
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.experiments.mlp_memory.train import train_memory
from knnlm.fileio import read_json, write_json_atomic
from knnlm.lm.adapters import Adapter, position_limit
from knnlm.lm.loading import LoadedLM, load_lm, tokenizer_fingerprint
from knnlm.lm.lora import apply_lora
from knnlm.lm.train import library_bars, train
from knnlm.lm.train_config import TrainConfig
from knnlm.retrieval.datastore import build_example_datastore, open_datastore
from knnlm.retrieval.memory import load_memory, memory_storage
from knnlm.retrieval.retriever import MixSettings

SEED_RESULTS = "results.json"
TRAIN_DONE = "train_done.json"
TRAIN_STARTED = "train_started.json"


def _same(a: Any, b: Any) -> bool:
    """Settings equality after a JSON round trip (tuples vs lists, int vs float keys)."""
    return json.loads(json.dumps(a, default=float)) == json.loads(json.dumps(b, default=float))


def seed_key(settings: MacondoSettings, seed: int) -> dict[str, Any]:
    """The settings of one seed as recorded in its results (its cache key)."""
    key = dict(settings.as_dict(), seed=seed)
    key.pop("seeds", None)
    return key


@contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


def run_seed(
    seed: int, seed_dir: Path, settings: MacondoSettings, *, progress: bool = True
) -> dict[str, Any]:
    """Generate, fine-tune, build the datastore and score one seed; returns its results dict
    (a seed whose ``results.json`` holds the same settings is not rerun)."""
    key = seed_key(settings, seed)
    cached = read_json(seed_dir / SEED_RESULTS)
    if cached is not None and _same(upgrade_settings(cached.get("settings")), key):
        return cached
    seed_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train_key = _train_key(key)
    done = _finished_training(seed_dir, train_key)
    with _timed(times, "data"):
        data, model = data_and_model(seed, seed_dir, settings, trained=done is not None)
    with _timed(times, "train"):
        if done is None:
            done = _fine_tune(seed, seed_dir, settings, data, model, train_key, progress)
        del model
    with _timed(times, "score"):
        lm, scores = _score_trained(seed_dir, settings, data, progress)
    if settings.memory:
        with _timed(times, "memory"):
            _memory_scores(scores, lm, data, seed_dir, settings, seed)
    if settings.tune:
        with _timed(times, "tune"):
            _tune(scores, lm, data, seed_dir / "datastore", settings, seed)
    times["total"] = time.perf_counter() - t0
    out = seed_results(seed, key, seed_dir, data, scores, done, times)
    write_json_atomic(seed_dir / SEED_RESULTS, out)
    return out


# -- fine-tuning -------------------------------------------------------------------------


def _finished_training(seed_dir: Path, train_key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of a finished fine-tuning with these settings whose model is on disk."""
    done = read_json(seed_dir / TRAIN_DONE)
    if done is None or not _same(done.get("settings"), train_key):
        return None
    return done if (seed_dir / "model" / "config.json").is_file() else None


def _fine_tune(
    seed: int,
    seed_dir: Path,
    settings: MacondoSettings,
    data: SeedData,
    model: Any,
    train_key: Mapping[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune ``model`` on the training sentences into ``model/`` (resuming an interrupted
    run with the same settings); returns the record written to ``train_done.json``."""
    model_dir = seed_dir / "model"
    # A checkpoint left by a run with other settings cannot be resumed: start over.
    started = read_json(seed_dir / TRAIN_STARTED)
    if started is not None and not _same(started, train_key):
        shutil.rmtree(model_dir, ignore_errors=True)
    write_json_atomic(seed_dir / TRAIN_STARTED, train_key)
    if settings.lora:
        model = apply_lora(model)
    on_eval = _curve_scorer(seed_dir, settings, data, seed) if settings.eval_every else None
    curve = []
    if on_eval is not None:
        # Step 0: the model before fine-tuning (the callback covers the later steps).
        model.eval()
        with torch.no_grad():
            curve.append({"step": 0, **on_eval(0, model)})
        model.train()
    config = _train_config(settings, model, seed)
    result = train(
        model, data.tokenizer, data.train_texts, config, model_dir, on_eval=on_eval,
        progress=progress,
    )  # fmt: skip
    train_info = {
        "steps": result.steps,
        "epochs": result.epochs,
        "final_loss": result.final_loss,
        "loss_curve": result.loss_curve,
        "seconds": result.seconds,
    }
    done = {"settings": train_key, "curve": curve + result.evals, "train": train_info}
    write_json_atomic(seed_dir / TRAIN_DONE, done)
    return done


def _train_config(settings: MacondoSettings, model: Any, seed: int) -> TrainConfig:
    limit = position_limit(model)
    max_pos = limit[0] if limit else 256
    return TrainConfig(
        lr=settings.lr,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        max_steps=settings.max_steps,
        warmup_ratio=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        seed=seed,
        context_len=min(int(max_pos), 256),
        checkpoint_every=settings.checkpoint_every,
        eval_every=settings.eval_every,
        precision=settings.precision,
    )


def _curve_scorer(
    seed_dir: Path, settings: MacondoSettings, data: SeedData, seed: int
) -> Callable[[int, Any], dict]:
    """The callback of fine-tuning that scores the test set at a step (Figure 3): per-n means
    of the LM and (``curve_knn``) of the kNN-LM on a datastore from the model of that step,
    over the test parents the verdict reads (a ``tune`` grid's dev share left out), so Figure
    1 draws what claim (c) reads."""
    model_dir = seed_dir / "model"
    keep = _verdict_mask(data, settings, seed)
    ns = [n for n, k in zip(data.ns, keep, strict=True) if k]

    def on_eval(step: int, m: Any) -> dict:
        lm_now = _loaded(m, data.tokenizer, f"{model_dir}@step{step}", f"step-{step}")
        with tempfile.TemporaryDirectory(dir=seed_dir, prefix=".curve-") as tmp:
            datastore = Path(tmp) / "datastore" if settings.curve_knn else None
            scored = _child_log_probs(lm_now, data, datastore, settings, progress=False)
        out: dict[str, Any] = {key: group_means(v[keep], ns) for key, v in scored.items()}
        return out | {"parents": "verdict" if settings.tune else "all"}

    return on_eval


def _verdict_mask(data: SeedData, settings: MacondoSettings, seed: int) -> np.ndarray:
    """The test examples the verdict reads: all of them, or those outside the dev share."""
    if not settings.tune:
        return np.ones(len(data.test), dtype=bool)
    return ~dev_mask(data.test, seed, settings.tune["dev_share"])


def _loaded(model: Any, tokenizer: Any, name: str, fingerprint: str) -> LoadedLM:
    """An in-memory model as a LoadedLM (used while training, between saves)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return LoadedLM(
        model=base,
        tokenizer=tokenizer,
        adapter=Adapter(base),
        name=name,
        fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


# -- scoring -----------------------------------------------------------------------------


def _child_log_probs(
    lm: LoadedLM,
    data: SeedData,
    datastore_dir: Path | None,
    settings: MacondoSettings,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Per test example log p(child | prompt) for the LM and (with a datastore dir, built
    there over the training sentences) the kNN-LM."""
    if datastore_dir is None:
        return continuation_log_probs(lm, data.prompts, data.conts)
    path = build_example_datastore(
        lm,
        data.train_texts,
        datastore_dir,
        key_type=settings.key_type,
        key_dtype=settings.key_dtype,
        batch_size=settings.batch_size_eval,
        add_eos=True,
        progress=progress,
        overwrite=True,  # the seed folder's own datastore: rebuilt when the model changes
    )
    return continuation_log_probs(
        lm, data.prompts, data.conts, datastore=path, knn=settings.knn, mix=settings.mix,
        batch_size=settings.batch_size_eval,
    )  # fmt: skip


def _score_trained(
    seed_dir: Path, settings: MacondoSettings, data: SeedData, progress: bool
) -> tuple[LoadedLM, SeedScores]:
    """The fine-tuned model, and its LM and kNN-LM scores (the datastore built in
    ``datastore/``) with its LM's per-n means on the training sentences."""
    with library_bars(progress):
        lm = load_lm(str(seed_dir / "model"), device=settings.device)
    scored = _child_log_probs(lm, data, seed_dir / "datastore", settings, progress)
    # How well the LM learned the training sentences themselves (with their desc clause).
    train = data.ds.train
    train_lm = continuation_log_probs(
        lm, [r["prompt"] for r in train], child_continuations(lm.tokenizer, train),
        batch_size=settings.batch_size_eval,
    )["lm"]  # fmt: skip
    train_groups = group_means(train_lm, [int(r["n_children"]) for r in train])
    keep = np.ones(len(data.test), dtype=bool)  # every parent, unless a tune grid takes some
    return lm, SeedScores(scored["lm"], scored["knnlm"], keep, train_groups)


def _memory_scores(
    scores: SeedScores,
    lm: LoadedLM,
    data: SeedData,
    seed_dir: Path,
    settings: MacondoSettings,
    seed: int,
) -> None:
    """Section 5 on Macondo: the MLP memory trained on this seed's datastore (keys -> values),
    then log((1 - w) p_lm + w p_mem) of each test child, w the kNN-LM's weight (a ``tune``
    grid chooses w on dev), into ``scores``."""
    m, memory_dir = settings.memory, seed_dir / "memory"
    store = open_datastore(seed_dir / "datastore")
    memory = MemoryTrainSettings(hidden=m["hidden"], lr=m["lr"], batch_tokens=m["batch_tokens"],
                                 epochs=m["epochs"], seed=seed)  # fmt: skip
    tr = train_memory(
        store.keys, store.values, lm.adapter.output_embedding.detach(), memory_dir, memory,
        progress=False, overwrite=True, datastore={"path": str(store.path), "n": store.n},
    )  # fmt: skip
    scored = continuation_log_probs(
        lm, data.prompts, data.conts, batch_size=settings.batch_size_eval,
        memory=load_memory(memory_dir, device=str(lm.device)),
        mix=MixSettings(memory_weight=settings.knn_weight), key_type=store.meta["key_type"],
    )  # fmt: skip
    scores.mlp, scores.mlp_raw = scored["lm_memory"], scored["memory"]
    scores.memory = {
        "weight": settings.knn_weight,
        "steps": tr.steps,
        "final_loss": tr.final_loss,
        "seconds": tr.seconds,
        "storage": memory_storage(memory_dir),
        **{k: m[k] for k in ("hidden", "epochs", "lr", "batch_tokens")},
    }


def _tune(
    scores: SeedScores,
    lm: LoadedLM,
    data: SeedData,
    datastore: Path,
    settings: MacondoSettings,
    seed: int,
) -> None:
    """k, T and weights chosen on a dev share of the parents (:mod:`macondo_tuning`): the
    kNN-LM and memory log-likelihoods at them, the other parents marked for the verdict, and
    the tuning record, into ``scores``."""
    grid = settings.tune
    dev = dev_mask(data.test, seed, grid["dev_share"])
    knn = knn_grid_log_probs(lm, data.test, data.conts, datastore, grid["k"],
                             grid["temperature"], settings.batch_size_eval,
                             search=settings.search)  # fmt: skip
    t = tune(scores.lm, knn, scores.mlp_raw, dev, grid)
    record = {key: t[key] for key in ("tuned", "sweep", "lm_dev") if key in t}
    if "memory_sweep" in t:
        record["memory_sweep"] = t["memory_sweep"]
    scores.knnlm_default = scores.knnlm  # the run's own k, w, T, on the same parents
    scores.knnlm, scores.mlp, scores.keep, scores.tuning = t["knnlm"], t.get("mlp"), ~dev, record
    if scores.memory is not None:
        scores.memory["weight"] = t["tuned"].get("memory_weight")


# Settings that only affect scoring after fine-tuning; changing them reuses the trained model
# (unless curves are recorded during training, where they matter too).
_SCORING_ONLY = (
    "k",
    "knn_weight",
    "knn_weight_convention",
    "temperature",
    "key_type",
    "key_dtype",
    "search",
    "batch_size_eval",
    "memory",
    "tune",
)


def _train_key(seed_settings: Mapping[str, Any]) -> dict[str, Any]:
    if seed_settings.get("eval_every"):
        return dict(seed_settings)
    return {k: v for k, v in seed_settings.items() if k not in _SCORING_ONLY}
