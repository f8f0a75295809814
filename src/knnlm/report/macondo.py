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

from knnlm.experiments.macondo import RESULTS
from knnlm.experiments.stats import mean_std, t_test_p
from knnlm.report.analysis import Analysis, Claim, FigureSink
from knnlm.report.macondo_figures import plot_figure1, plot_macondo_gains, render_macondo, table5
from knnlm.report.tables import fmt_number, fmt_pm, markdown_table
from knnlm.report.verdicts import HELD, NOT_HELD, UNTESTABLE, per_seed, verdict

# Premise 1: the paper fine-tunes for 50 epochs (App. C), long enough that its LM knows the
# training statements; its test shortfall (Fig. 1) is then a failure to generalise, not
# under-training. We require the LM's mean log-likelihood of the children of its *training*
# sentences to be at least log(1/n) - 0.5 nats for every n in every seed: on average each
# child gets at least e^-0.5 ≈ 61% of the probability a perfect model gives it (it may exceed
# log(1/n): the clause can single the child out).
FIT_MARGIN_NATS = 0.5
# Premise 2: there is a generalisation gap to close. Figure 1's LM sits far below log(1/n);
# we require its mean test log-likelihood, averaged over n (and seeds), to be at least this far
# below log(1/n). Otherwise the LM already generalises and a retrieval gain has nothing to show.
GENERALISE_GAP_NATS = 0.5
# The test: per seed, the paired gain (augmented minus LM test log-likelihood, averaged over n,
# same seed and dataset); held if its mean over seeds is at least MACONDO_MIN_GAIN nats and a
# one-sided t-test of mean > 0 gives p < MACONDO_P. The paper prints Table 5's numbers only as
# an image in our copy; in Figure 1 the kNN-LM's dotted lines stand visibly apart from the LM's
# on an axis where the log(1/n) reference lines are log(5/4) = 0.22 nats apart at the closest,
# so a real gain is taken to be at least a quarter of that: 0.05 nats.
MACONDO_MIN_GAIN = 0.05
MACONDO_P = 0.05


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


def _premises(m: Mapping[str, Any], claim: str, criterion: str) -> tuple[dict | None, str]:
    """(an untestable verdict if a premise failed, the premises' evidence)."""
    per, ns = per_seed(m), [str(n) for n in m["n_values"]]
    fit = ", ".join(f"n={n}: {fmt_pm([p['train']['lm'][n] for p in per])}" for n in ns)
    unfit = [
        (p.get("seed"), n, p["train"]["lm"][n])
        for p in per
        for n in ns
        if not p["train"]["lm"][n] >= -math.log(int(n)) - FIT_MARGIN_NATS
    ]
    if unfit:
        seed, n, v = unfit[0]
        return verdict(
            claim, UNTESTABLE, criterion,
            f"premise failed, the LM did not fit its training facts: {len(unfit)} (seed, n) "
            f"pair(s) below log(1/n) - {FIT_MARGIN_NATS:g}, e.g. seed {seed}, n={n}: {_f(v)} < "
            f"{_f(-math.log(int(n)) - FIT_MARGIN_NATS)}. LM train log-likelihood: {fit}",
        ), fit  # fmt: skip
    below = [-math.log(int(n)) - mean_std([p["test"]["lm"][n] for p in per])[0] for n in ns]
    gap = sum(below) / len(below)
    text = (
        f"LM train log-likelihood: {fit}; LM test log-likelihood below log(1/n) by "
        f"{', '.join(_f(b) for b in below)} nats (n = {', '.join(ns)}), {_f(gap)} on average"
    )
    if not gap >= GENERALISE_GAP_NATS:
        return verdict(
            claim, UNTESTABLE, criterion,
            f"untestable here: the LM already generalises ({text}; needs >= "
            f"{GENERALISE_GAP_NATS:g})",
        ), text  # fmt: skip
    if len(per) < 2:
        return verdict(claim, UNTESTABLE, criterion, f"one seed: no paired test. {text}"), text
    return None, text


def paired_gains(m: Mapping[str, Any], model: str) -> list[float]:
    """Per seed: ``model`` minus LM test log-likelihood, averaged over n."""
    ns = [str(n) for n in m["n_values"]]
    return [
        sum(p["test"][model][n] - p["test"]["lm"][n] for n in ns) / len(ns) for p in per_seed(m)
    ]


def _judge(m: Mapping[str, Any], model: str, claim: str, criterion: str) -> dict:
    failed, premises = _premises(m, claim, criterion)
    if failed:
        return failed
    gains = paired_gains(m, model)
    mean, _ = mean_std(gains)
    p = t_test_p(gains)
    ok = mean >= MACONDO_MIN_GAIN and p < MACONDO_P
    ns = [str(n) for n in m["n_values"]]
    per_n = "; ".join(
        f"n={n}: {fmt_pm([q['test'][model][n] - q['test']['lm'][n] for q in per_seed(m)], '.3f')}"
        for n in ns
    )
    tuned = [q.get("tuned") or {} for q in per_seed(m)]
    how = (
        "retrieval tuned on a dev share of the test parents, read on the rest"
        if all(t.get("tuned_on") == "dev" for t in tuned)
        else "retrieval at fixed settings (not tuned)"
    )
    edge = sum(bool(t.get("at_grid_edge")) for t in tuned)
    if edge:
        how += f"; the dev choice sits at the top of the grid in {edge} of {len(tuned)} seeds"
    evidence = (
        f"paired test gain {model} - LM (nats, averaged over n) per seed "
        f"{', '.join(_f(g, '.3f') for g in gains)}: mean {_f(mean, '.3f')}, one-sided t-test "
        f"p = {_f(p, '.3g')} over {len(gains)} seeds; per n: {per_n}; {how}. {premises}"
    )
    return verdict(claim, HELD if ok else NOT_HELD, criterion, evidence)


def _criterion(what: str) -> str:
    return (
        f"premises: the fine-tuned LM fitted its training facts (train log-likelihood of the "
        f"children >= log(1/n) - {FIT_MARGIN_NATS:g} nats for every n in every seed) and fails "
        f"to generalise (mean test log-likelihood >= {GENERALISE_GAP_NATS:g} nats below log(1/n),"
        f" averaged over n); held if the paired test gain of {what} over the LM (averaged over "
        f"n, per seed) has mean >= {MACONDO_MIN_GAIN:g} nats and a one-sided t-test over seeds "
        f"p < {MACONDO_P:g}"
    )


CLAIM_C = (
    "(c) on Macondo the kNN-LM generalises from over-specified training sentences better than "
    "the LM (Section 4)"
)
CRITERION_C = _criterion("the kNN-LM")
CLAIM_C_MLP = (
    "(c') on Macondo the MLP memory trained on the datastore generalises better than the LM, "
    "like the kNN-LM (Section 5 on Section 4's data)"
)
CRITERION_C_MLP = _criterion("LM + MLP memory")


def claim_overspec(r: Mapping[str, Any]) -> dict:
    return _judge(r["macondo"], "knnlm", CLAIM_C, CRITERION_C)


def claim_overspec_mlp(r: Mapping[str, Any]) -> dict:
    return _judge(r["macondo"], "mlp", CLAIM_C_MLP, CRITERION_C_MLP)


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
        f"(claim (c) requires at least log(1/n) - {FIT_MARGIN_NATS:g} for every n and seed). "
        "That every test column is at most log(1/n) is no finding: a parent's children share at "
        "most probability 1, so their mean log-probability cannot exceed log(1/n). The finding "
        "is the gap between the kNN-LM (and the MLP) and the LM on the test sentences.\n\n"
        + _tuning_note(per)
        + "Scale: the paper fine-tunes a pretrained GPT-2 XL (1.5B parameters, and Mistral-7B "
        "in App. C.1); this run fine-tunes the small LM it trained itself on a slice of "
        "WikiText-2, so the premises above, not the model, decide whether the test says "
        "anything.\n\n"
    )
    if figs.get("figure1"):
        md += (
            f"![Figure 1 / Figure 3]({figs['figure1']})\n\n"
            "Figure 1 / Figure 3 as the paper draws them: test log-likelihood during "
            "fine-tuning, one colour per n, dotted kNN-LM, dashed log(1/n), mean over seeds.\n\n"
        )
    md += _gain_table(m)
    if figs.get("macondo_gains"):
        md += (
            f"![gain over the LM per n]({figs['macondo_gains']})\n\n"
            "The gain claims (c) and (c') read: augmented minus LM test log-likelihood per n, "
            "one dot per seed, mean ± sample std.\n\n"
        )
    return md


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
    models = [x for x in ("knnlm", "mlp") if all(x in p["test"] for p in per)]
    if not models:
        return ""
    rows = [
        [p.get("seed")]
        + [sum(p["test"][x][n] - p["test"]["lm"][n] for n in ns) / len(ns) for x in models]
        for p in per
    ]
    names = {"knnlm": "kNN-LM - LM", "mlp": "LM+MLP - LM"}
    table = markdown_table(["seed", *(names[x] for x in models)], rows,
                           floatfmt=["", *([".3f"] * len(models))])  # fmt: skip
    return (
        "Per seed, the paired test gain over the LM averaged over n (nats; what claims (c) and "
        f"(c') test):\n\n{table}\n\n"
    )


def _final_mlp(m: Mapping[str, Any]) -> dict[str, float] | None:
    """The LM + MLP's test log-likelihood per n, mean over seeds (a marker on Figure 1)."""
    rows = [(p.get("test") or {}).get("mlp") for p in m.get("per_seed") or []]
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
                  lambda p: plot_figure1(mac["curves"], p, final_mlp=_final_mlp(mac)), mac.get("figure1"))  # fmt: skip
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
    claims=(Claim(CLAIM_C, CRITERION_C, claim_overspec),),
    findings=(Claim(CLAIM_C_MLP, CRITERION_C_MLP, claim_overspec_mlp),),
    paper_figures=_paper_figures,
    evidence_figures=_evidence_figures,
    stage_figures=_stage_figures,
)
