"""RetoMaton pointers (Alon et al., ICML 2022): skip a search when the previous token's
neighbours already point to enough candidates.

Row r of a datastore holds the context ending at token r of its stream and the value token
r + 1, so row r's successor is simply row r + 1 (nothing to store). After token t is scored
with neighbours N_t, those whose value is t's actual target point to their successors; the
pointers that exist (r + 1 < N) and are not token t + 1's own row (self-exclusion) are token
t + 1's candidates. Fewer than ``threshold`` of them: t + 1 searches as usual; otherwise its
neighbours are those pointers, with exact distances to its own query. A threshold above k
searches every token (exactly the kNN-LM).

Vectorised: the n tokens of a batch are cut into segments of ``segment`` consecutive tokens
(each segment's first token searches), and all segments advance together, one step of a
segment at a time: at each step the segments whose token has fewer than ``threshold`` live
pointers are searched in one batched call, the others read their pointers' exact distances in
one call, and one comparison over (segments, k) keeps the pointers whose stored value is the
text's next token. The work is one pass over (n, k) plus the searches; the loop runs over the
``segment`` steps, never over tokens or neighbours.
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
    n_rows = values.shape[0]
    rows = torch.full((n, k), -1, dtype=torch.int64)
    dists = torch.full((n, k), float("inf"), dtype=torch.float32)
    searched = torch.zeros(n, dtype=torch.bool)
    own = torch.full((n,), -1, dtype=torch.int64) if own is None else own.long()
    starts = torch.arange(0, n, segment)
    state = torch.full((len(starts), k), -1, dtype=torch.int64)  # each segment's pointers
    for j in range(segment):
        tok = starts + j
        live = tok < n
        if not live.any():
            break
        tok, state = tok[live], state[live]
        starts = starts[live]
        need = ((state >= 0).sum(1) < threshold) | (j == 0)  # a segment starts by searching
        # index_copy_ rather than indexed assignment: on a loaded CPU the latter's parallel
        # path waited ~10 ms a call for its threads (measured), index_copy_ microseconds
        cur, cur_d = state.clone(), torch.full(state.shape, float("inf"))
        at = need.nonzero().squeeze(1)
        if at.numel():
            nb = search(tok[at])
            cur.index_copy_(0, at, nb.rows.cpu())
            cur_d.index_copy_(0, at, nb.distances.float().cpu())
            searched.index_fill_(0, tok[at], True)
        at = (~need).nonzero().squeeze(1)
        if at.numel():
            cur_d.index_copy_(0, at, distances(tok[at], cur.index_select(0, at)))
        rows.index_copy_(0, tok, cur)
        dists.index_copy_(0, tok, cur_d)
        # the pointers into the next step: rows whose value is this token's target, moved on
        nxt = cur + 1
        ok = (cur >= 0) & (nxt < n_rows)
        ok &= values[cur.clamp(0, n_rows - 1)] == targets[tok][:, None]
        ok &= nxt != own[(tok + 1).clamp(max=n - 1)][:, None]  # never a token's own row
        state = torch.where(ok, nxt, -1)
    table = values.to(torch.int64)
    return Neighbours.lookup(dists, rows, table), searched


def row_distances(
    keys: np.ndarray, queries: torch.Tensor, rows: torch.Tensor, metric: str = "l2",
    block_bytes: int = 1 << 26,
) -> torch.Tensor:  # fmt: skip
    """(m, k) float32 distance of query i to datastore row ``rows[i, j]`` (squared L2, or the
    negated inner product), +inf where the row is -1; ``keys`` the datastore's (N, d) array.
    The fallback of backends without their own ``row_distances``: blocks of queries whose
    gathered keys take about ``block_bytes``, so memory stays bounded at any k."""
    m, k = rows.shape
    out = torch.full((m, k), float("inf"), dtype=torch.float32)
    step = max(1, block_bytes // max(1, 4 * k * keys.shape[1]))
    for s in range(0, m, step):  # blocks of queries, not tokens one by one
        r = rows[s : s + step]
        found = r >= 0
        uniq, inv = torch.unique(r[found], return_inverse=True)
        table = torch.from_numpy(np.asarray(keys[uniq.numpy()], dtype=np.float32))
        q = queries[s : s + step].float()[found.nonzero()[:, 0]]
        kv = table[inv]
        d = ((q - kv) ** 2).sum(-1) if metric == "l2" else -(q * kv).sum(-1)
        out[s : s + step][found] = d
    return out
