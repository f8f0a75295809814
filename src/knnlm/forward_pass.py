"""The one scoring pass: windows -> hooked forward -> per-position records.

Every consumer (datastore build, perplexity, kNN-LM evaluation, the projection, MLP-memory
data) reads the same :class:`ScoredBatch` stream, so they all agree on which tokens are
scored, with which context, and which key belongs to which target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from knnlm.data.windows import Window, make_windows
from knnlm.errors import KnnlmError
from knnlm.lm.adapters import Adapter, position_limit
from knnlm.settings import Settings, require


@dataclass(frozen=True)
class WindowSettings(Settings):
    """Scoring windows: ``context_len`` tokens each, ``stride`` apart (every target scored
    once). None: the model's maximum positions, and half of ``context_len``, filled in by
    :meth:`for_model`. Example: ``WindowSettings(1024, 512)``."""

    context_len: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        c, s = self.context_len, self.stride
        require(c is None or c >= 2, "context_len", f"must be at least 2, got {c}")
        if s is not None and c is not None:
            require(1 <= s <= c, "stride", f"must be in [1, context-len={c}], got {s}")
        elif s is not None:
            require(s >= 1, "stride", f"must be at least 1, got {s}")

    def for_model(self, model: torch.nn.Module) -> WindowSettings:
        """Both set, the defaults taken from ``model`` (:func:`default_window`); itself when
        both are set already (checked when it was built)."""
        if self.context_len is not None and self.stride is not None:
            return self
        return WindowSettings(*default_window(model, self.context_len, self.stride))


def default_window(
    model: torch.nn.Module, context_len: int | None = None, stride: int | None = None
) -> tuple[int, int]:
    """(context_len, stride) with the defaults: the model's maximum positions, half of it.

    Example: a GPT-2 with 1024 positions gives ``default_window(model) == (1024, 512)``.
    """
    if context_len is None:
        limit = position_limit(model)
        if limit is None:
            raise KnnlmError("the model's config names no maximum positions; pass --context-len")
        context_len = limit[0]
    if stride is None:
        stride = max(1, context_len // 2)
    return context_len, stride


def check_context_len(model: torch.nn.Module, context_len: int) -> None:
    """Refuse windows longer than the model's positions (one line naming its limit)."""
    limit = position_limit(model)
    if limit is not None and context_len > limit[0]:
        raise KnnlmError(
            f"--context-len {context_len} is longer than the model's {limit[0]} positions "
            f"(config {limit[1]}); use --context-len {limit[0]} or less"
        )


@dataclass
class ScoredBatch:
    """Records for the scored targets of a group of windows, in stream order."""

    positions: np.ndarray  # (n,) int64 absolute target positions in the token stream
    targets: torch.Tensor  # (n,) long
    lm_log_prob: torch.Tensor | None  # (n,) float32 log p_lm(target)
    keys: torch.Tensor | None  # (n, d) the requested key type
    enc: torch.Tensor | None  # (n, d) enc(c): the input of g (projection onto f∘g)
    lm_logits: torch.Tensor | None  # (n, V) float32 full LM logits
    first_row: int  # index of this batch's first record among all scored targets
    windows_done: int  # number of windows fully processed after this batch
    lm_stats: torch.Tensor | None = None  # (n, 2) float32 LM entropy and max log-prob


def window_batches(windows: list[Window], batch_size: int) -> list[tuple[int, int]]:
    """Fixed batch boundaries [start, stop) over windows; a resumed or sharded pass reuses them
    so that every window is always computed in the same batch (bit-identical results)."""
    if batch_size < 1:
        raise KnnlmError(f"--batch-size must be at least 1, got {batch_size}")
    return [(i, min(i + batch_size, len(windows))) for i in range(0, len(windows), batch_size)]


def rows_before(windows: list[Window]) -> np.ndarray:
    """Row offset of each window's first scored target, plus the total at the end."""
    counts = np.array([w.n_scored for w in windows], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


@dataclass
class _BatchScores:
    scored: torch.Tensor  # (B, W) bool on the CPU: logit column c scores token c+1
    targets: torch.Tensor
    lm_log_prob: torch.Tensor | None
    keys: torch.Tensor | None
    enc: torch.Tensor | None
    lm_logits: torch.Tensor | None
    lm_stats: torch.Tensor | None = None


def lm_stats(
    logits: torch.Tensor, lse: torch.Tensor | None = None, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, 2) entropy and max log-probability of softmax(logits), in float32.

    ``logits`` (m, V); ``rows`` picks n of them (all when None); ``lse`` (m,) is their
    logsumexp when already taken. Two (n, V) buffers: the picked rows, turned into log p in
    place, and p, turned into p log p in place (measured: benchmarks/bench_hot_path.py).
    """
    x = logits.float() if rows is None else logits.index_select(0, rows).float()
    if x is logits:
        x = x.clone()  # log p is made in place
    if lse is None:
        lse = torch.logsumexp(x, dim=-1)
    elif rows is not None:
        lse = lse.index_select(0, rows)
    log_p = x.sub_(lse[:, None])
    top = log_p.amax(-1)
    entropy = log_p.exp().mul_(log_p).sum(-1).neg_()
    return torch.stack([entropy, top], dim=-1)


def _score_batch(
    model: torch.nn.Module,
    store: dict[str, torch.Tensor],
    batch_ids: torch.Tensor,
    lengths: torch.Tensor,
    first: torch.Tensor,
    key_type: str | None,
    want_lm: bool,
    want_enc: bool,
    want_logits: bool,
    want_stats: bool = False,
) -> _BatchScores:
    """One forward over right-padded rows; records of logit columns [first, length - 1).

    With causal attention the padding never influences the real positions (the mask is
    passed anyway, for models that need it).
    """
    device = next(model.parameters()).device
    col = torch.arange(batch_ids.shape[1])
    inside = col[None, :] < lengths[:, None]
    scored = (col[None, :] >= first[:, None]) & (col[None, :] < lengths[:, None] - 1)
    out = model(
        input_ids=batch_ids.to(device), attention_mask=inside.long().to(device), use_cache=False
    )
    mask = scored.to(device)
    targets = batch_ids[:, 1:].to(device)[mask[:, :-1]]
    lm_lp = logits = lse = None
    if want_logits or (want_lm and out.logits.dtype != torch.float32):
        sel = out.logits[mask].float()
        if want_lm:
            lm_lp = torch.log_softmax(sel, dim=-1).gather(1, targets[:, None]).squeeze(1)
        if want_logits:
            logits = sel
    elif want_lm:
        # float32 logits: log p(target) = logit[target] - logsumexp(logits) on the
        # (batch, width) grid, without copying the scored rows out of the logits.
        nxt = torch.cat([batch_ids[:, 1:], batch_ids[:, :1]], dim=1).to(device)
        tgt_logit = out.logits.gather(-1, nxt[..., None]).squeeze(-1)
        lse = torch.logsumexp(out.logits, dim=-1)  # kept for the gate's statistics
        lm_lp = (tgt_logit - lse)[mask]
    stats = None
    if want_stats:  # from the logsumexp above, on the scored rows only
        flat = out.logits.reshape(-1, out.logits.shape[-1])
        rows = mask.reshape(-1).nonzero().squeeze(1)
        stats = lm_stats(flat, None if lse is None else lse.reshape(-1), rows)
    return _BatchScores(
        scored=scored,
        targets=targets,
        lm_log_prob=lm_lp,
        keys=Adapter.key_from(store, key_type)[mask] if key_type else None,
        enc=store["enc"][mask] if want_enc else None,
        lm_logits=logits,
        lm_stats=stats,
    )


def score_stream(
    model: torch.nn.Module,
    ids: np.ndarray,
    context_len: int,
    stride: int | None = None,
    *,
    batch_size: int = 8,
    key_type: str | None = "ffn_input",
    want_lm: bool = True,
    want_enc: bool = False,
    want_logits: bool = False,
    batch_range: tuple[int, int] | None = None,
    progress: bool = True,
    desc: str = "scoring",
    want_stats: bool = False,
) -> Iterator[ScoredBatch]:
    """Run the LM over ``ids`` in windows and yield the records of every scored target.

    ``want_stats`` adds each target's LM entropy and max log-probability (``lm_stats``), the
    cheap features of the adaptive-retrieval gate, without returning the full logits.

    ``batch_range`` restricts the pass to batches [a, b) of the fixed batch layout (resume,
    sharding); windows in a batch are right-padded. Settings are checked when called, before
    the first batch is asked for.
    """
    check_context_len(model, context_len)
    windows = make_windows(len(ids), context_len, stride)
    return _stream(
        model, ids, windows, batch_size, key_type, want_lm, want_enc, want_logits,
        batch_range, progress, desc, want_stats,
    )  # fmt: skip


@torch.no_grad()
def _stream(
    model: torch.nn.Module,
    ids: np.ndarray,
    windows: list[Window],
    batch_size: int,
    key_type: str | None,
    want_lm: bool,
    want_enc: bool,
    want_logits: bool,
    batch_range: tuple[int, int] | None,
    progress: bool,
    desc: str,
    want_stats: bool = False,
) -> Iterator[ScoredBatch]:
    adapter = Adapter(model)
    batches = window_batches(windows, batch_size)
    offsets = rows_before(windows)
    a, b = batch_range if batch_range is not None else (0, len(batches))
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    pad_id = 0
    total = int(offsets[batches[b - 1][1]] - offsets[batches[a][0]]) if b > a else 0
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="tok", smoothing=0.1)
    # Plain perplexity needs no hooks, so it works for families that are not registered.
    hooks = adapter.capture() if key_type or want_enc else nullcontext({})
    with hooks as store:
        for bi in range(a, b):
            lo, hi = batches[bi]
            group = windows[lo:hi]
            width = max(w.length for w in group)
            begins = torch.tensor([w.begin for w in group])
            lengths = torch.tensor([w.length for w in group])
            first = torch.tensor([w.score_from - w.begin - 1 for w in group])
            # Gather the window tokens with one indexing op; pad beyond each window's end.
            src = begins[:, None] + torch.arange(width)[None, :]
            inside = src < (begins + lengths)[:, None]
            batch_ids = torch.where(inside, ids_t[src.clamp(max=len(ids) - 1)], pad_id)
            r = _score_batch(
                model, store, batch_ids, lengths, first, key_type, want_lm, want_enc, want_logits,
                want_stats,
            )  # fmt: skip
            bar.update(len(r.targets))
            yield ScoredBatch(
                positions=src[:, 1:][r.scored[:, :-1]].numpy(),
                targets=r.targets,
                lm_log_prob=r.lm_log_prob,
                keys=r.keys,
                enc=r.enc,
                lm_logits=r.lm_logits,
                first_row=int(offsets[lo]),
                windows_done=hi,
                lm_stats=r.lm_stats,
            )
    bar.close()


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    examples: list[list[int]],
    *,
    batch_size: int = 32,
    key_type: str | None = "ffn_input",
    want_lm: bool = True,
    score_from: list[int] | None = None,
    progress: bool = False,
    desc: str = "scoring examples",
) -> Iterator[ScoredBatch]:
    """Score independent short sequences (e.g. Macondo sentences), each with no outside context.

    Target ``t`` of example ``i`` (``t >= score_from[i]``, default 1) is predicted from tokens
    ``[0, t)`` of that example alone. ``positions`` are ``i * 2**32 + t`` so callers can recover
    the example (``positions >> 32``) and the token (``positions & 0xFFFFFFFF``).
    """
    if batch_size < 1:
        raise KnnlmError(f"--batch-size must be at least 1, got {batch_size}")
    adapter = Adapter(model)
    starts = score_from or [1] * len(examples)
    if any(len(e) < 2 for e in examples):
        raise ValueError("every example needs at least two tokens")
    row = 0
    bar = tqdm(total=len(examples), disable=not progress, desc=desc, unit="ex")
    with adapter.capture() as store:
        for lo in range(0, len(examples), batch_size):
            group = [torch.as_tensor(e, dtype=torch.long) for e in examples[lo : lo + batch_size]]
            batch_ids = pad_sequence(group, batch_first=True)
            lengths = torch.tensor([len(e) for e in group])
            first = torch.tensor(starts[lo : lo + len(group)]) - 1
            r = _score_batch(
                model, store, batch_ids, lengths, first, key_type, want_lm, False, False
            )
            col = torch.arange(batch_ids.shape[1])
            ex_index = torch.arange(lo, lo + len(group))[:, None]
            positions = (ex_index * (1 << 32) + col[None, :] + 1)[r.scored].numpy()
            bar.update(len(group))
            yield ScoredBatch(
                positions=positions,
                targets=r.targets,
                lm_log_prob=r.lm_log_prob,
                keys=r.keys,
                enc=None,
                lm_logits=None,
                first_row=row,
                windows_done=lo + len(group),
            )
            row += len(r.targets)
    bar.close()
