"""Section 5 of the paper: an MLP trained on the datastore instead of retrieval.

Claim (d) with its storage bound and the equal-compute control; Table 2 of the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from knnlm.experiments.stats import MIN_SEEDS, Interval, seed_interval
from knnlm.report.analysis import Analysis, Claim
from knnlm.report.projection import gap_share
from knnlm.report.section_parts import lm_description, seeds_note, settings_md, values_text
from knnlm.report.tables import fmt_number, fmt_pm, markdown_table
from knnlm.report.verdicts import (
    INCONCLUSIVE,
    NOT_HELD,
    UNTESTABLE,
    interval_text,
    judge,
    per_seed,
    verdict,
)

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
# (d)'s minimum effect: the paper's gain is 1.45 perplexity on WikiText-103, several percent of
# the LM's perplexity; "effectively reduces" is read as at least 1% of perplexity, 0.01 nats
# per token, well above the rounding of a few thousand test tokens and below the paper's gain.
MEMORY_MIN_GAIN = 0.01
_GAIN_SOURCE = (
    "1% of perplexity: above the rounding of the test tokens, below the paper's 1.45 on "
    "WikiText-103"
)
CRITERION_D = (
    '"interpolating the original LM with this MLP model effectively reduces the perplexity '
    'while requiring less than 4% of storage" (§5); measured per natural-text LM seed as '
    "log(LM test perplexity / LM+MLP test perplexity) (nats per token; the MLP's weight chosen "
    "on valid) and the MLP's storage (output matrix W "
    f"{'counted' if MEMORY_COUNT_SHARED_W else 'shared with the LM, not counted'}) over "
    "datastore + index; held if the one-sided 95% interval of the gain excludes 0, its mean is "
    f"at least {MEMORY_MIN_GAIN:g} nats (minimum effect: {_GAIN_SOURCE}) and the storage is "
    f"under {100 * MEMORY_STORAGE_MAX:g}%; not held if the interval lies below "
    f"{MEMORY_MIN_GAIN:g} or the storage is not under {100 * MEMORY_STORAGE_MAX:g}%. The "
    "equal-compute control is its own finding (d-control)"
)
CLAIM_D_CONTROL = (
    "(d-control) our stricter check: LM + MLP beats an equal-compute control, the same LM "
    "trained on for the MLP's optimiser steps and tokens and interpolated the same way"
)
CRITERION_D_CONTROL = (
    "not the paper's (it has no such control); per seed log(control perplexity / LM+MLP "
    "perplexity) on test, the control continued from the same LM the claim uses with its weight "
    f"chosen on valid; held / not held / inconclusive as (d) with minimum effect "
    f"{MEMORY_MIN_GAIN:g} nats"
)
_NO_INTERVAL = "fewer than 3 seeds and no per-token record to bootstrap over"


def storage_fractions(storage: Mapping[str, Any]) -> tuple[float, float]:
    """MLP storage over datastore + index bytes, with and without the W shared with the LM."""
    total = storage["datastore_bytes"] + storage["index_bytes"]
    if not total > 0:
        raise ValueError("datastore + index storage is zero")
    return storage["memory_bytes"] / total, storage["memory_bytes_without_shared_W"] / total


def log_gains(base: Sequence[float], model: Sequence[float]) -> list[float]:
    """Per seed, log(base perplexity / model perplexity): nats per token, positive = better."""
    return [math.log(a) - math.log(b) for a, b in zip(base, model, strict=True)]


def decide_gain(gains: list[float], records: list[Any]) -> tuple[str, str]:
    """(status, text) of a per-seed gain: the interval over seeds with 3 or more; else each
    seed's bootstrap over its scored test tokens (``records``), which must agree to decide."""
    if len(gains) >= MIN_SEEDS:
        iv = seed_interval(gains)
        return judge(iv, MEMORY_MIN_GAIN), interval_text(iv, MEMORY_MIN_GAIN, "nats", _GAIN_SOURCE)
    if not records or any(not r for r in records):
        return UNTESTABLE, _NO_INTERVAL
    ivs = [Interval.from_dict(r) for r in records]
    states = {judge(iv, MEMORY_MIN_GAIN) for iv in ivs}
    status = states.pop() if len(states) == 1 else INCONCLUSIVE
    text = "; ".join(
        (f"seed {i}: " if len(ivs) > 1 else "")
        + interval_text(iv, MEMORY_MIN_GAIN, "nats", _GAIN_SOURCE)
        for i, iv in enumerate(ivs)
    )
    if len(ivs) > 1:
        text += " (fewer than 3 seeds: each seed judged on its own tokens; they must agree)"
    return status, text


def scale_text(r: Mapping[str, Any]) -> str:
    mem = r["memory"]
    steps = [(p.get("train") or {}).get("steps") for p in per_seed(mem)]
    return (
        "paper: a 16-layer WikiText-103 LM, the MLP trained 2 epochs (App. D); here: "
        f"{lm_description(r)}, the MLP trained {values_text(steps)} steps"
    )


def claim_memory(r: Mapping[str, Any]) -> dict:
    mem = r["memory"]
    per = per_seed(mem)
    lm = [p["test"]["lm"] for p in per]
    mlp = [p["test"]["mlp"] for p in per]
    knn = [p["test"].get("knnlm_tuned") for p in per]
    frac, frac_w = storage_fractions(mem["storage"])
    counted = frac if MEMORY_COUNT_SHARED_W else frac_w
    gains = log_gains(lm, mlp)
    shares = [
        gap_share(a, b, c) if c is not None and c < a else None
        for a, b, c in zip(lm, mlp, knn, strict=True)
    ]
    share_txt = (
        f"{fmt_pm([100 * s for s in shares if s is not None], '.0f')}%"
        if any(s is not None for s in shares)
        else "undefined (no kNN-LM gain)"
    )
    decided, test = decide_gain(gains, [p["test"].get("gain_tokens") for p in per])
    evidence = (
        f"test perplexity over {len(per)} seed(s): LM {fmt_pm(lm)}, LM+MLP {fmt_pm(mlp)} "
        f"(per seed LM / LM+MLP: "
        + "; ".join(f"{_f(a)} / {_f(b)}" for a, b in zip(lm, mlp, strict=True))
        + f"); gain log(LM / LM+MLP) per seed {', '.join(_f(g, '.4f') for g in gains)}: {test}; "
        f"kNN-LM {fmt_pm(knn)}; share of the kNN-LM gain the MLP gets {share_txt}. Storage: MLP "
        f"{mem['storage']['memory_bytes']} bytes = {_f(100 * frac, '.2f')}% of datastore + "
        f"index ({mem['storage']['datastore_bytes'] + mem['storage']['index_bytes']} bytes); "
        f"without the W shared with the LM {_f(100 * frac_w, '.2f')}%. "
        + _training_text(mem)
        + ". Paper (WikiText-103): perplexity lower by 1.45, under 4% storage, gap to the "
        "kNN-LM not fully closed"
    )
    if not counted < MEMORY_STORAGE_MAX:
        status = NOT_HELD
    else:
        status = decided
    return verdict(CLAIM_D, status, CRITERION_D, evidence, scale=scale_text(r))


def _training_text(mem: Mapping[str, Any]) -> str:
    """How the MLP was trained, beside the paper's Appendix D, with any cap the budget forced."""
    s = mem.get("settings") or {}
    s = s.get("memory") or s  # MemoryTrainSettings whole; results before it: the flat keys
    per = per_seed(mem)
    stops = [(p.get("train") or {}).get("stopped") for p in per]
    how = (
        f"MLP training: hidden {_f(s.get('hidden'), 'g')}, lr {_f(s.get('lr'), 'g')}, "
        f"{values_text([(p.get('train') or {}).get('steps') for p in per])} steps"
    )
    if any(stops):
        how += f" (stopped: {values_text(stops, '')})"
    if s.get("max_steps") is not None:
        how += f"; step cap {s['max_steps']} forced by the time budget"
    return how + " (the paper, App. D: 2 epochs on WikiText, lr 1e-5)"


def _convergence(lm: list[float], alone: list[Any]) -> str:
    if any(a is None for a in alone):
        return "not recorded"
    lower = sum(a < b for a, b in zip(alone, lm, strict=True))
    if lower:
        return (f"lower in {lower} of {len(lm)} seeds: the LM was not trained to convergence, "
                "so the control partly finishes its training")  # fmt: skip
    return "not lower in any seed: more training alone does not help this LM"


def lm_valid_text(r: Mapping[str, Any], seeds: Sequence[Any]) -> str:
    """The LM's valid loss over its last evaluations, per seed of ``seeds`` (the LM the claim
    and the control start from); empty where the run did not measure it."""
    by_seed = {lm.get("seed"): lm.get("valid_loss") for lm in r.get("lm") or []}
    parts, where = [], ""
    for seed in seeds:
        v = by_seed.get(seed)
        if not v or not v.get("loss"):
            continue
        where = v.get("measured_on") or "valid split"
        loss, steps = v["loss"], v["steps"]
        parts.append(
            f"seed {seed}, steps {steps[0]}-{steps[-1]}: "
            + ", ".join(_f(x, ".3f") for x in loss)
            + f" (change {_f(loss[-1] - loss[0], '+.3f')} nats)"
        )
    if not parts:
        return ""
    return f"; the LM's valid loss at its last evaluations ({where}): " + "; ".join(parts)


def claim_memory_control(r: Mapping[str, Any]) -> dict:
    mem = r["memory"]
    per = per_seed(mem)
    missing = [p.get("seed") for p in per if not (p.get("control") or {}).get("test")]
    if missing:
        return verdict(CLAIM_D_CONTROL, UNTESTABLE, CRITERION_D_CONTROL,
                       f"no equal-compute control for seed(s) {missing}")  # fmt: skip
    lm = [p["test"]["lm"] for p in per]
    mlp = [p["test"]["mlp"] for p in per]
    ctrl = [p["control"]["test"]["control"] for p in per]
    alone = [p["control"]["test"].get("control_alone") for p in per]
    gains = log_gains(ctrl, mlp)
    status, test = decide_gain(gains, [p["control"].get("gain_tokens") for p in per])
    evidence = (
        "per seed LM / LM+MLP / control: "
        + "; ".join(f"{_f(a)} / {_f(b)} / {_f(c)}" for a, b, c in zip(lm, mlp, ctrl, strict=True))
        + f"; gain log(control / LM+MLP) per seed {', '.join(_f(g, '.4f') for g in gains)}: "
        f"{test}. How converged the LM is: trained on for the MLP's steps alone it reaches "
        f"{fmt_pm(alone)} test perplexity against the LM's {fmt_pm(lm)} ({_convergence(lm, alone)})"
        + lm_valid_text(r, [p.get("seed") for p in per])
    )
    return verdict(CLAIM_D_CONTROL, status, CRITERION_D_CONTROL, evidence, scale=scale_text(r))


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
    """Section 5's equal-compute control per seed (the finding (d-control) reads it)."""
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
    findings=(Claim(CLAIM_D_CONTROL, CRITERION_D_CONTROL, claim_memory_control),),
)
