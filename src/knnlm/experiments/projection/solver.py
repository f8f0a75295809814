"""Batched solver of the paper's Eq. 2: z* = argmin_z KL[f(z) || p_target].

``f(z) = softmax(logits_fn(z))`` with the model's weights fixed, and ``p_target`` a full
vocabulary distribution given as log-probabilities (the kNN-LM distribution). The KL is in
the paper's direction, model distribution first:

    KL[q || p] = sum_v q_v (log q_v - log p_v),   q = f(z).

Zeros in the target. Where p_v = 0 and q_v > 0 the KL is +inf in exact math, and since a
softmax is strictly positive, it is +inf for every z. p_knnlm = (1 - w) p_lm + w p_knn is
strictly positive whenever the kNN weight w < 1, so this only happens for pure-kNN targets.
To keep values and gradients finite, log p is clamped at ``LOGP_FLOOR`` (-1e4): no float32
log-softmax of real logits comes near it, exp(-1e4) is 0 in every float type, and the
surrogate still penalises mass on the zero set with slope 1e4. The KL reported for such rows
is that surrogate, a finite lower bound of the true (infinite) value; ``clamped`` flags them.

Optimisation (Appendix A.2): Adam with lr 0.1 on z, all positions of a batch as one (n, d)
tensor, stopping each position when its KL changes by less than ``tol`` between two steps.
Appendix E's learning-rate study (lr 1e-3, 100 steps) is ``fixed_steps=100``.

That stopping rule is the paper's, and it stops long before a minimum (a few steps, a few % of
the starting KL removed). :func:`solve_converged` solves the same problem to convergence: L-BFGS
(strong Wolfe line search) on the summed KL of a batch of positions, whose Hessian is block
diagonal, one d x d block per position, keeping each position's best z seen, until every
position's relative KL change stays below ``tol`` or the iteration cap. It also solves the other KL
direction, KL[p_target || f(z)] (the cross-entropy perplexity depends on, up to a constant).

The two uses: onto f, z lives in the input space of f (``adapter.f_logits``,
z0 = g(enc(c))); onto f∘g, z lives in the input space of g (``adapter.fg_logits``,
z0 = enc(c)). Call with the model in eval mode (no dropout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from knnlm.errors import KnnlmError

LOGP_FLOOR = -1e4
# Rows of target_logp must be normalised; loose enough for targets stored in bfloat16.
_NORM_TOL = 1e-2

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ProjectionResult:
    """Outcome of solving Eq. 2 for n positions.

    z: (n, d) the solution of each position, at its convergence step, in z0's dtype.
    kl: (n,) KL[f(z) || p_target] at that z (float32).
    kl_init: (n,) the KL at z0.
    steps: (n,) int64, Adam updates applied to each position.
    converged: (n,) bool, whether the stopping rule fired (within max_steps; with
        ``fixed_steps``, whether the last step changed the KL by less than tol).
    clamped: (n,) bool, target rows with entries below LOGP_FLOOR (zeros): their KL is the
        floored surrogate, see the module doc.
    curve: (T,) mean KL over positions after each update (T = steps taken by the batch), or
        None unless recorded. Stopped positions contribute their final KL.
    curve_per_position: (T, n) the same per position, or None.
    """

    z: torch.Tensor
    kl: torch.Tensor
    kl_init: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    clamped: torch.Tensor
    curve: torch.Tensor | None = None
    curve_per_position: torch.Tensor | None = None


DIRECTIONS = ("model_first", "target_first")


def _kl_target_first(logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL[exp(logp) || softmax(logits)] per row, float32; floored entries carry p = 0."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _kl_floored(logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL[softmax(logits) || exp(logp)] per row, float32; ``logp`` already floored."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (logq.exp() * (logq - logp)).sum(dim=-1)


def kl_model_to_target(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL[softmax(logits) || p_target] per row, shapes (n, V) -> (n,), computed in float32.

    ``target_logp`` holds log-probabilities; entries below LOGP_FLOOR (including -inf) are
    clamped to it (see the module doc).
    """
    if logits.shape != target_logp.shape or logits.dim() != 2:
        raise KnnlmError(
            f"logits and target_logp must both be (n, V); got {tuple(logits.shape)} and "
            f"{tuple(target_logp.shape)}"
        )
    return _kl_floored(logits, target_logp.float().clamp_min(LOGP_FLOOR))


def _check_inputs(
    target_logp: torch.Tensor,
    z0: torch.Tensor,
    lr: float,
    tol: float,
    max_steps: int,
    fixed_steps: int | None,
) -> None:
    if z0.dim() != 2:
        raise KnnlmError(f"z0 must be (n, d); got shape {tuple(z0.shape)}")
    if target_logp.dim() != 2 or target_logp.shape[0] != z0.shape[0]:
        raise KnnlmError(
            f"target_logp must be (n, V) with n = {z0.shape[0]} rows like z0; "
            f"got shape {tuple(target_logp.shape)}"
        )
    if target_logp.device != z0.device:
        raise KnnlmError(f"target_logp is on {target_logp.device} but z0 is on {z0.device}")
    if not lr > 0:
        raise KnnlmError(f"learning rate must be > 0; got {lr}")
    if not tol >= 0:
        raise KnnlmError(f"tol must be >= 0; got {tol}")
    if fixed_steps is None and max_steps < 1:
        raise KnnlmError(f"max_steps must be >= 1; got {max_steps}")
    if fixed_steps is not None and fixed_steps < 1:
        raise KnnlmError(f"fixed_steps must be >= 1; got {fixed_steps}")
    if z0.shape[0] == 0:
        return
    t = target_logp.float()
    if torch.isnan(t).any():
        raise KnnlmError("target_logp contains NaN")
    lse = torch.logsumexp(t, dim=-1)
    bad = ~(lse.abs() <= _NORM_TOL)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise KnnlmError(
            "target_logp rows must be log-probabilities (logsumexp 0); "
            f"row {i} has logsumexp {float(lse[i]):.4g}"
        )


def solve_projection(
    logits_fn: LogitsFn,
    target_logp: torch.Tensor,
    z0: torch.Tensor,
    lr: float = 0.1,
    tol: float = 1e-3,
    max_steps: int = 500,
    fixed_steps: int | None = None,
    record_curve: bool = False,
    progress: bool = False,
) -> ProjectionResult:
    """Solve Eq. 2 for every row of ``z0`` at once with Adam on one (n, d) tensor.

    Step t applies the t-th Adam update and evaluates KL_t at the new z. A position stops at
    the first t >= 1 with |KL_t - KL_{t-1}| < tol: its z and KL are those of step t, its
    gradient is masked and its row restored after every later update (Adam's momentum would
    move it otherwise), and it leaves the forward pass. A position already at KL_0 < tol
    stops at step 0: KL >= 0, so no descent step could change it by tol or more, while
    Adam's sign-like first step on a near-zero gradient would move it needlessly.

    ``fixed_steps=N`` runs exactly N updates on every position with no early stop, as in
    Appendix E. The optimisation runs in float32; ``logits_fn`` receives z in z0's dtype.
    Only z is optimised, and gradients are taken with respect to z alone, so the model's
    parameters are never written and receive no ``.grad``.
    """
    _check_inputs(target_logp, z0, lr, tol, max_steps, fixed_steps)
    fixed = fixed_steps is not None
    total = int(fixed_steps) if fixed else int(max_steps)
    logp, clamped = _floored_target(target_logp)
    run = _AdamRun(logits_fn, logp, z0, lr, tol, fixed, keep_curve=record_curve or fixed)
    bar = tqdm(total=total, desc="projection", unit="step", disable=not progress, leave=False)
    with torch.enable_grad():
        for t in range(total + 1):
            rows, kl_sub = run.evaluate(t)
            if t == total or run.n_done == run.n:
                break
            run.update(rows, kl_sub)
            bar.update(1)
            if progress and t % 10 == 0:
                bar.set_postfix(
                    active=run.n - run.n_done, mean_kl=f"{float(run.kl_cur.mean()):.4g}"
                )
    bar.close()
    return run.result(clamped)


def _floored_target(target_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logp`` in float32 floored at LOGP_FLOOR, and the rows that had entries below it."""
    with torch.no_grad():
        logp = target_logp.float().clamp_min(LOGP_FLOOR)
        clamped = (target_logp < LOGP_FLOOR).any(dim=-1)
    return logp, clamped


class _AdamRun:
    """The state of one batched Adam solve of :func:`solve_projection`: z as one (n, d)
    parameter, and per position its current KL, Adam updates applied and whether it stopped."""

    def __init__(
        self, logits_fn: LogitsFn, logp: torch.Tensor, z0: torch.Tensor, lr: float, tol: float,
        fixed: bool, keep_curve: bool,
    ) -> None:  # fmt: skip
        self.logits_fn, self.logp, self.dtype = logits_fn, logp, z0.dtype
        self.tol, self.fixed, self.keep_curve = tol, fixed, keep_curve
        self.n, dev = z0.shape[0], z0.device
        self.z = torch.nn.Parameter(z0.detach().float().clone())
        self.opt = torch.optim.Adam([self.z], lr=lr)
        self.kl_cur = torch.zeros(self.n, device=dev)
        self.kl_init = self.kl_cur
        self.steps = torch.zeros(self.n, dtype=torch.long, device=dev)
        self.done = torch.zeros(self.n, dtype=torch.bool, device=dev)
        self.z_frozen = torch.zeros_like(self.z)  # rows of stopped positions, written back
        self.curve: list[torch.Tensor] = []
        self.n_done = 0  # one host sync per step: this count

    def forward(self, rows: torch.Tensor | None) -> torch.Tensor:
        """KL of the positions ``rows`` (all when None) at the current z, with its graph."""
        zz = self.z if rows is None else self.z[rows]
        tt = self.logp if rows is None else self.logp[rows]
        logits = self.logits_fn(zz.to(self.dtype))
        if logits.shape != tt.shape:
            raise KnnlmError(
                f"logits_fn returned shape {tuple(logits.shape)}; expected {tuple(tt.shape)} "
                "(the target's vocabulary size must match the model's)"
            )
        return _kl_floored(logits, tt)

    def evaluate(self, t: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """KL_t of the positions still moving (forwarded only those); stop the positions whose
        KL moved by less than tol (at t = 0: those already below tol). Returns the rows
        forwarded (None: all) and their KL."""
        rows = None if self.n_done == 0 else (~self.done).nonzero().squeeze(1)
        kl_sub = self.forward(rows) if self.n else torch.zeros(0, device=self.z.device)
        kl_prev = self.kl_cur.clone()
        with torch.no_grad():
            if rows is None:
                self.kl_cur.copy_(kl_sub.detach())
            else:
                self.kl_cur[rows] = kl_sub.detach()
        if t == 0:
            self.kl_init = self.kl_cur.clone()
            newly = self.kl_cur < self.tol
        else:
            if self.keep_curve:
                self.curve.append(self.kl_cur.clone())
            newly = ~self.done & ((self.kl_cur - kl_prev).abs() < self.tol)
        if not self.fixed:
            with torch.no_grad():
                self.z_frozen = torch.where(newly.unsqueeze(1), self.z.detach(), self.z_frozen)
            self.done |= newly
            self.n_done = int(self.done.sum())
        return rows, kl_sub

    def update(self, rows: torch.Tensor | None, kl_sub: torch.Tensor) -> None:
        """One Adam update of the moving positions; stopped rows are restored after it."""
        # Gradient of the summed KL of moving positions only: each row's gradient is its
        # own KL's, as in a one-position solve.
        keep = ~self.done if rows is None else ~self.done[rows]
        (grad,) = torch.autograd.grad((kl_sub * keep).sum(), self.z)
        self.z.grad = grad.masked_fill(self.done.unsqueeze(1), 0.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.z.copy_(torch.where(self.done.unsqueeze(1), self.z_frozen, self.z))
            self.steps += (~self.done).long()

    def result(self, clamped: torch.Tensor) -> ProjectionResult:
        with torch.no_grad():
            if self.fixed:
                last = self.curve[-2] if len(self.curve) > 1 else self.kl_init
                converged = (self.kl_cur - last).abs() < self.tol
            else:
                converged = self.done.clone()
            curve_t = (
                torch.stack(self.curve)
                if self.curve
                else torch.zeros(0, self.n, device=self.z.device)
            )
        return ProjectionResult(
            z=self.z.detach().to(self.dtype),
            kl=self.kl_cur,
            kl_init=self.kl_init,
            steps=self.steps,
            converged=converged,
            clamped=clamped,
            curve=curve_t.mean(dim=1) if self.keep_curve else None,
            curve_per_position=curve_t if self.keep_curve else None,
        )


def _lbfgs_closure(logits_fn: LogitsFn, logp: torch.Tensor, z: torch.Tensor, dtype, kl_fn, best):
    """The closure L-BFGS calls at every trial z: updates each row's best (KL, z) in ``best``."""

    def closure() -> torch.Tensor:
        z.grad = None
        kl = kl_fn(logits_fn(z.to(dtype)), logp)
        with torch.no_grad():
            better = kl.detach() < best["kl"]  # NaN never replaces a finite best
            best["kl"] = torch.where(better, kl.detach(), best["kl"])
            best["z"] = torch.where(better.unsqueeze(1), z.detach(), best["z"])
        loss = kl.sum()
        (z.grad,) = torch.autograd.grad(loss, z)
        best["evals"] += 1
        return loss.detach()

    return closure


def solve_converged(
    logits_fn: LogitsFn,
    target_logp: torch.Tensor,
    z0: torch.Tensor,
    *,
    tol: float = 1e-6,
    max_steps: int = 2000,
    direction: str = "model_first",
    patience: int = 3,
    history: int = 20,
) -> ProjectionResult:
    """Solve Eq. 2 to convergence for every row of ``z0``: L-BFGS on the summed KL.

    One iteration is one L-BFGS update with its line search (``steps`` counts iterations; each
    takes one or a few evaluations). Stops when every row's best KL has moved by at most ``tol``
    (relative) over the last ``patience`` iterations, or after ``max_steps`` iterations. Each
    row keeps the best z seen at any evaluation, so its KL never exceeds KL_0. ``converged``
    flags rows whose best KL moved by at most ``tol`` (relative) over the last ``patience``
    iterations. ``curve_per_position`` is (T, n): each row's best KL after iteration t.
    ``direction``: "model_first" is the paper's KL[f(z) || p]; "target_first" is KL[p || f(z)].
    """
    _check_inputs(target_logp, z0, 1.0, tol, max_steps, None)
    if direction not in DIRECTIONS:
        raise KnnlmError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if patience < 1:
        raise KnnlmError(f"patience must be >= 1; got {patience}")
    kl_fn = _kl_floored if direction == "model_first" else _kl_target_first
    logp, clamped = _floored_target(target_logp)
    n, dev = z0.shape[0], z0.device
    z = torch.nn.Parameter(z0.detach().float().clone())
    best = {"kl": torch.full((n,), math.inf, device=dev), "z": z.detach().clone(), "evals": 0}
    if n == 0:
        empty = torch.zeros(0, device=dev)
        return ProjectionResult(z0.clone(), empty, empty, empty.long(), empty.bool(), clamped)
    opt = torch.optim.LBFGS(
        [z], lr=1.0, max_iter=1, history_size=history, line_search_fn="strong_wolfe",
        tolerance_grad=0.0, tolerance_change=0.0,
    )  # fmt: skip
    closure = _lbfgs_closure(logits_fn, logp, z, z0.dtype, kl_fn, best)
    with torch.enable_grad():
        closure()
    kl_init = best["kl"].clone()
    curve = [kl_init]

    def at_tol() -> torch.Tensor:
        ref = curve[max(0, len(curve) - 1 - patience)]
        return (ref - best["kl"]).abs() <= tol * best["kl"].abs().clamp_min(1e-12)

    with torch.enable_grad():
        for _ in range(max_steps):
            opt.step(closure)
            curve.append(best["kl"].clone())
            # One host sync per iteration: every row calm over the last ``patience`` iterations.
            if len(curve) > patience and bool(at_tol().all()):
                break
    per_pos = torch.stack(curve[1:])
    moved = at_tol()
    return ProjectionResult(
        z=best["z"].to(z0.dtype),
        kl=best["kl"],
        kl_init=kl_init,
        steps=torch.full((n,), len(curve) - 1, dtype=torch.long, device=dev),
        converged=moved,
        clamped=clamped,
        curve=per_pos.mean(dim=1),
        curve_per_position=per_pos,
    )
