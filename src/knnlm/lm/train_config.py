"""Settings of one training run (:class:`TrainConfig`) and its outcome (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from knnlm.errors import KnnlmError
from knnlm.settings import Settings, flag, require

PRECISIONS = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Settings of one training run.

    ``max_steps`` (optimizer steps) overrides ``epochs`` when given. ``batch_size`` counts
    sequences per forward pass; ``grad_accum`` forward passes make one optimizer step.
    ``data_seed`` fixes the batch order (defaults to ``seed``, which fixes dropout).
    ``checkpoint_every`` / ``eval_every`` are in optimizer steps; 0 or None disables them.
    """

    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    data_seed: int | None = None
    context_len: int = 256
    grad_accum: int = 1
    checkpoint_every: int | None = 500
    eval_every: int | None = None
    log_every: int = 10
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.data_seed is None:
            self.data_seed = self.seed
        checks = [
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"max steps must be at least 1, got {self.max_steps}",
            ),
            (
                0 <= self.warmup_ratio < 1,
                f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm > 0, f"max grad norm must be positive, got {self.max_grad_norm}"),
            (self.context_len >= 2, f"context length must be at least 2, got {self.context_len}"),
            (self.grad_accum >= 1, f"gradient accumulation must be >= 1, got {self.grad_accum}"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
            (
                self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise KnnlmError(msg)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        d = asdict(self)
        for k in ("checkpoint_every", "eval_every", "log_every"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class LMTrainSettings(Settings):
    """What :func:`knnlm.lm.train.train_lm` (``knnlm train``) trains, checked where it is
    built: from scratch (``preset``) or fine-tuning ``base_model`` (with ``lora``), on one
    token stream or one ``examples`` per line. None: the preset's (or fine-tuning's)
    default. Example: ``LMTrainSettings("tiny", max_steps=100)``."""

    preset: str = "small"
    base_model: str | None = None
    lora: bool = False
    drop_last_mlp: bool = False
    examples: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    context_len: int | None = None
    grad_accum: int = 1
    seed: int = 0
    data_seed: int | None = None
    checkpoint_every: int | None = 500
    eval_every: int | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        require(not (self.lora and self.base_model is None), "lora",
                "fine-tunes a pretrained model: give <<base_model>> as well")  # fmt: skip
        require(self.precision in PRECISIONS, "precision",
                f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")  # fmt: skip


# How knnlm train names the fields it sets.
LM_TRAIN_FLAGS = flag({"base_model": "--model"})


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    total_steps: int
    epochs: float
    final_loss: float | None
    loss_curve: list[dict]
    evals: list[dict]
    tokens_seen: int
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    tokens_this_run: int
    resumed_from: int | None
    model: nn.Module | None = field(default=None, repr=False)
    reused: bool = False  # the finished model of an identical run was found and kept

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "steps": self.steps,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "final_loss": self.final_loss,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "resumed_from": self.resumed_from,
            "evals": self.evals,
        }
