"""`knnlm reproduce` end to end at a tiny scale: files, sections, claims, and numbers that match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knnlm.report.tables import fmt_number


def _run(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "knnlm", "reproduce", "--quick", "--tiny", "--quiet", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


def _table_after(md: str, marker: str) -> list[list[str]]:
    """Cells of the first Markdown table after the line containing ``marker``."""
    lines = md[md.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [r for r in rows[2:]]  # drop header and rule


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_files_sections_and_claims(run):
    out, proc = run
    results = json.loads((out / "results.json").read_text())
    for key in ("knnlm", "projection", "macondo", "memory", "hurdle", "claims"):
        assert key in results
    assert len(results["claims"]) == 5
    for c in results["claims"]:
        assert set(c) >= {"claim", "held", "evidence"} and isinstance(c["held"], bool)
    md = (out / "report.md").read_text()
    for section in ("## Claims", "Table 1.", "Table 2.", "Table 3.", "Table 4.", "Table 5.",
                    "Section 2", "Section 3", "Section 4", "Section 5", "Appendix E",
                    "Wall time per stage"):  # fmt: skip
        assert section in md, section
    pngs = list((out / "figures").glob("*.png"))
    assert len(pngs) >= 4
    for fig in results["figures"].values():
        assert f"]({fig})" in md and (out / fig).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(results["figures"])
    claims = _table_after(md, "## Claims")
    assert len(claims) == 5
    for row, c in zip(claims, results["claims"], strict=True):
        assert row[1] == fmt_number(c["held"])


def test_report_numbers_equal_results_json(run):
    out, _ = run
    r = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    knn = _table_after(md, "## kNN-LM")
    assert knn[0][1] == fmt_number(r["knnlm"]["lm"]["perplexity"])
    assert knn[1][1] == fmt_number(r["knnlm"]["knnlm"]["perplexity"])
    t1 = _table_after(md, "**Table 1.**")
    p = r["projection"]["lr_0.1"]
    assert [row[1] for row in t1] == [
        fmt_number(p[k]["perplexity"]) for k in ("lm", "knnlm", "proj_f", "proj_fg")
    ]
    t3 = _table_after(md, "**Table 3.**")
    assert t3[0][1] == fmt_number(p["proj_f"]["kl_mean"], ".4f")
    assert t3[1][1] == fmt_number(p["proj_fg"]["kl_mean"], ".4f")
    t2 = _table_after(md, "**Table 2.**")
    m = r["memory"]
    assert [row[1] for row in t2[:3]] == [
        fmt_number(m[k]["perplexity"]) for k in ("lm", "knnlm", "mlp")
    ]
    assert t2[2][2] == fmt_number(m["storage"]["memory_bytes"])
    t5 = _table_after(md, "**Table 5.**")
    groups = r["macondo"]["groups"]
    assert len(t5) == len(groups)
    for row in t5:
        g = groups[row[0]]
        assert row[1] == f"{fmt_number(g['lm'])} ± {fmt_number(g['lm_std'])}"
        assert row[3] == fmt_number(g["perfect"])


def test_rerun_reuses_every_stage(run):
    out, _ = run
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert all(s["cached"] for s in stages.values())
