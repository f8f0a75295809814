"""Report building blocks: tables (exact strings), figures (valid PNGs), self-contained HTML."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.experiments.results_schema import check_results
from knnlm.experiments.stats import mean_std
from knnlm.report import figures
from knnlm.report.analyses import make_claims
from knnlm.report.html import markdown_to_html, write_report
from knnlm.report.hurdle import plot_hurdle_runs
from knnlm.report.macondo_figures import plot_figure1
from knnlm.report.reproduction_report import render_markdown, write_paper_report
from knnlm.report.tables import (
    claims_table,
    fmt_number,
    fmt_pm,
    markdown_table,
    settings_line,
    settings_table,
)
from results_contract import make_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse_table(md: str) -> tuple[list[str], list[list[str]]]:
    """Split a pipe table back into header and body cells (independent of the writer)."""
    lines = [ln for ln in md.strip().splitlines() if ln.strip()]

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())
        assert parts[0] == "" and parts[-1] == ""
        return [p.strip().replace("\\|", "|") for p in parts[1:-1]]

    rule = cells(lines[1])
    assert all(re.fullmatch(r":?-{3,}:?", r) for r in rule), rule
    return cells(lines[0]), [cells(ln) for ln in lines[2:]]


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert h >= min_side and w >= min_side, img.shape
    # Something was drawn: a blank canvas has one colour.
    assert float(np.asarray(img[..., :3]).std()) > 0.01
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"


# ----------------------------------------------------------------------------- tables


def test_fmt_number_rules():
    assert fmt_number(3.14159) == "3.14"
    assert fmt_number(3.14159, ".4f") == "3.1416"
    assert fmt_number(258.345, ".1f") == "258.3"
    assert fmt_number(np.float32(2.5), ".2f") == "2.50"
    assert fmt_number(np.float64(1e-5), ".2e") == "1.00e-05"
    assert fmt_number(1024) == "1024"
    assert fmt_number(np.int64(500000)) == "500000"
    assert fmt_number(np.array(7)) == "7"
    assert fmt_number(None) == "–"
    assert fmt_number(True) == "✓" and fmt_number(False) == "✗"
    assert fmt_number(float("nan")) == "nan"
    assert fmt_number(float("inf")) == "inf" and fmt_number(-math.inf) == "-inf"
    assert fmt_number(-0.001) == "0.00"  # no negative zero
    assert fmt_number(-0.006) == "-0.01"
    assert fmt_number("ffn_input") == "ffn_input"
    with pytest.raises(KnnlmError):
        fmt_number(1.0, "not-a-format")


@pytest.mark.parametrize("value", [258.3456, -1.6094, 0.1, 12345.678, 1 / 3])
def test_fmt_number_matches_rounded_json_value(value):
    # A reader can check a report number against the JSON: it is the value rounded.
    for digits in (1, 2, 4):
        s = fmt_number(value, f".{digits}f")
        assert float(s) == round(value, digits)
        assert abs(float(s) - value) <= 0.5 * 10**-digits + 1e-12


def test_markdown_table_round_trip():
    headers = ["model", "ppl", "keys", "note"]
    rows = [
        ["LM", 258.3456, 500000, None],
        ["kNN-LM (T=10)", 225.9951, 500000, "best | valid"],
        ["MLP", float("nan"), None, "-"],
    ]
    md = markdown_table(headers, rows)
    head, body = parse_table(md)
    assert head == headers
    assert body == [
        ["LM", "258.35", "500000", "–"],
        ["kNN-LM (T=10)", "226.00", "500000", "best | valid"],
        ["MLP", "nan", "–", "-"],
    ]
    # Numeric columns right-aligned, text left-aligned.
    rule = md.splitlines()[1].split("|")[1:-1]
    assert [r.strip()[0] == ":" for r in rule] == [True, False, False, True]
    assert [r.strip()[-1] == ":" for r in rule] == [False, True, True, False]


def test_markdown_table_per_column_format_and_align():
    md = markdown_table(
        ["a", "b"], [[0.123456, 0.123456]], align=["c", "l"], floatfmt=[".3f", ".1e"]
    )
    head, body = parse_table(md)
    assert body == [["0.123", "1.2e-01"]]
    assert md.splitlines()[1].split("|")[1].strip().startswith(":")


def test_markdown_table_errors():
    with pytest.raises(KnnlmError, match="row 1 has 1 cells"):
        markdown_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(KnnlmError, match="align"):
        markdown_table(["a"], [[1]], align=["x"])
    with pytest.raises(KnnlmError):
        markdown_table([], [])


def test_settings_line():
    s = settings_line(
        {
            "k": 1024,
            "knn_weight": 0.25,
            "temperature": 1.0,
            "exact": True,
            "index": {"type": "ivfpq", "nprobe": 32},
            "lrs": [0.1, 1e-3],
            "ckpt": None,
        }
    )
    assert s == (
        "k=1024, knn_weight=0.25, temperature=1.0, exact=true, index.type=ivfpq, "
        "index.nprobe=32, lrs=[0.1, 0.001], ckpt=none"
    )
    assert "\n" not in s
    with pytest.raises(KnnlmError):
        settings_line([1, 2])


def test_claims_table():
    md = claims_table(
        [
            {"claim": "(a) kNN-LM wins", "status": "held", "held": True,
             "criterion": "below in every seed", "evidence": "62 -> 57"},
            {"claim": "(b) x | y", "status": "not held", "held": False,
             "criterion": "KL < 0.1", "evidence": "KL 0.2"},
            {"claim": "(c)", "status": "untestable here", "held": False,
             "criterion": "c", "evidence": "not run"},
        ]
    )  # fmt: skip
    head, body = parse_table(md.split("\n\nDetails")[0])
    assert head == ["Claim", "Status"]
    assert [r[1] for r in body] == ["held", "not held", "untestable here"]
    assert body[1] == ["(b) x | y", "not held"]
    assert "- **(b) x | y: not held.**\n  - Criterion: KL < 0.1.\n  - Evidence: KL 0.2." in md
    with pytest.raises(KnnlmError, match="lacks criterion"):
        claims_table([{"claim": "x", "status": "held", "evidence": "y"}])
    with pytest.raises(KnnlmError, match="status"):
        claims_table([{"claim": "x", "status": "maybe", "criterion": "c", "evidence": "y"}])


def test_settings_table_is_compact():
    md = settings_table({"k": 256, "index": {"nprobe": 32}, "lr": 0.1, "x": None})
    head, body = parse_table(md)
    assert head == ["setting", "value"] * 3
    assert body == [["`k`", "256", "`index.nprobe`", "32", "`lr`", "0.1"],
                    ["`x`", "none", "", "", "", ""]]  # fmt: skip


def test_mean_std_and_fmt_pm_by_hand():
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(math.sqrt(7 / 3)))
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([None, 3.0, None]) == (3.0, None)
    assert mean_std([]) == (None, None)
    assert fmt_pm([1.0, 2.0, 4.0]) == "2.33 ± 1.53"
    assert fmt_pm([1.0]) == "1.00"
    assert fmt_pm([None]) == "–"


# ----------------------------------------------------------------------------- figures


def _groups(with_mlp: bool) -> dict:
    g = {}
    for n in range(1, 6):
        g[n] = {
            "lm": -2.5 - 0.2 * n,
            "lm_std": 0.1,
            "knnlm": -2.0 - 0.2 * n,
            "knnlm_std": 0.15,
            "perfect": math.log(1 / n),
        }
        if with_mlp:
            g[n] |= {"mlp": -2.2 - 0.2 * n, "mlp_std": 0.12}
    return g


@pytest.mark.parametrize("with_mlp", [False, True])
def test_plot_macondo_groups(tmp_path, with_mlp):
    out = figures.plot_macondo_groups(_groups(with_mlp), tmp_path / "fig" / "groups.png", "T")
    assert out == tmp_path / "fig" / "groups.png"
    assert_png(out)


def test_plot_macondo_groups_json_keys_and_single_group(tmp_path):
    g = {"3": {"lm": -3.1, "lm_std": 0.0, "knnlm": -2.9, "knnlm_std": None, "perfect": None}}
    assert_png(figures.plot_macondo_groups(g, tmp_path / "one.png"))
    with pytest.raises(KnnlmError):
        figures.plot_macondo_groups({}, tmp_path / "none.png")
    with pytest.raises(KnnlmError):
        figures.plot_macondo_groups({"x": {"lm": 1.0}}, tmp_path / "bad.png")


def test_plot_macondo_curves(tmp_path):
    steps = list(range(0, 2001, 250))
    rng = np.random.default_rng(0)
    curves = {
        n: {
            "lm": list(-6 + 3 * (1 - np.exp(-np.array(steps) / 500)) - 0.3 * n),
            "knnlm": list(
                -5.5
                + 3 * (1 - np.exp(-np.array(steps) / 500))
                - 0.3 * n
                + rng.normal(0, 0.05, len(steps))
            ),
        }
        for n in range(1, 6)
    }
    curves[5].pop("knnlm")  # may be missing
    assert_png(figures.plot_macondo_curves(steps, curves, tmp_path / "curves.png"))
    # single point
    assert_png(figures.plot_macondo_curves([100], {2: {"lm": [-1.2]}}, tmp_path / "c1.png"))
    with pytest.raises(KnnlmError, match="has 2 points"):
        figures.plot_macondo_curves([1, 2, 3], {1: {"lm": [0.1, 0.2]}}, tmp_path / "bad.png")


def test_plot_hurdle(tmp_path):
    steps = np.arange(0, 4001, 200)
    m1 = -4 + 3 * (1 - np.exp(-steps / 1500))
    m2 = -4 + 3 * (1 - np.exp(-steps / 800))
    out = figures.plot_hurdle(
        steps,
        m1,
        np.full_like(m1, 0.2),
        m2,
        np.full_like(m2, 0.3),
        "log-likelihood",
        tmp_path / "hurdle.png",
        "Macondo",
    )
    assert_png(out)
    out = figures.plot_hurdle(
        [10], [5.1], None, [4.8], [0.1], "train loss", tmp_path / "hurdle1.png", "WikiText"
    )
    assert_png(out)


def test_plot_sweep_heatmap(tmp_path):
    weights = [0.0, 0.1, 0.25, 0.5, 0.9]
    temps = [1, 3, 10, 30]
    w, t = np.meshgrid(weights, temps, indexing="ij")
    ppl = 258.3 - 30 * w * np.log(t) / np.log(30) + 400 * w**3
    ppl[4, 0] = np.inf  # a diverged cell is drawn grey, not an error
    out = figures.plot_sweep_heatmap(weights, temps, ppl, tmp_path / "sweep.png", "valid", 258.3)
    assert_png(out)
    # single cell
    assert_png(figures.plot_sweep_heatmap([0.25], [1.0], [[260.0]], tmp_path / "s1.png"))
    with pytest.raises(KnnlmError, match="shape"):
        figures.plot_sweep_heatmap(weights, temps, ppl.T, tmp_path / "bad.png")
    with pytest.raises(KnnlmError, match="no finite"):
        figures.plot_sweep_heatmap([0.1], [1.0], [[np.nan]], tmp_path / "bad.png")


def test_plot_kl_hist(tmp_path):
    rng = np.random.default_rng(0)
    wide_f = rng.lognormal(-4, 2, 2000)  # spans many decades -> log x
    wide_fg = np.concatenate([rng.lognormal(-3, 2, 2000), [0.0]])
    assert_png(figures.plot_kl_hist(wide_f, wide_fg, tmp_path / "kl_wide.png"))
    narrow = rng.uniform(0.01, 0.1, 500)
    assert_png(figures.plot_kl_hist(narrow, narrow * 1.5, tmp_path / "kl_narrow.png"))
    assert_png(figures.plot_kl_hist([0.05], [0.07], tmp_path / "kl_one.png"))
    with pytest.raises(KnnlmError):
        figures.plot_kl_hist([], [], tmp_path / "bad.png")


def test_plot_kl_steps(tmp_path):
    steps = list(range(0, 101, 10))
    f = {s: 2.0 * np.exp(-s / 10) + 1e-3 for s in steps}
    fg = [(s, 2.0 * np.exp(-s / 60) + 0.05) for s in steps]
    assert_png(figures.plot_kl_steps(f, fg, tmp_path / "kls.png", lr=1e-3))
    assert_png(figures.plot_kl_steps([0.5], {"steps": [0], "values": [0.9]}, tmp_path / "k1.png"))
    assert_png(figures.plot_kl_steps({"0": 0.5, "10": 0.2}, [0.9, 0.4], tmp_path / "k2.png", 0.1))


def test_plot_loss_curve(tmp_path):
    steps = np.arange(100)
    assert_png(
        figures.plot_loss_curve(steps, 6 * np.exp(-steps / 30) + 3, tmp_path / "l.png", "train")
    )
    assert_png(figures.plot_loss_curve([5], [4.2], tmp_path / "l1.png", "train"))
    with pytest.raises(KnnlmError):
        figures.plot_loss_curve([], [], tmp_path / "bad.png", "x")


def test_figures_use_no_pyplot_state(tmp_path):
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    figures.plot_loss_curve([0, 1], [2.0, 1.0], tmp_path / "l.png", "x")
    import sys

    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


# ----------------------------------------------------------------------------- HTML


def _report(tmp_path: Path) -> tuple[str, bytes, float]:
    ppl = 225.99512
    png = figures.plot_loss_curve(
        [0, 1, 2], [3.0, 2.0, 1.5], tmp_path / "figs" / "loss curve.png", "x"
    )
    md = "\n".join(
        [
            "# Reproduction",
            "",
            "Perplexity on the `test` split.",
            "",
            markdown_table(["model", "ppl"], [["LM", 258.3], ["kNN-LM", ppl]]),
            "",
            settings_line({"k": 1024, "knn_weight": 0.25}),
            "",
            "![training loss](<figs/loss curve.png>)",
            "",
            "- one",
            "- two",
            "",
        ]
    )
    return md, png.read_bytes(), ppl


def test_markdown_to_html_is_self_contained(tmp_path):
    md, png_bytes, ppl = _report(tmp_path)
    page = markdown_to_html(md, tmp_path, "Report <kNN-LM>")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Report &lt;kNN-LM&gt;</title>" in page
    assert "<table>" in page and "<th" in page and "<ul>" in page
    assert f'<td style="text-align:right">{fmt_number(ppl)}</td>' in page
    assert "<code>test</code>" in page
    # The figure is embedded byte for byte; nothing refers to an external file.
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m and base64.b64decode(m.group(1)) == png_bytes
    assert 'src="fig' not in page
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_markdown_to_html_rejects_missing_or_remote_images(tmp_path):
    with pytest.raises(KnnlmError, match="missing.png"):
        markdown_to_html("![x](missing.png)", tmp_path, "t")
    with pytest.raises(KnnlmError, match="self-contained"):
        markdown_to_html("![x](https://example.org/a.png)", tmp_path, "t")
    page = markdown_to_html('<img src="https://example.org/a.png">', tmp_path, "t")
    assert "<img" not in page  # raw HTML is escaped


def test_write_report(tmp_path):
    md, _, ppl = _report(tmp_path)
    md_path, html_path = write_report(tmp_path, md, "Reproduction")
    assert md_path == tmp_path / "report.md" and html_path == tmp_path / "report.html"
    assert md_path.read_text(encoding="utf-8") == md
    page = html_path.read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and fmt_number(ppl) in page
    assert not list(tmp_path.glob(".*.tmp"))
    # A broken figure reference leaves no partial report behind.
    out = tmp_path / "other"
    with pytest.raises(KnnlmError):
        write_report(out, "![x](nope.png)", "t")
    assert not (out / "report.md").exists() and not (out / "report.html").exists()


# ----------------------------------------------------------------------------- the paper report


def _capture_labels(monkeypatch) -> list[tuple[str, str]]:
    """Record each saved figure's axis labels (figures are cleared once written)."""
    seen: list[tuple[str, str]] = []
    original = figures.save

    def save(fig, path):
        ax = fig.axes[0]
        seen.append((ax.get_xlabel(), ax.get_ylabel()))
        return original(fig, path)

    monkeypatch.setattr(figures, "save", save)
    return seen


def test_kl_axes_name_the_direction_computed(tmp_path, monkeypatch):
    # The solver minimises KL[f(z) || p_knnlm] (Eq. 2); the axes must say so.
    from knnlm.experiments.projection.solver import kl_model_to_target

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    q = torch.softmax(logits, -1)
    by_hand = float((q * (q.log() - target)).sum())  # KL[q || p], q = f(z)
    assert float(kl_model_to_target(logits, target)[0]) == pytest.approx(by_hand, rel=1e-5)
    seen = _capture_labels(monkeypatch)
    figures.plot_kl_hist([0.01, 0.02], [0.03], tmp_path / "h.png")
    figures.plot_kl_steps([0.5, 0.2], [0.6, 0.4], tmp_path / "s.png")
    assert "KL[f(z*) ‖ p_knnlm]" in seen[0][0]
    assert "KL[f(z) ‖ p_knnlm]" in seen[1][1]


def test_plot_figure1_from_contract_curves(tmp_path, monkeypatch):
    curves = make_results()["macondo"]["curves"]
    assert_png(plot_figure1(curves, tmp_path / "f1.png", final_mlp={"1": -1.5, "2": -2.0}))
    with_mlp = dict(curves, mlp={n: [[v + 0.3 for v in row] for row in rows]
                                 for n, rows in curves["lm"].items()})  # fmt: skip
    assert_png(plot_figure1(with_mlp, tmp_path / "f1m.png"))
    one = {"steps": [5], "lm": {"2": [[-1.0]]}}  # one seed, one step, no kNN-LM
    assert_png(plot_figure1(one, tmp_path / "f1one.png"))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c["lm"]["1"][0].pop(), "has 4 values but there are 5 steps"),
        (lambda c: c["knnlm"].__setitem__("2", []), "non-empty list"),
        (lambda c: c["lm"].__setitem__("3", [1.0, 2.0]), r"must be a list of values"),
        (lambda c: c.__setitem__("steps", []), "empty"),
        (lambda c: c.__setitem__("lm", {"x": [[1.0]]}), "number of children"),
        (lambda c: c["lm"]["1"].__setitem__(0, ["a"] * 5), "numbers"),
    ],
)
def test_plot_figure1_refuses_bad_curves(tmp_path, mutate, match):
    curves = make_results()["macondo"]["curves"]
    mutate(curves)
    with pytest.raises(KnnlmError, match=match):
        plot_figure1(curves, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(KnnlmError):
        plot_figure1([1, 2], tmp_path / "bad.png")


def test_plot_hurdle_runs(tmp_path):
    h = make_results()["hurdle"]
    assert_png(plot_hurdle_runs(h["loglik"], "log-likelihood", tmp_path / "f4.png", "Macondo"))
    one = {"steps": [0, 10], "with_mlp": [[1.0, 2.0]], "without_mlp": [[1.0, 2.5]]}
    assert_png(plot_hurdle_runs(one, "loss", tmp_path / "one.png"))
    bad = dict(h["loss"], without_mlp=h["loss"]["without_mlp"][:2])
    with pytest.raises(KnnlmError, match="3 seeds but without_mlp has 2"):
        plot_hurdle_runs(bad, "loss", tmp_path / "bad.png")
    with pytest.raises(KnnlmError, match="with_mlp is missing"):
        plot_hurdle_runs({"steps": [0, 1], "without_mlp": [[1, 2]]}, "x", tmp_path / "bad.png")
    with pytest.raises(KnnlmError):
        plot_hurdle_runs(None, "x", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _section_text(md: str, heading: str) -> str:
    start = md.index(heading)
    nxt = md.find("\n## ", start + 1)
    return md[start : nxt if nxt >= 0 else len(md)]


def _tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in ``text`` as its body rows."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            out.append(parse_table("\n".join(block))[1])
            block = []
    return out


def _pm(values) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}"


def test_paper_report_from_the_contract_fixture(tmp_path):
    r = make_results()
    check_results(r)
    out = write_paper_report(tmp_path, copy.deepcopy(r))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["claims"] == out["claims"] == make_claims(r)
    md = (tmp_path / "report.md").read_text()
    # Claims table: one row per claim, status and criterion as in results.json.
    claims_md = _section_text(md, "## Claims")
    rows = _tables(claims_md)[0]
    assert [x[1] for x in rows] == [c["status"] for c in saved["claims"]]
    for c in saved["claims"]:
        assert f"  - Criterion: {c['criterion']}." in claims_md
    # Section 2: mean ± sample std over seeds, computed here with numpy.
    t1 = _tables(_section_text(md, "## kNN-LM"))[0]
    per = r["knnlm"]["per_seed"]
    assert t1[0][4:] == [_pm([p["valid"]["lm"] for p in per]), _pm([p["test"]["lm"] for p in per])]
    assert t1[1][1:4] == ["0.25", "1", "fixed (paper)"]
    assert t1[2][5] == _pm([p["test"]["knnlm_tuned"] for p in per]) and t1[2][3] == "valid"
    # Section 3: capped positions and the share of the gap (40 -> 36; f at 36.2 closes 95%).
    proj = _tables(_section_text(md, "## Capacity"))
    assert proj[0][2] == ["f(z*), paper's rule", "36.20", "95%"]
    # The converged solve (36.1: (40 - 36.1) / 4 = 0.97499.. in floating point) and the two
    # sensitivity rows.
    assert proj[0][4] == ["f(z*), converged", "36.10", "97%"]
    assert [row[0] for row in proj[0][6:]] == [
        "f(z*) without final norm, converged",
        "f(z*) for KL[p_knnlm ‖ f(z)], converged",
    ]
    assert [row[6] for row in proj[1]] == ["300 / 3 of 300"] * 2 + ["300 / 0 of 300"] * 4
    # Table 5 per n, every column, computed independently.
    t5 = _tables(_section_text(md, "## Generalization"))[0]
    mac = r["macondo"]["per_seed"]
    for row, n in zip(t5, ["1", "2", "3", "4", "5"], strict=True):
        assert row[0] == n and row[1] == f"{-math.log(int(n)):.2f}".replace("-0.00", "0.00")
        assert row[2] == _pm([p["train"]["lm"][n] for p in mac])
        assert row[3:] == [_pm([p["test"][m][n] for p in mac]) for m in ("lm", "knnlm", "mlp")]
    # Section 5: storage fractions with and without W (3 MB and 1 MB of 100 MB).
    t2 = _tables(_section_text(md, "## An MLP"))[0]
    assert [row[4] for row in t2] == ["–", "100%", "3.00%", "1.00%"]
    assert "(LM - LM+MLP) / (LM - kNN-LM): 40 ± 0%" in md
    # What was not run, with the command.
    assert "`knnlm macondo export-conv`" in _section_text(md, "## What this run did not do")
    # Figures drawn from the data, embedded in the HTML.
    assert set(saved["figures"]) == {"figure1", "figure4", "figure5", "macondo_gains",
                                     "hurdle_gaps_loglik", "hurdle_gaps_loss", "width"}  # fmt: skip
    for rel in saved["figures"].values():
        assert f"]({rel})" in md
        assert_png(tmp_path / rel)
    html = (tmp_path / "report.html").read_text()
    assert (
        html.count("data:image/png;base64,") == 7
    )  # Figures 1, 4, 5, the Macondo gains, two hurdle gap figures
    assert "Not run" not in md and "incomplete" not in md and "not drawn" not in md


def test_paper_report_provenance_table(tmp_path):
    r = make_results()
    r["provenance"]["git"]["dirty"] = True
    r["provenance"]["packages"]["peft"] = None
    write_paper_report(tmp_path, r)
    md = (tmp_path / "report.md").read_text()
    # Beside the header's settings, before the claims.
    assert md.index("## Provenance") < md.index("## Claims")
    rows = _tables(_section_text(md, "## Provenance"))[0]
    shown = {k.strip("`"): v for row in rows for k, v in zip(row[::2], row[1::2], strict=True)}
    p = r["provenance"]
    assert shown["torch"] == p["packages"]["torch"] and shown["peft"] == "none"
    assert shown["commit"] == "0" * 40 + " (uncommitted changes)"
    assert shown["cpu_count"] == "2" and shown["torch_threads"] == "1"
    assert shown["device"] == "cpu" and shown["cpu"] == "A CPU"
    assert shown["started_utc"] == p["started_utc"] and shown["ended_utc"] == p["ended_utc"]
    # A results.json from before provenance was recorded: no section, no error.
    del r["provenance"]
    write_paper_report(tmp_path, r)
    assert "## Provenance" not in (tmp_path / "report.md").read_text()


def test_paper_report_partial_run(tmp_path):
    r = make_results()
    del r["macondo"], r["memory"]
    r["projection"] = None
    r["hurdle"]["loss"] = None
    r.pop("not_run")
    out = write_paper_report(tmp_path, r)
    md = (tmp_path / "report.md").read_text()
    # (a), (b), (c0), (c), (d), (e), (b'), (b-width), (c'), (d-control); the width study ran.
    assert [c["status"] for c in out["claims"]] == [
        "held", "untestable here", "untestable here", "untestable here", "untestable here",
        "untestable here", "untestable here", "held", "untestable here", "untestable here",
    ]  # fmt: skip
    for heading, key in (("## Capacity", "projection"), ("## Generalization", "macondo"),
                         ("## An MLP", "memory")):  # fmt: skip
        assert f"Not run in this invocation (no `{key}` results)" in _section_text(md, heading)
    assert "Figure 5): not recorded in this run" in _section_text(md, "## The last-MLP")
    assert set(out["figures"]) == {"figure4", "hurdle_gaps_loglik", "width"}
    assert "do not list what was left out" in md
    assert (tmp_path / "report.html").is_file()


def test_paper_report_incomplete_section_still_renders(tmp_path):
    r = make_results()
    del r["memory"]["storage"]
    r["macondo"]["curves"]["lm"]["2"][1] = [0.0]  # ragged: Figure 1 cannot be drawn
    out = write_paper_report(tmp_path, r)
    md = (tmp_path / "report.md").read_text()
    assert out["claims"][4]["claim"].startswith("(d)")
    assert out["claims"][4]["status"] == "untestable here"
    assert "The `memory` results are incomplete" in md and "storage" in md
    assert "figure1" not in out["figures"]
    assert "figure1: curves.lm.2[1] has 1 values but there are 5 steps" in md
    # Table 5 does not need the curves.
    assert "**Table 5.**" in md


def test_paper_report_copies_pipeline_figures_when_data_is_absent(tmp_path):
    r = make_results()
    src = figures.plot_loss_curve([0, 1], [2.0, 1.0], tmp_path / "src" / "f1.png", "x")
    del r["macondo"]["curves"]
    r["macondo"]["figure1"] = str(src)
    out = write_paper_report(tmp_path / "out", r)
    assert out["figures"]["figure1"] == "figures/figure1_macondo.png"
    assert (tmp_path / "out" / "figures" / "figure1_macondo.png").read_bytes() == src.read_bytes()


def test_paper_report_draws_kl_figures_and_drops_per_position_lists(tmp_path):
    r = make_results()
    p, q = r["projection"]["lr_0.1"], r["projection"]["lr_0.001"]
    p["proj_f"]["kl"], p["proj_fg"]["kl"] = [0.01, 0.05, 0.2], [0.02, 0.06]
    q["proj_f"]["kl_curve"], q["proj_fg"]["kl_curve"] = [1.0, 0.5, 0.3], [1.0, 0.8, 0.7]
    band = {"mean": [0.3, 0.2, 0.1], "q25": [0.2, 0.1, 0.05], "median": [0.3, 0.2, 0.1],
            "q75": [0.4, 0.3, 0.2]}  # fmt: skip
    for name in ("proj_f", "proj_fg"):
        p["converged"][name]["kl"] = [0.01, 0.02]
        p[name]["kl_curve_bands"] = p["converged"][name]["kl_curve_bands"] = band
    out = write_paper_report(tmp_path, r)
    assert {"kl_hist", "kl_steps", "kl_solves"} <= set(out["figures"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "kl" not in saved["projection"]["lr_0.1"]["proj_f"]
    assert "kl" not in saved["projection"]["lr_0.1"]["converged"]["proj_f"]
    assert saved["projection"]["lr_0.001"]["proj_f"]["kl_curve"] == [1.0, 0.5, 0.3]
    page = (tmp_path / "report.html").read_text()
    # Figures 1, 4, 5, the three KL figures, the Macondo gains, the two hurdle gap figures and
    # the width study.
    assert page.count("data:image/png;base64,") == len(out["figures"]) == 10


def test_stage_figures_are_drawn_where_the_results_point(tmp_path):
    """A reproduction's per-stage figures come from the data its stages saved: a seed whose
    sweep data is missing gets no heatmap (and no error); Macondo and hurdle outputs are
    drawn only from their own results files."""
    from knnlm.report.reproduction_report import draw_stage_figures

    r = make_results()
    per_seed = r["knnlm"]["per_seed"]
    for i, p in enumerate(per_seed):
        p["figure"] = str(tmp_path / f"knnlm-{i}" / "sweep.png")
    grid = {"weights": [0.1, 0.25], "temperatures": [1.0, 3.0], "k": 8,
            "valid": [[30.0, 29.0], [28.0, 31.0]], "lm_ppl": 30.5}  # fmt: skip
    (tmp_path / "knnlm-0").mkdir()
    (tmp_path / "knnlm-0" / "sweep.json").write_text(json.dumps(grid))
    p, q = r["projection"]["lr_0.1"], r["projection"]["lr_0.001"]
    p["proj_f"]["kl"], p["proj_fg"]["kl"] = [0.01, 0.05, 0.2], [0.02, 0.06]
    q["proj_f"]["kl_curve"], q["proj_fg"]["kl_curve"] = [1.0, 0.5, 0.3], [1.0, 0.8, 0.7]
    p["figure"], q["figure"] = str(tmp_path / "kl_hist.png"), str(tmp_path / "kl_steps.png")
    r["macondo"]["table5"] = str(tmp_path / "macondo" / "table5.md")
    r["hurdle"]["figure4"] = str(tmp_path / "hurdle" / "figure4.png")
    draw_stage_figures(r)
    assert len(per_seed) >= 2
    assert Path(per_seed[0]["figure"]).read_bytes()[:8] == PNG_SIGNATURE
    assert not any(Path(x["figure"]).exists() for x in per_seed[1:])
    for f in (p["figure"], q["figure"]):
        assert Path(f).read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "macondo").exists() and not (tmp_path / "hurdle").exists()


def test_the_knn_weight_sentence_does_not_contradict_itself():
    # Issue 27: "puts 0.25 on p_knn, i.e. w = 1 - λ" said both things at once (1 - 0.25 = 0.75).
    from pathlib import Path

    from knnlm.experiments.macondo.settings import KNN_WEIGHT_NOTE

    repo = Path(__file__).resolve().parents[1]
    md = (repo / "README.md").read_text()
    r = make_results()
    r["claims"] = make_claims(r)
    section = _section_text(render_markdown(r, {}), "## kNN-LM")
    for text in (md, KNN_WEIGHT_NOTE.replace("lambda", "λ"), section):
        flat = " ".join(text.split())
        assert "w = 1 - λ" not in flat and "λ = 1 - w" not in flat
        assert "which read literally puts 0.75 on p_knn" in flat
        assert "put 0.25 on p_knn" in flat


def test_figure1_draws_what_claim_c_reads_and_says_so(tmp_path):
    # Issue 27: Figure 1 drew the default setting over every test parent, the MLP tuned on the
    # test parents, and its caption said neither.
    r = make_results()
    for p in r["macondo"]["per_seed"]:
        p["tuned"] = {"tuned_on": "dev", "k": 64, "temperature": 30.0, "knn_weight": 0.95,
                      "memory_weight": 0.9, "dev_examples": 10, "test_examples": 20}  # fmt: skip
    r["macondo"]["curves"]["parents"] = "verdict"
    out = write_paper_report(tmp_path, r)
    assert out["figures"]["figure1"] == "figures/figure1_macondo.png"
    md = _section_text((tmp_path / "report.md").read_text(), "## Generalization")
    assert "Curves on the test parents claim (c) reads (the dev share left out)" in md
    assert "the dotted kNN-LM is at the default setting (k=256, w=0.25 on p_knn, T=1)" in md
    assert "stars mark the kNN-LM at the dev-tuned setting" in md
    del r["macondo"]["curves"]["parents"]  # curves of a run made before the rule
    write_paper_report(tmp_path, r)
    md = _section_text((tmp_path / "report.md").read_text(), "## Generalization")
    assert "Curves on every test parent (dev share included" in md
