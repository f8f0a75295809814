"""The Macondo over-specification experiment (paper Section 4, Figures 1 and 3, Table 5).

For each seed: generate Macondo with that seed, fine-tune a causal LM on the training
sentences ("[villager], who [desc], is the parent of [child]", one example each), build a
datastore over the same sentences with the fine-tuned model, and score every test example
("[villager], is the parent of" -> " [child]") with the LM and the kNN-LM. A model that
generalises from the over-specified training sentences gives each of a parent's n children
log(1/n); the paper finds the LM far below that and the kNN-LM closer.

Model, by preset:

- ``quick`` (the CPU default, no ``model``): no pretrained LM is reachable offline, so a
  ``tiny`` GPT-2 is trained from scratch on the training sentences, which is then its
  fine-tuning stage. Its tokenizer is a byte-level BPE trained on those sentences alone. Every
  word seen at least twice ends up one token once merges saturate (each child appears
  ``sentences_per_pair`` times), so the dataset is generated without a tokenizer and then
  checked with :func:`knnlm.data.macondo.non_single_token_children`; no regeneration needed.
- ``default``: fine-tune ``model`` (e.g. a ``small`` LM trained with ``knnlm train``) with
  CPU-sized settings; its tokenizer decides which names are single tokens.
- ``paper-gpt2``: the paper's GPT-2 setup (App. C): lr 1e-5, batch 4, warm-up 0.05, 50
  epochs, no weight decay (Trainer defaults); model ``gpt2-xl`` unless given.
- ``paper-mistral``: LoRA (r=8, alpha=16, dropout 0.05), batch 128, lr 5e-5 (Trainer
  default), 30 epochs; model ``mistralai/Mistral-7B-v0.1`` unless given.

Aggregation: mean log-likelihood over the test examples of each n per seed, then mean and
population standard deviation (ddof=0) of those per-seed means over seeds.

Artifacts per seed under ``out/seed-S/``: ``data/`` (the dataset), ``model/`` (the fine-tuned
model), ``datastore/``, ``results.json``. A seed whose ``results.json`` holds the same
settings is not rerun; a finished fine-tuning (``train_done.json``) is reused; an interrupted
one resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.data.macondo import (
    MacondoDataset,
    generate_macondo,
    non_single_token_children,
    perfect_log_likelihood,
    write_macondo,
)
from knnlm.errors import KnnlmError
from knnlm.fileio import read_json, write_json_atomic, write_text_atomic

RESULTS = "results.json"
TABLE = "table5.md"
FIGURE_GROUPS = "figure1.png"
FIGURE_CURVES = "figure3.png"
SEED_RESULTS = "results.json"
TRAIN_DONE = "train_done.json"
TRAIN_STARTED = "train_started.json"
MACONDO_SIZE_KEYS = (
    "n_villagers",
    "n_parents_per_count",
    "min_children",
    "max_children",
    "sentences_per_pair",
)
KNN_WEIGHT_NOTE = (
    "knn_weight is the weight on p_knn: p = (1 - w) p_lm + w p_knn; the paper writes "
    "lambda p_lm + (1 - lambda) p_knn with lambda = 0.25, i.e. w = 1 - lambda"
)


@dataclass(frozen=True)
class RunPreset:
    """Fine-tuning settings of one Macondo setup (see the module docstring)."""

    name: str
    description: str
    epochs: int
    lr: float
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    lora: bool = False
    precision: str = "float32"
    # Train this model preset from scratch with a BPE tokenizer trained on Macondo.
    scratch_architecture: str | None = None
    scratch_vocab_size: int = 4096
    default_model: str | None = None
    # Intra-op CPU threads while running (None: torch's default). A tiny model's matrices are
    # too small for thread hand-offs to pay, and on a busy machine they cost far more.
    cpu_threads: int | None = None


RUN_PRESETS: dict[str, RunPreset] = {
    p.name: p
    for p in (
        RunPreset(
            name="quick",
            description="tiny GPT-2 trained from scratch on the training sentences (CPU, ~1 min)",
            # 20 epochs: the LM fits its training sentences (child log-likelihood on them
            # above log(1/n)) while one seed stays near a minute on 2 CPU cores.
            epochs=20,
            lr=3e-3,
            batch_size=16,
            warmup_ratio=0.05,
            weight_decay=0.01,
            scratch_architecture="tiny",
            cpu_threads=1,
        ),
        RunPreset(
            name="default",
            description="full fine-tuning of a given model with CPU-sized settings",
            epochs=10,
            lr=1e-4,
            batch_size=8,
            warmup_ratio=0.05,
            weight_decay=0.0,
        ),
        RunPreset(
            name="paper-gpt2",
            description="the paper's GPT-2 fine-tuning (App. C): lr 1e-5, batch 4, 50 epochs",
            epochs=50,
            lr=1e-5,
            batch_size=4,
            warmup_ratio=0.05,
            weight_decay=0.0,
            default_model="gpt2-xl",
        ),
        RunPreset(
            name="paper-mistral",
            description="the paper's Mistral LoRA fine-tuning (App. C.1): batch 128, 30 epochs",
            epochs=30,
            lr=5e-5,
            batch_size=128,
            warmup_ratio=0.05,
            weight_decay=0.0,
            lora=True,
            precision="bfloat16",
            default_model="mistralai/Mistral-7B-v0.1",
        ),
    )
}


def get_run_preset(name: str) -> RunPreset:
    if name not in RUN_PRESETS:
        raise KnnlmError(f"unknown Macondo preset {name!r}; choose one of {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]


# ---------------------------------------------------------------------------------------
# aggregation (pure functions)
# ---------------------------------------------------------------------------------------
def group_means(
    values: Sequence[float] | np.ndarray, n_children: Sequence[int]
) -> dict[str, float]:
    """Mean of ``values`` over the examples of each number of children, keyed "1", "2", ..."""
    v = np.asarray(values, dtype=np.float64)
    ns = np.asarray(n_children, dtype=np.int64)
    if v.shape != ns.shape:
        raise KnnlmError("values and n_children differ in length")
    return {str(n): float(v[ns == n].mean()) for n in np.unique(ns)}


def aggregate_groups(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """Mean and population std (ddof=0) over seeds of each per-seed group mean.

    ``per_seed[i][n]`` holds "lm" and optionally "knnlm" for seed i; the result's ``[n]``
    holds "lm", "lm_std", "knnlm", "knnlm_std", "perfect" (log(1/n)) and "seeds".
    """
    if not per_seed:
        raise KnnlmError("no seeds to aggregate")
    ns = sorted({int(n) for groups in per_seed for n in groups})
    out: dict[str, dict] = {}
    for n in ns:
        row: dict[str, Any] = {}
        present = [g[str(n)] for g in per_seed if str(n) in g]
        for key in ("lm", "knnlm"):
            vals = np.array([g[key] for g in present if g.get(key) is not None], dtype=np.float64)
            row[key] = float(vals.mean()) if vals.size else None
            row[f"{key}_std"] = float(vals.std()) if vals.size else None
        row["perfect"] = perfect_log_likelihood(n)
        row["seeds"] = len(present)
        out[str(n)] = row
    return out


def aggregate_curves(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any] | None:
    """Figure 3 curves: per step and n, mean and std over seeds of the per-seed group means.

    ``per_seed[i]`` is seed i's list of {"step", "lm": {n: v}, "knnlm": {n: v} (optional)}.
    Only steps present in every seed are kept.
    """
    if not per_seed or any(not c for c in per_seed):
        return None
    common = set.intersection(*({int(e["step"]) for e in c} for c in per_seed))
    steps = sorted(common)
    if not steps:
        return None
    by_step = [{int(e["step"]): e for e in c} for c in per_seed]
    ns = sorted({int(n) for c in per_seed for e in c for n in e["lm"]})
    groups: dict[str, dict] = {}
    for n in ns:
        row: dict[str, Any] = {"perfect": perfect_log_likelihood(n)}
        for key in ("lm", "knnlm"):
            if any(by_step[0][s].get(key) is None for s in steps):
                row[key] = row[f"{key}_std"] = None
                continue
            m = np.array([[seed[s][key][str(n)] for s in steps] for seed in by_step])
            row[key], row[f"{key}_std"] = m.mean(0).tolist(), m.std(0).tolist()
        groups[str(n)] = row
    return {"steps": steps, "groups": groups}


def reproduced(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Did the paper's effect hold: LM below log(1/n), kNN-LM closer to log(1/n) than the LM?

    The mean log-likelihood of a parent's children is at most log(1/n) for any model (it is
    maximal when they share the mass evenly), so "closer" means "higher".
    """
    per_n: dict[str, dict] = {}
    for n, g in sorted(groups.items(), key=lambda kv: int(kv[0])):
        lm_gap = g["perfect"] - g["lm"]
        knn_gap = None if g.get("knnlm") is None else g["perfect"] - g["knnlm"]
        per_n[n] = {
            "lm_gap": lm_gap,
            "knnlm_gap": knn_gap,
            "lm_below_perfect": bool(lm_gap > 0),
            "knnlm_closer": None if knn_gap is None else bool(knn_gap < lm_gap),
        }
    lm_gap = float(np.mean([r["lm_gap"] for r in per_n.values()]))
    knn_gaps = [r["knnlm_gap"] for r in per_n.values()]
    knn_gap = None if None in knn_gaps else float(np.mean(knn_gaps))
    overall = {
        "lm_gap": lm_gap,
        "knnlm_gap": knn_gap,
        "lm_below_perfect": all(r["lm_below_perfect"] for r in per_n.values()),
        "knnlm_closer": None if knn_gap is None else bool(knn_gap < lm_gap),
    }
    closer_all = knn_gap is not None and all(r["knnlm_closer"] for r in per_n.values())
    held = bool(overall["lm_below_perfect"] and closer_all and overall["knnlm_closer"])
    closer_ns = [n for n, r in per_n.items() if r["knnlm_closer"]]
    if knn_gap is None:
        summary = "not tested: no kNN-LM numbers"
    elif held:
        summary = (
            "yes: the LM is below log(1/n) for every n and the kNN-LM is closer to log(1/n) "
            f"for every n (mean gap {lm_gap:.3f} -> {knn_gap:.3f} nats)"
        )
    else:
        summary = (
            f"no: LM below log(1/n) for every n: {overall['lm_below_perfect']}; kNN-LM closer "
            f"for n in {{{', '.join(closer_ns)}}} of {{{', '.join(per_n)}}}; mean gap LM "
            f"{lm_gap:.3f}, kNN-LM {knn_gap:.3f} nats"
        )
    return {"held": held, "summary": summary, "per_n": per_n, "overall": overall}


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
def _pm(mean: float | None, std: float | None) -> str | None:
    from knnlm.report.tables import fmt_number

    if mean is None:
        return None
    return f"{fmt_number(mean)} ± {fmt_number(std)}" if std is not None else fmt_number(mean)


def table5(groups: Mapping[str, Mapping[str, Any]], n_seeds: int | None = None) -> str:
    """Table 5: rows n = 1..5, columns LM, kNN-LM, perfect log(1/n) (mean ± std over seeds)."""
    from knnlm.report.tables import markdown_table

    rows = [
        [
            int(n),
            _pm(g["lm"], g.get("lm_std")),
            _pm(g.get("knnlm"), g.get("knnlm_std")),
            g["perfect"],
        ]
        for n, g in sorted(groups.items(), key=lambda kv: int(kv[0]))
    ]
    seeds = f" ({n_seeds} seed{'s' * (n_seeds != 1)})" if n_seeds else ""
    return markdown_table(
        ["children (n)", f"LM{seeds}", f"kNN-LM{seeds}", "perfect log(1/n)"],
        rows,
        align=["r", "r", "r", "r"],
    )


def _same(a: Any, b: Any) -> bool:
    """Settings equality after a JSON round trip (tuples vs lists, int vs float keys)."""
    return json.loads(json.dumps(a, default=float)) == json.loads(json.dumps(b, default=float))


# ---------------------------------------------------------------------------------------
# one seed
# ---------------------------------------------------------------------------------------
def _model_id(model: str) -> str:
    """What identifies the base model in the cache key: its files' config and sizes if local."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in {".safetensors", ".bin"}:
            h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return f"{path.resolve()}#sha256:{h.hexdigest()[:16]}"


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


def _loaded(model: Any, tokenizer: Any, name: str, fingerprint: str) -> Any:
    """An in-memory model as a LoadedLM (used while training, between saves)."""
    from knnlm.lm.adapters import Adapter
    from knnlm.lm.loading import LoadedLM, tokenizer_fingerprint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return LoadedLM(
        model=base,
        tokenizer=tokenizer,
        adapter=Adapter(base),
        name=name,
        fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def _score(
    lm: Any,
    test: Sequence[Mapping[str, Any]],
    continuations: list[str],
    train_texts: list[str],
    datastore_dir: Path | None,
    settings: Mapping[str, Any],
    progress: bool,
) -> dict[str, np.ndarray]:
    """Per-example log p(child | prompt) for the LM and (with a datastore dir) the kNN-LM."""
    from knnlm.evaluate import KnnSettings, continuation_log_probs
    from knnlm.retrieval.datastore import build_example_datastore

    prompts = [r["prompt"] for r in test]
    if datastore_dir is None:
        return continuation_log_probs(lm, prompts, continuations)
    path = build_example_datastore(
        lm,
        train_texts,
        datastore_dir,
        key_type=settings["key_type"],
        key_dtype=settings["key_dtype"],
        batch_size=settings["batch_size_eval"],
        add_eos=True,
        progress=progress,
        overwrite=True,  # the seed folder's own datastore: rebuilt when the model changes
    )
    knn = KnnSettings(
        k=settings["k"], knn_weight=settings["knn_weight"], temperature=settings["temperature"]
    )
    return continuation_log_probs(
        lm, prompts, continuations, datastore=path, knn=knn, batch_size=settings["batch_size_eval"]
    )


def _make_dataset(seed: int, tokenizer: Any, sizes: Mapping[str, Any]) -> MacondoDataset:
    given = {k: v for k, v in sizes.items() if v is not None}  # None: the generator's default
    try:
        return generate_macondo(seed=seed, tokenizer=tokenizer, **given)
    except TypeError as exc:  # an unknown size keyword
        raise KnnlmError(f"bad Macondo size settings {dict(sizes)}: {exc}") from None


def _label_scratch_tokenizer(ds: MacondoDataset, tokenizer: Any) -> None:
    from knnlm.data.names import tokenizer_view

    info = tokenizer_view(tokenizer).info
    ds.meta["tokenizer"] = dict(info, name="byte-level BPE trained on this dataset's train split")


def _scratch_model_and_data(seed: int, settings: Mapping[str, Any], sizes: Mapping[str, Any]):
    """Dataset without a tokenizer, a BPE tokenizer trained on its training sentences, a
    randomly initialised model of the scratch preset."""
    from knnlm.lm.presets import build_model_from_preset
    from knnlm.lm.tokenizer import train_bpe_tokenizer

    ds = _make_dataset(seed, None, sizes)
    # min_frequency 2 with a vocabulary past saturation: every word seen twice is one token.
    tok = train_bpe_tokenizer(
        [r["text"] + "\n" for r in ds.train], settings["scratch_vocab_size"], min_frequency=2
    )
    bad = non_single_token_children(ds, tok)
    if bad:
        raise KnnlmError(
            f"{len(bad)} children's names (e.g. {bad[0]!r}) are not single tokens under the BPE "
            "tokenizer trained on Macondo; raise sentences_per_pair to at least 2"
        )
    _label_scratch_tokenizer(ds, tok)
    model = build_model_from_preset(settings["scratch_architecture"], tokenizer=tok, seed=seed)
    return ds, tok, model


def run_seed(
    seed: int,
    seed_dir: Path,
    settings: Mapping[str, Any],
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, fine-tune, build the datastore and score one seed; returns its results dict."""
    import torch

    from knnlm.evaluate import continuation_log_probs
    from knnlm.lm.loading import load_lm, pick_device
    from knnlm.lm.train import TrainConfig, apply_lora, model_from_pretrained, train

    seed_settings = dict(settings, seed=seed)
    seed_settings.pop("seeds", None)
    cached = read_json(seed_dir / SEED_RESULTS)
    if cached is not None and _same(cached.get("settings"), seed_settings):
        return cached
    seed_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    sizes = settings["macondo"]
    model_dir = seed_dir / "model"
    train_key = _train_key(seed_settings)
    done = read_json(seed_dir / TRAIN_DONE)
    trained = (
        done is not None
        and _same(done.get("settings"), train_key)
        and (model_dir / "config.json").is_file()
    )
    model = None
    if trained:  # only the dataset is rebuilt (deterministic); the model is on disk
        from knnlm.lm.loading import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
        ds = _make_dataset(seed, None if settings["from_scratch"] else tokenizer, sizes)
        if settings["from_scratch"]:
            _label_scratch_tokenizer(ds, tokenizer)
    elif settings["from_scratch"]:
        ds, tokenizer, model = _scratch_model_and_data(seed, settings, sizes)
        model.to(pick_device(device))
    else:
        model, tokenizer = model_from_pretrained(settings["model"], device)
        ds = _make_dataset(seed, tokenizer, sizes)
    write_macondo(ds, seed_dir / "data")
    train_texts = [r["text"] for r in ds.train]
    test = ds.test
    ns = [int(r["n_children"]) for r in test]
    conts = child_continuations(tokenizer, test)
    times["data"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if trained:
        curve, train_info = done["curve"], done["train"]
    else:
        # A checkpoint left by a run with other settings cannot be resumed: start over.
        started = read_json(seed_dir / TRAIN_STARTED)
        if started is not None and not _same(started, train_key):
            shutil.rmtree(model_dir, ignore_errors=True)
        write_json_atomic(seed_dir / TRAIN_STARTED, train_key)
        if settings["lora"]:
            model = apply_lora(model)
        max_pos = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 256
        )
        config = TrainConfig(
            lr=settings["lr"],
            batch_size=settings["batch_size"],
            epochs=settings["epochs"],
            max_steps=settings["max_steps"],
            warmup_ratio=settings["warmup_ratio"],
            weight_decay=settings["weight_decay"],
            seed=seed,
            context_len=min(int(max_pos), 256),
            checkpoint_every=settings["checkpoint_every"],
            eval_every=settings["eval_every"],
            precision=settings["precision"],
        )

        def on_eval(step: int, m: Any) -> dict:
            lm_now = _loaded(m, tokenizer, f"{model_dir}@step{step}", f"step-{step}")
            with tempfile.TemporaryDirectory(dir=seed_dir, prefix=".curve-") as tmp:
                scored = _score(
                    lm_now,
                    test,
                    conts,
                    train_texts,
                    Path(tmp) / "datastore" if settings["curve_knn"] else None,
                    settings,
                    progress=False,
                )
            return {key: group_means(v, ns) for key, v in scored.items()}

        curve = []
        if settings["eval_every"]:
            # Step 0: the model before fine-tuning (the callback covers the later steps).
            model.eval()
            with torch.no_grad():
                curve.append({"step": 0, **on_eval(0, model)})
            model.train()
        result = train(
            model,
            tokenizer,
            train_texts,
            config,
            model_dir,
            on_eval=on_eval if settings["eval_every"] else None,
            progress=progress,
        )
        curve += result.evals
        train_info = {
            "steps": result.steps,
            "epochs": result.epochs,
            "final_loss": result.final_loss,
            "loss_curve": result.loss_curve,
            "seconds": result.seconds,
        }
        write_json_atomic(
            seed_dir / TRAIN_DONE,
            {"settings": train_key, "curve": curve, "train": train_info},
        )
        del model, result
    times["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    from knnlm.lm.train import library_bars

    with library_bars(progress):
        lm = load_lm(str(model_dir), device=device)
    scored = _score(lm, test, conts, train_texts, seed_dir / "datastore", settings, progress)
    # How well the LM learned the training sentences themselves (with their desc clause).
    train_conts = child_continuations(lm.tokenizer, ds.train)
    train_lm = continuation_log_probs(
        lm, [r["prompt"] for r in ds.train], train_conts, batch_size=settings["batch_size_eval"]
    )["lm"]
    train_groups = group_means(train_lm, [int(r["n_children"]) for r in ds.train])
    times["score"] = time.perf_counter() - t2
    lm_lp, knn_lp = scored["lm"], scored["knnlm"]
    lm_groups, knn_groups = group_means(lm_lp, ns), group_means(knn_lp, ns)
    groups = {
        n: {
            "lm": lm_groups[n],
            "knnlm": knn_groups[n],
            "perfect": perfect_log_likelihood(int(n)),
            "count": ns.count(int(n)),
        }
        for n in lm_groups
    }
    examples = [
        {
            "villager": r["villager"],
            "child": r["child"],
            "n_children": int(r["n_children"]),
            "prompt": r["prompt"],
            "continuation": c,
            "lm": float(a),
            "knnlm": float(b),
        }
        for r, c, a, b in zip(test, conts, lm_lp, knn_lp, strict=True)
    ]
    times["total"] = time.perf_counter() - t0
    out = {
        "seed": seed,
        "settings": seed_settings,
        "dataset": ds.meta["counts"],
        "datastore_size": _datastore_n(seed_dir / "datastore"),
        "groups": groups,
        "train_groups_lm": train_groups,
        "curve": curve,
        "train": train_info,
        "seconds": times,
        "examples": examples,
    }
    write_json_atomic(seed_dir / SEED_RESULTS, out)
    return out


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
)


def _train_key(seed_settings: Mapping[str, Any]) -> dict[str, Any]:
    if seed_settings.get("eval_every"):
        return dict(seed_settings)
    return {k: v for k, v in seed_settings.items() if k not in _SCORING_ONLY}


def _datastore_n(path: Path) -> int:
    meta = read_json(path / "meta.json") or {}
    return int(meta.get("n", 0))


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------
@contextmanager
def _cpu_threads(n: int | None, device: str | None) -> Iterator[None]:
    """Use ``n`` intra-op threads on the CPU for the duration, then restore the old number."""
    import torch

    from knnlm.lm.loading import pick_device

    if not n or pick_device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_settings(
    model: str | None,
    seeds: Sequence[int],
    preset: str | None,
    *,
    k: int,
    knn_weight: float,
    temperature: float,
    epochs: int | None,
    max_steps: int | None,
    lr: float | None,
    batch_size: int | None,
    warmup_ratio: float | None,
    lora: bool | None,
    eval_every: int | None,
    curve_knn: bool,
    macondo_kwargs: Mapping[str, Any] | None,
    key_type: str,
    key_dtype: str,
    precision: str | None,
    checkpoint_every: int | None,
    batch_size_eval: int,
) -> dict[str, Any]:
    """Check every input and return the full settings dict (the cache key of each seed)."""
    from knnlm.evaluate import KnnSettings

    seeds = list(seeds)
    if not seeds:
        raise KnnlmError("at least one seed is needed")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise KnnlmError(f"seeds must be non-negative integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise KnnlmError(f"seeds must be distinct, got {seeds}")
    KnnSettings(k=k, knn_weight=knn_weight, temperature=temperature).validate()
    for name, v in (("epochs", epochs), ("max_steps", max_steps), ("batch_size", batch_size),
                    ("eval_every", eval_every), ("batch_size_eval", batch_size_eval)):  # fmt: skip
        if v is not None and (not isinstance(v, int) or v < 1):
            raise KnnlmError(f"{name} must be a positive integer, got {v!r}")
    if lr is not None and not lr > 0:
        raise KnnlmError(f"learning rate must be positive, got {lr}")
    if warmup_ratio is not None and not 0 <= warmup_ratio < 1:
        raise KnnlmError(f"warm-up ratio must be in [0, 1), got {warmup_ratio}")
    sizes = dict(macondo_kwargs or {})
    unknown = sorted(set(sizes) - set(MACONDO_SIZE_KEYS))
    if unknown:
        raise KnnlmError(
            f"unknown Macondo size setting(s) {unknown}; allowed: {', '.join(MACONDO_SIZE_KEYS)}"
        )

    name = preset or ("quick" if model is None else "default")
    p = get_run_preset(name)
    scratch = p.scratch_architecture is not None
    if scratch and model is not None:
        raise KnnlmError(
            f"preset {name!r} trains a small model from scratch; drop --model, or choose "
            "--preset default (or paper-gpt2 / paper-mistral) to fine-tune it"
        )
    if not scratch and model is None:
        if p.default_model is None:
            raise KnnlmError(f"preset {name!r} fine-tunes a model: give --model MODEL_DIR")
        model = p.default_model
    use_lora = p.lora if lora is None else bool(lora)
    if use_lora and scratch:
        raise KnnlmError("LoRA fine-tunes a pretrained model; the quick preset trains from scratch")
    return {
        "preset": name,
        "preset_description": p.description,
        "model": None if scratch else model,
        "model_id": None if scratch else _model_id(model),
        "from_scratch": scratch,
        "scratch_architecture": p.scratch_architecture,
        "scratch_vocab_size": p.scratch_vocab_size if scratch else None,
        "tokenizer": "byte-level BPE trained on each seed's training sentences"
        if scratch
        else "the model's",
        "epochs": epochs or p.epochs,
        "max_steps": max_steps,
        "lr": lr if lr is not None else p.lr,
        "batch_size": batch_size or p.batch_size,
        "warmup_ratio": warmup_ratio if warmup_ratio is not None else p.warmup_ratio,
        "weight_decay": p.weight_decay,
        "lora": use_lora,
        "precision": precision or p.precision,
        "checkpoint_every": checkpoint_every,
        "k": k,
        "knn_weight": knn_weight,
        "knn_weight_convention": KNN_WEIGHT_NOTE,
        "temperature": temperature,
        "key_type": key_type,
        "key_dtype": key_dtype,
        "search": "exact (flat L2 over the datastore)",
        "batch_size_eval": batch_size_eval,
        "eval_every": eval_every,
        "curve_knn": bool(curve_knn and eval_every),
        "macondo": {key: sizes.get(key) for key in MACONDO_SIZE_KEYS},
        "aggregation": "mean over test examples per n per seed; mean and population std "
        "(ddof=0) over seeds",
        "seeds": seeds,
    }


def run_macondo(
    out: str | Path,
    model: str | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    preset: str | None = None,
    *,
    k: int = 1024,
    knn_weight: float = 0.25,
    temperature: float = 1.0,
    epochs: int | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    warmup_ratio: float | None = None,
    lora: bool | None = None,
    eval_every: int | None = None,
    curve_knn: bool = True,
    macondo_kwargs: Mapping[str, Any] | None = None,
    key_type: str = "ffn_input",
    key_dtype: str = "float32",
    precision: str | None = None,
    checkpoint_every: int | None = 1000,
    batch_size_eval: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the Macondo experiment for every seed and write results, Table 5 and figures.

    ``preset`` defaults to ``quick`` without ``model`` and ``default`` with one; ``epochs``,
    ``lr``, ``batch_size``, ``warmup_ratio``, ``lora`` override the preset. ``eval_every``
    (steps) records per-n mean log-likelihoods during fine-tuning (Figure 3), for the kNN-LM
    too unless ``curve_knn=False`` (a datastore is built from the current model each time).
    ``macondo_kwargs`` sets sizes (``n_villagers``, ``n_parents_per_count``, ``max_children``,
    ``min_children``, ``sentences_per_pair``). Returns the results dict written to
    ``out/results.json``.
    """
    from tqdm.auto import tqdm

    settings = resolve_settings(
        model,
        seeds,
        preset,
        k=k,
        knn_weight=knn_weight,
        temperature=temperature,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        warmup_ratio=warmup_ratio,
        lora=lora,
        eval_every=eval_every,
        curve_knn=curve_knn,
        macondo_kwargs=macondo_kwargs,
        key_type=key_type,
        key_dtype=key_dtype,
        precision=precision,
        checkpoint_every=checkpoint_every,
        batch_size_eval=batch_size_eval,
    )
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise KnnlmError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = []
    threads = get_run_preset(settings["preset"]).cpu_threads
    with _cpu_threads(threads, device):
        for s in tqdm(settings["seeds"], desc="macondo seeds", unit="seed", disable=not progress):
            per_seed.append(
                run_seed(s, out / f"seed-{s}", settings, device=device, progress=progress)
            )
    groups = aggregate_groups([r["groups"] for r in per_seed])
    curves = aggregate_curves([r["curve"] for r in per_seed]) if settings["eval_every"] else None
    results: dict[str, Any] = {
        "groups": groups,
        "per_seed": [
            {
                key: r[key]
                for key in (
                    "seed",
                    "groups",
                    "train_groups_lm",
                    "dataset",
                    "datastore_size",
                    "train",
                    "seconds",
                )
            }
            for r in per_seed
        ],
        "settings": settings,
        "reproduced": reproduced(groups),
        "seconds": time.perf_counter() - t0,
        "files": {"table": TABLE, "figure1": FIGURE_GROUPS},
    }
    if curves is not None:
        results["curves"] = curves
        results["files"]["figure3"] = FIGURE_CURVES
    write_outputs(out, results)
    return results


def write_outputs(out: Path, results: Mapping[str, Any]) -> None:
    """``results.json``, ``table5.md``, ``figure1.png`` and (with curves) ``figure3.png``."""
    from knnlm.report.figures import plot_macondo_curves, plot_macondo_groups
    from knnlm.report.tables import settings_line

    settings = results["settings"]
    n_seeds = len(settings["seeds"])
    model = settings["model"] or f"{settings['scratch_architecture']} GPT-2 trained from scratch"
    md = [
        "# Macondo: log-likelihood of the child's name (Table 5)",
        "",
        table5(results["groups"], n_seeds),
        "",
        f"Model: {model}; preset {settings['preset']}; mean ± std over {n_seeds} seed(s).",
        "",
        f"Reproduced: {results['reproduced']['summary']}",
        "",
        "Settings: "
        + settings_line({k: v for k, v in settings.items() if k != "knn_weight_convention"}),
        "",
    ]
    write_text_atomic(out / TABLE, "\n".join(md))
    plot_macondo_groups(
        results["groups"], out / FIGURE_GROUPS, title=f"Macondo: {model} ({n_seeds} seeds)"
    )
    if results.get("curves"):
        c = results["curves"]
        plot_macondo_curves(
            c["steps"],
            {n: {"lm": g["lm"], "knnlm": g.get("knnlm")} for n, g in c["groups"].items()},
            out / FIGURE_CURVES,
            title=f"Macondo during fine-tuning: {model}",
        )
    write_json_atomic(out / RESULTS, results)


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
