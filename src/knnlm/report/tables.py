"""Markdown tables for results and the reproduction report.

Every number that reaches a table goes through :func:`fmt_number`, so a test (or a reader)
can recompute the exact string shown in the report from the value stored in the results JSON.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.experiments.stats import mean_std

MISSING = "–"  # en dash: a value that was not measured (None)
CHECK = "✓"
CROSS = "✗"
_ALIGN_RULES = {"l": ":---", "r": "---:", "c": ":---:"}


def _scalar(x: Any) -> Any:
    """Unwrap numpy scalars / 0-d arrays / torch scalars into Python numbers."""
    item = getattr(x, "item", None)
    if item is not None and getattr(x, "ndim", 0) == 0:
        return item()
    return x


def fmt_number(x: Any, floatfmt: str = ".2f") -> str:
    """Format one table value; the single source of truth for numbers in the report.

    None -> "–"; bool -> "✓"/"✗"; integers -> plain digits (no separators);
    real numbers -> ``format(x, floatfmt)`` with "nan"/"inf"/"-inf" for non-finite values and
    no "-0.00" (a rounded negative zero is shown as zero); anything else -> ``str(x)``.
    """
    x = _scalar(x)
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return CHECK if x else CROSS
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        try:
            s = format(x, floatfmt)
        except ValueError as e:
            raise KnnlmError(f"invalid number format {floatfmt!r}: {e}") from None
        # "-0.00" reads as a sign error; the value rounds to zero.
        if s.startswith("-") and float(s) == 0.0:
            s = s[1:]
        return s
    return str(x)


def _cell(x: Any, floatfmt: str) -> str:
    """A table cell: the formatted value with pipes escaped and newlines flattened."""
    s = fmt_number(x, floatfmt)
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _is_number(x: Any) -> bool:
    x = _scalar(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def markdown_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    align: Sequence[str] | None = None,
    floatfmt: str | Sequence[str] = ".2f",
) -> str:
    """A GitHub-style pipe table (no trailing newline).

    ``align`` gives "l", "r" or "c" per column; by default numeric columns (every non-None
    value a number) are right-aligned and the others left-aligned. ``floatfmt`` is one format
    spec for every column or one per column. Cells are padded for a readable source.
    """
    headers = [str(h) for h in headers]
    ncol = len(headers)
    if ncol == 0:
        raise KnnlmError("a table needs at least one column")
    rows = [list(r) for r in rows]
    for i, r in enumerate(rows):
        if len(r) != ncol:
            raise KnnlmError(f"table row {i} has {len(r)} cells, expected {ncol} ({headers})")
    fmts = [floatfmt] * ncol if isinstance(floatfmt, str) else list(floatfmt)
    if len(fmts) != ncol:
        raise KnnlmError(f"floatfmt has {len(fmts)} entries, expected {ncol}")
    if align is None:
        align = [
            "r"
            if any(r[j] is not None for r in rows)
            and all(r[j] is None or _is_number(r[j]) for r in rows)
            else "l"
            for j in range(ncol)
        ]
    align = list(align)
    if len(align) != ncol or any(a not in _ALIGN_RULES for a in align):
        raise KnnlmError(f"align must give one of l/r/c for each of the {ncol} columns: {align}")

    head = [_cell(h, "") for h in headers]
    body = [[_cell(v, fmts[j]) for j, v in enumerate(r)] for r in rows]
    widths = [max(len(head[j]), 3, *(len(r[j]) for r in body)) for j in range(ncol)]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(widths[j]) if align[j] == "r" else c.ljust(widths[j])
            for j, c in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = []
    for j, a in enumerate(align):
        r = _ALIGN_RULES[a]
        rule.append(r[0] + "-" * (widths[j] - len(r)) + r[1:])
    out = [line(head), "| " + " | ".join(rule) + " |"]
    out += [line(r) for r in body]
    return "\n".join(out)


def _setting_value(v: Any) -> str:
    v = _scalar(v)
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return repr(float(v))  # shortest round-trip text: the exact value that was used
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_setting_value(x) for x in v) + "]"
    return str(v)


def settings_line(settings: Mapping[str, Any]) -> str:
    """One line "k=1024, knn_weight=0.25, ..." naming the settings behind a table.

    Nested mappings are flattened with dotted keys ("index.nprobe=32"); floats keep their
    exact shortest representation so the line can be copied back into a command.
    """
    return ", ".join(f"{k}={v}" for k, v in setting_pairs(settings))


def setting_pairs(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, exact value) of every leaf of ``settings``, in order."""
    if not isinstance(settings, Mapping):
        raise KnnlmError(f"settings must be a mapping, got {type(settings).__name__}")
    parts: list[tuple[str, str]] = []

    def walk(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                walk(key + ".", v)
            else:
                parts.append((key, _setting_value(v)))

    walk("", settings)
    return parts


def settings_table(settings: Mapping[str, Any], pairs_per_row: int = 3) -> str:
    """The settings as a compact table: ``pairs_per_row`` (setting, value) pairs per row."""
    pairs = setting_pairs(settings)
    rows = []
    for i in range(0, len(pairs), pairs_per_row):
        chunk = pairs[i : i + pairs_per_row]
        chunk += [("", "")] * (pairs_per_row - len(chunk))
        rows.append([x for k, v in chunk for x in ((f"`{k}`" if k else ""), v)])
    return markdown_table(["setting", "value"] * pairs_per_row, rows,
                          align=["l", "l"] * pairs_per_row)  # fmt: skip


def fmt_pm(values: Sequence[Any], floatfmt: str = ".2f") -> str:
    """ "mean ± std" over seeds (sample std), the mean alone for one seed, "–" for none."""
    mean, std = mean_std(values)
    if mean is None:
        return MISSING
    if std is None:
        return fmt_number(mean, floatfmt)
    return f"{fmt_number(mean, floatfmt)} ± {fmt_number(std, floatfmt)}"


CLAIM_STATUSES = ("held", "not held", "inconclusive", "untestable here")


def claims_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """The paper's claims as a short table, claim | status (held / not held / inconclusive /
    untestable here) | what this scale can test against what the paper ran (when the claims
    say), then each claim's criterion and evidence below it."""
    rows, details = [], []
    for i, c in enumerate(claims):
        missing = [k for k in ("claim", "status", "criterion", "evidence") if k not in c]
        if missing:
            raise KnnlmError(f"claim {i} lacks {', '.join(missing)}")
        if c["status"] not in CLAIM_STATUSES:
            raise KnnlmError(
                f"claim {i} has status {c['status']!r}; expected one of {CLAIM_STATUSES}"
            )
        rows.append([str(c["claim"]), c["status"], c.get("scale")])
        details.append(
            f"- **{c['claim']}: {c['status']}.**\n  - Criterion: {c['criterion']}.\n"
            f"  - Evidence: {c['evidence']}."
        )
    if any(r[2] is not None for r in rows):
        head = ["Claim", "Status", "What this scale can test (paper / here)"]
        table = markdown_table(head, rows, align=["l", "l", "l"])
    else:
        table = markdown_table(["Claim", "Status"], [r[:2] for r in rows], align=["l", "l"])
    return table + "\n\nDetails, per claim:\n\n" + "\n".join(details)


def projection_tables(result: Mapping[str, Any]) -> str:
    """Table 1 (perplexities) and Table 3 (KL statistics) of a
    :func:`knnlm.experiments.projection.run.run_projection` result, as Markdown."""
    s = result["settings"]
    t1 = markdown_table(
        ["", "perplexity"],
        [
            ["LM", result["lm"]["perplexity"]],
            ["kNN-LM", result["knnlm"]["perplexity"]],
            ["f(z*) (projection onto f)", result["proj_f"]["perplexity"]],
            ["f∘g(z*) (projection onto f∘g)", result["proj_fg"]["perplexity"]],
        ],
    )
    t3 = markdown_table(
        ["projection", "KL mean", "KL median", "KL p90", "KL max", "steps (mean)"],
        [
            [
                label,
                result[key]["kl_mean"],
                result[key]["kl_median"],
                result[key]["kl_p90"],
                result[key]["kl_max"],
                result[key]["steps_mean"],
            ]
            for label, key in (("f", "proj_f"), ("f∘g", "proj_fg"))
        ],
        floatfmt=[".4f"] * 5 + [".1f"],
    )
    # ProjectionSettings whole; results written before it hold the same keys flat.
    run = s.get("projection") or {**s, "window": {k: s[k] for k in ("context_len", "stride")}}
    shown = {"split": run["split"], **run["window"],
             **{k: s[k] for k in ("k", "knn_weight", "temperature")},
             "lr": run["lr"], "tol": run["tol"], "positions": result["positions"]}  # fmt: skip
    line = settings_line(shown)
    return (
        f"**Table 1: perplexity on the same {result['positions']} positions**\n\n{t1}\n\n"
        f"{line}\n\n**Table 3: KL[f(z*) || p_knnlm] after solving Eq. 2**\n\n{t3}\n"
    )
