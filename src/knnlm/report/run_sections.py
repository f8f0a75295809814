"""Report sections about the run itself: what it did not do, wall time per stage, provenance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from knnlm.report.tables import fmt_number, markdown_table, settings_table


def not_run_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    items = r.get("not_run")
    md = "## What this run did not do\n\n"
    if items is None:
        return md + "The results do not list what was left out.\n\n"
    if not items:
        return md + "Nothing: every part of the paper this toolkit covers ran.\n\n"
    for it in items:
        md += f"- **{it.get('what', '?')}** — {it.get('why', 'no reason given')}."
        if it.get("command"):
            md += f" To run it: `{it['command']}`"
        md += "\n"
    return md + "\n"


def stages_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    rows = [[name, rec.get("seconds"), "cached" if rec.get("cached") else "ran"]
            for name, rec in r["stages"].items()]  # fmt: skip
    md = "## Wall time per stage\n\n" + markdown_table(
        ["stage", "seconds", ""], rows, floatfmt=".1f"
    )
    if r.get("wall_seconds") is not None:
        md += f"\n\nTotal wall time of this invocation: {fmt_number(r['wall_seconds'], '.1f')} s."
    return md + "\n"


def provenance_section(r: Mapping[str, Any]) -> str:
    """What ran the results: versions, the source's commit, the machine, UTC start and end."""
    p = r["provenance"]
    git = p.get("git") or {}
    commit = git.get("commit")
    if commit and git.get("dirty"):
        commit += " (uncommitted changes)"
    shown = {
        **(p.get("packages") or {}),
        "python": p.get("python"),
        "commit": commit or "not a git checkout",
        "cpu": p.get("cpu_model"),
        "cpu_count": p.get("cpu_count"),
        "torch_threads": p.get("torch_threads"),
        "device": p.get("device"),
        "started_utc": p.get("started_utc"),
        "ended_utc": p.get("ended_utc"),
    }
    return "## Provenance\n\n" + settings_table(shown) + "\n\n"
