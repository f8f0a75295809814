"""Section 4 of the paper: generalisation from over-specified training sentences (Macondo).

Claim (c) for the kNN-LM and the finding (c') for the MLP memory, with the same two premises and
the same paired test over seeds; Table 5 (per-n log-likelihood of the children); Figure 1/3 and
the per-seed gains. :func:`table5` reads ``results["macondo"]`` of the results contract, so the
stand-alone Macondo run and the reproduction print the same table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from knnlm.experiments.macondo.run import RESULTS
from knnlm.experiments.stats import (
    MIN_SEEDS,
    Interval,
    bootstrap_interval,
    mean_std,
    seed_interval,
    t_test_p,
)
from knnlm.report.analysis import Analysis, Claim, FigureSink
from knnlm.report.macondo_figures import plot_figure1, plot_macondo_gains, render_macondo, table5
from knnlm.report.section_parts import lm_description
from knnlm.report.tables import fmt_number, fmt_pm, markdown_table
from knnlm.report.verdicts import UNTESTABLE, interval_text, judge, per_seed, verdict

# Section 4's headline: "In this section, we identify a limitation of LM training that may cause
# the performance gap: The failure to generalize from over-specified descriptions." (§4), read
# through "the fine-tuned GPT-2 model has a likelihood much lower than the theoretical perfect
# likelihood (log(1/# of children)). It indicates that it cannot generalize from
# over-specification." (§4.3). Measurable: per seed, log(1/n) minus the LM's mean test
# log-likelihood of the children, averaged over n; held if it is at least HEADLINE_MIN_GAP
# nats. Minimum effect: "much lower" is read as at least 0.5 nats (the child gets at most
# e^-0.5 ≈ 61% of the probability a perfect model gives it); Figure 1's LM sits several nats
# below log(1/n).
HEADLINE_MIN_GAP = 0.5
# The headline's premise, the paper's own setup: it fine-tunes for 50 epochs (App. C), long
# enough that the LM knows its training statements, so its test shortfall is a failure to
# generalise, not under-training. Here: the LM's mean log-likelihood of the children of its
# *training* sentences is at least log(1/n) - FIT_MARGIN_NATS for every n in every seed.
FIT_MARGIN_NATS = 0.5
# (c): "Figure 1 shows that the kNN-augmented model performs better than the vanilla model"
# (§4.3). Measurable: the paired test gain (augmented minus LM test log-likelihood, averaged
# over n, same seed and dataset, on the parents not used to choose the settings). Minimum
# effect: the paper prints Table 5's numbers only as an image in our copy; in Figure 1 the
# kNN-LM's dotted lines stand visibly apart from the LM's on an axis where the log(1/n)
# reference lines are log(5/4) = 0.22 nats apart at the closest, so a real gain is taken to
# be at least a quarter of that: 0.05 nats.
MACONDO_MIN_GAIN = 0.05
MACONDO_P = 0.05  # kept for the one-sided t-test p shown beside the interval
_GAIN_SOURCE = "a quarter of the closest log(1/n) spacing in Figure 1, log(5/4) = 0.22 nats"
_HEADLINE_SOURCE = "'much lower than the theoretical perfect likelihood': the child at most 61% of log(1/n)'s probability"
# The paper's Macondo: 500 villagers, 100 of them parents with 1 to 5 children (20 per n),
# GPT-2 XL fine-tuned for 50 epochs (App. B, C).
PAPER_PARENTS_PER_N = 20
PAPER_EPOCHS = 50


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


def _ns(m: Mapping[str, Any]) -> list[str]:
    return [str(n) for n in m["n_values"]]


def macondo_interval(
    m: Mapping[str, Any], per_seed_value: Any, per_child_value: Any
) -> Interval | None:
    """The interval of a per-seed effect: over seeds with 3 or more, else a bootstrap over the
    test children, stratified by (seed, n) so each cell weighs as in the per-seed mean; None
    when there are fewer than 3 seeds and no per-child record."""
    per = per_seed(m)
    if len(per) >= MIN_SEEDS:
        return seed_interval([per_seed_value(p) for p in per])
    rows = [p.get("test_examples") for p in per]
    if not all(rows):
        return None
    values, strata = [], []
    for p, ex in zip(per, rows, strict=True):
        values += per_child_value(ex)
        strata += [f"{p.get('seed')}/{n}" for n in ex["n"]]
    return bootstrap_interval(values, "test children", strata=strata)


def sizes_text(m: Mapping[str, Any]) -> str:
    """The Macondo size and fine-tuning epochs beside the paper's (named beside (c))."""
    s = m.get("settings") or {}
    per_n = (s.get("macondo") or {}).get("n_parents_per_count")
    return (
        f"Macondo size here: {_f(per_n, 'g')} parents per n, {_f(s.get('epochs'), 'g')} "
        f"fine-tuning epochs (the paper: {PAPER_PARENTS_PER_N} per n, {PAPER_EPOCHS} epochs); "
        "no conclusion is drawn across scales whose sizes differ"
    )


def _fit_failure(m: Mapping[str, Any]) -> str | None:
    per, ns = per_seed(m), _ns(m)
    fit = ", ".join(f"n={n}: {fmt_pm([p['train']['lm'][n] for p in per])}" for n in ns)
    unfit = [
        (p.get("seed"), n, p["train"]["lm"][n])
        for p in per
        for n in ns
        if not p["train"]["lm"][n] >= -math.log(int(n)) - FIT_MARGIN_NATS
    ]
    if not unfit:
        return None
    seed, n, v = unfit[0]
    return (
        f"premise failed, the LM did not fit its training facts: {len(unfit)} (seed, n) "
        f"pair(s) below log(1/n) - {FIT_MARGIN_NATS:g}, e.g. seed {seed}, n={n}: {_f(v)} < "
        f"{_f(-math.log(int(n)) - FIT_MARGIN_NATS)}. LM train log-likelihood: {fit}"
    )


def _shortfall(m: Mapping[str, Any]) -> Interval | None:
    ns = _ns(m)
    return macondo_interval(
        m,
        lambda p: sum(-math.log(int(n)) - p["test"]["lm"][n] for n in ns) / len(ns),
        lambda ex: [-math.log(int(n)) - v for n, v in zip(ex["n"], ex["lm"], strict=True)],
    )


CLAIM_H = (
    "(c0) the LM fails to generalise from over-specified descriptions: its test log-likelihood "
    "of the children sits below log(1/n) (Section 4's headline)"
)
CRITERION_H = (
    '"The failure to generalize from over-specified descriptions" (§4), measured as in §4.3 '
    '("a likelihood much lower than the theoretical perfect likelihood"): per seed, log(1/n) '
    "minus the LM's mean test log-likelihood, averaged over n; held if the one-sided 95% "
    f"interval excludes 0 and the mean is at least {HEADLINE_MIN_GAP:g} nats (minimum effect: "
    f"{_HEADLINE_SOURCE}). Premise (the paper's 50-epoch fine-tuning): the LM fitted its "
    f"training facts (train log-likelihood >= log(1/n) - {FIT_MARGIN_NATS:g} for every n and "
    "seed), else untestable here"
)


def claim_headline(r: Mapping[str, Any]) -> dict:
    m = r["macondo"]
    failed = _fit_failure(m)
    if failed:
        return verdict(CLAIM_H, UNTESTABLE, CRITERION_H, failed, scale=scale_text(r))
    iv = _shortfall(m)
    if iv is None:
        return verdict(CLAIM_H, UNTESTABLE, CRITERION_H, _NO_INTERVAL, scale=scale_text(r))
    status = judge(iv, HEADLINE_MIN_GAP)
    ns = _ns(m)
    below = [-math.log(int(n)) - mean_std([p["test"]["lm"][n] for p in per_seed(m)])[0]
             for n in ns]  # fmt: skip
    evidence = (
        f"LM test log-likelihood below log(1/n) by {', '.join(_f(b) for b in below)} nats "
        f"(n = {', '.join(ns)}); "
        + interval_text(iv, HEADLINE_MIN_GAP, "nats", "see the criterion")
        + f". {sizes_text(m)}"
    )
    return verdict(CLAIM_H, status, CRITERION_H, evidence, scale=scale_text(r))


_NO_INTERVAL = "fewer than 3 seeds and no per-child record to bootstrap over"


def paired_gains(m: Mapping[str, Any], model: str) -> list[float]:
    """Per seed: ``model`` minus LM test log-likelihood, averaged over n."""
    ns = _ns(m)
    return [
        sum(p["test"][model][n] - p["test"]["lm"][n] for n in ns) / len(ns) for p in per_seed(m)
    ]


def gain_interval(m: Mapping[str, Any], model: str) -> Interval | None:
    ns = _ns(m)
    return macondo_interval(
        m,
        lambda p: sum(p["test"][model][n] - p["test"]["lm"][n] for n in ns) / len(ns),
        lambda ex: [a - b for a, b in zip(ex[model], ex["lm"], strict=True)],
    )


def grid_edges(per: list, params: tuple[str, ...]) -> str:
    """How often the dev choice of ``params`` sits at an edge of its grid (counted per
    parameter, so one model's settings never count for another's)."""
    tuned = [q.get("tuned") or {} for q in per]
    parts = []
    for name in params:
        hits = sum(name in (t.get("at_grid_edge") or ()) for t in tuned if isinstance(
            t.get("at_grid_edge"), (list, tuple)))  # fmt: skip
        if hits:
            parts.append(f"{name} at an edge of its grid in {hits} of {len(tuned)} seeds")
    return "; the dev choice has " + ", ".join(parts) if parts else ""


def _setting_line(m: Mapping[str, Any], model: str, label: str) -> tuple[str, str]:
    """(status, text) of one setting's paired gain."""
    iv = gain_interval(m, model)
    if iv is None:
        return UNTESTABLE, f"{label}: {_NO_INTERVAL}"
    status = judge(iv, MACONDO_MIN_GAIN)
    gains = paired_gains(m, model)
    return status, (
        f"{label}: {status} — per seed {', '.join(_f(g, '.3f') for g in gains)} nats; "
        + interval_text(iv, MACONDO_MIN_GAIN, "nats", _GAIN_SOURCE)
        + f", one-sided t-test p = {_f(t_test_p(gains), '.3g')}"
    )


def _judge(r: Mapping[str, Any], model: str, claim: str, criterion: str, params: tuple) -> dict:
    m = r["macondo"]
    per = per_seed(m)
    tuned = [q.get("tuned") or {} for q in per]
    on_dev = all(t.get("tuned_on") == "dev" for t in tuned)
    label = "dev-tuned (settings chosen on a dev share of the test parents, read on the rest)" \
        if on_dev else "fixed settings (not tuned)"  # fmt: skip
    status, main = _setting_line(m, model, label)
    parts = [main + (grid_edges(per, params) if on_dev else "")]
    default = f"{model}_default"
    if on_dev and all(default in p["test"] for p in per):
        s = m.get("settings") or {}
        _, line = _setting_line(
            m, default, f"default setting (k={_f(s.get('k'), 'g')}, w={_f(s.get('knn_weight'), 'g')}, "
            f"T={_f(s.get('temperature'), 'g')}; same test parents)")  # fmt: skip
        parts.append(line)
    head = claim_headline(r)
    parts.append(
        f"qualifier, Section 4's headline (c0): {head['status']} — the gain reads as better "
        "generalisation only where the LM fails to generalise"
    )
    parts.append(sizes_text(m))
    if other := other_size_line(r, model):
        parts.append(other)
    return verdict(claim, status, criterion, ". ".join(parts), scale=scale_text(r))


def other_size_line(r: Mapping[str, Any], model: str) -> str | None:
    """The same gain at the run's second Macondo size (``macondo_small``: the same LM and
    fine-tuning, fewer parents per n), named by its size; not part of the verdict."""
    small = r.get("macondo_small")
    if not small or not small.get("per_seed"):
        return None
    per_n = ((small.get("settings") or {}).get("macondo") or {}).get("n_parents_per_count")
    _, line = _setting_line(small, model, f"the same LM at {_f(per_n, 'g')} parents per n")
    return (
        line + " (same LM and fine-tuning, only the Macondo size differs: a contrast of sizes "
        "on this LM, not of scales)"
    )


def _criterion(what: str, sentence: str) -> str:
    return (
        f"{sentence}; measured as the paired test gain of {what} over the LM in log-likelihood "
        "of the child (averaged over n, per seed, on the test parents not used to choose its "
        "settings); held if the one-sided 95% interval excludes 0 and the mean is at least "
        f"{MACONDO_MIN_GAIN:g} nats (minimum effect: {_GAIN_SOURCE}); not held if the interval "
        f"lies below {MACONDO_MIN_GAIN:g}; read beside the headline (c0) and, for the dev-tuned "
        "setting, beside the default setting"
    )


def scale_text(r: Mapping[str, Any]) -> str:
    m = r["macondo"]
    s = m.get("settings") or {}
    per_n = (s.get("macondo") or {}).get("n_parents_per_count")
    if s.get("from_scratch"):
        lm = f"a {s.get('scratch_architecture')} GPT-2 trained from scratch"
    else:
        lm = lm_description(r)
    return (
        f"paper: GPT-2 XL fine-tuned on Macondo ({PAPER_PARENTS_PER_N} parents per n, "
        f"{PAPER_EPOCHS} epochs); here: {lm}, fine-tuned ({_f(per_n, 'g')} per n, "
        f"{_f(s.get('epochs'), 'g')} epochs)"
    )


CLAIM_C = (
    "(c) on Macondo the kNN-LM generalises from over-specified training sentences better than "
    "the LM (Section 4)"
)
CRITERION_C = _criterion(
    "the kNN-LM", '"Figure 1 shows that the kNN-augmented model performs better than the '
    'vanilla model" (§4.3)')  # fmt: skip
CLAIM_C_MLP = (
    "(c') on Macondo the MLP memory trained on the datastore generalises better than the LM, "
    "like the kNN-LM (Section 5 on Section 4's data)"
)
CRITERION_C_MLP = _criterion(
    "LM + MLP memory", '"It turns out that we can close the generalization gap on Moncodo by '
    'training another neural model that maps the intermediate representation to the target '
    'token" (§1)')  # fmt: skip


def claim_overspec(r: Mapping[str, Any]) -> dict:
    return _judge(r, "knnlm", CLAIM_C, CRITERION_C, ("k", "temperature", "knn_weight"))


def claim_overspec_mlp(r: Mapping[str, Any]) -> dict:
    return _judge(r, "mlp", CLAIM_C_MLP, CRITERION_C_MLP, ("memory_weight",))


# ----------------------------------------------------------------------------- section


def macondo_section(r: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    m = r["macondo"]
    per = m["per_seed"]
    names = ", ".join(str(p.get("seed", i)) for i, p in enumerate(per))
    spread = "mean ± sample std over" if len(per) > 1 else "one seed,"
    md = (
        "## Generalization from over-specification: Macondo (Section 4)\n\n"
        f"**Table 5.** Mean log-likelihood (natural log) of each child's name, by number of "
        f"children n, {spread} {len(per)} seed(s) ({names}); each seed is its own Macondo "
        'dataset, used to fine-tune and to evaluate. Training sentences read "[villager], who '
        '[desc], is the parent of [child]", test sentences drop the clause.\n\n'
        + table5(m)
        + "\n\n"
        "How to read it: the training column checks that the LM fitted its fine-tuning facts "
        f"(the headline (c0) requires at least log(1/n) - {FIT_MARGIN_NATS:g} for every n and "
        "seed). "
        "That every test column is at most log(1/n) is no finding: a parent's children share at "
        "most probability 1, so their mean log-probability cannot exceed log(1/n). The finding "
        "is the gap between the kNN-LM (and the MLP) and the LM on the test sentences.\n\n"
        + _tuning_note(per)
        + "Scale: the paper fine-tunes a pretrained GPT-2 XL (1.5B parameters, and Mistral-7B "
        f"in App. C.1); this run fine-tunes {_lm_text(r)}. {sizes_text(m)}.\n\n"
    )
    if figs.get("figure1"):
        md += (
            f"![Figure 1 / Figure 3]({figs['figure1']})\n\n"
            "Figure 1 / Figure 3 as the paper draws them: test log-likelihood during "
            "fine-tuning, one colour per n, solid LM, dotted kNN-LM, dashed log(1/n), mean over "
            f"seeds. {_figure1_caption(m)}\n\n"
        )
    md += _gain_table(m)
    if figs.get("macondo_gains"):
        md += (
            f"![gain over the LM per n]({figs['macondo_gains']})\n\n"
            "The gain claims (c) and (c') read: augmented minus LM test log-likelihood per n, "
            "one dot per seed, mean ± sample std.\n\n"
        )
    return md


def _tuned_on_dev(m: Mapping[str, Any]) -> bool:
    tuned = [p.get("tuned") or {} for p in m.get("per_seed") or []]
    return bool(tuned) and all(t.get("tuned_on") == "dev" for t in tuned)


def _figure1_caption(m: Mapping[str, Any]) -> str:
    """What Figure 1 draws, in the settings and on the parents claim (c) reads."""
    s = m.get("settings") or {}
    default = (f"k={_f(s.get('k'), 'g')}, w={_f(s.get('knn_weight'), 'g')} on p_knn, "
               f"T={_f(s.get('temperature'), 'g')}")  # fmt: skip
    if not _tuned_on_dev(m):
        return f"Curves on every test parent; the kNN-LM at the run's setting ({default})."
    same = (m.get("curves") or {}).get("parents") == "verdict"
    return (
        (
            "Curves on the test parents claim (c) reads (the dev share left out)"
            if same
            else "Curves on every test parent (dev share included: a run made before the curves were "
            "read on the verdict's parents)"
        )
        + f"; the dotted "
        f"kNN-LM is at the default setting ({default}); stars mark the kNN-LM at the dev-tuned "
        "setting and triangles the LM + MLP at its dev-tuned weight, both on the final model "
        "and the parents claim (c) reads."
    )


def _lm_text(r: Mapping[str, Any]) -> str:
    """What LM this run fine-tunes on Macondo, and on what corpus it was trained (never "a
    slice" where the run read the whole corpus)."""
    s = (r.get("macondo") or {}).get("settings") or {}
    if s.get("from_scratch"):
        return f"a {s.get('scratch_architecture')} GPT-2 trained from scratch on Macondo"
    cfg = r.get("config") or {}
    corpus = cfg.get("corpus")
    if cfg.get("scale") == "quick" or corpus is None:
        where = "the embedded WikiText-2 slice"
    else:
        where = f"the corpus {corpus}"
    return f"the LM this run trained on {where} ({s.get('model') or 'its model'})"


def _tuning_note(per: list) -> str:
    tuned = [p.get("tuned") for p in per]
    if not all(t and t.get("tuned_on") == "dev" for t in tuned):
        return "Retrieval at fixed settings (k, temperature, weight not tuned).\n\n"
    cells = "; ".join(
        f"seed {p.get('seed')}: k={t['k']}, T={t['temperature']:g}, w={t['knn_weight']:g}"
        + (f", MLP w={t['memory_weight']:g}" if t.get("memory_weight") is not None else "")
        for p, t in zip(per, tuned, strict=True)
    )
    return (
        "Retrieval settings chosen per seed on a dev share of the test parents "
        f"({tuned[0]['dev_examples']} children), Table 5's test columns read on the other "
        f"{tuned[0]['test_examples']}: {cells}.\n\n"
    )


def _gain_table(m: Mapping[str, Any]) -> str:
    """Per seed, the paired gains claims (c) and (c') test (mean over n, nats)."""
    per, ns = m["per_seed"], [str(n) for n in m["n_values"]]
    models = [x for x in ("knnlm", "knnlm_default", "mlp") if all(x in p["test"] for p in per)]
    if not models:
        return ""
    rows = [
        [p.get("seed")]
        + [sum(p["test"][x][n] - p["test"]["lm"][n] for n in ns) / len(ns) for x in models]
        for p in per
    ]
    names = {"knnlm": "kNN-LM - LM", "knnlm_default": "kNN-LM (default setting) - LM",
             "mlp": "LM+MLP - LM"}  # fmt: skip
    table = markdown_table(["seed", *(names[x] for x in models)], rows,
                           floatfmt=["", *([".3f"] * len(models))])  # fmt: skip
    return (
        "Per seed, the paired test gain over the LM averaged over n (nats; what claims (c) and "
        f"(c') test):\n\n{table}\n\n"
    )


def _final(m: Mapping[str, Any], model: str) -> dict[str, float] | None:
    """A model's test log-likelihood per n, mean over seeds (a marker on Figure 1)."""
    rows = [(p.get("test") or {}).get(model) for p in m.get("per_seed") or []]
    if not rows or any(not row for row in rows):
        return None
    return {str(n): sum(row[str(n)] for row in rows) / len(rows) for n in rows[0]}


def _stage_figures(r: Mapping[str, Any]) -> None:
    where = (r.get("macondo") or {}).get("table5")
    if where and (Path(where).parent / RESULTS).is_file():
        folder = Path(where).parent
        render_macondo(folder, json.loads((folder / RESULTS).read_text()))


def _paper_figures(r: Mapping[str, Any], sink: FigureSink) -> None:
    mac = r.get("macondo") or {}
    if mac.get("curves"):
        sink.draw("figure1", "figure1_macondo.png",
                  lambda p: plot_figure1(
                mac["curves"], p, final_mlp=_final(mac, "mlp"),
                final_knn=_final(mac, "knnlm") if _tuned_on_dev(mac) else None), mac.get("figure1"))  # fmt: skip
    else:
        sink.copy("figure1", mac.get("figure1"), "figure1_macondo.png")


def _evidence_figures(r: Mapping[str, Any], sink: FigureSink) -> None:
    mac = r.get("macondo") or {}
    if mac.get("per_seed"):
        sink.draw("macondo_gains", "macondo_gains.png", lambda p: plot_macondo_gains(mac, p))


ANALYSIS = Analysis(
    key="macondo",
    title="Generalization from over-specification: Macondo (Section 4)",
    section=macondo_section,
    claims=(
        Claim(CLAIM_H, CRITERION_H, claim_headline),
        Claim(CLAIM_C, CRITERION_C, claim_overspec),
    ),
    findings=(Claim(CLAIM_C_MLP, CRITERION_C_MLP, claim_overspec_mlp),),
    paper_figures=_paper_figures,
    evidence_figures=_evidence_figures,
    stage_figures=_stage_figures,
)
