"""Section 4 of the report: Table 5 (per-n log-likelihood of the children) and Figure 1/3.

:func:`table5` reads ``results["macondo"]`` of the results contract, so the stand-alone
Macondo run and the reproduction print the same table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.report.claims_macondo import FIT_MARGIN_NATS
from knnlm.report.tables import fmt_pm, markdown_table

_COLUMNS = (
    ("train", "lm", "LM, training sentences"),
    ("test", "lm", "LM, test"),
    ("test", "knnlm", "kNN-LM, test"),
    ("test", "mlp", "LM + MLP, test"),
)


def table5(macondo: Mapping[str, Any]) -> str:
    """Table 5: one row per number of children n; mean ± sample std over seeds of the mean
    natural-log likelihood of each child's name, for the LM on its training sentences and for
    the LM, kNN-LM and LM + MLP on the test sentences, beside log(1/n).

    A model a run did not score (e.g. no MLP) shows "–".
    """
    per = macondo.get("per_seed")
    if not per:
        raise KnnlmError("Table 5 needs macondo.per_seed with at least one seed")
    ns = macondo.get("n_values") or sorted({int(n) for p in per for n in p["test"]["lm"]})
    rows = []
    for n in ns:
        row: list[Any] = [int(n), -math.log(int(n))]
        for split, model, _ in _COLUMNS:
            row.append(fmt_pm([((p.get(split) or {}).get(model) or {}).get(str(n)) for p in per]))
        rows.append(row)
    return markdown_table(
        ["children (n)", "log(1/n)", *(c[2] for c in _COLUMNS)],
        rows,
        align=["r"] * (2 + len(_COLUMNS)),
    )


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
