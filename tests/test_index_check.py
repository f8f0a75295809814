"""The perplexity change an approximate index causes, measured when it is built (--corpus)."""

from __future__ import annotations

import json

import pytest

from knnlm.errors import KnnlmError
from knnlm.retrieval.search.conventions import record_index_check
from tiny import run_cli


def _eval(monkeypatch, capsys, lm, corpus, ds, tmp_path, search: str) -> float:
    out = tmp_path / f"{search}.json"
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", lm, "--corpus", corpus,
                           "--split", "valid", "--context-len", 32, "--stride", 16,
                           "--datastore", ds, "--k", 8, "--search", search, "--json", out,
                           "--quiet")  # fmt: skip
    assert code == 0, err
    return json.loads(out.read_text())["knnlm"]["perplexity"]


def test_index_build_reports_the_perplexity_change_it_causes(
    monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path
):
    ds = tmp_path / "ds"
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "--model", tiny_lm_dir,
                           "--corpus", tiny_corpus, "--out", ds, "--context-len", 32,
                           "--stride", 16, "--quiet")  # fmt: skip
    assert code == 0, err
    # A coarse IVF-PQ (1 of 8 lists probed, 4 bytes a key) misses neighbours on purpose.
    code, out, err = run_cli(monkeypatch, capsys, "datastore", "index", ds, "--type", "ivfpq",
                             "--nlist", 8, "--nprobe", 1, "--pq-bytes", 4, "--corpus",
                             tiny_corpus, "--split", "valid", "--k", 8, "--quiet")  # fmt: skip
    assert code == 0, err
    check = json.loads((ds / "index.json").read_text())["perplexity_check"]
    assert "through the index" in out
    # Both sides equal the eval command's own figures with each search (the datastore's
    # window, context 32 / stride 16, is the check's default).
    exact = _eval(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, ds, tmp_path, "exact")
    index = _eval(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, ds, tmp_path, "faiss")
    assert check["exact_perplexity"] == pytest.approx(exact, rel=1e-9)
    assert check["index_perplexity"] == pytest.approx(index, rel=1e-9)
    assert check["index_perplexity"] != pytest.approx(check["exact_perplexity"], rel=1e-6)
    assert check["relative_change"] == pytest.approx(index / exact - 1)
    assert (check["split"], check["k"]) == ("valid", 8)


def test_a_check_of_an_index_replaced_meanwhile_is_not_recorded(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"index_sha256": "new"}))
    with pytest.raises(KnnlmError, match="changed during"):
        record_index_check(tmp_path, {"exact_perplexity": 1.0}, "old")
    assert "perplexity_check" not in json.loads((tmp_path / "index.json").read_text())
    record_index_check(tmp_path, {"exact_perplexity": 1.0}, "new")
    assert json.loads((tmp_path / "index.json").read_text())["perplexity_check"]
