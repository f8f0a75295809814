"""The vocabulary of claim verdicts, shared by every analysis module.

A verdict is ``{"claim", "status", "held", "criterion", "evidence"}`` (plus ``"scale"``: what
this run can test against what the paper ran) with one of four states: ``held``; ``not held``
only when the evidence excludes the paper's effect (the one-sided 95% interval lies below the
minimum effect); ``inconclusive`` when it cannot decide (with a power line: the seeds or
positions needed to detect the minimum effect at the observed spread); ``untestable here``
(its section was not run, or what it is read on is missing). ``held`` is True only for
``held``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from knnlm.experiments.stats import Interval, units_needed
from knnlm.report.tables import fmt_number

HELD, NOT_HELD, UNTESTABLE = "held", "not held", "untestable here"
INCONCLUSIVE = "inconclusive"
STATES = (HELD, NOT_HELD, INCONCLUSIVE, UNTESTABLE)


def verdict(
    claim: str, status: str, criterion: str, evidence: str, scale: str | None = None
) -> dict:
    if status not in STATES:
        raise ValueError(f"unknown verdict status {status!r}")
    out = {
        "claim": claim,
        "status": status,
        "held": status == HELD,
        "criterion": criterion,
        "evidence": evidence,
    }
    if scale is not None:
        out["scale"] = scale
    return out


def combine(states: Sequence[str]) -> str:
    """One status from parts that must all hold: an excluded part sinks it, a missing part
    leaves it untestable, an undecided one inconclusive."""
    for status in (NOT_HELD, UNTESTABLE, INCONCLUSIVE):
        if status in states:
            return status
    return HELD


def judge(iv: Interval, min_effect: float) -> str:
    """Held when the effect is shown (lower bound above 0) and at least ``min_effect`` on
    average; not held when the upper bound lies below ``min_effect`` (the evidence excludes
    the paper's effect); inconclusive otherwise."""
    if iv.lower > 0 and iv.mean >= min_effect:
        return HELD
    if iv.upper < min_effect:
        return NOT_HELD
    return INCONCLUSIVE


def interval_text(iv: Interval, min_effect: float, unit: str, source: str) -> str:
    """The interval, the minimum effect with where it comes from, and (inconclusive) the power
    line."""
    f = lambda x: fmt_number(x, ".3g")  # noqa: E731
    text = (
        f"{iv.method}: mean {f(iv.mean)} {unit}, one-sided 95% bounds: above {f(iv.lower)}, "
        f"below {f(iv.upper)}; minimum effect {min_effect:g} {unit} ({source})"
    )
    if judge(iv, min_effect) == INCONCLUSIVE:
        need = units_needed(iv.sd, min_effect)
        text += (
            f"; power: about {need} {iv.over} would detect {min_effect:g} {unit} at the observed "
            f"spread (sd {f(iv.sd)}), this run has {iv.n}"
            if need is not None
            else "; power: no spread to size a larger run from"
        )
    return text


def per_seed(section: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The section's per-seed results; an empty list is an incomplete section."""
    per = section["per_seed"]
    if not per:
        raise ValueError("per_seed is empty")
    return list(per)


def seed_list(per: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(str(p.get("seed", i)) for i, p in enumerate(per))
