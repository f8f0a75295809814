"""One seed of the Macondo experiment (Section 4): generate, fine-tune, datastore, score.

The dataset is generated with the tokenizer of the model that is fine-tuned (so every child
is one token under it) and used both to fine-tune and to evaluate. After fine-tuning: a
datastore over the training sentences (one example each, as seen in fine-tuning), the MLP
memory trained on that datastore (Section 5 / Appendix D: 10 epochs), and per test example
log p(child | "[villager], is the parent of") under the LM, the kNN-LM and LM + MLP memory.
The LM's log-likelihood of the children of the *training* sentences is recorded too, to check
that it fitted what it was fine-tuned on.

Artifacts under ``seed_dir``: ``data/``, ``model/``, ``datastore/``, ``memory/``,
``results.json``. A seed whose ``results.json`` holds the same settings is not rerun; a
finished fine-tuning (``train_done.json``) is reused; an interrupted one resumes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.continuations import continuation_log_probs
from knnlm.data.macondo import (
    MacondoDataset,
    generate_macondo,
    non_single_token_children,
    perfect_log_likelihood,
    write_macondo,
)
from knnlm.errors import KnnlmError
from knnlm.experiments.macondo.aggregate import group_means
from knnlm.experiments.macondo.settings import MacondoSettings, upgrade_settings
from knnlm.experiments.macondo.tuning import dev_mask, knn_grid_log_probs, tune
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.experiments.mlp_memory.train import train_memory
from knnlm.fileio import read_json, write_json_atomic
from knnlm.lm.adapters import Adapter, position_limit
from knnlm.lm.loading import LoadedLM, load_lm, load_tokenizer, pick_device, tokenizer_fingerprint
from knnlm.lm.lora import apply_lora
from knnlm.lm.presets import build_model_from_preset
from knnlm.lm.tokenizer import tokenizer_view, train_bpe_tokenizer
from knnlm.lm.train import library_bars, model_from_pretrained, train
from knnlm.lm.train_config import TrainConfig
from knnlm.retrieval.datastore import build_example_datastore, open_datastore
from knnlm.retrieval.memory import load_memory, memory_storage
from knnlm.retrieval.retriever import MixSettings
from knnlm.retrieval.search.choose import resolve_search

SEED_RESULTS = "results.json"
TRAIN_DONE = "train_done.json"
TRAIN_STARTED = "train_started.json"


def _same(a: Any, b: Any) -> bool:
    """Settings equality after a JSON round trip (tuples vs lists, int vs float keys)."""
    return json.loads(json.dumps(a, default=float)) == json.loads(json.dumps(b, default=float))


@dataclass
class SeedData:
    """One seed's dataset as the run uses it: tokenised by ``tokenizer`` (the fine-tuned
    model's), ``conts[i]`` the continuation whose first token is test example i's child."""

    ds: MacondoDataset
    tokenizer: Any
    conts: list[str]

    @property
    def test(self) -> list[dict[str, Any]]:
        return self.ds.test

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.ds.test]

    @property
    def ns(self) -> list[int]:
        return [int(r["n_children"]) for r in self.ds.test]

    @property
    def train_texts(self) -> list[str]:
        return [r["text"] for r in self.ds.train]


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
        data, model = _data_and_model(seed, seed_dir, settings, trained=done is not None)
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
    out = _seed_results(seed, key, seed_dir, data, scores, done, times)
    write_json_atomic(seed_dir / SEED_RESULTS, out)
    return out


# -- data and model ----------------------------------------------------------------------


def _finished_training(seed_dir: Path, train_key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of a finished fine-tuning with these settings whose model is on disk."""
    done = read_json(seed_dir / TRAIN_DONE)
    if done is None or not _same(done.get("settings"), train_key):
        return None
    return done if (seed_dir / "model" / "config.json").is_file() else None


def _data_and_model(
    seed: int, seed_dir: Path, settings: MacondoSettings, *, trained: bool
) -> tuple[SeedData, Any]:
    """The seed's dataset (written to ``data/``) and the model to fine-tune (None when
    ``trained``: then only the dataset is rebuilt, deterministic, and the model is on disk)."""
    model = None
    if trained:
        tokenizer = load_tokenizer(str(seed_dir / "model"))
        ds = _make_dataset(seed, None if settings.from_scratch else tokenizer, settings.sizes)
        if settings.from_scratch:
            _label_scratch_tokenizer(ds, tokenizer)
    elif settings.from_scratch:
        ds, tokenizer, model = _scratch_model_and_data(seed, settings)
        model.to(pick_device(settings.device))
    else:
        model, tokenizer = model_from_pretrained(settings.model, settings.device)
        ds = _make_dataset(seed, tokenizer, settings.sizes)
    write_macondo(ds, seed_dir / "data")
    return SeedData(ds, tokenizer, child_continuations(tokenizer, ds.test)), model


def child_continuations(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The continuation string per record whose first token is the child's name token.

    The child's token is read off ``prompt + " " + child``; " child" is the natural
    continuation for byte-level BPE, while SentencePiece tokenizers add their own prefix space
    to a separately encoded "child".
    """
    prompts = [r["prompt"] for r in records]
    spaced = [" " + r["child"] for r in records]
    bare = [r["child"] for r in records]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    full, pre, a, b = (
        enc([p + s for p, s in zip(prompts, spaced, strict=True)]),
        enc(prompts),
        enc(spaced),
        enc(bare),
    )
    out = []
    for i, r in enumerate(records):
        k = len(pre[i])
        if full[i][:k] != pre[i] or len(full[i]) != k + 1:
            raise KnnlmError(
                f"the child's name {r['child']!r} is not one token after {r['prompt']!r} under "
                "this tokenizer"
            )
        want = full[i][k]
        if a[i][:1] == [want]:
            out.append(spaced[i])
        elif b[i][:1] == [want]:
            out.append(bare[i])
        else:
            raise KnnlmError(f"cannot encode the child {r['child']!r} as its own first token")
    return out


def _make_dataset(seed: int, tokenizer: Any, sizes: Mapping[str, Any]) -> MacondoDataset:
    given = {k: v for k, v in sizes.items() if v is not None}  # None: the generator's default
    try:
        view = None if tokenizer is None else tokenizer_view(tokenizer)
        return generate_macondo(seed=seed, tokenizer=view, **given)
    except TypeError as exc:  # an unknown size keyword
        raise KnnlmError(f"bad Macondo size settings {dict(sizes)}: {exc}") from None


def _label_scratch_tokenizer(ds: MacondoDataset, tokenizer: Any) -> None:
    info = tokenizer_view(tokenizer).info
    ds.meta["tokenizer"] = dict(info, name="byte-level BPE trained on this dataset's train split")


def _scratch_model_and_data(seed: int, settings: MacondoSettings):
    """Dataset without a tokenizer, a BPE tokenizer trained on its training sentences, a
    randomly initialised model of the scratch preset."""
    ds = _make_dataset(seed, None, settings.sizes)
    # min_frequency 2 with a vocabulary past saturation: every word seen twice is one token.
    tok = train_bpe_tokenizer(
        [r["text"] + "\n" for r in ds.train],
        settings.run_preset.scratch_vocab_size,
        min_frequency=2,
    )
    bad = non_single_token_children(ds, tokenizer_view(tok))
    if bad:
        raise KnnlmError(
            f"{len(bad)} children's names (e.g. {bad[0]!r}) are not single tokens under the BPE "
            "tokenizer trained on Macondo; raise sentences_per_pair to at least 2"
        )
    _label_scratch_tokenizer(ds, tok)
    architecture = settings.run_preset.scratch_architecture
    model = build_model_from_preset(architecture, tokenizer=tok, seed=seed)
    return ds, tok, model


# -- fine-tuning -------------------------------------------------------------------------


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


# -- results -----------------------------------------------------------------------------


def _seed_results(
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


def search_used(search: str, datastore: Path) -> dict[str, str]:
    """The backend ``search`` asked for and the one that searched this datastore."""
    return {"requested": search, "used": resolve_search(search, datastore)}


def _datastore_n(path: Path) -> int:
    meta = read_json(path / "meta.json") or {}
    return int(meta.get("n", 0))
