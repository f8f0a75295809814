"""Section 5 of the paper: an MLP trained on the datastore instead of retrieval.

Claim (d) with its storage bound and the equal-compute control; Table 2 of the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from knnlm.report.analysis import Analysis, Claim
from knnlm.report.projection import gap_share
from knnlm.report.section_parts import seeds_note, settings_md
from knnlm.report.tables import fmt_number, fmt_pm, markdown_table
from knnlm.report.verdicts import HELD, NOT_HELD, UNTESTABLE, per_seed, verdict

# (d) Section 1 / 5: the MLP memory needs "less than 4% storage space of kNN augmentation"
# ("over 25x smaller"). At the paper's scale (103M keys) the output matrix W is well under 1%
# of the datastore, so the bound holds with or without it; on a small corpus W alone can pass
# 4%. The verdict compares what each augmentation adds to the LM: the MLP reuses the LM's own W
# (logits = W(z + LN(MLP(z))), App. D), just as the kNN-LM's storage leaves out the LM's
# weights, so W is not counted; the fraction with W is reported beside it.
MEMORY_STORAGE_MAX = 0.04
MEMORY_COUNT_SHARED_W = False


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


CLAIM_D = (
    "(d) an MLP trained on the datastore lowers the LM's perplexity with a small fraction of the "
    "kNN storage (Section 5)"
)
CRITERION_D = (
    f"LM+MLP test perplexity below the LM's and below an equal-compute control's (the LM "
    f"trained on for the MLP's optimiser steps and tokens, interpolated with its weight chosen on "
    f"valid) in every natural-text LM seed (weights chosen on valid; every seed, as (a): too few "
    f"seeds for a test) and MLP "
    f"storage (output matrix W {'counted' if MEMORY_COUNT_SHARED_W else 'shared, not counted'}) "
    f"< {100 * MEMORY_STORAGE_MAX:g}% of datastore + index"
)


def storage_fractions(storage: Mapping[str, Any]) -> tuple[float, float]:
    """MLP storage over datastore + index bytes, with and without the W shared with the LM."""
    total = storage["datastore_bytes"] + storage["index_bytes"]
    if not total > 0:
        raise ValueError("datastore + index storage is zero")
    return storage["memory_bytes"] / total, storage["memory_bytes_without_shared_W"] / total


def claim_memory(r: Mapping[str, Any]) -> dict:
    mem = r["memory"]
    per = per_seed(mem)
    lm = [p["test"]["lm"] for p in per]
    mlp = [p["test"]["mlp"] for p in per]
    knn = [p["test"].get("knnlm_tuned") for p in per]
    frac, frac_w = storage_fractions(mem["storage"])
    wins = sum(b < a for a, b in zip(lm, mlp, strict=True))
    missing = [p.get("seed") for p in per if not (p.get("control") or {}).get("test")]
    if missing:
        return verdict(CLAIM_D, UNTESTABLE, CRITERION_D, f"no equal-compute control for seed(s) "
                       f"{missing}: the MLP's gain cannot be credited to the MLP")  # fmt: skip
    ctrl = [p["control"]["test"]["control"] for p in per]
    beats = sum(b < c for b, c in zip(mlp, ctrl, strict=True))
    shares = [
        gap_share(a, b, c) if c is not None and c < a else None
        for a, b, c in zip(lm, mlp, knn, strict=True)
    ]
    share_txt = (
        f"{fmt_pm([100 * s for s in shares if s is not None], '.0f')}%"
        if any(s is not None for s in shares)
        else "undefined (no kNN-LM gain)"
    )
    evidence = (
        f"test perplexity over {len(per)} seed(s): LM {fmt_pm(lm)}, LM+MLP {fmt_pm(mlp)}, lower "
        f"in {wins} of {len(per)} seeds; equal-compute control (the LM trained on for the MLP's "
        f"steps and tokens, interpolated the same way) {fmt_pm(ctrl)}, MLP below it in {beats} of "
        f"{len(per)} seeds (per seed LM / MLP / control: "
        + "; ".join(f"{_f(a)} / {_f(b)} / {_f(c)}" for a, b, c in zip(lm, mlp, ctrl, strict=True))
        + f"); kNN-LM {fmt_pm(knn)}; share of the kNN-LM gain the MLP "
        f"gets {share_txt}. Storage: MLP {mem['storage']['memory_bytes']} bytes = "
        f"{_f(100 * frac, '.2f')}% of datastore + index "
        f"({mem['storage']['datastore_bytes'] + mem['storage']['index_bytes']} bytes); without "
        f"the W shared with the LM {_f(100 * frac_w, '.2f')}%. Paper (WikiText-103): perplexity "
        "lower by 1.45, under 4% storage, gap to the kNN-LM not fully closed"
    )
    ok = (
        wins == len(per)
        and beats == len(per)
        and (frac if MEMORY_COUNT_SHARED_W else frac_w) < MEMORY_STORAGE_MAX
    )
    return verdict(CLAIM_D, HELD if ok else NOT_HELD, CRITERION_D, evidence)


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
        f"Per seed:\n\n{t_seed}\n\n" + _control_line(per) + settings_md(m.get("settings"))
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


ANALYSIS = Analysis(
    key="memory",
    title="An MLP instead of retrieval (Section 5)",
    section=memory_section,
    claims=(Claim(CLAIM_D, CRITERION_D, claim_memory),),
)
