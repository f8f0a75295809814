"""Figures and tables of the experiment commands, drawn from the results they saved.

The experiments compute and save numbers only; these functions turn one experiment's results
(as returned, or as read back from its folder) into the files a reader looks at, under the
names the experiment declares. :func:`draw_stage_figures` does it for every stage of a
reproduction, from its assembled results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from knnlm.experiments.hurdle import RESULT_FILE
from knnlm.experiments.macondo import FIGURE_CURVES, FIGURE_GROUPS, RESULTS, TABLE, contract_view
from knnlm.experiments.stats import mean_std_rows
from knnlm.fileio import write_json_atomic, write_text_atomic
from knnlm.report import figures as F
from knnlm.report.macondo import table5
from knnlm.report.tables import settings_line


def render_macondo(out: str | Path, results: Mapping[str, Any]) -> None:
    """``table5.md``, ``figure1.png`` and (with curves) ``figure3.png`` of a Macondo run."""
    out = Path(out).expanduser()
    settings = results["settings"]
    n_seeds = len(settings["seeds"])
    model = settings["model"] or f"{settings['scratch_architecture']} GPT-2 trained from scratch"
    md = [
        "# Macondo: log-likelihood of the child's name (Table 5)",
        "",
        table5(contract_view(results)),
        "",
        f"Model: {model}; preset {settings['preset']}; mean ± sample std over {n_seeds} seed(s).",
        "",
        f"Reproduced: {results['reproduced']['summary']}",
        "",
        "Settings: "
        + settings_line({k: v for k, v in settings.items() if k != "knn_weight_convention"}),
        "",
    ]
    write_text_atomic(out / TABLE, "\n".join(md))
    F.plot_macondo_groups(
        results["groups"], out / FIGURE_GROUPS, title=f"Macondo: {model} ({n_seeds} seeds)"
    )
    if results.get("curves"):
        c = results["curves"]
        F.plot_macondo_curves(
            c["steps"],
            {n: {"lm": g["lm"], "knnlm": g.get("knnlm")} for n, g in c["groups"].items()},
            out / FIGURE_CURVES,
            title=f"Macondo during fine-tuning: {model}",
        )


def render_hurdle(out: str | Path, result: dict) -> dict:
    """``figure4.png`` (and with a corpus ``figure5.png``) of a hurdle run; records their
    paths under ``result["figures"]`` and in ``hurdle.json``. Returns ``result``."""
    out = Path(out).expanduser()
    s = result["settings"]
    arch, n_seeds = s["preset"]["name"], len(s["seeds"])
    w, wo = result["with_mlp"], result["without_mlp"]
    figures = {
        "figure4": str(
            F.plot_hurdle(
                w["steps"], w["loglik"], w["loglik_std"], wo["loglik"], wo["loglik_std"],
                ylabel="mean log-likelihood of the child", path=out / "figure4.png",
                title=f"Macondo test set ({arch}, {n_seeds} seeds)",
            )
        )
    }  # fmt: skip
    if s.get("corpus") is not None:
        # The loss on fixed training blocks, logged like Figure 4 (step 0 included).
        # (sample std over seeds, as everywhere in the report)
        ev = {v: mean_std_rows(r["loss_eval_per_seed"]) for v, r in (("w", w), ("wo", wo))}
        corpus = s["corpus"]["corpus"]
        figures["figure5"] = str(
            F.plot_hurdle(
                w["loss_eval_steps"], ev["w"][0], ev["w"][1], ev["wo"][0], ev["wo"][1],
                ylabel="training loss (fixed training blocks)", path=out / "figure5.png",
                title=f"{Path(corpus).name or corpus} ({arch}, {n_seeds} seeds)",
            )
        )  # fmt: skip
    result["figures"] = figures
    write_json_atomic(out / RESULT_FILE, result)
    return result


def render_sweep(figure: str | Path) -> Path | None:
    """The (weight x temperature) heatmap of one ``knnlm`` stage, from the ``sweep.json``
    saved beside where it goes. None when that file is not there."""
    figure = Path(figure)
    data_file = figure.with_suffix(".json")
    if not data_file.is_file():
        return None
    d = json.loads(data_file.read_text())
    return F.plot_sweep_heatmap(
        d["weights"], d["temperatures"], d["valid"], figure,
        title=f"kNN-LM valid perplexity, LM seed {d.get('seed', '?')} (k={d['k']})",
        lm_ppl=d["lm_ppl"],
    )  # fmt: skip


def render_projection(result: Mapping[str, Any], lr_study: bool) -> Path | None:
    """A projection stage's figure at ``result["figure"]``: the KL histogram (Table 3's run)
    or the KL over steps (Appendix E's fixed-steps run). None without the data."""
    f, fg = result.get("proj_f") or {}, result.get("proj_fg") or {}
    if not result.get("figure"):
        return None
    if lr_study:
        if f.get("kl_curve") is None:
            return None
        return F.plot_kl_steps(f["kl_curve"], fg["kl_curve"], result["figure"], lr=1e-3)
    if f.get("kl") is None:
        return None
    return F.plot_kl_hist(f["kl"], fg["kl"], result["figure"])


def draw_stage_figures(r: Mapping[str, Any]) -> None:
    """Every stage's own figures (and Table 5) of a reproduction, at the paths its results
    record: each seed's sweep heatmap, the two projection plots, the Macondo and hurdle
    outputs (drawn from the results files of those runs)."""
    knn = r.get("knnlm") or {}
    for p in knn.get("per_seed") or []:
        if p.get("figure"):
            render_sweep(p["figure"])
    proj = r.get("projection") or {}
    for key, lr_study in (("lr_0.1", False), ("lr_0.001", True)):
        if proj.get(key):
            render_projection(proj[key], lr_study)
    for part, anchor, name, render in (
        ("macondo", "table5", RESULTS, render_macondo),
        ("hurdle", "figure4", RESULT_FILE, render_hurdle),
    ):
        where = (r.get(part) or {}).get(anchor)
        if where and (Path(where).parent / name).is_file():
            folder = Path(where).parent
            render(folder, json.loads((folder / name).read_text()))
