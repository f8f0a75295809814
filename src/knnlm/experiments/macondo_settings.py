"""Settings of the Macondo experiment (Section 4; Appendix C): fine-tuning presets and the
checked settings dict that is the cache key of each seed.

Presets:

- ``quick`` (no ``model``): a ``tiny`` GPT-2 trained from scratch on the training sentences,
  with a byte-level BPE trained on them (``knnlm macondo run`` without a model).
- ``quick-finetune``: fine-tune a small LM trained here on natural text (the quick
  reproduction's seed-0 LM) with CPU-sized settings: enough epochs that it fits its training
  sentences (their children's log-likelihood is recorded to check it).
- ``default``: fine-tune ``model`` with CPU-sized settings; its tokenizer decides which names
  are single tokens.
- ``paper-gpt2``: the paper's GPT-2 setup (App. C): lr 1e-5, batch 4, warm-up 0.05, 50
  epochs, no weight decay (Trainer defaults); model ``gpt2-xl`` unless given.
- ``paper-mistral``: LoRA (r=8, alpha=16, dropout 0.05), batch 128, lr 5e-5 (Trainer
  default), 30 epochs; model ``mistralai/Mistral-7B-v0.1`` unless given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.lm.presets import get_preset

MACONDO_SIZE_KEYS = (
    "n_villagers",
    "n_parents_per_count",
    "min_children",
    "max_children",
    "sentences_per_pair",
)
# The MLP memory on a Macondo datastore, where a run names only what it changes.
MACONDO_MEMORY = {"hidden": 1024, "epochs": 10, "lr": 1e-3, "batch_tokens": 256}
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


def _scratch(architecture: str, name: str, description: str, **changes: Any) -> RunPreset:
    """Train the shared LM preset ``architecture`` from scratch with its own training
    defaults, ``changes`` apart."""
    a = get_preset(architecture)
    base = RunPreset(
        name=name,
        description=description,
        epochs=a.epochs,
        lr=a.lr,
        batch_size=a.batch_size,
        warmup_ratio=a.warmup_ratio,
        weight_decay=a.weight_decay,
        scratch_architecture=architecture,
    )
    return replace(base, **changes)


# Full fine-tuning with CPU-sized settings: the base that the other fine-tuning presets change.
_FINETUNE = RunPreset(
    name="default",
    description="full fine-tuning of a given model with CPU-sized settings",
    epochs=10,
    lr=1e-4,
    batch_size=8,
    warmup_ratio=0.05,
    weight_decay=0.0,
)


def _finetune(name: str, description: str, **changes: Any) -> RunPreset:
    return replace(_FINETUNE, name=name, description=description, **changes)


RUN_PRESETS: dict[str, RunPreset] = {
    p.name: p
    for p in (
        _scratch(
            "tiny",
            "quick",
            "tiny GPT-2 trained from scratch on the training sentences (CPU, ~1 min)",
            # 20 epochs: the LM fits its training sentences (child log-likelihood on them
            # above log(1/n)) while one seed stays near a minute on 2 CPU cores.
            epochs=20,
            batch_size=16,  # as quick-finetune; tiny's own 8 is for blocks of natural text
            cpu_threads=1,
        ),
        _finetune(
            "quick-finetune",
            "fine-tune a small LM trained here on natural text (CPU, ~1 min/seed)",
            # A tiny LM pretrained on text needs a high rate and ~15 epochs (~1,000 steps) to
            # fit 1,125 training sentences; its train-sentence log-likelihood is recorded.
            epochs=15,
            lr=3e-3,
            batch_size=16,
            cpu_threads=1,
        ),
        _FINETUNE,
        # The paper's settings (App. C); no weight decay (the Trainer default), as the base.
        _finetune(
            "paper-gpt2",
            "the paper's GPT-2 fine-tuning (App. C): lr 1e-5, batch 4, 50 epochs",
            epochs=50,
            lr=1e-5,
            batch_size=4,
            default_model="gpt2-xl",
        ),
        _finetune(
            "paper-mistral",
            "the paper's Mistral LoRA fine-tuning (App. C.1): batch 128, 30 epochs",
            epochs=30,
            lr=5e-5,
            batch_size=128,
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
    memory: Mapping[str, Any] | None = None,
    tune: Mapping[str, Any] | None = None,
    search: str = "auto",
) -> dict[str, Any]:
    """Check every input and return the full settings dict (the cache key of each seed).

    ``search`` is the neighbour search backend (exact, faiss or auto; auto is exact on a
    Macondo datastore, which has no index)."""
    from knnlm.retrieval.retriever import KnnSettings

    seeds = list(seeds)
    if not seeds:
        raise KnnlmError("at least one seed is needed")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise KnnlmError(f"seeds must be non-negative integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise KnnlmError(f"seeds must be distinct, got {seeds}")
    KnnSettings(k=k, knn_weight=knn_weight, temperature=temperature, search=search).validate()
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
        "search": search,
        "batch_size_eval": batch_size_eval,
        "eval_every": eval_every,
        "curve_knn": bool(curve_knn and eval_every),
        "macondo": {key: sizes.get(key) for key in MACONDO_SIZE_KEYS},
        "aggregation": "mean over test examples per n per seed; mean and sample std "
        "(ddof=1, none for one seed) over seeds",
        "memory": _memory_settings(memory),
        "tune": _tune_settings(tune),
        "seeds": seeds,
    }


# What ``search`` read before it was an option: ``auto``'s behaviour (exact on a datastore
# without an index), so results cached under it are reused by a run with ``search="auto"``.
LEGACY_SEARCH = "exact (flat L2 over the datastore)"


def upgrade_settings(cached: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """Cached settings with the pre-option ``search`` description read as ``auto``."""
    if cached is None or cached.get("search") != LEGACY_SEARCH:
        return cached
    return {**cached, "search": "auto"}


def _tune_settings(tune: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The dev-share tuning grid (k, temperature, knn_weight, memory_weight), checked."""
    if not tune:
        return None
    t = {key: tune[key] for key in ("dev_share", "k", "temperature", "knn_weight",
                                     "memory_weight")}  # fmt: skip
    if not 0 < t["dev_share"] < 1:
        raise KnnlmError(f"dev share must be in (0, 1), got {t['dev_share']}")
    for key, ok in (
        ("k", lambda v: isinstance(v, int) and v >= 1),
        ("temperature", lambda v: v > 0),
        ("knn_weight", lambda v: 0 < v < 1),
        ("memory_weight", lambda v: 0 < v < 1),
    ):
        if not t[key] or not all(ok(v) for v in t[key]):
            raise KnnlmError(f"tuning grid {key} has a value out of range: {t[key]}")
    return {key: (list(v) if isinstance(v, list | tuple) else v) for key, v in t.items()}


def _memory_settings(memory: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The MLP memory trained on each seed's datastore (Appendix D: 10 epochs on Macondo)."""
    if not memory:
        return None
    m = MACONDO_MEMORY | dict(memory)
    for key in ("hidden", "epochs", "batch_tokens"):
        if not isinstance(m[key], int) or m[key] < 1:
            raise KnnlmError(f"memory {key} must be a positive integer, got {m[key]!r}")
    if not m["lr"] > 0:
        raise KnnlmError(f"memory lr must be positive, got {m['lr']}")
    return m
