"""knnlm tune: the frontier is Pareto, the pick obeys its rule, the settings file reproduces the
reported perplexity through eval and the API, and a bad settings file is one clear line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from knnlm.errors import KnnlmError
from knnlm.frontier import SETTINGS_KEYS, load_tuned_settings, pareto_front, pick
from tiny import run_cli

# A synthetic timing table: LM perplexity 100 at 1000 tok/s, the default kNN-LM 50 at 300.
LM = {"perplexity": 100.0, "tok_s": 1000.0}
DEFAULT_PPL = 50.0
TABLE = [
    {"name": "default", "perplexity": 50.0, "tok_s": 300.0},
    {"name": "A", "perplexity": 51.0, "tok_s": 500.0},  # keeps (ln 100 - ln 51) / ln 2 = 0.9714
    {"name": "B", "perplexity": 52.0, "tok_s": 800.0},  # keeps 0.9434: fast, under 0.95
    {"name": "C", "perplexity": 50.5, "tok_s": 400.0},  # keeps 0.9856: better, slower than A
    {"name": "D", "perplexity": 60.0, "tok_s": 1000.0},  # the fastest; keeps 0.737
    {"name": "E", "perplexity": 55.0, "tok_s": 450.0},  # dominated by A
    {"name": "F", "perplexity": 51.0, "tok_s": 500.0},  # equal to A
]


def _dominated(p, points):
    return any(q["perplexity"] <= p["perplexity"] and q["tok_s"] >= p["tok_s"]
               and (q["perplexity"] < p["perplexity"] or q["tok_s"] > p["tok_s"])
               for q in points)  # fmt: skip


def test_the_frontier_is_pareto_on_a_synthetic_table():
    front = pareto_front(TABLE)
    assert [TABLE[i]["name"] for i in front] == ["D", "B", "A", "C", "default"]
    # against the definition, point by point, on random tables (ties included)
    import random

    rng = random.Random(0)
    for _ in range(200):
        pts = [{"perplexity": rng.choice([10, 11, 12, 13]), "tok_s": rng.choice([1, 2, 3, 4])}
               for _ in range(rng.randint(1, 12))]  # fmt: skip
        front = pareto_front(pts)
        assert not any(_dominated(pts[i], pts) for i in front)
        kept = {(pts[i]["perplexity"], pts[i]["tok_s"]) for i in front}
        assert all((p["perplexity"], p["tok_s"]) in kept for p in pts if not _dominated(p, pts))
        assert len(kept) == len(front)  # equal points once


def test_the_pick_keeps_the_gain_it_is_asked_to():
    shares = {p["name"]: (math.log(100) - math.log(p["perplexity"])) / math.log(2) for p in TABLE}
    assert shares["B"] < 0.95 < shares["A"]  # the table is built to fail a wrong pick
    assert TABLE[pick(TABLE, LM, DEFAULT_PPL, keep_gain=0.95)]["name"] == "A"  # not B, C, D
    assert TABLE[pick(TABLE, LM, DEFAULT_PPL, keep_gain=0.94)]["name"] == "B"
    assert TABLE[pick(TABLE, LM, DEFAULT_PPL, keep_gain=0.98)]["name"] == "C"
    assert TABLE[pick(TABLE, LM, DEFAULT_PPL, keep_gain=1.0)]["name"] == "default"
    # at >= 70% of the LM's speed: B and D qualify, B is the better
    assert TABLE[pick(TABLE, LM, DEFAULT_PPL, min_speed=0.7)]["name"] == "B"
    with pytest.raises(KnnlmError, match="--min-speed"):
        pick(TABLE, LM, DEFAULT_PPL, min_speed=1.5)
    with pytest.raises(KnnlmError, match="no gain"):
        pick(TABLE, LM, 120.0)


BAD_FILES = [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"k": 8, "lr": 1}', "unknown setting 'lr'"),
    ('{"k": 0}', "k must be a whole number >= 1"),
    ('{"knn_weight": 2}', "knn_weight must be a number in [0, 1]"),
    ('{"k": true}', "k must be"),
    # the settings objects whole, as knnlm tune writes them
    ('{"knn": {"k": 0}, "mix": {}}', "k must be a whole number >= 1"),
    ('{"knn": {"k": 8, "lr": 1}}', "unknown setting knn.lr"),
    ('{"knn": 3}', "knn must be a JSON object"),
    ('{"mix": {"temperature": -1}}', "knn_temperature must be a positive number"),
    ('{"mix": {"memory": "runs/mem"}}', "mix.memory = 'runs/mem' cannot be taken"),
    ('{"knn": {"k": 8}, "lr": 1}', "unknown setting 'lr'"),
]


@pytest.mark.parametrize("text, message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_a_bad_settings_file_is_one_clear_line(monkeypatch, capsys, tmp_path, text, message):
    path = tmp_path / "tuned.json"
    path.write_text(text)
    for cmd in (["eval", "-c", "c"], ["generate", "-p", "x"]):
        code, _, err = run_cli(monkeypatch, capsys, *cmd, "-m", "nowhere", "--settings", path)
        assert code == 2 and err.startswith(f"Error: settings file {path}: "), err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(KnnlmError, match="settings file"):
        load_tuned_settings(tmp_path / "missing.json")


def _tune(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, ds, tmp_path, *extra):
    out = tmp_path / "tuned.json"
    code, text, err = run_cli(
        monkeypatch, capsys, "tune", "-m", tiny_lm_dir, "-c", tiny_corpus, "--split", "valid",
        "-d", ds, "--context-len", 32, "--stride", 16, "--ks", "64,16", "--knn-weights", "0.25,0.5",
        "--knn-temperatures", "1,4", "--speed-tokens", 200, "-o", out, "--json",
        tmp_path / "tune.json", "--plot", tmp_path / "tune.png", "-q", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((tmp_path / "tune.json").read_text()), out, text


def test_the_settings_file_reproduces_the_tuned_perplexity(
    monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path
):
    ds = tmp_path / "ds"
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "-m", tiny_lm_dir, "-c",
                           tiny_corpus, "-o", ds, "--context-len", 32, "--stride", 16, "-q")  # fmt: skip
    assert code == 0, err
    res, out, text = _tune(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, ds, tmp_path,
                           "--pointers", "2", "--keep-gain", "0.9")  # fmt: skip
    assert (tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads(out.read_text())
    assert settings == res["settings"] and set(settings) == {"datastore", "knn", "mix"}
    pick_ = res["pick"]
    knn, mix = settings["knn"], settings["mix"]
    assert [knn["k"], mix["knn_weight"], mix["temperature"]] == [
        pick_[key] for key in ("k", "knn_weight", "knn_temperature")
    ]
    assert set(load_tuned_settings(out)) == set(SETTINGS_KEYS)  # read as the option names
    # the frontier's points are undominated, the pick keeps the gain asked for
    pts = res["points"]
    assert not any(_dominated(pts[i], pts) for i in res["frontier"])
    lm_ppl, default_ppl = res["lm"]["perplexity"], res["default"]["perplexity"]
    share = (math.log(lm_ppl) - math.log(pick_["perplexity"])) / (
        math.log(lm_ppl) - math.log(default_ppl)
    )
    assert share >= 0.9 and pick_["tok_s"] == max(
        p["tok_s"]
        for p in pts
        if (math.log(lm_ppl) - math.log(p["perplexity"]))
        >= 0.9 * (math.log(lm_ppl) - math.log(default_ppl))
    )
    assert any(p["pointers"] == 2 for p in pts) and "pick (" in text
    # the run's settings are in its results whole, the windows as used: they rebuild to the flags
    from knnlm.forward_pass import WindowSettings
    from knnlm.tune import TuneSettings

    rebuilt = TuneSettings.from_dict(res["tune"])
    assert rebuilt == TuneSettings(
        window=WindowSettings(32, 16), ks=(64, 16), knn_weights=(0.25, 0.5),
        knn_temperatures=(1.0, 4.0), pointers=(2.0,), speed_tokens=200, keep_gain=0.9,
    )  # fmt: skip
    # eval with the file: the perplexity the tuner reported, to the last digit
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", tiny_lm_dir, "-c", tiny_corpus,
                           "--context-len", 32, "--stride", 16, "--settings", out, "--json",
                           tmp_path / "eval.json", "-q")  # fmt: skip
    assert code == 0, err
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["knnlm"]["perplexity"] == pytest.approx(pick_["perplexity"], rel=1e-9, abs=0)
    assert ev["knnlm"]["perplexity"] == pick_["perplexity_checked"]
    assert ev["settings"]["k"] == settings["knn"]["k"]
    # the file holds the settings objects whole: eval ran with exactly them
    assert ev["settings"]["eval"]["knn"] == settings["knn"]
    assert ev["settings"]["eval"]["mix"] == settings["mix"]
    # every grid point is an interpolation of LM and kNN: check one against eval itself
    other = next(p for p in pts if p["k"] == 16 and p["knn_weight"] == 0.5
                 and p["knn_temperature"] == 4 and p["pointers"] is None)  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", tiny_lm_dir, "-c", tiny_corpus,
                           "--context-len", 32, "--stride", 16, "-d", ds, "--k", 16,
                           "--knn-weight", 0.5, "--knn-temperature", 4, "--json",
                           tmp_path / "e2.json", "-q")  # fmt: skip
    assert code == 0, err
    e2 = json.loads((tmp_path / "e2.json").read_text())
    assert e2["knnlm"]["perplexity"] == pytest.approx(other["perplexity"], rel=1e-9, abs=0)
    # a flag that disagrees with the file is refused; one that agrees is fine
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", tiny_lm_dir, "-c", tiny_corpus,
                           "--settings", out, "--k", settings["knn"]["k"] + 1)  # fmt: skip
    assert code == 2 and "--k" in err and "conflicts with settings file" in err, err
    # the Python API takes the same file
    from knnlm import KnnLM

    knn_lm = KnnLM.from_pretrained(str(tiny_lm_dir))
    api = knn_lm.perplexity(tiny_corpus, context_len=32, stride=16, settings=out)
    assert api.knnlm == ev["knnlm"]["perplexity"]
    with pytest.raises(KnnlmError, match="k "):
        knn_lm.perplexity(tiny_corpus, k=3, settings=out)


def test_gated_points_are_what_eval_gives_with_the_gate(
    monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path
):
    ds, gate = tmp_path / "ds", tmp_path / "gate"
    window = ["--context-len", 32, "--stride", 16]
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "-m", tiny_lm_dir, "-c",
                           tiny_corpus, "-o", ds, *window, "-q")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "gate", "train", "-m", tiny_lm_dir, "-d", ds,
                           "-c", tiny_corpus, "--split", "test", "-o", gate, "--kind", "entropy",
                           "--k", 16, *window, "-q")  # fmt: skip
    assert code == 0, err
    res, _, _ = _tune(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, ds, tmp_path, "--gate",
                      gate, "--retrieval-rates", "0.5", "--min-speed", "0.01")  # fmt: skip
    gated = next(p for p in res["points"] if p["retrieval_rate"] == 0.5 and p["k"] == 16
                 and p["knn_weight"] == 0.5 and p["knn_temperature"] == 4)  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", tiny_lm_dir, "-c", tiny_corpus,
                           *window, "-d", ds, "--k", 16, "--knn-weight", 0.5, "--knn-temperature",
                           4, "--gate", gate, "--retrieval-rate", 0.5, "--json",
                           tmp_path / "g.json", "-q")  # fmt: skip
    assert code == 0, err
    ev = json.loads((tmp_path / "g.json").read_text())
    assert ev["knnlm"]["perplexity"] == pytest.approx(gated["perplexity"], rel=1e-9, abs=0)
    assert ev["knnlm"]["retrieval_share"] == pytest.approx(gated["searched"], abs=1e-12)
    assert 0 < gated["searched"] < 1


TUNE_MISTAKES = [
    (["--knn-weights", "0.5,2"], "--knn-weights values must each be in [0, 1], got 2.0"),
    (["--knn-temperatures", "0"], "--knn-temperatures values must each be positive, got 0.0"),
    (["--ks", "0"], "--ks values must each be a whole number of at least 1, got 0"),
    (["--pointers", "0.5"], "--pointers values must each be at least 1 (or inf), got 0.5"),
    (["--speed-tokens", "0"], "--speed-tokens must be a whole number of at least 1, got 0"),
    (["--keep-gain", "1.5"], "--keep-gain must be in (0, 1], got 1.5"),
    (["--min-speed", "0"], "--min-speed must be positive, got 0.0"),
    (["--stride", "64", "--context-len", "32"], "--stride must be in [1, context-len=32]"),
]


@pytest.mark.parametrize("extra, message", TUNE_MISTAKES, ids=[m for _, m in TUNE_MISTAKES])
def test_a_tune_mistake_is_named_as_its_flag_before_any_model_loads(
    monkeypatch, capsys, tiny_corpus, tmp_path, extra, message
):
    code, _, err = run_cli(monkeypatch, capsys, "tune", "-m", "nowhere", "-c", tiny_corpus,
                           "-d", tmp_path / "no-ds", *extra)  # fmt: skip
    assert code == 2 and err.startswith(f"Error: {message}"), err
    assert len(err.strip().splitlines()) == 1, err


def test_tune_settings_are_written_whole_and_rebuilt_from_json():
    from knnlm.forward_pass import WindowSettings
    from knnlm.tune import TuneSettings

    # lists (as JSON gives them) held as tuples; a folder as a Path written and compared as text
    s = TuneSettings("test", WindowSettings(32, 16), ks=[16, 4], nprobes=[2],
                     gate=Path("runs/gate"), search="exact", min_speed=0.5)  # fmt: skip
    assert s.ks == (16, 4) and s.nprobes == (2,) and s.gate == "runs/gate"
    written = json.loads(json.dumps(s.to_dict()))
    assert written["window"] == {"context_len": 32, "stride": 16} and written["ks"] == [16, 4]
    assert TuneSettings.from_dict(written) == s


def test_generate_refuses_a_settings_file_with_a_gate(monkeypatch, capsys, tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"k": 8, "gate": "g", "retrieval_rate": 0.5}))
    code, _, err = run_cli(monkeypatch, capsys, "generate", "-m", "nowhere", "-p", "x",
                           "--settings", path)  # fmt: skip
    assert code == 2 and "takes no --gate" in err and len(err.strip().splitlines()) == 1, err
