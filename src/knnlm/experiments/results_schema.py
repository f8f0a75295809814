"""The shape of ``results.json``: the keys and per-seed shapes ``knnlm reproduce`` writes and
the report reads, and :func:`check_results`, its checker.

A spec is a tree. A dict names the keys its mapping must hold, each with the spec of its value;
``ANY`` accepts any value; ``Each(spec)`` is a list whose items all match ``spec``;
``Nullable(spec)`` is a key that must be there but may hold None; ``Maybe(spec)`` a key that
may be missing or empty. Relations between fields (one row per seed and step, per-n keys equal
to ``n_values``) are the ``RULES`` of a section, checked after its keys. Every top-level section
is optional: a partial run leaves some out, and the report shows them as not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knnlm.provenance import PACKAGES

__all__ = ["SCHEMA", "RULES", "ResultsSchemaError", "check_results"]


class ResultsSchemaError(ValueError):
    """Results that do not have the shape the report reads (in ``reproduce``, a bug)."""


ANY = None


@dataclass(frozen=True)
class Each:
    item: Any


@dataclass(frozen=True)
class Nullable:
    spec: Any


@dataclass(frozen=True)
class Maybe:
    spec: Any


def keys(names: str, spec: Any = ANY) -> dict[str, Any]:
    """Each of the space-separated ``names``, with the same value spec."""
    return {k: spec for k in names.split()}


_SPLIT = keys("tokens lm knnlm_paper knnlm_tuned")
KNNLM = keys("seeds paper_setting") | {
    "per_seed": Each(
        {"seed": ANY, "tuned": keys("knn_weight temperature tuned_on"), "valid": _SPLIT,
         "test": _SPLIT}
    ),
}  # fmt: skip

_SOLVE = keys("perplexity kl_mean kl_median steps_mean steps_max capped")
_PROJ = keys("split seed positions lm knnlm max_steps")
PROJECTION = {
    "lr_0.1": _PROJ
    | {
        "proj_f": _SOLVE,
        "proj_fg": _SOLVE,
        "converged": keys(
            "proj_f proj_fg proj_f_lm_head proj_f_target_first",
            keys("perplexity kl_mean kl_init_mean kl_removed at_tolerance"),
        ),
    },
    # Table 4's paired test reads the per-position log-probabilities.
    "lr_0.001": _PROJ | keys("proj_f proj_fg", _SOLVE | {"target_logp": ANY}),
}

MEMORY = {
    "seeds": ANY,
    "storage": keys("memory_bytes memory_bytes_without_shared_W datastore_bytes index_bytes"),
    "per_seed": Each(
        keys("seed weight valid")
        | {"test": keys("lm knnlm_tuned mlp"), "control": Nullable({"test": keys("control")})}
    ),
}

MACONDO = keys("seeds n_values") | {
    "per_seed": Each(
        {
            "test": keys("lm knnlm mlp"),
            "train": keys("lm"),
            # retrieval chosen on a dev share of the parents
            "tuned": Maybe(keys("k temperature knn_weight tuned_on")),
        }
    ),
    "curves": keys("steps lm knnlm"),
}

_CURVE = Nullable(keys("steps with_mlp without_mlp"))
HURDLE = {"seeds": ANY, "loglik": _CURVE, "loss": _CURVE}

# Where a width has 2 or more LM seeds, its shares per seed and over them (mean, t bounds).
_WIDTH_SEEDS = {"share_per_seed": Maybe(ANY), "share_over_seeds": Maybe(keys("mean lower upper n"))}
WIDTH_STUDY = {
    "rows": Maybe(
        Each(
            keys("d lm knnlm proj_fg")
            | {"proj_f": keys("perplexity share kl_mean kl_init_mean") | _WIDTH_SEEDS}
        )
    )
}

PROVENANCE = keys("python cpu_model cpu_count torch_threads device started_utc ended_utc") | {
    "packages": keys(" ".join(PACKAGES)),
    "git": keys("commit dirty"),
}

# Per LM seed; the valid loss at the LM's last evaluations where the run measured it.
LM = Each({"valid_loss": Maybe(keys("steps loss measured_on"))})

SCHEMA: dict[str, Any] = {
    "lm": Maybe(LM),
    "knnlm": Maybe(KNNLM),
    "projection": Maybe(PROJECTION),
    "memory": Maybe(MEMORY),
    "macondo": Maybe(MACONDO),
    # The same LM on Macondo at a second size (corpus scale: the quick scale's 6 per n).
    "macondo_small": Maybe(MACONDO),
    "hurdle": Maybe(HURDLE),
    "width_study": Maybe(WIDTH_STUDY),
    "provenance": Maybe(PROVENANCE),
    "not_run": Maybe(Each(keys("what why command"))),
}


def _fail(message: str) -> None:
    raise ResultsSchemaError(f"results.json: {message}")


def _check(value: Any, spec: Any, where: str) -> None:
    if spec is ANY:
        return
    if isinstance(spec, Maybe):
        if value:
            _check(value, spec.spec, where)
    elif isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.spec, where)
    elif isinstance(spec, Each):
        if not isinstance(value, Sequence) or isinstance(value, str):
            _fail(f"{where} is not a list")
        for i, item in enumerate(value):
            _check(item, spec.item, f"{where}[{i}]")
    else:
        if not isinstance(value, Mapping):
            _fail(f"{where} is not a mapping")
        for key, sub in spec.items():
            path = f"{where}.{key}" if where else key
            if key in value:
                _check(value[key], sub, path)
            elif not isinstance(sub, Maybe):
                _fail(f"{where or 'the top level'} lacks {key!r}")


# ----------------------------------------------------------------------------- relations


def _rows(rows: Any, n_seeds: int, n_steps: int, where: str) -> None:
    """One row per seed, one value per step."""
    if len(rows) != n_seeds:
        _fail(f"{where}: {len(rows)} rows for {n_seeds} seeds")
    for row in rows:
        if len(row) != n_steps:
            _fail(f"{where}: a row has {len(row)} values for {n_steps} steps")


def _knnlm_rules(k: Mapping[str, Any]) -> None:
    if len(k["per_seed"]) != len(k["seeds"]):
        _fail(f"knnlm: {len(k['per_seed'])} per-seed results for {len(k['seeds'])} seeds")


def _projection_rules(p: Mapping[str, Any]) -> None:
    low = p["lr_0.001"]
    if len(low["proj_f"]["target_logp"]) != len(low["proj_fg"]["target_logp"]):
        _fail("projection.lr_0.001: proj_f and proj_fg hold different numbers of positions")


def _macondo_rules(m: Mapping[str, Any]) -> None:
    ns = {str(n) for n in m["n_values"]}
    for i, p in enumerate(m["per_seed"]):
        for part, models in (("test", ("lm", "knnlm", "mlp")), ("train", ("lm",))):
            for model in models:
                if set(p[part][model]) != ns:
                    _fail(
                        f"macondo.per_seed[{i}].{part}.{model}: keys are not n_values {sorted(ns)}"
                    )
    c = m["curves"]
    for model in ("lm", "knnlm"):
        for n in ns:
            _rows(c[model][n], len(m["seeds"]), len(c["steps"]), f"macondo.curves.{model}.{n}")


def _hurdle_rules(h: Mapping[str, Any]) -> None:
    for key in ("loglik", "loss"):
        if h[key] is not None:
            for side in ("with_mlp", "without_mlp"):
                _rows(h[key][side], len(h["seeds"]), len(h[key]["steps"]), f"hurdle.{key}.{side}")


def _provenance_rules(p: Mapping[str, Any]) -> None:
    if not p["started_utc"] <= p["ended_utc"]:
        _fail("provenance: ends before it starts")
    if "hostname" in p or "host" in p:
        _fail("provenance records a host name")


def _lm_rules(lms: Sequence[Mapping[str, Any]]) -> None:
    for lm in lms:
        v = lm.get("valid_loss")
        if v and len(v["steps"]) != len(v["loss"]):
            _fail(f"lm: seed {lm.get('seed')} has {len(v['loss'])} valid losses for "
                  f"{len(v['steps'])} steps")  # fmt: skip


def _width_rules(w: Mapping[str, Any]) -> None:
    """Where a width has shares per seed, one per seed of the study."""
    seeds = w.get("seeds") or [w.get("seed")]
    for row in w.get("rows") or []:
        for key in ("proj_f", "proj_fg"):
            per_seed = row[key].get("share_per_seed")
            if per_seed is not None and len(per_seed) != len(seeds):
                _fail(f"width_study: d={row['d']} {key} has {len(per_seed)} shares for "
                      f"{len(seeds)} seeds")  # fmt: skip


RULES: dict[str, Callable[[Any], None]] = {
    "lm": _lm_rules,
    "knnlm": _knnlm_rules,
    "projection": _projection_rules,
    "macondo": _macondo_rules,
    "macondo_small": _macondo_rules,
    "hurdle": _hurdle_rules,
    "provenance": _provenance_rules,
    "width_study": _width_rules,
}


def check_results(results: Mapping[str, Any]) -> None:
    """Raise :class:`ResultsSchemaError` naming the first place where ``results`` departs from
    :data:`SCHEMA` or its :data:`RULES`; a missing or empty section is allowed."""
    _check(results, SCHEMA, "")
    for section, rule in RULES.items():
        if results.get(section):
            rule(results[section])
