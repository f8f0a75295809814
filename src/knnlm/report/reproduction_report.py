"""The reproduction report: the claims table, Tables 1-5, the paper's figures, what was not run.

Every number in ``report.md`` is formatted by :func:`knnlm.report.tables.fmt_number` from the
value stored in ``results.json``, so the two always agree. A section the run did not produce
(a partial run) is rendered as "not run" and its claim as "untestable here".
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.fileio import write_json_atomic
from knnlm.report import evidence_figures as E
from knnlm.report import figures as F
from knnlm.report import markdown_sections
from knnlm.report.claims import HURDLE_FIRST_PART, make_claims
from knnlm.report.experiment_figures import draw_stage_figures
from knnlm.report.html import write_report
from knnlm.report.macondo import macondo_section
from knnlm.report.seed_figures import plot_figure1, plot_hurdle_runs
from knnlm.report.tables import claims_table

# (title shown when the section is absent, results key, renderer)
_SECTIONS: tuple[tuple[str, str, Callable[[Mapping[str, Any], Mapping[str, Any]], str]], ...] = (
    ("kNN-LM (Section 2)", "knnlm", markdown_sections.knnlm_section),
    ("Capacity of the last layers (Section 3)", "projection", markdown_sections.projection_section),
    ("Generalization from over-specification: Macondo (Section 4)", "macondo", macondo_section),
    ("An MLP instead of retrieval (Section 5)", "memory", markdown_sections.memory_section),
    ("The last-MLP hurdle (Appendix E)", "hurdle", markdown_sections.hurdle_section),
)


def _copy_figure(src: Any, out: Path, name: str) -> str | None:
    if not src or not Path(src).is_file():
        return None
    dst = out / "figures" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if Path(src).resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return f"figures/{name}"


def _get(r: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(r, Mapping):
            return None
        r = r.get(k)
    return r


def _final_mlp(m: Mapping[str, Any]) -> dict[str, float] | None:
    """The LM + MLP's test log-likelihood per n, mean over seeds (a marker on Figure 1)."""
    rows = [(p.get("test") or {}).get("mlp") for p in m.get("per_seed") or []]
    if not rows or any(not row for row in rows):
        return None
    return {str(n): sum(row[str(n)] for row in rows) / len(rows) for n in rows[0]}


def draw_figures(r: Mapping[str, Any], out: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """Draw Figures 1, 4, 5 (and the KL plots when the per-position data is there) from the
    results; copy the figures the pipeline drew otherwise. Returns (figure paths relative to
    ``out``, why a figure is missing)."""
    figdir = out / "figures"
    figs: dict[str, str | None] = {}
    why: dict[str, str] = {}

    def draw(key: str, name: str, fn: Callable[[Path], Any], fallback: Any = None) -> None:
        try:
            fn(figdir / name)
            figs[key] = f"figures/{name}"
        except (KnnlmError, KeyError, TypeError, ValueError) as e:
            figs[key] = _copy_figure(fallback, out, name)
            if figs[key] is None:
                why[key] = str(e)

    mac, hur = r.get("macondo") or {}, r.get("hurdle") or {}
    if mac.get("curves"):
        draw("figure1", "figure1_macondo.png",
             lambda p: plot_figure1(mac["curves"], p, final_mlp=_final_mlp(mac)), mac.get("figure1"))  # fmt: skip
    else:
        figs["figure1"] = _copy_figure(mac.get("figure1"), out, "figure1_macondo.png")
    for key, curve, name, ylabel, title in (
        ("figure4", "loglik", "figure4_hurdle.png", "log-likelihood of the child's name",
         "Macondo (Figure 4)"),
        ("figure5", "loss", "figure5_loss.png", "training loss",
         "Natural-text training loss (Figure 5)"),
    ):  # fmt: skip
        if hur.get(curve):
            draw(key, name, lambda p, c=hur[curve], y=ylabel, t=title: plot_hurdle_runs(c, y, p, t),
                 hur.get(key))  # fmt: skip
        else:
            figs[key] = _copy_figure(hur.get(key), out, name)
    p1, p3 = _get(r, "projection", "lr_0.1"), _get(r, "projection", "lr_0.001")
    if _get(p1, "proj_f", "kl") is not None:
        # The converged solve's KL where there is one: claim (b) reads it.
        conv = p1.get("converged") or {}
        src = conv if _get(conv, "proj_f", "kl") is not None else p1
        draw("kl_hist", "projection_kl_hist.png",
             lambda p: F.plot_kl_hist(src["proj_f"]["kl"], src["proj_fg"]["kl"], p, bound=0.1,
                                      title="converged solve" if src is not p1 else None),
             p1.get("figure"))  # fmt: skip
    else:
        figs["kl_hist"] = _copy_figure(_get(p1, "figure"), out, "projection_kl_hist.png")
    if _get(p3, "proj_f", "kl_curve") is not None:
        draw("kl_steps", "projection_kl_steps.png",
             lambda p: F.plot_kl_steps(p3["proj_f"]["kl_curve"], p3["proj_fg"]["kl_curve"], p, lr=1e-3),
             p3.get("figure"))  # fmt: skip
    else:
        figs["kl_steps"] = _copy_figure(_get(p3, "figure"), out, "projection_kl_steps.png")
    figs["sweep"] = _copy_figure(_get(r, "knnlm", "figure"), out, "sweep_heatmap.png")
    _draw_evidence(r, draw)
    return figs, why


def _draw_evidence(r: Mapping[str, Any], draw: Callable[..., None]) -> None:
    """The figures of what the verdicts read (:mod:`knnlm.report.evidence_figures`)."""
    mac, hur = r.get("macondo") or {}, r.get("hurdle") or {}
    p1 = _get(r, "projection", "lr_0.1")
    if mac.get("per_seed"):
        draw("macondo_gains", "macondo_gains.png", lambda p: E.plot_macondo_gains(mac, p))
    for key, curve, higher, ylabel in (
        ("hurdle_gaps_loglik", "loglik", True, "log-likelihood advantage (nats)"),
        ("hurdle_gaps_loss", "loss", False, "training-loss advantage (nats)"),
    ):  # fmt: skip
        if hur.get(curve):
            draw(key, f"{key}.png", lambda p, c=hur[curve], h=higher, y=ylabel:
                 E.plot_hurdle_gaps(c, h, HURDLE_FIRST_PART, y, p))  # fmt: skip
    if _get(r, "width_study", "rows"):
        draw("width", "projection_width.png", lambda p: E.plot_width(r["width_study"]["rows"], p))
    if _get(p1, "converged", "proj_f", "kl_curve_bands") is not None:
        draw("kl_solves", "projection_kl_solves.png", lambda p: E.plot_kl_solves(p1, p))


def _header(r: Mapping[str, Any]) -> str:
    cfg = r.get("config") or {}
    scale = cfg.get("scale")
    corpus = cfg.get("corpus")
    scale_text = {
        "quick": "quick (the embedded default; CPU)",
        "corpus": f"corpus ({corpus})",
        "paper": f"paper ({corpus})",
    }.get(scale, str(scale))
    model = _get(r, "lm", "model")
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
        "Each verdict is `held`, `not held`, or `untestable here` (the section did not run, or "
        "the claim's premise failed, so there is nothing for it to explain). Tuning is on "
        "valid, verdicts on test.\n\n" + claims_table(claims) + "\n\n"
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
        body.append(markdown_sections.provenance_section(r))
    body.append(_claims_section(r["claims"]))
    body += [_section(title, key, fn, r, dict(figs)) for title, key, fn in _SECTIONS]
    if why:
        body.append(
            "## Figures not drawn\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in sorted(why.items()))
            + "\n"
        )
    body.append(markdown_sections.not_run_section(r, figs))
    if r.get("stages"):
        body.append(markdown_sections.stages_section(r, figs))
    return "".join(body)


def write_paper_report(out: Path, results: dict) -> dict:
    """Write results.json (with the claims), report.md, report.html and figures/*.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs, why = draw_figures(results, out)
    results["claims"] = make_claims(results)
    results["figures"] = {k: v for k, v in figs.items() if v}
    # Per-position KL lists are large; the report keeps their statistics and histogram.
    # Table 4's per-position log-probabilities stay: its claim is re-read from them.
    for where in (("lr_0.1",), ("lr_0.001",), ("lr_0.1", "converged")):
        for name in ("proj_f", "proj_fg", "proj_f_lm_head", "proj_f_target_first"):
            q = _get(results, "projection", *where, name)
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
