"""The reproduction report: the claims table, Tables 1-5, the paper's figures, what was not run.

Every number in ``report.md`` is formatted by :func:`knnlm.report.tables.fmt_number` from the
value stored in ``results.json``, so the two always agree. A section the run did not produce
(a partial run) is rendered as "not run" and its claim as "untestable here".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from knnlm.fileio import write_json_atomic
from knnlm.report import analyses, run_sections
from knnlm.report.analysis import FigureSink, get_path
from knnlm.report.html import write_report
from knnlm.report.tables import claims_table


def draw_figures(r: Mapping[str, Any], out: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """Draw each analysis' figures from the results (the paper's first, then what the verdicts
    read), copying the ones the pipeline drew where the data to draw them is not there. Returns
    (figure paths relative to ``out``, why a figure is missing)."""
    sink = FigureSink(out)
    for a in analyses.ANALYSES:
        if a.paper_figures:
            a.paper_figures(r, sink)
    for a in analyses.ANALYSES:
        if a.evidence_figures:
            a.evidence_figures(r, sink)
    return sink.figs, sink.why


def draw_stage_figures(r: Mapping[str, Any]) -> None:
    """Every stage's own figures (and Table 5) of a reproduction, at the paths its results
    record (each analysis' ``stage_figures``)."""
    for a in analyses.ANALYSES:
        if a.stage_figures:
            a.stage_figures(r)


def _header(r: Mapping[str, Any]) -> str:
    cfg = r.get("config") or {}
    scale = cfg.get("scale")
    corpus = cfg.get("corpus")
    scale_text = {
        "quick": "quick (the embedded default; CPU)",
        "corpus": f"corpus ({corpus})",
        "paper": f"paper ({corpus})",
    }.get(scale, str(scale))
    model = get_path(r, "lm", "model")
    return (
        "# Reproduction report: On Retrieval Augmentation and the Limitations of Language "
        "Model Training (Chiang et al., NAACL 2024)\n\n"
        f"Scale: **{scale_text}**."
        + (f" Model: `{model}`." if model else "")
        + " Perplexities are token-weighted over every scored token; log-likelihoods are in "
        "nats. Settings differ from the paper's unless the scale is `paper`, so compare the "
        "directions and sizes of effects, not absolute numbers. The paper's table cells are not "
        "in the copy of the paper this toolkit ships with; the values its text states are "
        "quoted in the criteria.\n\n"
    )


def _claims_section(claims: list[dict]) -> str:
    return (
        "## Claims\n\n"
        "Each of the paper's claims is decided by the paper's own sentence, quoted in its "
        "criterion with how it is made measurable; our stricter checks are findings of their "
        "own, each with its own line. A verdict is `held` (the one-sided 95% interval excludes "
        "no effect and the mean reaches the minimum effect), `not held` (only when the interval "
        "lies below the minimum effect: the evidence excludes the paper's effect), "
        "`inconclusive` (the interval cannot decide; a power line says how many seeds or "
        "positions would), or `untestable here` (the section did not run, or what the claim is "
        "read on is missing). The interval is over seeds where there are 3 or more, else a "
        "seeded paired bootstrap over the scored tokens or positions (each verdict says which). "
        "Tuning is on valid (or a dev share), verdicts on test.\n\n" + claims_table(claims) + "\n\n"
    )


def _section(title: str, key: str, fn: Callable, r: Mapping[str, Any], figs: dict) -> str:
    if not r.get(key):
        return f"## {title}\n\nNot run in this invocation (no `{key}` results).\n\n"
    try:
        return fn(r, figs)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        why = f"they lack {e}" if isinstance(e, KeyError) else str(e)
        return f"## {title}\n\nThe `{key}` results are incomplete, so this section is not shown: {why}.\n\n"


def render_markdown(
    r: Mapping[str, Any], figs: Mapping[str, Any], why: Mapping[str, str] | None = None
) -> str:
    """report.md from the results (with ``r["claims"]``) and the figure paths."""
    body = [_header(r)]
    if r.get("provenance"):
        body.append(run_sections.provenance_section(r))
    body.append(_claims_section(r["claims"]))
    body += [
        _section(a.title, a.key, a.section, r, dict(figs)) for a in analyses.ANALYSES if a.section
    ]
    if why:
        body.append(
            "## Figures not drawn\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in sorted(why.items()))
            + "\n"
        )
    body.append(run_sections.not_run_section(r, figs))
    if r.get("stages"):
        body.append(run_sections.stages_section(r, figs))
    return "".join(body)


def write_paper_report(out: Path, results: dict) -> dict:
    """Write results.json (with the claims), report.md, report.html and figures/*.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs, why = draw_figures(results, out)
    results["claims"] = analyses.make_claims(results)
    results["figures"] = {k: v for k, v in figs.items() if v}
    # Per-position KL lists are large; the report keeps their statistics and histogram.
    # Table 4's per-position log-probabilities stay: its claim is re-read from them.
    for where in (("lr_0.1",), ("lr_0.001",), ("lr_0.1", "converged")):
        for name in ("proj_f", "proj_fg", "proj_f_lm_head", "proj_f_target_first"):
            q = get_path(results, "projection", *where, name)
            if isinstance(q, dict):
                q.pop("kl", None)
    md = render_markdown(results, figs, why)
    if (out / "inspect.html").is_file():  # knnlm reproduce's static inspect page (knnlm.inspect)
        md += "## What the kNN-LM retrieved\n\n[inspect.html](inspect.html): per token, the neighbours and p_lm, p_knn and the mixture, for a natural-text passage and Macondo test sentences.\n"
    write_json_atomic(out / "results.json", results)
    write_report(out, md, "knnlm reproduction report")
    return results


def write_reproduction_report(out: str | Path, results: dict) -> dict:
    """The report of a :func:`knnlm.experiments.reproduce.reproduce` run in ``out``: each
    stage's own figures (and Table 5) where its results point, then :func:`write_paper_report`.
    Returns the results with the claims."""
    draw_stage_figures(results)
    return write_paper_report(Path(out).expanduser(), results)
