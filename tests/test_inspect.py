"""knnlm inspect's view model, static page, request checks and CLI, against an independent
numpy brute force (the server and the browser: tests/test_inspect_server.py)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.inspect.requests import MAX_BODY, RequestError, parse_body, parse_request
from knnlm.inspect.static import write_static
from knnlm.inspect.steps import continue_text
from knnlm.inspect.view import Inspector, ViewSettings
from knnlm.retrieval.gate import Gate
from knnlm.retrieval.memory import MemoryMLP
from tiny import run_cli, small_datastore

TEXT = "the old house by the river was quiet ."


@pytest.fixture(scope="module")
def ds_dir(lm, small_corpus, tmp_path_factory):
    return small_datastore(lm, small_corpus, tmp_path_factory.mktemp("inspect") / "ds")


@pytest.fixture(scope="module")
def insp(lm, ds_dir):
    return Inspector(lm, ds_dir, k_max=16)


def brute_force(model, ds_dir, ids, t, k, w, temp) -> dict:
    """Target t of ``ids`` from a forward over ids[:t] alone, the ffn_input key grabbed from
    the last block, every datastore row's squared L2 distance, in float64 numpy."""
    keys = np.load(ds_dir / "keys.npy").astype(np.float64)
    values = np.load(ds_dir / "values.npy")
    grabbed = {}
    block = model.transformer.h[-1]
    handle = block.ln_2.register_forward_hook(lambda m, a, o: grabbed.__setitem__("k", o))
    with torch.no_grad():
        logits = model(torch.tensor([list(ids[:t])])).logits[0, -1].double().numpy()
    handle.remove()
    q = grabbed["k"][0, -1].double().numpy()
    p_lm = np.exp(logits - logits.max())
    p_lm /= p_lm.sum()
    d = ((keys - q) ** 2).sum(1)
    order = np.argsort(d, kind="stable")[:k]
    weights = np.exp(-(d[order] - d[order].min()) / temp)
    weights /= weights.sum()
    p_knn = np.zeros_like(p_lm)
    for row, wt in zip(order, weights, strict=True):
        p_knn[values[row]] += wt
    mix = (1 - w) * p_lm + w * p_knn
    return {"rows": order, "dist": d[order], "weights": weights, "lm": p_lm, "knn": p_knn,
            "mix": mix, "target": int(ids[t])}  # fmt: skip


def check_token(details: dict, ref: dict) -> None:
    nbs = details["neighbours"]
    assert [n["row"] for n in nbs] == ref["rows"].tolist()
    np.testing.assert_allclose([n["distance"] for n in nbs], ref["dist"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([n["weight"] for n in nbs], ref["weights"], atol=2e-5)
    for name in ("lm", "knn", "mix"):
        assert details["probs"][name] == pytest.approx(ref[name][ref["target"]], abs=2e-5)
        top = details["top"][name]
        want = np.sort(ref[name])[::-1][: len(top)]
        np.testing.assert_allclose([t["p"] for t in top], want, atol=2e-5)
        assert all(ref[name][t["id"]] == pytest.approx(t["p"], abs=2e-5) for t in top)
    for n in nbs:  # the neighbours listed as sharing a target carry that target
        same = [m for m in nbs if m["rank"] in n["shares"]]
        assert all(m["target_id"] == n["target_id"] for m in same)
        assert n["target_p"] == pytest.approx(ref["knn"][n["target_id"]], abs=2e-5)


def test_tokens_neighbours_and_distributions_equal_brute_force(insp, lm, ds_dir):
    ids = insp.encode(TEXT)
    k, w, temp = 6, 0.3, 2.0
    view = insp.view(ids, ViewSettings(k, w, temp), token=4)
    refs = [brute_force(lm.model, ds_dir, ids, t, k, w, temp) for t in range(1, len(ids))]
    check_token(view["token"], refs[3])
    toks = view["tokens"][1:]
    for name in ("lm", "knn", "mix"):
        want = [math.log(r[name][r["target"]]) if r[name][r["target"]] > 0 else None for r in refs]
        got = [t[name] for t in toks]
        assert [g is None for g in got] == [x is None for x in want]
        np.testing.assert_allclose([g for g in got if g is not None],
                                   [x for x in want if x is not None], atol=1e-4)  # fmt: skip
    nll = np.cumsum([-math.log(r["mix"][r["target"]]) for r in refs])
    np.testing.assert_allclose(
        view["perplexity"]["knnlm"], np.exp(nll / np.arange(1, len(refs) + 1)), rtol=1e-4
    )
    gains = [t["gain"] for t in toks]
    assert any(g > 0 for g in gains) and all(t["colour"].startswith("rgba(") for t in toks)


def test_controls_recompute_from_the_neighbours_kept_without_a_search(insp, lm, ds_dir):
    ids = insp.encode(TEXT)
    insp.view(ids, ViewSettings(16, 0.25, 1.0))
    searched = insp.searches
    for k, w, temp in [(3, 0.8, 0.5), (16, 0.05, 4.0), (1, 1.0, 1.0)]:
        view = insp.view(ids, ViewSettings(k, w, temp), token=2)
        check_token(view["token"], brute_force(lm.model, ds_dir, ids, 2, k, w, temp))
    assert insp.searches == searched
    with pytest.raises(KnnlmError, match="k must be in"):
        insp.view(ids, ViewSettings(17, 0.25, 1.0))


def test_generation_takes_the_mixtures_likeliest_token_at_each_step(insp, lm, ds_dir):
    ids = insp.encode("the village")
    s = ViewSettings(5, 0.5, 1.0)
    out = continue_text(insp, ids, s, 3)
    assert 1 <= len(out["steps"]) <= 3
    prefix = list(ids)
    for step in out["steps"]:
        ref = brute_force(lm.model, ds_dir, [*prefix, 0], len(prefix), 5, 0.5, 1.0)
        assert step["id"] == int(np.argmax(ref["mix"]))
        assert step["probs"]["mix"] == pytest.approx(ref["mix"].max(), abs=2e-5)
        assert [n["row"] for n in step["neighbours"]] == ref["rows"].tolist()
        prefix.append(step["id"])
    assert [t["id"] for t in out["view"]["tokens"]] == prefix


def test_gate_and_memory_when_given(lm, ds_dir):
    entropy_gate = Gate("entropy", {}, np.linspace(0.0, 10.0, 1001))
    memory = MemoryMLP.from_output_embedding(lm.model.lm_head.weight, hidden=8)
    insp = Inspector(lm, ds_dir, k_max=8, gate=entropy_gate, memory=memory)
    ids = insp.encode(TEXT)
    none = insp.view(ids, ViewSettings(8, 0.5, 1.0, retrieval_rate=0.0), token=3)
    assert all(t["mix"] == t["lm"] and not t["searched"] for t in none["tokens"][1:])
    every = insp.view(ids, ViewSettings(8, 0.5, 1.0, retrieval_rate=1.0, memory_weight=0.4), 3)
    assert all(t["searched"] for t in every["tokens"][1:])
    p = every["token"]["probs"]
    assert p["lm_memory"] == pytest.approx(0.6 * p["lm"] + 0.4 * p["memory"], rel=1e-5)
    assert p["mix"] == pytest.approx(0.5 * p["lm"] + 0.5 * p["knn"], rel=1e-5)


def test_static_page_holds_every_tokens_numbers_and_fetches_nothing(insp, tmp_path):
    s = ViewSettings(6, 0.3, 2.0)
    out = write_static(insp, [("a text", TEXT)], s, tmp_path / "page.html")
    html = out.read_text()
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', html).group(1))
    page = data["static"][0]
    ids = insp.encode(TEXT)
    assert page["details"]["4"] == insp.view(ids, s, token=4)["token"]
    assert len(page["details"]) == len(ids) - 1
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<svg" in html


def test_requests_are_bounded_and_typed():
    d = ViewSettings()
    assert parse_request({"text": "a b", "k": 3, "token": 2}, d)[1].k == 3
    cases = [
        (lambda: parse_body(b"x" * (MAX_BODY + 1)), 413),
        (lambda: parse_body(b"{not json"), 400),
        (lambda: parse_body(b"\xff\xfe"), 400),
        (lambda: parse_body(b"[1, 2]"), 422),
        (lambda: parse_body(b"[" * 30_000 + b"]" * 30_000), 400),
        (lambda: parse_body(b'{"text": "a", "k": ' + b"9" * 5000 + b"}"), 400),
        (lambda: parse_request({"text": 3}, d), 422),
        (lambda: parse_request({"text": "a", "k": "3"}, d), 422),
        (lambda: parse_request({"text": "a", "k": 2.5}, d), 422),
        (lambda: parse_request({"text": "a", "knn_weight": True}, d), 422),
        (lambda: parse_request({"text": "a", "path": "/etc/passwd"}, d), 422),
        (lambda: parse_request({"text": "a" * 20_001}, d), 413),
    ]
    for call, status in cases:
        with pytest.raises(RequestError) as err:
            call()
        assert err.value.status == status and err.value.message


def test_cli_mistakes_are_one_line(monkeypatch, capsys, tiny_lm_dir, ds_dir, tmp_path):
    base = ["inspect", "-m", tiny_lm_dir, "-d", ds_dir]
    for extra, word in [
        (["--k", "40", "--k-max", "8"], "--k must be"),
        (["--max-pending", "4"], "--max-pending"),
        (["--text", tmp_path / "t.txt"], "--text and --html"),
        (["--knn-weight", "2"], "--knn-weight"),
        (["--retrieval-rate", "0.5"], "--retrieval-rate needs --gate"),
    ]:
        code, out, err = run_cli(monkeypatch, capsys, *base, *extra)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err


def test_cli_writes_the_static_page(monkeypatch, capsys, tiny_lm_dir, ds_dir, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", "-m", tiny_lm_dir, "-d", ds_dir,
                             "--k-max", "8", "--k", "4", "--text", tmp_path / "t.txt",
                             "--html", tmp_path / "o.html")  # fmt: skip
    assert code == 0, err
    assert 'id="knnlm-data"' in (tmp_path / "o.html").read_text()


def test_a_host_other_than_loopback_warns(monkeypatch, capsys, tiny_lm_dir, ds_dir):
    import knnlm.inspect.server as server

    monkeypatch.setattr(server, "serve", lambda app, sock, host: sock.close())
    code, out, err = run_cli(monkeypatch, capsys, "inspect", "-m", tiny_lm_dir, "-d", ds_dir,
                             "--k-max", "8", "--k", "4", "--host", "0.0.0.0")  # fmt: skip
    assert code == 0 and "warning: listening on 0.0.0.0" in err and "http://0.0.0.0:" in out
    code, out, err = run_cli(monkeypatch, capsys, "inspect", "-m", tiny_lm_dir, "-d", ds_dir,
                             "--k-max", "8", "--k", "4")  # fmt: skip
    assert code == 0 and "warning" not in err and "http://127.0.0.1:" in out


def test_reproduction_page_of_a_passage_and_macondo_sentences(lm, tiny_lm_dir, ds_dir,
                                                              small_corpus, tmp_path):  # fmt: skip
    """inspect.html from a reproduction's results: the natural-text passage under the run's LM
    and datastore; Macondo sentences under an example datastore, whose rows' contexts are the
    training sentences themselves."""
    from knnlm.inspect.report_page import write_report_page
    from knnlm.retrieval.datastore import build_example_datastore

    seed = tmp_path / "macondo" / "seed-0"
    train = ["Ana Lopez, is the parent of Rio", "Rio Lopez, who was born in 1900, is a baker"]
    test = ["Ana Lopez, is the parent of Sol"]
    (seed / "data").mkdir(parents=True)
    for name, texts in (("train", train), ("test", test)):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        (seed / "data" / f"{name}.jsonl").write_text(lines)
    (seed / "model").symlink_to(tiny_lm_dir)
    build_example_datastore(lm, train, seed / "datastore", key_dtype="float32", progress=False)
    results = {
        "config": {"k": 8, "knn_weight": 0.25, "temperature": 1.0},
        "knnlm": {
            "settings": {
                "model": str(tiny_lm_dir),
                "datastore": str(ds_dir),
                "corpus": str(small_corpus),
            }
        },  # fmt: skip
        "macondo": {"figure1": str(tmp_path / "macondo" / "figure1.png")},
    }
    (small_corpus / "test.txt").write_text(TEXT + "\n")
    assert write_report_page(tmp_path, results) == {}
    html = (tmp_path / "inspect.html").read_text()
    pages = json.loads(re.search(r'type="application/json">(.*?)</script>', html).group(1))
    natural, macondo = pages["static"]
    assert natural["text"] == TEXT + "\n" and macondo["text"] == test[0]
    for details in macondo["details"].values():
        for nb in details["neighbours"]:
            stored = (nb["before"] + nb["target"]).split("<|endoftext|>")[-1]
            assert any(stored in t for t in train), stored  # a training sentence's text
