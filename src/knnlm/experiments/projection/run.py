"""Section 3: can the last layers express the kNN-LM's distribution? (Eq. 2, Tables 1, 3, 4)

For scored positions of a split, p_knnlm = (1 - w) p_lm + w p_knn over the full vocabulary is
projected onto the output space of f (z starts at g(enc(c))) and of f∘g (z starts at enc(c)).
If f(z*) reaches the kNN-LM's perplexity, the softmax bottleneck is not why the kNN-LM wins.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from knnlm.data.corpus import load_tokens
from knnlm.experiments.projection.settings import ProjectionSettings
from knnlm.experiments.projection.solver import (
    ProjectionResult,
    solve_converged,
    solve_projection,
)
from knnlm.forward_pass import score_stream
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.combiner import interpolate, perplexity
from knnlm.retrieval.datastore import corpus_fingerprint
from knnlm.retrieval.exclusion import should_exclude
from knnlm.retrieval.retriever import Retriever


def _kl_stats(kl: np.ndarray, steps: np.ndarray, cap: int) -> dict:
    """KL statistics; ``capped`` counts positions stopped by the step cap, not by convergence."""
    return {
        "kl_mean": float(np.mean(kl)),
        "kl_median": float(np.median(kl)),
        "kl_p90": float(np.percentile(kl, 90)),
        "kl_max": float(np.max(kl)),
        "steps_mean": float(np.mean(steps)),
        "steps_max": int(np.max(steps)),
        "capped": int(np.sum(steps >= cap)),
    }


def _curve_bands(parts: list[torch.Tensor]) -> dict:
    """Mean and quartiles over positions of per-position KL curves (T_i, n_i) of solve
    batches; a batch that stopped earlier holds its last value (its positions had stopped)."""
    length = max(int(c.shape[0]) for c in parts)
    if length == 0:
        return {}
    cols = [torch.cat([c, c[-1:].expand(length - c.shape[0], -1)]) for c in parts]
    m = torch.cat(cols, dim=1).double().numpy()  # (T, n)
    q25, q50, q75 = np.percentile(m, [25, 50, 75], axis=1)
    return {"mean": m.mean(1).tolist(), "q25": q25.tolist(), "median": q50.tolist(),
            "q75": q75.tolist()}  # fmt: skip


class _Solves:
    """Per-position outputs of each named solve across solve batches, then their summary."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(self, name: str, res, target_logp: torch.Tensor) -> None:
        part = self.parts.setdefault(name, {k: [] for k in
                                            ("logp", "kl", "kl_init", "steps", "tol", "curve")})  # fmt: skip
        for key, value in (("logp", target_logp), ("kl", res.kl), ("kl_init", res.kl_init),
                           ("steps", res.steps), ("tol", res.converged)):  # fmt: skip
            part[key].append(value.detach().cpu())
        if res.curve_per_position is not None:
            part["curve"].append(res.curve_per_position.detach().cpu())

    def summary(self, name: str, cap: int, n: int, keep_positions: bool) -> dict:
        part = {k: torch.cat(v) if v and k != "curve" else v for k, v in self.parts[name].items()}
        nll = -float(part["logp"].double().sum())
        kl_all = part["kl"].numpy()
        init = float(part["kl_init"].double().mean())
        out = {"perplexity": perplexity(nll, n), "nll_sum": nll,
               **_kl_stats(kl_all, part["steps"].numpy(), cap),
               "kl_init_mean": init, "at_tolerance": int(part["tol"].sum()),
               "kl_removed": (1 - float(np.mean(kl_all)) / init) if init > 0 else None,
               "kl": kl_all.tolist()}  # fmt: skip
        if keep_positions:
            out["target_logp"] = part["logp"].tolist()
        if part["curve"]:
            out["kl_curve_bands"] = _curve_bands(part["curve"])
        return out


# The converged solves: Eq. 2 onto f and f∘g (the claim), and two sensitivity rows: f without
# its final norm (the paper's "last linear layer with softmax"), and the other KL direction.
CONVERGED = ("proj_f", "proj_fg", "proj_f_lm_head", "proj_f_target_first")


def keep_better(cold: ProjectionResult, warm: ProjectionResult) -> ProjectionResult:
    """Per position, the solve that ends at the lower KL (the cold start on a tie); the
    starting KL and the KL curve stay the cold start's (the paper's start, g(enc(c)))."""
    better = warm.kl < cold.kl
    pick = lambda a, b: torch.where(better.reshape(-1, *[1] * (a.dim() - 1)), b, a)  # noqa: E731
    return replace(
        cold, z=pick(cold.z, warm.z), kl=pick(cold.kl, warm.kl),
        steps=pick(cold.steps, warm.steps), converged=pick(cold.converged, warm.converged),
    )  # fmt: skip


def _converged_solves(adapter, target_logp, enc, g_enc, tol, max_steps) -> dict:
    with torch.no_grad():
        normed = adapter.final_norm(g_enc)
    plan = {
        "proj_fg": (adapter.fg_logits, enc, "model_first"),
        "proj_f": (adapter.f_logits, g_enc, "model_first"),
        "proj_f_lm_head": (adapter.lm_head, normed, "model_first"),
        "proj_f_target_first": (adapter.f_logits, g_enc, "target_first"),
    }
    out = {
        name: (fn, solve_converged(fn, target_logp, z0, tol=tol, max_steps=max_steps,
                                   direction=direction))
        for name, (fn, z0, direction) in plan.items()
    }  # fmt: skip
    # f's output space contains f∘g's (z = g(z')), so f's minimum is at most f∘g's; a solve
    # from g(enc(c)) can stop in a worse local minimum. Start f from g(z*) of the f∘g solve too
    # and keep the better per position, so f never ends above f∘g.
    with torch.no_grad():
        warm_z = adapter.g(out["proj_fg"][1].z)
    warm = solve_converged(adapter.f_logits, target_logp, warm_z, tol=tol, max_steps=max_steps)
    out["proj_f"] = (adapter.f_logits, keep_better(out["proj_f"][1], warm))
    return out


def _choose(n_scored: int, max_positions: int | None, seed: int) -> np.ndarray:
    """Mask over stream positions 0..n_scored of the positions solved (a seeded sample)."""
    if max_positions is None or max_positions >= n_scored:
        return np.ones(n_scored + 1, dtype=bool)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(n_scored + 1, dtype=bool)
    chosen[1 + rng.choice(n_scored, size=max_positions, replace=False)] = True
    return chosen


def run_projection(
    lm: LoadedLM,
    corpus: str,
    datastore: str | Path,
    settings: ProjectionSettings = ProjectionSettings(),
    *,
    progress: bool = True,
) -> dict:
    """Solve Eq. 2 onto f and onto f∘g for (a seeded sample of) the scored positions.

    ``proj_f`` / ``proj_fg``: Adam at ``lr`` with the paper's stopping rule (or
    ``fixed_steps``; every setting is a field of ``settings``). ``converged=True`` adds ``result["converged"]``: the same positions
    solved to convergence (:func:`solve_converged`), with the sensitivity rows of
    :data:`CONVERGED`. ``keep_positions`` keeps each position's log-probability of its target
    (``target_logp``) for paired tests.
    """
    st = settings
    window = st.window.for_model(lm.model)
    context_len, stride, split, knn, mix = (window.context_len, window.stride, st.split, st.knn,
                                            st.mix)  # fmt: skip
    lr, tol, max_steps, fixed_steps, converged = (
        st.lr,
        st.tol,
        st.max_steps,
        st.fixed_steps,
        st.converged,
    )
    retriever = Retriever(lm, datastore, knn)
    ds = retriever.ds
    ids = load_tokens(lm.tokenizer, corpus, split, st.text_field)
    exclude = should_exclude(ds, knn.exclude_self, corpus_fingerprint(ids))
    chosen = _choose(len(ids) - 1, st.max_positions, st.seed)
    adapter = lm.adapter
    solves = _Solves()
    pending: list[dict] = []

    def solve_pending() -> None:
        if not pending:
            return
        cat = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        pending.clear()
        targets = cat["targets"][:, None]
        lm_logp = torch.log_softmax(cat["logits"].float(), dim=-1)
        target_logp = interpolate(lm_logp, cat["knn_logp"].to(lm_logp.device), mix.knn_weight)
        solves.add("lm", _Fixed(lm_logp), lm_logp.gather(1, targets).squeeze(1))
        solves.add("knnlm", _Fixed(lm_logp), target_logp.gather(1, targets).squeeze(1))
        enc = cat["enc"].float()
        with torch.no_grad():
            g_enc = adapter.g(enc)
        runs = {
            name: (fn, solve_projection(fn, target_logp, z0, lr=lr, tol=tol,
                                        max_steps=max_steps, fixed_steps=fixed_steps,
                                        record_curve=True))
            for name, fn, z0 in (("proj_f", adapter.f_logits, g_enc),
                                 ("proj_fg", adapter.fg_logits, enc))
        }  # fmt: skip
        if converged:
            conv = _converged_solves(adapter, target_logp, enc, g_enc, st.converged_tol,
                                     st.converged_max_steps)  # fmt: skip
            runs |= {f"converged.{k}": v for k, v in conv.items()}
        for name, (fn, res) in runs.items():
            with torch.no_grad():
                logp = torch.log_softmax(fn(res.z).float(), dim=-1)
            solves.add(name, res, logp.gather(1, targets).squeeze(1))

    bar = tqdm(total=int(chosen.sum()), disable=not progress, desc="projection", unit="pos")
    n_pending = 0
    for batch in score_stream(
        lm.model, ids, context_len, stride, batch_size=st.batch_size,
        key_type=ds.meta["key_type"], want_lm=False, want_enc=True, want_logits=True,
        progress=False,
    ):  # fmt: skip
        sel_np = chosen[batch.positions]
        if not sel_np.any():
            continue
        sel = torch.from_numpy(sel_np).to(batch.targets.device)
        rows = np.arange(batch.first_row, batch.first_row + len(sel_np))[sel_np]
        nb = retriever.search(batch.keys[sel], exclude_rows=rows if exclude else None)
        knn_logp = retriever.log_probs(nb, batch.lm_logits.shape[-1], mix.temperature)
        pending.append({"targets": batch.targets[sel], "logits": batch.lm_logits[sel],
                        "enc": batch.enc[sel], "knn_logp": knn_logp})  # fmt: skip
        n_pending += int(sel_np.sum())
        bar.update(int(sel_np.sum()))
        if n_pending >= st.solve_batch:
            solve_pending()
            n_pending = 0
    solve_pending()
    bar.close()

    n = int(chosen[1:].sum())
    # The facts of the run beside its settings, whole (ProjectionSettings.from_dict rebuilds
    # them), windows as used.
    result: dict = {
        "settings": {
            "model": lm.name, "model_fingerprint": lm.fingerprint, "datastore": str(ds.path),
            "datastore_n": ds.n, "key_type": ds.meta["key_type"], "corpus": corpus,
            "k": knn.k, "knn_weight": mix.knn_weight, "temperature": mix.temperature,
            "exclude_self": exclude, "search": retriever.backend.describe(),
            "stopping_rule": "the paper's: Adam, stop when |KL_t - KL_t-1| < tol"
            if fixed_steps is None else f"Adam, {fixed_steps} steps",
            "projection": {**st.to_dict(), "window": window.to_dict()},
        },
        "positions": n,
    }  # fmt: skip
    return result | _summaries(solves, n, fixed_steps or max_steps, converged,
                               st.keep_positions, st.converged_tol,
                               st.converged_max_steps)  # fmt: skip


class _Fixed:
    """A stand-in solve result for the LM and kNN-LM rows (no KL, no steps)."""

    def __init__(self, ref: torch.Tensor) -> None:
        zero = torch.zeros(ref.shape[0])
        self.kl = self.kl_init = zero
        self.steps = zero.long()
        self.converged = zero.bool()
        self.curve_per_position = None


def _summaries(solves: _Solves, n: int, cap: int, converged: bool, keep: bool, tol: float,
               conv_steps: int) -> dict:  # fmt: skip
    out: dict = {}
    for name in ("lm", "knnlm"):
        nll = -float(torch.cat(solves.parts[name]["logp"]).double().sum())
        out[name] = {"perplexity": perplexity(nll, n), "nll_sum": nll}
        if keep:
            out[name]["target_logp"] = torch.cat(solves.parts[name]["logp"]).tolist()
    for name in ("proj_f", "proj_fg"):
        out[name] = solves.summary(name, cap, n, keep)
        # The paper-rule curve as before: mean KL after each update.
        out[name]["kl_curve"] = out[name].get("kl_curve_bands", {}).get("mean", [])
    if converged:
        out["converged"] = {
            "method": "L-BFGS (strong Wolfe), best z kept, every position's relative KL change "
            f"<= {tol:g} over 3 iterations, or {conv_steps} iterations; f also started from "
            "g(z*) of the f∘g solve, the better kept",
            "warm_start": "proj_f: from g(enc(c)) and from g(z*) of proj_fg, the lower KL kept",
            "tol": tol,
            "max_steps": conv_steps,
            **{name: solves.summary(f"converged.{name}", conv_steps, n, keep)
               for name in CONVERGED},
        }  # fmt: skip
        out["converged"]["proj_f_target_first"]["kl_direction"] = "KL[p_knnlm || f(z)]"
    return out
