"""The settings of one MLP-memory training (Section 5): :class:`MemoryTrainSettings`."""

from __future__ import annotations

from dataclasses import dataclass

from knnlm.settings import Settings, require


@dataclass(frozen=True)
class MemoryTrainSettings(Settings):
    """What :func:`knnlm.experiments.mlp_memory.train.train_memory` trains, checked where it is
    built: the MLP's ``hidden`` size (paper: 4096), AdamW at a constant ``lr`` with
    ``weight_decay``, ``batch_tokens`` keys a step (paper: 3 x 3072) split into
    ``micro_batch`` pieces (same gradient), ``epochs`` passes or ``max_steps`` steps in all,
    the ``seed`` of the init and the order, and whether W (the LM's output embedding) is
    trained too (``train_output``). Example: ``MemoryTrainSettings(hidden=256, max_steps=100)``.
    """

    hidden: int = 4096
    lr: float = 1e-5
    batch_tokens: int = 9216
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    train_output: bool = False
    weight_decay: float = 0.0
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "batch_tokens", "epochs", "max_steps", "micro_batch"):
            v = getattr(self, name)
            ok = v is None and name in ("max_steps", "micro_batch") or isinstance(v, int) and v >= 1
            require(ok, name, f"must be a positive integer, got {v!r}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(
            self.weight_decay >= 0, "weight_decay", f"must be at least 0, got {self.weight_decay}"
        )
