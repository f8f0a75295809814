"""Tests of the Eq. 2 solver against independent computations (numpy loops, a hand-written Adam)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from knnlm.errors import KnnlmError
from knnlm.experiments.projection.solver import (
    LOGP_FLOOR,
    kl_model_to_target,
    solve_converged,
    solve_projection,
)
from knnlm.lm.loading import load_lm
from projection_loop import solve_projection_loop
from tiny import save_tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops gain nothing from threads, and on a busy machine OpenMP waits make them ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers ------------------------------------------------------------------------------


def _kl_numpy_loops(logits: np.ndarray, target_logp: np.ndarray, reverse: bool = False):
    """KL[q || p] (or KL[p || q]) with explicit loops, float64, q = softmax(logits)."""
    out = []
    for row, lp in zip(logits.astype(np.float64), target_logp.astype(np.float64), strict=True):
        m = max(row)
        z = sum(math.exp(x - m) for x in row)
        logq = [x - m - math.log(z) for x in row]
        lp = [max(v, LOGP_FLOOR) for v in lp]
        total = 0.0
        for a, b in zip(logq, lp, strict=True):
            if reverse:
                total += math.exp(b) * (b - a)
            else:
                total += math.exp(a) * (a - b)
        out.append(total)
    return np.array(out)


def _kl_ref(logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """The same KL written directly (no floor needed: the targets here are positive)."""
    logq = logits.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    return (torch.exp(logq) * (logq - logp)).sum(-1)


def _adam_reference(fn, logp, z0, lr, tol, steps):
    """Textbook Adam (Kingma & Ba, torch defaults) on one position; KL after each update."""
    z = z0.detach().float().clone()
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    b1, b2, eps = 0.9, 0.999, 1e-8
    kls, zs = [], [z.clone()]
    for t in range(1, steps + 2):
        zz = z.clone().requires_grad_(True)
        kl = _kl_ref(fn(zz), logp).sum()
        (g,) = torch.autograd.grad(kl, zz)
        kls.append(kl.item())
        if t == steps + 1:
            break
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        z = z - lr * mhat / (vhat.sqrt() + eps)
        zs.append(z.clone())
    return zs, kls  # zs[t], kls[t]: z and KL after t updates


def _head(seed: int = 0, d: int = 16, vocab: int = 50) -> nn.Module:
    """f of a toy model: LayerNorm then a linear map with sizeable logits."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, vocab))
    with torch.no_grad():
        head[1].weight.mul_(8.0)
    return head


# -- the KL ---------------------------------------------------------------------------------


def test_kl_matches_numpy_loops_and_direction_matters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7)) * 2
    t_logits = rng.normal(size=(3, 7)) * 2
    target = t_logits - np.log(np.exp(t_logits).sum(-1, keepdims=True))
    got = kl_model_to_target(torch.tensor(logits), torch.tensor(target)).numpy()
    want = _kl_numpy_loops(logits, target)
    rev = _kl_numpy_loops(logits, target, reverse=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The paper's direction is not symmetric: the reverse KL differs on this case.
    assert np.all(np.abs(rev - want) > 1e-2)


def test_kl_target_zeros_use_the_floor():
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    target = torch.log(p)  # -inf on the zeros
    got = kl_model_to_target(logits, target)
    assert torch.isfinite(got).all()
    want = _kl_numpy_loops(logits.numpy(), target.numpy())  # clamps at the floor too
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert got.item() > 1000  # the zero set is heavily penalised


def test_kl_low_precision_logits_are_computed_in_float32():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(2, 9)), dtype=torch.bfloat16)
    target = torch.log_softmax(torch.tensor(rng.normal(size=(2, 9))), -1).float()
    got = kl_model_to_target(logits, target)
    want = _kl_numpy_loops(logits.float().numpy(), target.numpy())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_kl_shape_mismatch_is_a_clear_error():
    with pytest.raises(KnnlmError, match=r"\(n, V\)"):
        kl_model_to_target(torch.zeros(2, 5), torch.zeros(2, 4))


# -- the solver on a toy head ---------------------------------------------------------------


def test_solver_follows_textbook_adam_and_the_stopping_rule():
    head = _head()
    torch.manual_seed(1)
    z_true = torch.randn(4, 16) * 3
    z0 = torch.randn(4, 16) * 3
    with torch.no_grad():
        logp = torch.log_softmax(head(z_true), -1)
    tol = 1e-3
    res = solve_projection(head, logp, z0, lr=0.1, tol=tol, max_steps=300)
    assert res.converged.all()
    for i in range(4):
        zs, kls = _adam_reference(head, logp[i : i + 1], z0[i : i + 1], 0.1, tol, 300)
        stop = next(t for t in range(1, len(kls)) if abs(kls[t] - kls[t - 1]) < tol)
        assert int(res.steps[i]) == stop
        torch.testing.assert_close(res.z[i : i + 1], zs[stop], rtol=1e-4, atol=1e-4)
        assert res.kl[i].item() == pytest.approx(kls[stop], abs=1e-5)
        assert res.kl_init[i].item() == pytest.approx(kls[0], abs=1e-5)


def test_fixed_steps_runs_exactly_n_steps_with_a_curve():
    head = _head(2)
    torch.manual_seed(3)
    z0 = torch.randn(5, 16) * 3
    with torch.no_grad():
        logp = torch.log_softmax(head(torch.randn(5, 16) * 3), -1)
    n_steps = 25
    res = solve_projection(head, logp, z0, lr=1e-3, fixed_steps=n_steps, tol=10.0)
    assert res.steps.tolist() == [n_steps] * 5  # a huge tol would stop early if allowed
    assert res.curve is not None and res.curve.shape == (n_steps,)
    assert res.curve_per_position.shape == (n_steps, 5)
    zs, kls = _adam_reference(head, logp[:1], z0[:1], 1e-3, 0.0, n_steps)
    np.testing.assert_allclose(res.curve_per_position[:, 0].numpy(), kls[1:], rtol=1e-4)
    torch.testing.assert_close(res.z[:1], zs[-1], rtol=1e-5, atol=1e-5)
    assert res.curve[-1].item() == pytest.approx(res.kl.mean().item(), rel=1e-6)


def test_converged_positions_stop_moving():
    head = _head(4)
    torch.manual_seed(5)
    z0 = torch.randn(6, 16) * 3
    # Easy rows: target near the start; hard rows: target far away.
    z_true = torch.cat([z0[:3] + 0.3 * torch.randn(3, 16), torch.randn(3, 16) * 3])
    with torch.no_grad():
        logp = torch.log_softmax(head(z_true), -1)
    full = solve_projection(head, logp, z0, tol=1e-4, max_steps=400, record_curve=True)
    assert full.converged.all()
    assert full.steps[:3].max() < full.steps[3:].min()
    # Cut the run right at each easy row's stop: its z is already final then.
    for i in range(3):
        cut = solve_projection(head, logp, z0, tol=1e-4, max_steps=int(full.steps[i]))
        assert torch.equal(cut.z[i], full.z[i])
        assert bool(cut.converged[i])
    # The easy rows solved alone give the same answer.
    alone = solve_projection(head, logp[:3], z0[:3], tol=1e-4, max_steps=400)
    assert torch.equal(alone.steps, full.steps[:3])
    torch.testing.assert_close(alone.z, full.z[:3], rtol=1e-5, atol=1e-5)
    # A stopped row's KL stays flat in the curve.
    s = int(full.steps[0])
    per = full.curve_per_position[:, 0]
    assert torch.all(per[s - 1 :] == full.kl[0])


def test_loop_reference_matches_batched():
    head = _head(6)
    torch.manual_seed(7)
    z0 = torch.randn(5, 16) * 3
    with torch.no_grad():
        logp = torch.log_softmax(head(torch.randn(5, 16) * 3), -1)
    a = solve_projection(head, logp, z0, tol=1e-3, record_curve=True)
    b = solve_projection_loop(head, logp, z0, tol=1e-3, record_curve=True)
    assert torch.equal(a.steps, b.steps)
    torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.curve, b.curve, rtol=1e-5, atol=1e-6)


def test_parameters_never_change_nor_get_grads():
    head = _head(8)  # parameters still require grad here
    before = {k: v.clone() for k, v in head.state_dict().items()}
    torch.manual_seed(9)
    z0 = torch.randn(3, 16) * 3
    with torch.no_grad():
        logp = torch.log_softmax(head(torch.randn(3, 16) * 3), -1)
    solve_projection(head, logp, z0, max_steps=20)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in head.parameters())


def test_target_with_zeros_is_flagged_and_finite():
    head = _head(10)
    z0 = torch.randn(2, 16) * 3
    p = torch.zeros(2, 50)
    p[:, :5] = 0.2
    logp = torch.log(p)
    logp[1] = torch.log_softmax(torch.randn(50), -1)
    res = solve_projection(head, logp, z0, max_steps=50)
    assert res.clamped.tolist() == [True, False]
    assert torch.isfinite(res.kl).all() and torch.isfinite(res.z).all()
    assert res.kl[0] < res.kl_init[0]


def test_bad_inputs_are_clear_errors():
    head = _head()
    z0 = torch.randn(2, 16)
    logp = torch.log_softmax(torch.randn(2, 50), -1)
    with pytest.raises(KnnlmError, match="log-probabilities"):
        solve_projection(head, logp + 1.0, z0)
    with pytest.raises(KnnlmError, match="rows like z0"):
        solve_projection(head, logp[:1], z0)
    with pytest.raises(KnnlmError, match="vocabulary size"):
        solve_projection(head, torch.log_softmax(torch.randn(2, 40), -1), z0)
    with pytest.raises(KnnlmError, match="learning rate"):
        solve_projection(head, logp, z0, lr=0.0)
    with pytest.raises(KnnlmError, match="fixed_steps"):
        solve_projection(head, logp, z0, fixed_steps=0)


def test_empty_batch():
    head = _head()
    res = solve_projection(head, torch.zeros(0, 50), torch.zeros(0, 16))
    assert res.z.shape == (0, 16) and res.kl.shape == (0,)


# -- f and f∘g of tiny GPT-2 and Llama ------------------------------------------------------


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory, tiny_tokenizer, tiny_lm_dir):
    if request.param == "gpt2":
        path = tiny_lm_dir
    else:
        path = save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, "llama")
    lm = load_lm(str(path), device="cpu")
    # Random init gives near-uniform outputs and an MLP that barely touches the residual;
    # a larger final-norm gain and larger MLP weights make f peaked and g matter.
    with torch.no_grad():
        lm.adapter.final_norm.weight.fill_(10.0)
        for p in lm.adapter.mlp.parameters():
            if p.dim() == 2:
                p.mul_(20.0 if request.param == "gpt2" else 15.0)
        h = torch.randn(64, lm.adapter.hidden_size) * 5
        assert ((lm.adapter.g(h) - h).norm(dim=-1) / h.norm(dim=-1)).mean() > 0.3
    return lm


def _hidden(lm, n_seq: int = 2, length: int = 8):
    torch.manual_seed(11)
    ids = torch.randint(0, lm.adapter.vocab_size, (n_seq, length))
    with torch.no_grad(), lm.adapter.capture() as store:
        logits = lm.model(ids).logits
    d = lm.adapter.hidden_size
    enc = store["enc"].reshape(-1, d)
    return enc, torch.log_softmax(logits.reshape(enc.shape[0], -1).float(), -1)


@pytest.mark.parametrize("space", ["f", "fg"])
def test_lm_own_distribution_is_already_optimal(tiny_lm, space):
    """knn weight 0: the target is the LM itself, from the model's full forward."""
    ad = tiny_lm.adapter
    enc, logp_lm = _hidden(tiny_lm)
    with torch.no_grad():
        z0 = ad.g(enc) if space == "f" else enc
    fn = ad.f_logits if space == "f" else ad.fg_logits
    res = solve_projection(fn, logp_lm, z0)
    assert res.kl_init.abs().max() < 1e-4
    assert res.converged.all() and res.steps.max() <= 2
    assert res.kl.abs().max() < 1e-3


@pytest.mark.parametrize("space", ["f", "fg"])
def test_reachable_target_is_reached(tiny_lm, space):
    ad = tiny_lm.adapter
    d = ad.hidden_size
    fn = ad.f_logits if space == "f" else ad.fg_logits
    torch.manual_seed(12)
    z_true = torch.randn(8, d) * 5
    z0 = z_true + torch.randn(8, d) * 2.5
    with torch.no_grad():
        logp = torch.log_softmax(fn(z_true).float(), -1)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = solve_projection(fn, logp, z0, lr=0.1, tol=1e-6, max_steps=800)
    assert res.kl_init.mean() > 0.1  # a real problem
    assert res.converged.all()
    assert res.kl.max() < 1e-3
    # Checked independently of the solver's own bookkeeping.
    with torch.no_grad():
        kl_np = _kl_numpy_loops(fn(res.z).float().numpy(), logp.numpy())
    assert kl_np.max() < 1e-3
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- the converged solve (L-BFGS) -----------------------------------------------------------


def _numpy_descent(W, b, logp, z0, reverse, iters=20000):
    """Gradient descent with backtracking on KL for f(z) = softmax(W z + b), float64 numpy,
    one position at a time: an independent reference minimum."""

    def kl_grad(z, lp):
        a = W @ z + b
        logq = a - a.max() - np.log(np.exp(a - a.max()).sum())
        q, p = np.exp(logq), np.exp(lp)
        if reverse:
            return float((p * (lp - logq)).sum()), W.T @ (q - p)
        kl = float((q * (logq - lp)).sum())
        return kl, W.T @ (q * (logq - lp - kl))

    out = []
    for z, lp in zip(z0.astype(np.float64), logp.astype(np.float64), strict=True):
        step = 1.0
        kl, g = kl_grad(z, lp)
        for _ in range(iters):
            while True:
                cand = z - step * g
                kc, gc = kl_grad(cand, lp)
                if kc <= kl - 1e-4 * step * (g @ g) or step < 1e-12:
                    break
                step /= 2
            z, kl, g, step = cand, kc, gc, step * 2
            if g @ g < 1e-20:
                break
        out.append(kl)
    return np.array(out)


@pytest.mark.parametrize("direction", ["model_first", "target_first"])
def test_converged_solve_reaches_the_numpy_minimum(direction):
    g = torch.Generator().manual_seed(3)
    V, d, n = 12, 3, 5
    W, b = torch.randn(V, d, generator=g, dtype=torch.float64), torch.randn(V, generator=g)
    z0 = torch.randn(n, d, generator=g)
    fn = lambda z: z.double() @ W.T + b.double()  # noqa: E731
    # As in Eq. 2: the LM's own distribution mixed with a sharp other one. KL[f(z) || p] is
    # not convex in z, but from z0 the descent and the solve find the same nearby minimum.
    other = torch.log_softmax(2 * torch.randn(n, V, generator=g, dtype=torch.float64), -1)
    target = torch.logaddexp(torch.log_softmax(fn(z0), -1) + math.log(0.6), other + math.log(0.4))
    res = solve_converged(fn, target, z0, tol=1e-9, max_steps=500, direction=direction)
    ref = _numpy_descent(W.numpy(), b.double().numpy(), target.numpy(), z0.numpy(),
                         reverse=direction == "target_first")  # fmt: skip
    assert ref.mean() > 0.05  # the target is out of reach: a real minimum, not zero
    np.testing.assert_allclose(res.kl.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert bool(res.converged.all())
    reverse = direction == "target_first"
    np.testing.assert_allclose(
        res.kl.numpy(), _kl_numpy_loops(fn(res.z).numpy(), target.numpy(), reverse), rtol=1e-5
    )


def test_converged_solve_is_at_most_the_fixed_step_solves():
    g = torch.Generator().manual_seed(5)
    V, d, n = 64, 8, 16
    lin = nn.Linear(d, V)
    norm = nn.LayerNorm(d)
    fn = lambda z: lin(norm(z))  # noqa: E731
    z0 = torch.randn(n, d, generator=g)
    with torch.no_grad():
        mix = torch.log_softmax(3 * torch.randn(n, V, generator=g), -1)
        target = torch.logaddexp(
            torch.log_softmax(fn(z0), -1) + math.log(0.75), mix + math.log(0.25)
        )
    conv = solve_converged(fn, target, z0)
    assert bool((conv.kl <= conv.kl_init).all())
    for kw in (
        {"lr": 1e-3, "fixed_steps": 100},
        {"lr": 0.1},
        {"lr": 0.1, "tol": 0, "max_steps": 300},
    ):
        other = solve_projection(fn, target, z0, **kw)
        assert bool((conv.kl <= other.kl + 1e-6).all()), kw
    assert conv.curve_per_position.shape == (int(conv.steps[0]), n)
    assert bool((conv.curve_per_position.diff(dim=0) <= 0).all())  # best-so-far never rises


def test_converged_solve_rejects_a_bad_direction():
    with pytest.raises(KnnlmError, match="direction"):
        solve_converged(
            lambda z: z, torch.full((1, 2), -math.log(2)), torch.zeros(1, 2), direction="up"
        )
