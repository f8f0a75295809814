"""Section 3: can the last layers express the kNN-LM's distribution? (Eq. 2, Tables 1, 3, 4)

For scored positions of a split, p_knnlm = (1 - w) p_lm + w p_knn over the full vocabulary is
projected onto the output space of f (z starts at g(enc(c))) and of f∘g (z starts at enc(c)).
If f(z*) reaches the kNN-LM's perplexity, the softmax bottleneck is not why the kNN-LM wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from knnlm.data.corpus import load_tokens
from knnlm.data.windows import resolve_stride
from knnlm.errors import KnnlmError
from knnlm.experiments.projection_solver import solve_projection
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.datastore import corpus_fingerprint
from knnlm.retrieval.exclusion import should_exclude
from knnlm.retrieval.knn import interpolate, perplexity
from knnlm.retrieval.retriever import KnnSettings, Retriever
from knnlm.scoring import score_stream


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


def run_projection(
    lm: LoadedLM,
    corpus: str,
    datastore: str | Path,
    split: str = "valid",
    *,
    context_len: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    knn: KnnSettings | None = None,
    max_positions: int | None = 2000,
    seed: int = 0,
    lr: float = 0.1,
    tol: float = 1e-3,
    max_steps: int = 500,
    fixed_steps: int | None = None,
    solve_batch: int = 256,
    text_field: str = "text",
    progress: bool = True,
) -> dict:
    """Solve Eq. 2 onto f and onto f∘g for (a seeded sample of) the scored positions."""
    stride = resolve_stride(context_len, stride)
    knn = knn or KnnSettings()
    retriever = Retriever(lm, datastore, knn)
    ds = retriever.ds
    ids = load_tokens(lm.tokenizer, corpus, split, text_field)
    exclude = should_exclude(ds, knn.exclude_self, corpus_fingerprint(ids))
    n_scored = len(ids) - 1
    if max_positions is not None and max_positions < 1:
        raise KnnlmError("--max-positions must be at least 1")
    if max_positions is None or max_positions >= n_scored:
        chosen = np.ones(n_scored + 1, dtype=bool)
    else:
        rng = np.random.default_rng(seed)
        chosen = np.zeros(n_scored + 1, dtype=bool)
        chosen[1 + rng.choice(n_scored, size=max_positions, replace=False)] = True
    adapter = lm.adapter
    acc = {name: [] for name in ("lm", "knnlm", "proj_f", "proj_fg")}
    kl = {"proj_f": [], "proj_fg": []}
    kl_init = {"proj_f": [], "proj_fg": []}
    steps = {"proj_f": [], "proj_fg": []}
    curves = {"proj_f": [], "proj_fg": []}
    pending: list[dict] = []
    n_pending = 0

    def solve_pending() -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        cat = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        pending, n_pending = [], 0
        targets = cat["targets"]
        lm_logp = torch.log_softmax(cat["logits"].float(), dim=-1)
        target_logp = interpolate(lm_logp, cat["knn_logp"].to(lm_logp.device), knn.knn_weight)
        acc["lm"].append(lm_logp.gather(1, targets[:, None]).squeeze(1).cpu())
        acc["knnlm"].append(target_logp.gather(1, targets[:, None]).squeeze(1).cpu())
        enc = cat["enc"].float()
        with torch.no_grad():
            g_enc = adapter.g(enc)
        for name, fn, z0 in (
            ("proj_f", adapter.f_logits, g_enc),
            ("proj_fg", adapter.fg_logits, enc),
        ):
            res = solve_projection(
                fn,
                target_logp,
                z0,
                lr=lr,
                tol=tol,
                max_steps=max_steps,
                fixed_steps=fixed_steps,
                record_curve=fixed_steps is not None,
            )
            with torch.no_grad():
                logp = torch.log_softmax(fn(res.z).float(), dim=-1)
            acc[name].append(logp.gather(1, targets[:, None]).squeeze(1).cpu())
            kl[name].append(res.kl.cpu())
            kl_init[name].append(res.kl_init.cpu())
            steps[name].append(res.steps.cpu())
            if res.curve is not None:
                curves[name].append((len(targets), res.curve.cpu()))

    bar = tqdm(total=int(chosen.sum()), disable=not progress, desc="projection", unit="pos")
    for batch in score_stream(
        lm.model,
        ids,
        context_len,
        stride,
        batch_size=batch_size,
        key_type=ds.meta["key_type"],
        want_lm=False,
        want_enc=True,
        want_logits=True,
        progress=False,
    ):
        sel_np = chosen[batch.positions]
        if not sel_np.any():
            continue
        sel = torch.from_numpy(sel_np).to(batch.targets.device)
        rows = np.arange(batch.first_row, batch.first_row + len(sel_np))[sel_np]
        nb = retriever.search(batch.keys[sel], exclude_rows=rows if exclude else None)
        knn_logp = retriever.log_probs(nb, batch.lm_logits.shape[-1])
        pending.append(
            {
                "targets": batch.targets[sel],
                "logits": batch.lm_logits[sel],
                "enc": batch.enc[sel],
                "knn_logp": knn_logp,
            }
        )
        n_pending += int(sel_np.sum())
        bar.update(int(sel_np.sum()))
        if n_pending >= solve_batch:
            solve_pending()
    solve_pending()
    bar.close()

    n = sum(len(x) for x in acc["lm"])
    result: dict = {
        "settings": {
            "model": lm.name,
            "model_fingerprint": lm.fingerprint,
            "datastore": str(ds.path),
            "datastore_n": ds.n,
            "key_type": ds.meta["key_type"],
            "corpus": corpus,
            "split": split,
            "context_len": context_len,
            "stride": stride,
            "k": knn.k,
            "knn_weight": knn.knn_weight,
            "temperature": knn.temperature,
            "exclude_self": exclude,
            "max_positions": max_positions,
            "seed": seed,
            "lr": lr,
            "tol": tol,
            "max_steps": max_steps,
            "fixed_steps": fixed_steps,
        },
        "positions": n,
    }
    for name in ("lm", "knnlm", "proj_f", "proj_fg"):
        nll = -float(torch.cat(acc[name]).double().sum())
        result[name] = {"perplexity": perplexity(nll, n), "nll_sum": nll}
    for name in ("proj_f", "proj_fg"):
        kl_all = torch.cat(kl[name]).numpy()
        result[name].update(
            _kl_stats(kl_all, torch.cat(steps[name]).numpy(), fixed_steps or max_steps)
        )
        result[name]["kl_init_mean"] = float(torch.cat(kl_init[name]).mean())
        result[name]["kl"] = kl_all.tolist()
        if curves[name]:
            # Position-weighted mean KL per step across solve batches.
            total = sum(w for w, _ in curves[name])
            length = min(len(c) for _, c in curves[name])
            mean = sum(w * c[:length].double() for w, c in curves[name]) / total
            result[name]["kl_curve"] = mean.tolist()
    return result
