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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.lm.presets import get_preset
from knnlm.retrieval.retriever import KnnSettings, MixSettings

MACONDO_SIZE_KEYS = (
    "n_villagers",
    "n_parents_per_count",
    "min_children",
    "max_children",
    "sentences_per_pair",
)
# Name files (paths) the children and villagers are drawn from; recorded only when given.
MACONDO_NAME_KEYS = ("given_names", "surnames")
# The MLP memory on a Macondo datastore, where a run names only what it changes.
MACONDO_MEMORY = {"hidden": 1024, "epochs": 10, "lr": 1e-3, "batch_tokens": 256}
KNN_WEIGHT_NOTE = (
    "knn_weight w is the weight on p_knn: p = (1 - w) p_lm + w p_knn. The paper writes "
    "p = lambda p_lm + (1 - lambda) p_knn with lambda = 0.25, which read literally puts 0.75 on "
    "p_knn; Khandelwal et al. and Xu et al., whose setup the paper follows, put 0.25 on p_knn, "
    "and so does this toolkit (--knn-weight 0.25)"
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


@dataclass(frozen=True)
class MacondoSettings:
    """Every setting of a Macondo run, the preset's values resolved (build one with
    :meth:`from_preset`); checked when made.

    :meth:`as_dict` is the record written into the results (each seed's cache key is made from
    it); ``device`` and ``workers`` say where the run goes, not what it computes, and are not in
    it. ``sizes`` are the dataset sizes (:data:`MACONDO_SIZE_KEYS`; missing: the generator's
    default), ``memory`` the MLP memory trained on each seed's datastore (hidden, epochs, lr,
    batch_tokens; None: none), ``tune`` the dev-share grid
    (:data:`knnlm.experiments.macondo.tuning.DEFAULT_TUNE`; None: k, temperature and knn_weight
    fixed), ``eval_every`` (steps) the curves over fine-tuning (Figure 3), with the kNN-LM too
    unless ``curve_knn`` is False. ``search`` is the neighbour search backend (exact, faiss or
    auto: exact on a Macondo datastore, which has no index).
    """

    preset: str
    model: str | None  # the model fine-tuned; None where the preset trains from scratch
    epochs: int
    lr: float
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    lora: bool
    precision: str
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    max_steps: int | None = None
    checkpoint_every: int | None = 1000
    eval_every: int | None = None
    curve_knn: bool = True
    k: int = 1024
    knn_weight: float = 0.25
    temperature: float = 1.0
    search: str = "auto"
    key_type: str = "ffn_input"
    key_dtype: str = "float32"
    batch_size_eval: int = 32
    sizes: Mapping[str, int | None] = field(default_factory=dict)
    memory: Mapping[str, Any] | None = None
    tune: Mapping[str, Any] | None = None
    device: str | None = None
    workers: int = 1

    @classmethod
    def from_preset(
        cls, name: str | None = None, *, model: str | None = None, **overrides: Any
    ) -> MacondoSettings:
        """Preset ``name`` (default: ``quick`` without ``model``, ``default`` with one) with
        ``overrides`` of any field; a preset value (epochs, lr, batch_size, warmup_ratio,
        weight_decay, lora, precision) given as None keeps the preset's."""
        name = name or ("quick" if model is None else "default")
        p = get_run_preset(name)
        preset_values = {
            "epochs": p.epochs,
            "lr": p.lr,
            "batch_size": p.batch_size,
            "warmup_ratio": p.warmup_ratio,
            "weight_decay": p.weight_decay,
            "lora": p.lora,
            "precision": p.precision,
        }
        given = {k: v for k, v in overrides.items() if v is not None or k not in preset_values}
        return cls(preset=name, model=model, **(preset_values | given))

    def __post_init__(self) -> None:
        set_ = partial(object.__setattr__, self)  # normalised copies of what was given
        set_("seeds", tuple(self.seeds))
        set_("sizes", dict(self.sizes or {}))
        set_("lora", bool(self.lora))
        _check_seeds(self.seeds)
        self.knn  # noqa: B018 - builds (and so checks) the kNN settings
        self.mix  # noqa: B018 - and the mixture's
        for name in ("epochs", "max_steps", "batch_size", "eval_every", "batch_size_eval"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KnnlmError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise KnnlmError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise KnnlmError(f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}")
        unknown = sorted(set(self.sizes) - {*MACONDO_SIZE_KEYS, *MACONDO_NAME_KEYS})
        if unknown:
            raise KnnlmError(
                f"unknown Macondo size setting(s) {unknown}; allowed: {', '.join(MACONDO_SIZE_KEYS)}"
            )
        set_("model", _base_model(self.preset, self.run_preset, self.model))
        if self.lora and self.from_scratch:
            raise KnnlmError(
                "LoRA fine-tunes a pretrained model; the quick preset trains from scratch"
            )
        set_("memory", _memory_settings(self.memory))
        set_("tune", _tune_settings(self.tune))

    @property
    def run_preset(self) -> RunPreset:
        return get_run_preset(self.preset)

    @property
    def from_scratch(self) -> bool:
        return self.run_preset.scratch_architecture is not None

    @property
    def knn(self) -> KnnSettings:
        """The kNN-LM's search (fixed; a ``tune`` grid chooses k on dev)."""
        return KnnSettings(k=self.k, search=self.search)

    @property
    def mix(self) -> MixSettings:
        """p_knn's weight and temperature (fixed ones; a ``tune`` grid chooses others on dev)."""
        return MixSettings(knn_weight=self.knn_weight, temperature=self.temperature)

    def as_dict(self) -> dict[str, Any]:
        """The run's settings as recorded in its results."""
        p, scratch = self.run_preset, self.from_scratch
        return {
            "preset": self.preset,
            "preset_description": p.description,
            "model": self.model,
            "model_id": None if scratch else _model_id(self.model),
            "from_scratch": scratch,
            "scratch_architecture": p.scratch_architecture,
            "scratch_vocab_size": p.scratch_vocab_size if scratch else None,
            "tokenizer": "byte-level BPE trained on each seed's training sentences"
            if scratch
            else "the model's",
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "warmup_ratio": self.warmup_ratio,
            "weight_decay": self.weight_decay,
            "lora": self.lora,
            "precision": self.precision,
            "checkpoint_every": self.checkpoint_every,
            "k": self.k,
            "knn_weight": self.knn_weight,
            "knn_weight_convention": KNN_WEIGHT_NOTE,
            "temperature": self.temperature,
            "key_type": self.key_type,
            "key_dtype": self.key_dtype,
            "search": self.search,
            "batch_size_eval": self.batch_size_eval,
            "eval_every": self.eval_every,
            "curve_knn": bool(self.curve_knn and self.eval_every),
            "macondo": {key: self.sizes.get(key) for key in MACONDO_SIZE_KEYS}
            | {key: self.sizes[key] for key in MACONDO_NAME_KEYS if self.sizes.get(key)},
            "aggregation": "mean over test examples per n per seed; mean and sample std "
            "(ddof=1, none for one seed) over seeds",
            "memory": _memory_settings(self.memory),
            "tune": _tune_settings(self.tune),
            "seeds": list(self.seeds),
        }


def _base_model(name: str, p: RunPreset, model: str | None) -> str | None:
    """The model preset ``name`` fine-tunes (``model``, else the preset's), None from scratch."""
    if p.scratch_architecture is not None:
        if model is not None:
            raise KnnlmError(
                f"preset {name!r} trains a small model from scratch; drop --model, or choose "
                "--preset default (or paper-gpt2 / paper-mistral) to fine-tune it"
            )
        return None
    if model is None and p.default_model is None:
        raise KnnlmError(f"preset {name!r} fine-tunes a model: give --model MODEL_DIR")
    return model if model is not None else p.default_model


def _check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise KnnlmError("at least one seed is needed")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise KnnlmError(f"seeds must be non-negative integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise KnnlmError(f"seeds must be distinct, got {list(seeds)}")


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
