"""RetoMaton pointers (Alon et al., ICML 2022): skip a search when the previous token's
neighbours already point to enough candidates.

Row r of a datastore holds the context ending at token r of its stream and the value token
r + 1, so row r's successor is simply row r + 1 (nothing to store). After token t is scored
with neighbours N_t, those whose value is t's actual target point to their successors; the
pointers that exist (r + 1 < N) and are not token t + 1's own row (self-exclusion) are token
t + 1's candidates. Fewer than ``threshold`` of them: t + 1 searches as usual; otherwise its
neighbours are those pointers, with exact distances to its own query. A threshold above k
searches every token (exactly the kNN-LM).

Vectorised: pointers are followed within segments of ``segment`` consecutive tokens of a
batch, and each segment's first token searches. From a searched token s with neighbours R,
the pointers alive at s + j are R + j for the R whose stored continuation matched the text
for j tokens, so one comparison over (segments, k, segment) finds every segment's next
search point at once; the rounds (one batched search of the segments that need one) number
at most ``segment``, and no loop runs over tokens or neighbours.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.protocol import Neighbours

SEGMENT = 32  # tokens of a batch over which pointers are followed (each segment starts searching)

# search(token indices) -> Neighbours of those tokens (k columns, on the CPU)
SearchFn = Callable[[torch.Tensor], Neighbours]
# distances(token indices (m,), rows (m, k), -1 = none) -> (m, k) float32, +inf where none
DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_threshold(threshold: float | None) -> float | None:
    """``--pointers``: None (off), or a threshold of at least 1 (inf: search every token)."""
    if threshold is not None and not threshold >= 1:
        raise KnnlmError(f"--pointers must be at least 1 (or inf), got {threshold}")
    return threshold


def pointer_neighbours(
    targets: torch.Tensor,
    k: int,
    threshold: float,
    values: torch.Tensor,
    search: SearchFn,
    distances: DistanceFn,
    own: torch.Tensor | None = None,
    segment: int = SEGMENT,
) -> tuple[Neighbours, torch.Tensor]:
    """Neighbours of each of the n tokens (rows -1 / +inf where none) and which were searched.

    ``targets`` (n,) the actual next tokens; ``values`` (N,) the datastore's values (int64);
    ``own`` (n,) each token's own row (-1 = none), dropped from its pointers as from its search.
    """
    n = targets.shape[0]
    if threshold > k or n == 0:  # no pointer set can reach the threshold
        return search(torch.arange(n)), torch.ones(n, dtype=torch.bool)
    rows = torch.full((n, k), -1, dtype=torch.int64)
    dists = torch.full((n, k), float("inf"), dtype=torch.float32)
    searched = torch.zeros(n, dtype=torch.bool)
    own = torch.full((n,), -1, dtype=torch.int64) if own is None else own.long()
    frontier = torch.arange(0, n, segment)
    ends = (frontier + segment).clamp(max=n)
    while True:
        active = (frontier < ends).nonzero().squeeze(1)
        if not active.numel():
            break
        s, e = frontier[active], ends[active]
        nb = search(s)
        rows[s], dists[s], searched[s] = nb.rows.cpu(), nb.distances.float().cpu(), True
        alive, stop = _alive(nb.rows.cpu(), s, e, targets, values, own, threshold)
        served = ~stop[:, :-1].cumsum(1).bool()  # the steps before the next search
        seg, j = served.nonzero(as_tuple=True)
        tok = s[seg] + j + 1
        ptr = torch.where(alive[seg, j], nb.rows.cpu()[seg] + j[:, None] + 1, -1)
        rows[tok], dists[tok] = ptr, distances(tok, ptr)
        frontier[active] = s + stop.float().argmax(1) + 1
    table = values.to(torch.int64)
    return Neighbours.lookup(dists, rows, table), searched


def _alive(
    r: torch.Tensor,
    s: torch.Tensor,
    e: torch.Tensor,
    targets: torch.Tensor,
    values: torch.Tensor,
    own: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alive (S, M, k): pointer r + j + 1 usable at token s + j + 1 (step j = 0 .. M-1);
    stop (S, M + 1): where each segment searches next (its end counts as a stop)."""
    n_rows, m = values.shape[0], int((e - s).max())
    step = torch.arange(m)
    tok = s[:, None] + step  # token whose target row r + j must have produced
    nxt = (tok + 1).clamp(max=targets.shape[0] - 1)
    inside = (tok + 1) < e[:, None]  # the successor's token is in the segment
    cand = r[:, None, :] + step[None, :, None]  # (S, M, k): row r + j
    ok = (r[:, None, :] >= 0) & (cand + 1 < n_rows) & inside[:, :, None]
    tgt = targets[tok.clamp(max=targets.shape[0] - 1)]
    ok &= values[cand.clamp(0, n_rows - 1)] == tgt[:, :, None]
    ok &= (cand + 1) != own[nxt][:, :, None]  # never a token's own row
    alive = ok.to(torch.uint8).cumprod(dim=1).bool()  # matched at every step so far
    few = alive.sum(-1) < threshold
    stop = torch.cat([few | ~inside, torch.ones(len(s), 1, dtype=torch.bool)], 1)
    return alive, stop


def row_distances(
    keys: np.ndarray, queries: torch.Tensor, rows: torch.Tensor, metric: str = "l2"
) -> torch.Tensor:
    """(m, k) float32 distance of query i to datastore row ``rows[i, j]`` (squared L2, or the
    negated inner product), +inf where the row is -1; ``keys`` the datastore's (N, d) array."""
    found = rows >= 0
    uniq, inv = torch.unique(rows[found], return_inverse=True)
    table = torch.from_numpy(np.asarray(keys[uniq.numpy()], dtype=np.float32))
    q = queries.float()[found.nonzero()[:, 0]]
    kv = table[inv]
    d = ((q - kv) ** 2).sum(-1) if metric == "l2" else -(q * kv).sum(-1)
    out = torch.full(rows.shape, float("inf"), dtype=torch.float32)
    out[found] = d
    return out
