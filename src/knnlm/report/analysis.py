"""How an analysis plugs into the report: its claims, its section and its figures.

Each analysis module of ``report/`` (natural text, projection, width study, Macondo, MLP memory,
hurdle) ends with one :class:`Analysis`; :mod:`knnlm.report.analyses` lists them in one table,
which is all the reproduction report reads. Adding an analysis is one module and one line there.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError

Results = Mapping[str, Any]


@dataclass(frozen=True)
class Claim:
    """One verdict: the claim's line, its criterion and the pure function that judges it."""

    claim: str
    criterion: str
    judge: Callable[[Results], dict]


class FigureSink:
    """Collects the report's figures under ``out/figures``: drawn from the results, or copied
    from where the pipeline drew them; records why a figure could not be drawn."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.figs: dict[str, str | None] = {}
        self.why: dict[str, str] = {}

    def copy(self, key: str, src: Any, name: str) -> None:
        self.figs[key] = copy_figure(src, self.out, name)

    def draw(self, key: str, name: str, fn: Callable[[Path], Any], fallback: Any = None) -> None:
        try:
            fn(self.out / "figures" / name)
            self.figs[key] = f"figures/{name}"
        except (KnnlmError, KeyError, TypeError, ValueError) as e:
            self.figs[key] = copy_figure(fallback, self.out, name)
            if self.figs[key] is None:
                self.why[key] = str(e)


def copy_figure(src: Any, out: Path, name: str) -> str | None:
    if not src or not Path(src).is_file():
        return None
    dst = out / "figures" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if Path(src).resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return f"figures/{name}"


def get_path(r: Any, *keys: str) -> Any:
    """``r[k1][k2]...``, or None where a level is missing."""
    for k in keys:
        if not isinstance(r, Mapping):
            return None
        r = r.get(k)
    return r


Figures = Callable[[Results, FigureSink], None]


@dataclass(frozen=True)
class Analysis:
    """One analysis of the paper as the report sees it.

    ``key`` is its ``results.json`` section; ``section`` renders its Markdown (None: shown inside
    another analysis' section); ``claims`` are the paper's claims it judges, ``findings`` the
    ones judged beside them; ``paper_figures`` draws the paper's figures, ``evidence_figures``
    what the verdicts read (drawn after every analysis' paper figures); ``stage_figures`` the
    figures its own run folder holds.
    """

    key: str
    title: str
    section: Callable[[Results, Mapping[str, Any]], str] | None = None
    claims: tuple[Claim, ...] = ()
    findings: tuple[Claim, ...] = ()
    paper_figures: Figures | None = None
    evidence_figures: Figures | None = None
    stage_figures: Callable[[Results], None] | None = None
