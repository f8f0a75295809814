"""The settings of one projection run (Section 3, Eq. 2): :class:`ProjectionSettings`."""

from __future__ import annotations

from dataclasses import dataclass

from knnlm.forward_pass import WindowSettings
from knnlm.retrieval.retriever import KnnSettings, MixSettings
from knnlm.settings import Settings, flag, require


@dataclass(frozen=True)
class ProjectionSettings(Settings):
    """Every setting of :func:`knnlm.experiments.projection.run.run_projection`, checked where it
    is built: the split and windows scored, the kNN-LM projected (searched as ``knn``, p_knn
    at ``mix``'s weight and temperature; no memory or gate), a seeded sample of
    ``max_positions`` positions (None: all), Adam at ``lr`` until the KL moves less than
    ``tol`` (at most ``max_steps``; ``fixed_steps``: exactly that many), ``converged`` adds
    the solve to convergence (L-BFGS, ``converged_tol`` / ``converged_max_steps``),
    ``keep_positions`` each position's target log-prob, ``solve_batch`` positions at once.
    Example: ``ProjectionSettings("test", WindowSettings(1024, 512), max_positions=500)``.
    """

    split: str = "valid"
    window: WindowSettings = WindowSettings(1024, 1024)
    batch_size: int = 8
    knn: KnnSettings = KnnSettings()
    mix: MixSettings = MixSettings()
    max_positions: int | None = 2000
    seed: int = 0
    lr: float = 0.1
    tol: float = 1e-3
    max_steps: int = 500
    fixed_steps: int | None = None
    converged: bool = False
    converged_tol: float = 1e-6
    converged_max_steps: int = 2000
    keep_positions: bool = False
    solve_batch: int = 256
    text_field: str = "text"

    def __post_init__(self) -> None:
        for name in ("max_positions", "fixed_steps"):
            v = getattr(self, name)
            require(v is None or v >= 1, name, f"must be at least 1, got {v}")
        for name in ("max_steps", "converged_max_steps", "solve_batch", "batch_size"):
            v = getattr(self, name)
            require(v >= 1, name, f"must be at least 1, got {v}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.tol >= 0, "tol", f"must be at least 0, got {self.tol}")


# How knnlm project names the fields it sets.
PROJECTION_FLAGS = flag({"fixed_steps": "--steps"})
# And KnnLM.project.
PROJECTION_ARGS = {"fixed_steps": "steps"}
