"""The results schema's checker: the fixture passes, and each kind of departure is named."""

from __future__ import annotations

import re

import pytest

from knnlm.experiments.results_schema import ResultsSchemaError, check_results
from results_contract import make_results


def test_fixture_and_partial_results_pass():
    check_results(make_results())
    r = make_results()
    for section in ("macondo", "hurdle", "width_study"):
        r.pop(section, None)
    r["projection"] = {}  # an empty section counts as not run
    check_results(r)


def _set(path: str, value):
    def edit(r):
        *head, last = path.split("/")
        for k in head:
            r = r[int(k)] if isinstance(r, list) else r[k]
        if value is _DROP:
            r.pop(last)
        else:
            r[last] = value

    return edit


_DROP = object()


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set("knnlm/per_seed/1/tuned/tuned_on", _DROP),
            "knnlm.per_seed[1].tuned lacks 'tuned_on'",
        ),
        (_set("knnlm/seeds", [0, 1]), "2 seeds"),
        (_set("projection/lr_0.1/converged", _DROP), "projection.lr_0.1 lacks 'converged'"),
        (_set("projection/lr_0.001/proj_fg/target_logp", [0.0]), "numbers of positions"),
        (_set("memory/per_seed/0/test", _DROP), "memory.per_seed[0] lacks 'test'"),
        (_set("memory/storage", []), "memory.storage is not a mapping"),
        (_set("macondo/per_seed/2/test/mlp/3", _DROP), "macondo.per_seed[2].test.mlp"),
        (_set("macondo/n_values", [1, 2, 3, 4]), "n_values"),
        (_set("hurdle/loss", _DROP), "hurdle lacks 'loss'"),
        (_set("provenance/packages/faiss", _DROP), "provenance.packages lacks 'faiss'"),
        (_set("provenance/hostname", "box"), "host name"),
        (_set("not_run", {"what": "x"}), "not_run is not a list"),
        (_set("lm/0/valid_loss/loss", [5.0]), "1 valid losses for 5 steps"),
        (_set("width_study/rows/1/proj_f/share_per_seed", [0.7, 0.7]), "2 shares for 3 seeds"),
    ],
)
def test_departures_are_named(edit, message):
    r = make_results()
    edit(r)
    with pytest.raises(ResultsSchemaError, match=re.escape(message)):
        check_results(r)


def test_rows_per_seed_and_step():
    r = make_results()
    r["hurdle"]["loglik"]["with_mlp"][0].pop()
    with pytest.raises(ResultsSchemaError, match="values for 9 steps"):
        check_results(r)
    r = make_results()
    r["macondo"]["curves"]["knnlm"]["2"].pop()
    with pytest.raises(ResultsSchemaError, match="2 rows for 3 seeds"):
        check_results(r)


def test_nullable_parts():
    """A run without the equal-compute control or the hurdle's loss curve still has the shape."""
    r = make_results()
    r["memory"]["per_seed"][0]["control"] = None
    r["hurdle"]["loss"] = None
    check_results(r)
