"""The kNN-LM's maths in one place (the combiner): p_knn, its per-neighbour weights, and every
way a second distribution is mixed into the LM's. Pure tensor functions, no I/O.

Every consumer combines through this module: the per-token scorer (:mod:`knnlm.token_scores`:
fixed weight, a gate's per-token weight, only the tokens a gate searched, the MLP memory), the
neighbour cache's re-scoring (:mod:`knnlm.sweep`), Macondo's tuning, generation, and the
neighbours shown to a user (:func:`knn_weights`).

Conventions:

- ``dists`` (n, k) are distances where smaller is closer: squared L2 (FAISS convention), or the
  negated inner product for ``ip`` indexes. The neighbour weights are softmax(-dists / T).
- ``ids`` (n, k) are datastore row ids; ``-1`` marks a missing neighbour (FAISS returns it when it
  finds fewer than k). Missing neighbours get zero weight and are never used as an index.
- ``values`` (n, k) are the neighbours' next-token ids (garbage where ``ids == -1``).
- ``counts`` (n, k), optional: how many original entries each neighbour stands for (a pruned
  datastore merges duplicates, :mod:`knnlm.retrieval.prune`); a neighbour's weight is multiplied
  by its count, i.e. ``log(count)`` is added to its logit. ``None`` is the unweighted kNN-LM.

Interpolation weight: ``knn_weight`` is the weight on p_knn,
``p = (1 - w) p_lm + w p_knn`` (default 0.25). The paper writes
``lambda p_lm + (1 - lambda) p_knn`` with lambda = 0.25; every public implementation, and this
one, puts 0.25 on p_knn, i.e. ``knn_weight = 1 - lambda``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from knnlm.errors import KnnlmError

NEG_INF = float("-inf")


def _neighbour_logits(
    dists: torch.Tensor, ids: torch.Tensor, temperature: float, counts: torch.Tensor | None = None
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logits = -dists.float() / temperature
    valid = (ids >= 0) & torch.isfinite(logits)
    if counts is not None:  # merged entries weigh as many as they stand for
        logits = logits + counts.float().clamp_min(1.0).log()
    return logits.masked_fill(~valid, NEG_INF)


def knn_target_log_prob(
    dists: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_knn(target) for each query, without building a (n, vocab) tensor.

    Returns -inf where no neighbour carries the target (or no neighbour was found).
    """
    logits = _neighbour_logits(dists, ids, temperature, counts)
    # One exp pass, not two logsumexps: shift by the row max, sum all and the target's weights.
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no neighbour: all -inf
    w = (logits - top).exp_()
    norm = w.sum(dim=-1)  # >= 1 where any neighbour exists
    match = values.long() == targets.long().unsqueeze(-1)
    hit = w.masked_fill_(~match, 0.0).sum(dim=-1)
    out = hit.log() - norm.log()
    # A target weight that underflowed float32 (far below the nearest): redo those rows exactly.
    tiny = torch.nonzero((hit < 1e-30) & match.any(dim=-1)).squeeze(1)
    if tiny.numel():
        lg = logits[tiny]
        exact = torch.logsumexp(lg.masked_fill(~match[tiny], NEG_INF), -1) - torch.logsumexp(lg, -1)
        out[tiny] = exact
    # No neighbour at all: the norm is 0 and the difference is nan; the mass is zero.
    return torch.where(norm > 0, out, torch.full_like(out, NEG_INF))


def knn_weights(
    dists: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, k) each neighbour's share of p_knn: softmax(-dists / T) (times its count), zero
    where missing; what :func:`knn_log_probs` scatters and what a user is shown."""
    logits = _neighbour_logits(dists, ids, temperature, counts)
    return torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)  # all-missing rows -> zeros


def prefix_log_probs(
    dists: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int],
    temperatures: Sequence[float],
    counts: torch.Tensor | None = None,
) -> dict[tuple[int, float], torch.Tensor]:
    """log p_knn(target) for every (k, temperature) from one search of k >= max(ks): the
    first k columns (neighbours sorted by distance) are the k nearest."""
    out = {}
    for k in ks:
        c = None if counts is None else counts[:, :k]
        for t in temperatures:
            out[(int(k), float(t))] = knn_target_log_prob(
                dists[:, :k], ids[:, :k], values[:, :k], targets, float(t), c
            )
    return out


def knn_log_probs(
    dists: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full log p_knn over the vocabulary, shape (n, vocab): neighbour weights scattered by value.

    Needed where the whole distribution is used (projection, generation); perplexity uses
    :func:`knn_target_log_prob`.
    """
    weights = knn_weights(dists, ids, temperature, counts)
    safe_values = values.long().masked_fill(ids < 0, 0)  # missing neighbours carry garbage
    if safe_values.numel() and (safe_values.min() < 0 or safe_values.max() >= vocab_size):
        bad = safe_values[(safe_values < 0) | (safe_values >= vocab_size)][0]
        raise KnnlmError(
            f"a neighbour's value {int(bad)} is outside the vocabulary of {vocab_size} tokens; "
            "the datastore does not belong to this model's tokenizer"
        )
    probs = torch.zeros(dists.shape[0], vocab_size, dtype=weights.dtype, device=weights.device)
    probs.scatter_add_(1, safe_values, weights)
    return probs.log()


def interpolate(
    lm_log_prob: torch.Tensor, other_log_prob: torch.Tensor, weight: float
) -> torch.Tensor:
    """log((1 - w) p_lm + w p_other), computed in log space; exact at w = 0 and w = 1."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1], got {weight}")
    if weight == 0.0:
        return lm_log_prob.clone()
    if weight == 1.0:
        return other_log_prob.clone()
    return torch.logaddexp(lm_log_prob + math.log1p(-weight), other_log_prob + math.log(weight))


def interpolate_per_token(
    lm_log_prob: torch.Tensor, other_log_prob: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """log((1 - w_i) p_lm + w_i p_other) with one weight w_i in [0, 1] per token (a learned
    weight, :mod:`knnlm.retrieval.gate`)."""
    w = weights.to(lm_log_prob.dtype)
    return torch.logaddexp(lm_log_prob + torch.log1p(-w), other_log_prob + torch.log(w))


def combine(
    lm_log_prob: torch.Tensor,
    other_log_prob: torch.Tensor,
    weight: float | torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mixture for every variant: a fixed ``weight`` (float) or one per token (a tensor
    aligned with ``lm_log_prob``, a learned gate's); with ``rows``, only those tokens were
    searched (``other_log_prob`` holds theirs) and the others keep p_lm exactly."""
    if rows is None:
        if torch.is_tensor(weight):
            return interpolate_per_token(lm_log_prob, other_log_prob, weight)
        return interpolate(lm_log_prob, other_log_prob, weight)
    out = lm_log_prob.clone()
    if rows.numel():
        w = weight[rows] if torch.is_tensor(weight) else weight
        out[rows] = combine(lm_log_prob[rows], other_log_prob, w)
    return out


def mix_log_weights(
    log_w: torch.Tensor, lm_log_prob: torch.Tensor, other_log_prob: torch.Tensor
) -> torch.Tensor:
    """log(w_lm p_lm + w_other p_other) from log-weights ``log_w`` (n, 2) that sum to one per
    token: the gate's mixture, differentiable in the weights (its training loss)."""
    return torch.logsumexp(
        torch.stack([log_w[:, 0] + lm_log_prob, log_w[:, 1] + other_log_prob], 1), dim=1
    )


def interpolate_numpy(lm: np.ndarray, other: np.ndarray, weight: float) -> np.ndarray:
    """:func:`interpolate` on numpy arrays, for 0 < weight < 1 (Macondo's tuning grid). Kept
    apart because numpy's logaddexp differs from torch's in the last bit of ~0.2% of values,
    and the tuning results were made with it."""
    return np.logaddexp(lm + math.log1p(-weight), other + math.log(weight))


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total NLL / number of scored tokens), token-weighted."""
    if n_tokens <= 0:
        return float("nan")
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return float("inf")
