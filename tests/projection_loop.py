"""The Eq. 2 solver applied one position at a time: the reference the batched solve is checked
against (tests/test_projection_solver.py) and timed against (benchmarks/bench_projection.py).

Each position runs its own Adam, so nothing of the batched solve's masking, freezing of stopped
rows or shared forward pass is involved.
"""

from __future__ import annotations

import torch

from knnlm.experiments.projection.solver import LogitsFn, ProjectionResult, solve_projection


def solve_projection_loop(
    logits_fn: LogitsFn,
    target_logp: torch.Tensor,
    z0: torch.Tensor,
    lr: float = 0.1,
    tol: float = 1e-3,
    max_steps: int = 500,
    fixed_steps: int | None = None,
    record_curve: bool = False,
) -> ProjectionResult:
    """:func:`solve_projection` on each row of ``z0`` alone, the results stacked."""
    kw = dict(lr=lr, tol=tol, max_steps=max_steps, fixed_steps=fixed_steps)
    if z0.shape[0] == 0:
        return solve_projection(logits_fn, target_logp, z0, **kw)
    parts = [
        solve_projection(
            logits_fn, target_logp[i : i + 1], z0[i : i + 1], record_curve=record_curve, **kw
        )
        for i in range(z0.shape[0])
    ]
    curve = per_pos = None
    if parts[0].curve_per_position is not None:
        # A stopped position keeps its final KL, as in the batched curve.
        length = max(p.curve_per_position.shape[0] for p in parts)
        cols = []
        for p in parts:
            c = p.curve_per_position[:, 0]
            pad = c[-1:] if c.numel() else p.kl
            cols.append(torch.cat([c, pad.expand(length - c.shape[0])]))
        per_pos = torch.stack(cols, dim=1) if length else torch.zeros(0, len(parts))
        curve = per_pos.mean(dim=1)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return ProjectionResult(
        z=cat("z"),
        kl=cat("kl"),
        kl_init=cat("kl_init"),
        steps=cat("steps"),
        converged=cat("converged"),
        clamped=cat("clamped"),
        curve=curve,
        curve_per_position=per_pos,
    )
