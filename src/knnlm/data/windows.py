"""Scoring windows: every target token is scored exactly once, with the most left context.

A window covers tokens ``[begin, end)``; the model reads them and scores targets
``[score_from, end)`` (target ``t`` is predicted from the logits at ``t - 1``). Windows start
every ``stride`` tokens, but never after the last scored target, since the next target needs
at least that token as context (so ``stride == context_len`` gives windows overlapping by one
token). Each window scores only the targets that no earlier window scored, so with
``stride < context_len`` later targets see up to ``context_len - 1`` tokens of context. The
first token of a split has no context and is never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from knnlm.errors import KnnlmError


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    score_from: int  # first scored target position (absolute)

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def resolve_stride(context_len: int, stride: int | None) -> int:
    """The stride to use: ``None`` means ``context_len``; 0 or negative is refused (never read
    as "the default")."""
    if context_len < 2:
        raise KnnlmError(f"--context-len must be at least 2, got {context_len}")
    if stride is None:
        return context_len
    if not 1 <= stride <= context_len:
        raise KnnlmError(f"--stride must be in [1, context-len={context_len}], got {stride}")
    return stride


def make_windows(n_tokens: int, context_len: int, stride: int | None = None) -> list[Window]:
    stride = resolve_stride(context_len, stride)
    if n_tokens < 2:
        raise KnnlmError("fewer than two tokens: nothing to score")
    windows: list[Window] = []
    scored_until = 1  # targets below this are done; target 0 has no context
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context_len, n_tokens)
        if end > scored_until:
            windows.append(Window(begin, end, max(scored_until, begin + 1)))
            scored_until = end
        begin = min(begin + stride, scored_until - 1)
    return windows
