"""The tuner's pure parts: the perplexity / speed frontier, the pick, and the settings file.

A point is a dict with at least ``perplexity`` and ``tok_s`` (and the settings that produced
it). :func:`pareto_front` keeps the points no other point beats on both; :func:`pick` chooses
the fastest point that keeps a share of the default kNN-LM's gain, or the best perplexity at a
share of the LM's speed. The settings file (``knnlm tune --out``) holds the pick's settings
objects whole: ``{"datastore": ..., "knn": KnnSettings, "mix": MixSettings}`` (each as its
``to_dict``); :func:`load_tuned_settings` reads it (or an older flat file of option names) as
the option names ``eval`` / ``generate`` / the API take (:data:`SETTINGS_KEYS`). No torch
here: the CLI reads settings files before it loads anything heavy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.fileio import write_json_atomic

# The options a settings file holds: the search-time settings of eval / generate / the API.
SETTINGS_KEYS = ("datastore", "k", "knn_weight", "knn_temperature", "nprobe", "search",
                 "pointers", "gate", "retrieval_rate")  # fmt: skip
# Where each lives in a file of settings objects ("knn": KnnSettings, "mix": MixSettings) ...
_PLACES = {"k": ("knn", "k"), "nprobe": ("knn", "nprobe"), "search": ("knn", "search"),
           "knn_weight": ("mix", "knn_weight"), "knn_temperature": ("mix", "temperature"),
           "pointers": ("mix", "pointers"), "gate": ("mix", "gate"),
           "retrieval_rate": ("mix", "retrieval_rate")}  # fmt: skip
# ... and the fields a file writes but cannot set (knnlm tune leaves them at these defaults).
_FIXED = {("knn", "recompute"): True, ("knn", "exclude_self"): "auto", ("mix", "memory"): None,
          ("mix", "memory_weight"): 0.25, ("mix", "gate_weight"): "fixed"}  # fmt: skip


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal perplexity at higher or
    equal tok/s, one of them strictly), fastest first; of equal points the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (-points[i]["tok_s"], points[i]["perplexity"]))
    front, best = [], math.inf
    for i in order:  # by falling speed: a point joins when it beats every faster one
        if points[i]["perplexity"] < best:
            front.append(i)
            best = points[i]["perplexity"]
    return front


def gain_kept(ppl: float, lm_ppl: float, default_ppl: float) -> float:
    """The share of the default kNN-LM's log-perplexity gain over the LM that ``ppl`` keeps."""
    gain = math.log(lm_ppl) - math.log(default_ppl)
    if not gain > 0:
        raise KnnlmError(
            f"the default kNN-LM does not beat the LM on this split (perplexity {default_ppl:.3f} "
            f"vs {lm_ppl:.3f}): there is no gain to keep; pick with --min-speed instead"
        )
    return (math.log(lm_ppl) - math.log(ppl)) / gain


def pick(
    points: Sequence[Mapping[str, Any]],
    lm: Mapping[str, float],
    default_ppl: float,
    keep_gain: float = 0.95,
    min_speed: float | None = None,
) -> int:
    """Index of the chosen point: with ``min_speed`` (a share of the LM's tok/s ``lm["tok_s"]``)
    the best perplexity among the points at least that fast; otherwise the fastest point that
    keeps ``keep_gain`` of the gain (ties: the better perplexity)."""
    if min_speed is not None:
        if not min_speed > 0:
            raise KnnlmError(f"--min-speed must be positive, got {min_speed}")
        fast = [i for i, p in enumerate(points) if p["tok_s"] >= min_speed * lm["tok_s"]]
        if not fast:
            top = max(p["tok_s"] for p in points) / lm["tok_s"]
            raise KnnlmError(
                f"no setting reaches --min-speed {min_speed:g} of the LM's tok/s (the fastest "
                f"reaches {top:.3f}); lower it"
            )
        return min(fast, key=lambda i: (points[i]["perplexity"], -points[i]["tok_s"]))
    if not 0 < keep_gain <= 1:
        raise KnnlmError(f"--keep-gain must be in (0, 1], got {keep_gain}")
    shares = [gain_kept(p["perplexity"], lm["perplexity"], default_ppl) for p in points]
    good = [i for i, s in enumerate(shares) if s >= keep_gain]
    if not good:
        raise KnnlmError(
            f"no setting keeps --keep-gain {keep_gain:g} of the gain (the best keeps "
            f"{max(shares):.3f}); lower it"
        )
    return max(good, key=lambda i: (points[i]["tok_s"], -points[i]["perplexity"]))


def write_tuned_settings(path: str | Path, settings: Mapping[str, Any]) -> Path:
    """Write a settings file (atomically): ``settings`` is ``{"datastore", "knn", "mix"}``, the
    settings objects whole (``knnlm.tune`` makes it)."""
    check_settings(dict(settings), f"settings {path}")
    write_json_atomic(Path(path), dict(settings))
    return Path(path)


def load_tuned_settings(path: str | Path) -> dict[str, Any]:
    """The settings of a file ``knnlm tune --out`` wrote: a dict of :data:`SETTINGS_KEYS`
    (absent keys are left out); one clear :class:`KnnlmError` for anything else."""
    what = f"settings file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KnnlmError(f"{what}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KnnlmError(f"{what}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise KnnlmError(f"{what}: not a JSON object of settings; write one with knnlm tune --out")
    return check_settings(data, what)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# key -> (accepts the value, what it must be); None is accepted where a setting is optional
_RULES = {
    "k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "a whole number >= 1"),
    "knn_weight": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "knn_temperature": (lambda v: _number(v) and v > 0, "a positive number"),
    "nprobe": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
               "null or a whole number >= 1"),
    "search": (lambda v: isinstance(v, str) and v != "", "a search name (auto, exact, faiss)"),
    "pointers": (lambda v: v is None or (_number(v) and v >= 1), "null or a number >= 1"),
    "gate": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a gate folder"),
    "retrieval_rate": (lambda v: v is None or (_number(v) and 0 <= v <= 1),
                       "null or a number in [0, 1]"),
    "datastore": (lambda v: v is None or (isinstance(v, str) and v != ""),
                  "null or a datastore folder"),
}  # fmt: skip


def check_settings(data: dict[str, Any], what: str) -> dict[str, Any]:
    """The option names and values of ``data`` (settings objects whole, or an older flat file)
    when every key is a known setting with a valid value; else one clear error."""
    if "knn" in data or "mix" in data:
        data = _flat(data, what)
    unknown = sorted(set(data) - set(SETTINGS_KEYS))
    if unknown:
        raise KnnlmError(
            f"{what}: unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS_KEYS)})"
        )
    for key, v in data.items():
        ok, must = _RULES[key]
        if not ok(v):
            raise KnnlmError(f"{what}: {key} must be {must}, got {v!r}")
    return dict(data)


def _flat(data: dict[str, Any], what: str) -> dict[str, Any]:
    """A file of settings objects as option names (``retrieval_rate`` None without a gate, as
    in a flat file); its other fields must keep the defaults knnlm tune writes."""
    extra = sorted(set(data) - {"datastore", "knn", "mix"})
    if extra:
        raise KnnlmError(f"{what}: unknown setting {extra[0]!r} (known: datastore, knn, mix)")
    parts = {part: data.get(part, {}) for part in ("knn", "mix")}
    for part, fields in parts.items():
        if not isinstance(fields, dict):
            raise KnnlmError(f"{what}: {part} must be a JSON object of settings, got {fields!r}")
        known = {f for p, f in (*_PLACES.values(), *_FIXED) if p == part}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise KnnlmError(f"{what}: unknown setting {part}.{unknown[0]} "
                             f"(known: {', '.join(sorted(known))})")  # fmt: skip
    for (part, field), default in _FIXED.items():
        if parts[part].get(field, default) != default:
            raise KnnlmError(f"{what}: {part}.{field} = {parts[part][field]!r} cannot be "
                             f"taken from a settings file (only {default!r}); pass it as an "
                             "option")  # fmt: skip
    out = {key: parts[p][f] for key, (p, f) in _PLACES.items() if f in parts[p]}
    if "datastore" in data:
        out["datastore"] = data["datastore"]
    if out.get("gate") is None and out.get("retrieval_rate") == 1.0:
        out["retrieval_rate"] = None  # no gate: the rate is unused
    return out


def merge_settings(
    file: Mapping[str, Any], given: Mapping[str, Any], names: Mapping[str, str], path: Any
) -> dict[str, Any]:
    """The file's settings with ``given`` (the settings passed explicitly beside it, by key)
    added; an explicit value that differs from the file's (None included: the file says "not
    used") is refused, naming ``names[key]`` (the flag or the Python argument)."""
    out = dict(file)
    for key, v in given.items():
        if key in file and file[key] != v:
            raise KnnlmError(
                f"{names.get(key, key)} {v} conflicts with settings file {path} ({key} = "
                f"{file[key]}); drop one of them"
            )
        out[key] = v
    return out
