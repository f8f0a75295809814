"""The vocabulary of claim verdicts, shared by every claims module.

A verdict is ``{"claim", "status", "held", "criterion", "evidence"}`` with status ``held``,
``not held`` or ``untestable here`` (its section was not run, or its premise failed); ``held``
is True only for ``held``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HELD, NOT_HELD, UNTESTABLE = "held", "not held", "untestable here"


def verdict(claim: str, status: str, criterion: str, evidence: str) -> dict:
    return {
        "claim": claim,
        "status": status,
        "held": status == HELD,
        "criterion": criterion,
        "evidence": evidence,
    }


def per_seed(section: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The section's per-seed results; an empty list is an incomplete section."""
    per = section["per_seed"]
    if not per:
        raise ValueError("per_seed is empty")
    return list(per)


def seed_list(per: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(str(p.get("seed", i)) for i, p in enumerate(per))
