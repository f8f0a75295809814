"""One token of the view: its neighbours (context, distance, weight, shared targets) and the
top next tokens under p_lm, p_knn and the mixture (and the memory's), all from the neighbours
already retrieved, through :mod:`knnlm.retrieval.combiner`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from knnlm.retrieval.combiner import interpolate, knn_log_probs
from knnlm.retrieval.search.protocol import Neighbours

if TYPE_CHECKING:
    from knnlm.inspect.view import Inspector, Mixed, Rows, ViewSettings

TOP = 10  # next tokens listed per distribution
SHOWN = 32  # neighbours listed per token
CONTEXT_TOKENS = 24  # of each neighbour's preceding text
AFTER_TOKENS = 4  # of the text after its target
FULL_COLOUR = 2.0  # a gain (or loss) of this many nats gets the strongest colour


def first_k(rows: Rows, k: int, sel: slice = slice(None)) -> tuple[Neighbours, Any]:
    """The k nearest of the k_max retrieved (the backends return them nearest first)."""
    nb = rows.neighbours
    cut = Neighbours(nb.distances[sel, :k], nb.rows[sel, :k], nb.values[sel, :k])
    return cut, None if rows.counts is None else rows.counts[sel, :k]


def finite(t: torch.Tensor) -> list[float | None]:
    """Plain floats for JSON; None where not finite (a zero probability's log, say)."""
    arr = t.detach().double().cpu().numpy()
    return [
        x if ok else None for x, ok in zip(arr.tolist(), np.isfinite(arr).tolist(), strict=True)
    ]


def colours(gain: torch.Tensor) -> list[str]:
    """A CSS colour per token: green where the kNN-LM raised log p(target), red where it
    lowered it, stronger up to FULL_COLOUR nats."""
    g = gain.double().nan_to_num(0.0, posinf=FULL_COLOUR, neginf=-FULL_COLOUR)
    alpha = (g.abs().clamp(max=FULL_COLOUR) / FULL_COLOUR * 0.85).tolist()
    up = (g > 0).tolist()
    return [f"rgba(22, 163, 74, {a:.3f})" if u else f"rgba(220, 38, 38, {a:.3f})"
            for a, u in zip(alpha, up, strict=True)]  # fmt: skip


def distributions(insp: Inspector, rows: Rows, m: Mixed, s: ViewSettings, j: int) -> dict:
    """Row ``j``'s full log-distributions over the vocabulary: lm, knn, mix (and memory,
    lm_memory), each (V,)."""
    nb, counts = first_k(rows, s.k, slice(j, j + 1))
    lm = torch.log_softmax(rows.logits[j : j + 1], dim=-1)
    knn = knn_log_probs(nb.distances, nb.rows, nb.values, lm.shape[-1], s.temperature, counts)
    mix = interpolate(lm, knn, s.knn_weight) if bool(m.kept[j]) else lm.clone()
    out = {"lm": lm[0], "knn": knn[0], "mix": mix[0]}
    if insp.memory is not None:
        device = next(insp.memory.parameters()).device
        with torch.no_grad():
            mem = insp.memory.log_probs(rows.keys[j : j + 1].to(device)).float().cpu()
        mem = mem[:, : lm.shape[-1]]
        out["memory"] = mem[0]
        out["lm_memory"] = interpolate(lm, mem, s.memory_weight)[0]
    return out


def neighbour_weights(nb: Neighbours, temperature: float, counts: Any) -> torch.Tensor:
    """Each neighbour's share of p_knn: p_knn with every neighbour as its own class."""
    own = torch.arange(nb.rows.shape[1]).expand_as(nb.rows)
    return knn_log_probs(nb.distances, nb.rows, own, own.shape[1], temperature, counts).exp()[0]


def token_details(
    insp: Inspector, rows: Rows, m: Mixed, s: ViewSettings, j: int, target: int | None = None
) -> dict:
    """Row ``j``: its target, the neighbours, and the top next tokens per distribution."""
    target = int(rows.targets[j]) if target is None else target
    dists = distributions(insp, rows, m, s, j)
    nb, counts = first_k(rows, s.k, slice(j, j + 1))
    decode = insp.lm.tokenizer.decode
    return {
        "index": j + 1,
        "target": {"id": target, "token": decode([target])},
        "probs": {name: float(lp[target].exp()) for name, lp in dists.items()},
        "searched": bool(m.kept[j]),
        "k": s.k,
        "found": int((nb.rows[0] >= 0).sum()),
        "neighbours": neighbour_list(
            insp, nb, neighbour_weights(nb, s.temperature, counts), dists["knn"], target
        ),  # fmt: skip
        "top": {name: top_tokens(lp, decode, target) for name, lp in dists.items()},
    }


def top_tokens(lp: torch.Tensor, decode, target: int) -> list[dict]:
    """The TOP likeliest tokens (those of non-zero probability), likeliest first."""
    vals, ids = torch.topk(lp, min(TOP, lp.shape[0]))
    keep = torch.isfinite(vals)
    return [
        {"id": i, "token": decode([i]), "p": p, "target": i == target}
        for i, p in zip(ids[keep].tolist(), vals[keep].exp().tolist(), strict=True)
    ]


def neighbour_list(
    insp: Inspector, nb: Neighbours, weights: torch.Tensor, knn: torch.Tensor, target: int
) -> list[dict]:
    """The nearest SHOWN neighbours: the datastore text before each (target marked apart),
    its distance and weight, and the ranks of the others (among all k) with its target."""
    found = int((nb.rows[0] >= 0).sum())
    values = nb.values[0, :found].numpy()
    shown = min(SHOWN, found)
    same = values[:shown, None] == values[None, :]
    positions, stream = insp.positions, insp.stream
    decode = insp.lm.tokenizer.decode
    out = []
    for i in range(shown):  # the listed neighbours themselves (display, at most SHOWN)
        row, value = int(nb.rows[0, i]), int(values[i])
        pos = row if positions is None else int(positions[row])  # row r's target: token r + 1
        others = [int(r) + 1 for r in np.flatnonzero(same[i]) if r != i]
        out.append({
            "rank": i + 1, "row": row, "distance": float(nb.distances[0, i]),
            "weight": float(weights[i]), "target": decode([value]), "target_id": value,
            "before": decode(np.asarray(stream[max(0, pos + 1 - CONTEXT_TOKENS) : pos + 1]).tolist()),
            "after": decode(np.asarray(stream[pos + 2 : pos + 2 + AFTER_TOKENS]).tolist()),
            "hit": value == target, "shares": others, "target_p": float(knn[value].exp()),
        })  # fmt: skip
    return out
