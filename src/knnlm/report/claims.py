"""Verdicts on the paper's five claims (a)-(e), and two findings judged beside them (Table 4,
the MLP memory on Macondo), read from ``results.json``.

Each claim is one pure function of the results returning a verdict
(:mod:`knnlm.report.verdicts`): ``held``, ``not held`` or ``untestable here`` (its section was
not run, or its premise failed: there is nothing for the claim to explain). The thresholds are
module constants, each justified next to it from the paper's text (Chiang et al., NAACL 2024).
Section 3's claims live in :mod:`knnlm.report.claims_projection`, Section 4's in
:mod:`knnlm.report.claims_macondo`; (a), (d), (e) and the list of all claims here.

Seed statistics are :func:`knnlm.experiments.stats.mean_std` (sample std, ddof=1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from knnlm.experiments.stats import mean_std, t_test_p
from knnlm.report.claims_macondo import (
    CLAIM_C,
    CLAIM_C_MLP,
    CRITERION_C,
    CRITERION_C_MLP,
    claim_overspec,
    claim_overspec_mlp,
)
from knnlm.report.claims_projection import (
    CLAIM_B,
    CLAIM_T4,
    CRITERION_B,
    CRITERION_T4,
    claim_projection,
    claim_table4,
    gap_share,
)
from knnlm.report.tables import fmt_number, fmt_pm
from knnlm.report.verdicts import HELD, NOT_HELD, UNTESTABLE, per_seed, seed_list, verdict

# (d) Section 1 / 5: the MLP memory needs "less than 4% storage space of kNN augmentation"
# ("over 25x smaller"). At the paper's scale (103M keys) the output matrix W is well under 1%
# of the datastore, so the bound holds with or without it; on a small corpus W alone can pass
# 4%. The verdict compares what each augmentation adds to the LM: the MLP reuses the LM's own W
# (logits = W(z + LN(MLP(z))), App. D), just as the kNN-LM's storage leaves out the LM's
# weights, so W is not counted; the fraction with W is reported beside it.
MEMORY_STORAGE_MAX = 0.04
MEMORY_COUNT_SHARED_W = False
# (e) Appendix E.1: without the last MLP the log-likelihood "grows faster ... during the first
# 4000 steps" (Fig. 4) and the loss "decreases faster at the early stage" (Fig. 5). Read as:
# over the evaluations in (0, T/2], T the last recorded step, the per-seed mean gap favours the
# model without the last MLP: over seeds, mean >= HURDLE_MIN_GAP and a one-sided t-test of
# mean > 0 at p < HURDLE_P (the paper's 5 seeds; a sign test over 2-3 seeds passes by chance
# 1 time in 4-8). Step 0 is the shared initialisation and is excluded. The paper gives no
# numbers for the early lead (Figures 4 and 5 are images in our copy): 0.01 nats, about 1% of
# perplexity or of a child's probability, is the smallest gap read as real here.
HURDLE_FIRST_PART = 0.5
HURDLE_MIN_GAP = 0.01
HURDLE_P = 0.05


def _f(x: Any, fmt: str = ".2f") -> str:
    return fmt_number(x, fmt)


# ----------------------------------------------------------------------------- (a)

CLAIM_A = "(a) the kNN-LM has lower perplexity than the LM (Section 2)"
CRITERION_A = (
    "test perplexity of the kNN-LM below the LM's in every natural-text LM seed, at the weight "
    "and temperature chosen on valid (the paper's w=0.25, T=1 reported as context); every seed, "
    "not a significance test: 3 seeds cannot reach p < 0.05 with a sign test (1/8)"
)


def claim_knnlm(r: Mapping[str, Any]) -> dict:
    k = r["knnlm"]
    per = per_seed(k)
    bad = [p for p in per if p["tuned"].get("tuned_on") != "valid"]
    if bad:
        return verdict(
            CLAIM_A,
            UNTESTABLE,
            CRITERION_A,
            f"seed {bad[0].get('seed')} was tuned on {bad[0]['tuned'].get('tuned_on')!r}, not "
            "valid: a test verdict would be read on the split that chose the setting",
        )
    lm = [p["test"]["lm"] for p in per]
    tuned = [p["test"]["knnlm_tuned"] for p in per]
    paper = [p["test"].get("knnlm_paper") for p in per]
    wins = sum(t < m for t, m in zip(tuned, lm, strict=True))
    paper_wins = sum(q is not None and q < m for q, m in zip(paper, lm, strict=True))
    settings = "; ".join(
        f"seed {p.get('seed')}: w={_f(p['tuned']['knn_weight'], 'g')}, "
        f"T={_f(p['tuned']['temperature'], 'g')}"
        for p in per
    )
    ps = k.get("paper_setting") or {}
    evidence = (
        f"test perplexity over {len(per)} seed(s) ({seed_list(per)}): LM {fmt_pm(lm)}, kNN-LM "
        f"tuned on valid {fmt_pm(tuned)}, lower in {wins} of {len(per)} seeds "
        f"(gain {', '.join(_f(m - t) for m, t in zip(lm, tuned, strict=True))}); tuned {settings}. "
        f"Context: paper's setting (w={_f(ps.get('knn_weight'), 'g')}, "
        f"T={_f(ps.get('temperature'), 'g')}) {fmt_pm(paper)}, lower in {paper_wins} of "
        f"{len(per)} seeds"
    )
    return verdict(CLAIM_A, HELD if wins == len(per) else NOT_HELD, CRITERION_A, evidence)


# ----------------------------------------------------------------------------- (d)

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


# ----------------------------------------------------------------------------- (e)

CLAIM_E = (
    "(e) the last MLP slows early training: without it the model learns faster early on "
    "(Appendix E)"
)
CRITERION_E = (
    "per seed, the mean gap over the evaluations after step 0 up to half of training, in favour "
    f"of the model without the last MLP; held if over seeds its mean is >= {HURDLE_MIN_GAP:g} "
    f"nats and a one-sided t-test gives p < {HURDLE_P:g}, on Macondo log-likelihood (Figure 4) "
    "and on natural-text training loss (Figure 5); a missing half leaves the claim untestable"
)


def early_gaps(curve: Mapping[str, Any], higher_is_better: bool) -> tuple[list[float], list[int]]:
    """Per seed, the mean advantage of the model without the last MLP over (0, T/2].

    Positive favours the model without it. Returns (gaps, steps used); no steps -> [] gaps.
    """
    steps = [int(s) for s in curve["steps"]]
    with_mlp, without = curve["with_mlp"], curve["without_mlp"]
    if len(with_mlp) != len(without) or not with_mlp:
        raise ValueError("with_mlp and without_mlp hold different numbers of seeds")
    if any(len(row) != len(steps) for row in (*with_mlp, *without)):
        raise ValueError("a seed's curve does not have one value per step")
    half = HURDLE_FIRST_PART * max(steps)
    idx = [i for i, s in enumerate(steps) if 0 < s <= half]
    if not idx:
        return [], []
    sign = 1.0 if higher_is_better else -1.0
    gaps = [
        sign * sum(b[i] - a[i] for i in idx) / len(idx)
        for a, b in zip(with_mlp, without, strict=True)
    ]
    return gaps, [steps[i] for i in idx]


def _hurdle_part(curve: Mapping[str, Any] | None, higher: bool, name: str) -> tuple[str, str]:
    """(status of this half, evidence) for one of Figure 4 / Figure 5."""
    if curve is None:
        return UNTESTABLE, f"{name}: not recorded in this run"
    gaps, used = early_gaps(curve, higher)
    if not gaps:
        return UNTESTABLE, f"{name}: no evaluation between step 0 and half of training"
    ahead = sum(g > 0 for g in gaps)
    mean, _ = mean_std(gaps)
    p = t_test_p(gaps)
    what = "log-likelihood" if higher else "training loss"
    text = (
        f"{name}: advantage of the model without the last MLP in {what} (nats, positive = "
        f"ahead) averaged over steps {used[0]}..{used[-1]} ({len(used)} evaluations), per seed "
        f"{', '.join(_f(g, '.3f') for g in gaps)}: mean {_f(mean, '.3f')}, one-sided t-test "
        f"p = {_f(p, '.3g')}, ahead in {ahead} of {len(gaps)} seeds"
    )
    if p is None:
        return UNTESTABLE, f"{text}; one seed: no paired test"
    return (HELD if mean >= HURDLE_MIN_GAP and p < HURDLE_P else NOT_HELD), text


def claim_hurdle(r: Mapping[str, Any]) -> dict:
    h = r["hurdle"]
    s4, e4 = _hurdle_part(h["loglik"], True, "Figure 4, Macondo log-likelihood")
    s5, e5 = _hurdle_part(h.get("loss"), False, "Figure 5, natural-text training loss")
    # The paper rests the claim on both figures: Fig. 4 is memorisation of synthetic facts,
    # Fig. 5 the natural-text training the "limitation of LM training" is about, so neither
    # half carries it alone. A measured half that fails sinks the claim; a missing half
    # leaves it untestable.
    if NOT_HELD in (s4, s5):
        status = NOT_HELD
    elif UNTESTABLE in (s4, s5):
        status = UNTESTABLE
    else:
        status = HELD
    return verdict(CLAIM_E, status, CRITERION_E, f"{e4}; {e5}")


# ----------------------------------------------------------------------------- all

CLAIMS: tuple[tuple[str, str, str, Callable[[Mapping[str, Any]], dict]], ...] = (
    ("knnlm", CLAIM_A, CRITERION_A, claim_knnlm),
    ("projection", CLAIM_B, CRITERION_B, claim_projection),
    ("macondo", CLAIM_C, CRITERION_C, claim_overspec),
    ("memory", CLAIM_D, CRITERION_D, claim_memory),
    ("hurdle", CLAIM_E, CRITERION_E, claim_hurdle),
    # Findings the paper states beside its five claims, judged on their own.
    ("projection", CLAIM_T4, CRITERION_T4, claim_table4),
    ("macondo", CLAIM_C_MLP, CRITERION_C_MLP, claim_overspec_mlp),
)


def make_claims(results: Mapping[str, Any]) -> list[dict]:
    """One verdict per claim (a)-(e). A missing section makes its claim untestable ("not run");
    a section that lacks a contract key does too, naming the key, so a partial run still
    renders."""
    out = []
    for section, claim, criterion, fn in CLAIMS:
        if not results.get(section):
            out.append(verdict(claim, UNTESTABLE, criterion, f"not run: no {section!r} results"))
            continue
        try:
            out.append(fn(results))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
            out.append(
                verdict(claim, UNTESTABLE, criterion, f"{section!r} results incomplete: {why}")
            )
    return out
