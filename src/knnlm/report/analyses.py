"""The one table of the report's analyses, and the verdicts on every claim they judge.

Each analysis lives in its own module with its claims, section and figures (its
:class:`~knnlm.report.analysis.Analysis`); the report reads only :data:`ANALYSES`. Adding an
analysis is one module and one line here. Claims are listed in this order, the paper's claims
(a)-(e) first, then the findings judged beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from knnlm.report import hurdle, macondo, mlp_memory, natural_text, projection, width_study
from knnlm.report.analysis import Analysis, Claim
from knnlm.report.verdicts import UNTESTABLE, verdict

ANALYSES: tuple[Analysis, ...] = (
    natural_text.ANALYSIS,
    projection.ANALYSIS,
    width_study.ANALYSIS,
    macondo.ANALYSIS,
    mlp_memory.ANALYSIS,
    hurdle.ANALYSIS,
)


def all_claims() -> list[tuple[str, Claim]]:
    """(results key, claim) for every claim, then every finding, in the table's order."""
    return [(a.key, c) for a in ANALYSES for c in a.claims] + [
        (a.key, c) for a in ANALYSES for c in a.findings
    ]


def make_claims(results: Mapping[str, Any]) -> list[dict]:
    """One verdict per claim. A missing section makes its claim untestable ("not run"); a
    section that lacks a contract key does too, naming the key, so a partial run still
    renders."""
    out = []
    for section, c in all_claims():
        if not results.get(section):
            out.append(
                verdict(c.claim, UNTESTABLE, c.criterion, f"not run: no {section!r} results")
            )
            continue
        try:
            out.append(c.judge(results))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
            out.append(
                verdict(c.claim, UNTESTABLE, c.criterion, f"{section!r} results incomplete: {why}")
            )
    return out
