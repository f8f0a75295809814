"""The projection experiment (Eq. 2) end to end on a tiny model and datastore."""

from __future__ import annotations

import pytest

from knnlm.evaluate import evaluate
from knnlm.experiments.projection import run_projection
from knnlm.report.tables import projection_tables
from knnlm.retrieval.retriever import KnnSettings
from tiny import quiet_datastore

CTX = 32


@pytest.fixture(scope="module")
def setup(lm, tiny_corpus, tmp_path_factory):
    ds = quiet_datastore(lm, tiny_corpus, tmp_path_factory.mktemp("p") / "ds", context_len=CTX)
    return lm, ds, str(tiny_corpus)


def test_weight_zero_projects_onto_the_lm_itself(setup):
    lm, ds, corpus = setup
    res = run_projection(
        lm,
        corpus,
        ds,
        context_len=CTX,
        knn=KnnSettings(k=8, knn_weight=0.0),
        max_positions=40,
        progress=False,
    )
    assert res["positions"] == 40
    for name in ("proj_f", "proj_fg"):
        assert res[name]["kl_max"] < 1e-3
        assert res[name]["perplexity"] == pytest.approx(res["lm"]["perplexity"], rel=1e-3)
    assert res["knnlm"]["perplexity"] == pytest.approx(res["lm"]["perplexity"], rel=1e-9)


def test_lm_and_knnlm_match_eval_and_projection_gets_close(setup):
    lm, ds, corpus = setup
    knn = KnnSettings(k=16, knn_weight=0.5, temperature=3.0)
    res = run_projection(
        lm,
        corpus,
        ds,
        context_len=CTX,
        knn=knn,
        max_positions=None,
        solve_batch=64,
        progress=False,
    )
    ev = evaluate(lm, corpus, "valid", context_len=CTX, datastore=ds, knn=knn, progress=False)
    assert res["positions"] == ev["tokens"]
    assert res["lm"]["perplexity"] == pytest.approx(ev["lm"]["perplexity"], rel=1e-5)
    assert res["knnlm"]["perplexity"] == pytest.approx(ev["knnlm"]["perplexity"], rel=1e-5)
    # The projection moves f(z) from the LM towards the kNN-LM.
    for name in ("proj_f", "proj_fg"):
        assert res[name]["kl_mean"] < res[name]["kl_init_mean"]
    md = projection_tables(res)
    assert "Table 1" in md and "Table 3" in md


def test_fixed_steps_records_a_curve(setup):
    lm, ds, corpus = setup
    res = run_projection(
        lm,
        corpus,
        ds,
        context_len=CTX,
        knn=KnnSettings(k=8, knn_weight=0.25),
        max_positions=20,
        lr=1e-3,
        fixed_steps=10,
        progress=False,
    )
    for name in ("proj_f", "proj_fg"):
        assert len(res[name]["kl_curve"]) == 10
        assert res[name]["steps_max"] == 10


def test_converged_solve_is_at_most_the_lr_study_on_the_same_positions(setup):
    lm, ds, corpus = setup
    common = dict(context_len=CTX, knn=KnnSettings(k=8, knn_weight=0.5, temperature=2.0),
                  max_positions=30, seed=4, progress=False)  # fmt: skip
    conv = run_projection(lm, corpus, ds, converged=True, keep_positions=True, **common)
    low = run_projection(lm, corpus, ds, lr=1e-3, fixed_steps=100, keep_positions=True, **common)
    assert conv["knnlm"]["target_logp"] == low["knnlm"]["target_logp"]  # the same positions
    c = conv["converged"]
    for name in ("proj_f", "proj_fg"):
        assert all(a <= b + 1e-6 for a, b in zip(c[name]["kl"], low[name]["kl"], strict=True))
        assert c[name]["kl_mean"] <= conv[name]["kl_mean"] + 1e-6  # and below the paper's rule
        assert c[name]["at_tolerance"] == 30
        assert 0 < c[name]["kl_removed"] <= 1
        bands = c[name]["kl_curve_bands"]
        assert bands["q25"][-1] <= bands["median"][-1] <= bands["q75"][-1]
    # Both sensitivity rows start where f does: at p_lm (f without its norm gets the normed z).
    assert c["proj_f_lm_head"]["kl_init_mean"] == pytest.approx(c["proj_f"]["kl_init_mean"], 1e-4)
    rev = c["proj_f_target_first"]
    assert rev["kl_direction"] == "KL[p_knnlm || f(z)]"
    assert rev["kl_mean"] < rev["kl_init_mean"]
