"""Report building blocks: tables (exact strings), figures (valid PNGs), self-contained HTML."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from knnlm.errors import KnnlmError
from knnlm.report import figures
from knnlm.report.html import markdown_to_html, write_report
from knnlm.report.tables import claims_table, fmt_number, markdown_table, settings_line

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
            {"claim": "last layer is not a bottleneck", "held": True, "evidence": "KL 0.05"},
            {"claim": "LM generalises", "held": np.bool_(False), "evidence": "gap 1.2 nats"},
            {"claim": "not run", "held": None, "evidence": None},
        ]
    )
    head, body = parse_table(md)
    assert head == ["Claim", "Held", "Evidence"]
    assert [r[1] for r in body] == ["✓", "✗", "–"]
    assert body[1][2] == "gap 1.2 nats"
    with pytest.raises(KnnlmError, match="lacks held"):
        claims_table([{"claim": "x", "evidence": "y"}])


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
