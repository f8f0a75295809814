"""Report sections for the natural-text part (Sections 2, 3, 5), Appendix E and the run itself.

Each renderer takes the whole results dict and the figure paths and returns Markdown; it
assumes its section is present (``reproduction_report.py`` says "not run" otherwise). Numbers over seeds
are "mean ± sample std" (:func:`knnlm.report.tables.fmt_pm`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from knnlm.report.claims import (
    HURDLE_FIRST_PART,
    MEMORY_STORAGE_MAX,
    early_gaps,
    storage_fractions,
)
from knnlm.report.claims_projection import KL_MEAN_MAX, gap_share
from knnlm.report.tables import fmt_number, fmt_pm, markdown_table, settings_table


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


def seeds_note(per_seed: Sequence[Mapping[str, Any]]) -> str:
    n = len(per_seed)
    names = ", ".join(str(p.get("seed", i)) for i, p in enumerate(per_seed))
    if n == 1:
        return f"one seed ({names}), so no spread"
    return f"mean ± sample std over {n} seeds ({names})"


def _values(xs: Sequence[Any], fmt: str = "g") -> str:
    """One value if every seed agrees, else the per-seed values joined by " / "."""
    shown = [_f(x, fmt) for x in xs]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def _figure(figs: Mapping[str, Any], key: str, alt: str) -> str:
    return f"![{alt}]({figs[key]})\n\n" if figs.get(key) else ""


def _settings(s: Mapping[str, Any] | None) -> str:
    return f"Settings:\n\n{settings_table(s)}\n\n" if s else ""


# ----------------------------------------------------------------------------- Section 2


def knnlm_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    k = r["knnlm"]
    per = k["per_seed"]
    ps = k.get("paper_setting") or {}

    def col(split: str, key: str) -> str:
        return fmt_pm([p[split].get(key) for p in per])

    t1 = markdown_table(
        ["model", "weight w", "temperature T", "chosen on", "valid", "test"],
        [
            ["LM", None, None, None, col("valid", "lm"), col("test", "lm")],
            ["kNN-LM, paper's setting", _f(ps.get("knn_weight"), "g"),
             _f(ps.get("temperature"), "g"), "fixed (paper)", col("valid", "knnlm_paper"),
             col("test", "knnlm_paper")],
            ["kNN-LM, tuned", _values([p["tuned"]["knn_weight"] for p in per]),
             _values([p["tuned"]["temperature"] for p in per]),
             _values([p["tuned"].get("tuned_on") for p in per], ""),
             col("valid", "knnlm_tuned"), col("test", "knnlm_tuned")],
        ],
        align=["l", "r", "r", "l", "r", "r"],
    )  # fmt: skip
    t_seed = markdown_table(
        ["seed", "w", "T", "valid tokens", "test tokens", "LM valid", "kNN-LM tuned valid",
         "LM test", "kNN-LM paper test", "kNN-LM tuned test"],
        [[p.get("seed"), p["tuned"]["knn_weight"], p["tuned"]["temperature"],
          p["valid"].get("tokens"), p["test"].get("tokens"), p["valid"]["lm"],
          p["valid"].get("knnlm_tuned"), p["test"]["lm"], p["test"].get("knnlm_paper"),
          p["test"]["knnlm_tuned"]] for p in per],
        floatfmt=["", "g", "g", "", "", ".2f", ".2f", ".2f", ".2f", ".2f"],
    )  # fmt: skip
    return (
        "## kNN-LM (Section 2)\n\n"
        f"**LM and kNN-LM** (the first rows of the paper's Tables 1 and 2). Token-weighted perplexity, {seeds_note(per)}. The tuned "
        "(w, T) is the argmin of the valid perplexity over the sweep, per seed; the verdict is "
        "read on test. w is the weight on p_knn (the paper's λ = 1 - w).\n\n"
        f"{t1}\n\nPer seed:\n\n{t_seed}\n\n"
        + _settings(k.get("settings"))
        + _figure(
            figs, "sweep", "valid perplexity over the weight x temperature sweep, first LM seed"
        )
    )


# ----------------------------------------------------------------------------- Section 3

_PROJ = (("proj_f", "f(z*)"), ("proj_fg", "f∘g(z*)"))


def _capped(p: Mapping[str, Any], q: Mapping[str, Any]) -> str:
    return f"{_f(q.get('capped'))} of {_f(p.get('positions'))}"


def _projection_rows(p: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, solve) for the paper's rule, the converged solve and its sensitivity rows."""
    rows = [(f"{name}, paper's rule", p[key]) for key, name in _PROJ]
    conv = p.get("converged") or {}
    rows += [(f"{name}, converged", conv[key]) for key, name in _PROJ if key in conv]
    rows += [(f"f(z*) {label}, converged", conv[key]) for key, label in (
        ("proj_f_lm_head", "without final norm"),
        ("proj_f_target_first", "for KL[p_knnlm ‖ f(z)]"),
    ) if key in conv]  # fmt: skip
    return rows


def width_text(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    """Section 3 against model width (``reproduce --width-study``), or why it is absent."""
    w = r.get("width_study")
    if not w or not w.get("rows"):
        return ("Width study: not run (`knnlm reproduce --width-study 64,128,256`; the paper's "
                "claim is made at d = 1024).\n\n")  # fmt: skip
    rows = [
        [row["d"], row.get("params"), row["lm"], row["knnlm"]]
        + [None if row[k]["share"] is None else f"{_f(100 * row[k]['share'], '.0f')}%"
           for k in ("proj_f", "proj_fg")]
        + [row["proj_f"]["kl_mean"], row["proj_f"]["kl_init_mean"]]
        for row in w["rows"]
    ]  # fmt: skip
    table = markdown_table(
        ["d", "parameters", "LM", "kNN-LM", "f(z*) closes", "f∘g(z*) closes", "KL f(z*)",
         "starting KL"],
        rows, floatfmt=["", "", ".2f", ".2f", "", "", ".4f", ".4f"], align=["r"] * 8,
    )  # fmt: skip
    return (
        f"**Width study.** The run's LM preset at each width d (LM seed {w.get('seed')}), each "
        "with its own datastore and valid-tuned kNN-LM, Eq. 2 solved to convergence on its "
        f"test positions (the paper: d = 1024).\n\n{table}\n\n"
        + _figure(figs, "width", "share of the gap closed and KL against width")
    )


def projection_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    proj = r["projection"]
    p = proj["lr_0.1"]
    t1, t3 = _table1(p), _table3(p)
    md = (
        "## Capacity of the last layers (Section 3)\n\n"
        f"**Table 1.** Perplexity on the same {_f(p['positions'])} positions of "
        f"the {p.get('split', '?')} split (LM seed {p.get('seed', '?')}), kNN-LM at the "
        "valid-tuned setting. Eq. 2 solved twice: the paper's rule (Adam at lr 0.1, each position "
        f"stops when its KL moves by less than the tolerance, or at the {_f(p.get('max_steps'))}"
        "-step cap), and to convergence (L-BFGS, best z kept, relative KL change <= "
        f"{_f((p.get('converged') or {}).get('tol'), 'g')}), which claim (b) reads. Sensitivity:"
        ' f without its final norm (the paper\'s "last linear layer with softmax"), and the '
        "other KL direction.\n\n"
        f"{t1}\n\n"
        f"**Table 3.** KL[f(z*) ‖ p_knnlm] at the solution, the quantity Eq. 2 minimises (the "
        f"paper: mean under {KL_MEAN_MAX:g}; the KL[p_knnlm ‖ f(z)] row is in its own "
        f"direction).\n\n{t3}\n\n"
        + _settings(p.get("settings"))
        + _figure(figs, "kl_hist", "per-position KL[f(z*) ‖ p_knnlm]")
        + _figure(figs, "kl_solves", "KL against step: the paper's rule and the converged solve")
        + width_text(r, figs)
    )
    q = proj.get("lr_0.001")
    return md + _table4_text(q, figs) if q else md


def _table1(p: Mapping[str, Any]) -> str:
    """Perplexity of each solve, and the share of the LM -> kNN-LM gap it closes."""
    lm, knn = p["lm"]["perplexity"], p["knnlm"]["perplexity"]
    rows = _projection_rows(p)
    return markdown_table(
        ["model", "perplexity", "share of the LM -> kNN-LM gap closed"],
        [["LM", lm, None], ["kNN-LM", knn, None]]
        + [[name, q["perplexity"],
            None if lm == knn else f"{_f(100 * gap_share(lm, q['perplexity'], knn), '.0f')}%"]
           for name, q in rows],
        align=["l", "r", "r"],
    )  # fmt: skip


def _table3(p: Mapping[str, Any]) -> str:
    """The KL at each solve's solution, how much of the starting KL it removed, and steps."""
    rows = _projection_rows(p)
    return markdown_table(
        ["solve", "KL mean", "KL median", "starting KL", "KL removed", "steps (mean)",
         "positions at tolerance / at the cap"],
        [[name, q["kl_mean"], q.get("kl_median"), q.get("kl_init_mean"),
          None if q.get("kl_removed") is None else f"{_f(100 * q['kl_removed'], '.0f')}%",
          q.get("steps_mean"),
          f"{_f(q.get('at_tolerance'))} / {_f(q.get('capped'))} of {_f(p.get('positions'))}"]
         for name, q in rows],
        floatfmt=["", ".4f", ".4f", ".4f", "", ".1f", ""],
        align=["l", "r", "r", "r", "r", "r", "r"],
    )  # fmt: skip


def _table4_text(q: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    """Table 4 (Appendix E: lr 1e-3 for a fixed number of steps) with its caption and figure."""
    t4 = markdown_table(
        ["model", "perplexity", "KL mean", "positions at the step cap"],
        [["LM", q["lm"]["perplexity"], None, None],
         ["kNN-LM", q["knnlm"]["perplexity"], None, None]]
        + [[name.replace("*", ""), q[key]["perplexity"], q[key]["kl_mean"], _capped(q, q[key])]
           for key, name in _PROJ],
        floatfmt=["", ".2f", ".4f", ""],
        align=["l", "r", "r", "r"],
    )  # fmt: skip
    return (
        f"**Table 4.** Learning rate 1e-3 for {_f(q.get('max_steps'))} steps "
        f"({_f(q['positions'])} positions of the {q.get('split', '?')} split): the paper "
        "finds f∘g harder to solve than f at a small learning rate (Appendix E).\n\n"
        f"{t4}\n\n" + _figure(figs, "kl_steps", "mean KL[f(z) ‖ p_knnlm] over steps")
    )


# ----------------------------------------------------------------------------- Section 5


def memory_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    m = r["memory"]
    per = m["per_seed"]
    st = m["storage"]
    frac, frac_w = storage_fractions(st)
    ds_bytes = st["datastore_bytes"] + st["index_bytes"]

    def col(split: str, key: str) -> str:
        return fmt_pm([p[split].get(key) for p in per])

    t2 = markdown_table(
        ["model", "valid", "test", "storage (bytes)", "storage / (datastore + index)"],
        [
            ["LM", col("valid", "lm"), col("test", "lm"), None, None],
            ["LM + kNN (tuned on valid)", None, col("test", "knnlm_tuned"), ds_bytes, "100%"],
            ["LM + MLP", col("valid", "mlp"), col("test", "mlp"), st["memory_bytes"],
             f"{_f(100 * frac)}%"],
            ["LM + MLP, W shared with the LM not counted", col("valid", "mlp"), col("test", "mlp"),
             st["memory_bytes_without_shared_W"], f"{_f(100 * frac_w)}%"],
        ],
        align=["l", "r", "r", "r", "r"],
    )  # fmt: skip
    shares = [
        None
        if p["test"].get("knnlm_tuned") is None or not p["test"]["knnlm_tuned"] < p["test"]["lm"]
        else 100 * gap_share(p["test"]["lm"], p["test"]["mlp"], p["test"]["knnlm_tuned"])
        for p in per
    ]
    t_seed = markdown_table(
        ["seed", "MLP weight (valid)", "LM test", "kNN-LM test", "LM + MLP test",
         "share of the kNN-LM gain"],
        [[p.get("seed"), p.get("weight"), p["test"]["lm"], p["test"].get("knnlm_tuned"),
          p["test"]["mlp"], None if s is None else f"{_f(s, '.0f')}%"]
         for p, s in zip(per, shares, strict=True)],
        floatfmt=["", "g", ".2f", ".2f", ".2f", ""],
        align=["r", "r", "r", "r", "r", "r"],
    )  # fmt: skip
    return (
        "## An MLP instead of retrieval (Section 5)\n\n"
        f"**Table 2.** Token-weighted perplexity, {seeds_note(per)}; the MLP's interpolation "
        "weight is chosen on valid per seed. Storage is measured from the files: datastore "
        f"{st['datastore_bytes']} bytes of keys and values, index {st['index_bytes']} bytes. "
        f'The paper\'s bound is under {100 * MEMORY_STORAGE_MAX:g}% ("over 25x smaller").\n\n'
        f"{t2}\n\nShare of the kNN-LM's test gain the MLP gets, (LM - LM+MLP) / (LM - kNN-LM): "
        f"{fmt_pm([s for s in shares if s is not None], '.0f')}"
        f"{'%' if any(s is not None for s in shares) else ''} (the paper: the MLP does not "
        "fully close the gap on WikiText).\n\n"
        f"Per seed:\n\n{t_seed}\n\n" + _control_line(per) + _settings(m.get("settings"))
    )


def _control_line(per: Sequence[Mapping[str, Any]]) -> str:
    """Section 5's equal-compute control per seed (claim (d) needs the MLP below it)."""
    rows = [(p.get("seed"), p.get("control") or {}) for p in per]
    if not any(c.get("test") for _, c in rows):
        return "No equal-compute control in this run.\n\n"
    parts = [
        f"seed {s}: {_f(c['test']['control'])} (w={_f(c.get('weight'), 'g')}, "
        f"{_f((c.get('train') or {}).get('steps'))} steps)"
        for s, c in rows
        if c.get("test")
    ]
    return (
        "Equal-compute control, the LM trained on for the MLP's optimiser steps and tokens and "
        "interpolated like it (weight chosen on valid), test perplexity: "
        + "; ".join(parts)
        + ".\n\n"
    )


# ----------------------------------------------------------------------------- Appendix E


def _hurdle_lines(curve: Mapping[str, Any], higher: bool, what: str) -> str:
    gaps, used = early_gaps(curve, higher)
    if not gaps:
        return f"- {what}: no evaluation between step 0 and half of training.\n"
    return (
        f"- {what}: over steps {used[0]}..{used[-1]} ({len(used)} evaluations, step 0 "
        f"excluded), the advantage of the model without the last MLP (nats, positive = ahead) "
        f"per seed: {', '.join(_f(g, '.3f') for g in gaps)}.\n"
    )


def hurdle_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    h = r["hurdle"]
    params = h.get("params") or {}
    md = "## The last-MLP hurdle (Appendix E)\n\n"
    if params:
        md += (
            "Two models trained from scratch, identical but for the last block's MLP "
            f"({_f(params.get('with_mlp'))} vs {_f(params.get('without_mlp'))} parameters).\n\n"
        )
    n = len(h["loglik"]["with_mlp"])
    md += (
        f"Figures show the mean over {n} seed(s), with ± sample std bands when there are "
        f"several; the shaded part, up to {HURDLE_FIRST_PART:g} of training, is what claim (e) "
        "reads.\n\n"
    )
    md += _hurdle_lines(h["loglik"], True, "Macondo log-likelihood (Figure 4)")
    if h.get("loss") is not None:
        md += _hurdle_lines(h["loss"], False, "natural-text training loss (Figure 5)")
    else:
        md += "- Natural-text training loss (Figure 5): not recorded in this run.\n"
    md += _horizon(h) + "\n"
    md += _figure(figs, "figure4", "Figure 4") + _figure(figs, "figure5", "Figure 5")
    md += _figure(figs, "hurdle_gaps_loglik", "per-seed gap, Macondo log-likelihood")
    md += _figure(figs, "hurdle_gaps_loss", "per-seed gap, natural-text training loss")
    return md + _settings(h.get("settings"))


def _meet(curve: Mapping[str, Any], higher: bool) -> str:
    """Where the mean curves meet: the first evaluation after step 0 at which the model without
    the last MLP stops being ahead, or that it stays ahead (or behind) throughout."""
    steps = [int(x) for x in curve["steps"]]
    a = [sum(col) / len(col) for col in zip(*curve["with_mlp"], strict=True)]
    b = [sum(col) / len(col) for col in zip(*curve["without_mlp"], strict=True)]
    gap = [(y - x) if higher else (x - y) for x, y in zip(a, b, strict=True)]
    later = [(s, g) for s, g in zip(steps, gap, strict=True) if s > 0]
    if not later:
        return "no evaluation after step 0"
    first_sign = later[0][1] > 0
    for s, g in later:
        if (g > 0) != first_sign:
            return f"the mean curves cross at step {s} (the model without it {'falls behind' if first_sign else 'moves ahead'})"
    return f"the mean curves do not cross: without the last MLP stays {'ahead' if first_sign else 'behind'} up to step {later[-1][0]}"


def _horizon(h: Mapping[str, Any]) -> str:
    """The run's training horizon next to the paper's, and where the curves meet."""
    st = h.get("settings") or {}
    out = (
        f"- Horizon: {_f(st.get('steps'))} training steps, evaluated every "
        f"{_f(st.get('eval_every'))} (the paper reads the first 4,000 steps of GPT-2 small, "
        "evaluated every 1,000); Figure 4: " + _meet(h["loglik"], True)
    )
    if h.get("loss") is not None:
        out += "; Figure 5: " + _meet(h["loss"], False)
    return out + ".\n"


# ----------------------------------------------------------------------------- the run


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
        md += f"\n\nTotal wall time of this invocation: {_f(r['wall_seconds'], '.1f')} s."
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
