"""The CLI end to end: the contract flags work, and bad input gives one clear line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny import leaf_commands, run_cli


def test_help_lists_every_command(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0
    for cmd in ("reproduce", "train", "eval", "datastore", "sweep", "generate", "project",
                "macondo", "memory", "hurdle"):  # fmt: skip
        assert cmd in out, cmd


def test_eval_datastore_sweep_generate_contract(
    monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path
):
    ds = tmp_path / "ds"
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "--model", tiny_lm_dir,
                           "--corpus", tiny_corpus, "--split", "train", "--out", ds,
                           "--context-len", 32, "--stride", 16, "--quiet")  # fmt: skip
    assert code == 0, err
    assert {"keys.npy", "values.npy", "meta.json"} <= {p.name for p in ds.iterdir()}
    code, _, err = run_cli(
        monkeypatch, capsys, "datastore", "index", ds, "--type", "flat", "--quiet"
    )
    assert code == 0, err
    out_json = tmp_path / "eval.json"
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", tiny_lm_dir, "--corpus",
                           tiny_corpus, "--split", "valid", "--context-len", 32, "--stride", 16,
                           "--datastore", ds, "--k", 8, "--knn-weight", 0.25, "--knn-temperature", 1,
                           "--cache", tmp_path / "cache", "--json", out_json, "--quiet")  # fmt: skip
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["tokens"] > 0 and res["lm"]["perplexity"] > 1 and res["knnlm"]["perplexity"] > 1
    assert set(res["lm"]) >= {"perplexity", "nll_sum"}
    code, out, err = run_cli(monkeypatch, capsys, "sweep", tmp_path / "cache", "--knn-weights",
                             "0.1,0.5", "--knn-temperatures", "1,5", "--json", tmp_path / "s.json",
                             "--png", tmp_path / "s.png", "--quiet")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The JSON speaks the options' names; the table prints every cell, rows by weight.
    sw = json.loads((tmp_path / "s.json").read_text())
    assert sw["knn_weights"] == [0.1, 0.5] and sw["knn_temperatures"] == [1.0, 5.0]
    assert set(sw["best"]) == {"k", "knn_weight", "knn_temperature", "perplexity"}
    assert "weights" not in sw and "temperatures" not in sw
    rows = [line.split() for line in out.splitlines() if line.startswith(("     0.1", "     0.5"))]
    cells = [[float(x) for x in row[1:]] for row in rows]
    assert cells == [[round(p, 3) for p in row] for row in sw["perplexity"][0]]
    assert f"{sw['best']['perplexity']:.3f}" in out.splitlines()[-1]
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--model", tiny_lm_dir,
                             "--datastore", ds, "--k", 8, "--prompt", "the village",
                             "--max-new-tokens", 5)  # fmt: skip
    assert code == 0, err
    assert out.startswith("the village")
    # neighbours answers each -p in turn, each as it answers that prompt alone.
    both = tmp_path / "nb.json"
    code, out, err = run_cli(monkeypatch, capsys, "neighbours", "-m", tiny_lm_dir, "-d", ds,
                             "-p", "the village", "-p", "a river was", "-k", 3, "--json", both)  # fmt: skip
    assert code == 0, err
    answers = json.loads(both.read_text())
    assert [a["prompt"] for a in answers] == ["the village", "a river was"]
    assert out.count("prompt ") == 2 and out.index("'the village'") < out.index("'a river was'")
    for a in answers:
        one = tmp_path / "one.json"
        run_cli(monkeypatch, capsys, "neighbours", "-m", tiny_lm_dir, "-d", ds, "-p",
                a["prompt"], "-k", 3, "--json", one)  # fmt: skip
        (alone,) = json.loads(one.read_text())
        assert len(a["neighbours"]) == 3 and a == alone


@pytest.mark.parametrize(
    "case",
    ["missing_model", "missing_corpus", "non_utf8", "empty", "bad_weight", "bad_stride",
     "missing_datastore", "unknown_arch"],
)  # fmt: skip
def test_bad_input_one_clear_line(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path, case):
    corpus = tiny_corpus
    model = tiny_lm_dir
    extra: list = []
    if case == "missing_model":
        model = tmp_path / "nope"
    elif case == "missing_corpus":
        corpus = tmp_path / "nope"
    elif case == "non_utf8":
        corpus = tmp_path / "bad"
        corpus.mkdir()
        (corpus / "valid.txt").write_bytes(b"caf\xe9 au lait\n")
    elif case == "empty":
        corpus = tmp_path / "empty"
        corpus.mkdir()
        (corpus / "valid.txt").write_text("  \n")
    elif case == "bad_weight":
        extra = ["--datastore", tmp_path, "--knn-weight", 1.5]
    elif case == "bad_stride":
        extra = ["--stride", 999]
    elif case == "missing_datastore":
        extra = ["--datastore", tmp_path / "nods"]
    elif case == "unknown_arch":
        from transformers import BertConfig, BertForMaskedLM

        model = tmp_path / "bert"
        BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16)).save_pretrained(model)  # fmt: skip
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--model", model, "--corpus", corpus,
                             "--split", "valid", "--context-len", 32, "--quiet", *extra)  # fmt: skip
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err


def test_project_contract(monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path):
    ds = tmp_path / "ds"
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "--model", tiny_lm_dir,
                           "--corpus", tiny_corpus, "--out", ds, "--context-len", 32, "--quiet")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "proj.json"
    code, text, err = run_cli(monkeypatch, capsys, "project", "--model", tiny_lm_dir,
                              "--datastore", ds, "--corpus", tiny_corpus, "--split", "valid",
                              "--context-len", 32, "--stride", 32, "--k", 8, "--knn-weight", 0.25,
                              "--max-positions", 20, "--json", out, "--png", tmp_path / "kl.png",
                              "--quiet")  # fmt: skip
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["positions"] == 20
    for key in ("lm", "knnlm", "proj_f", "proj_fg"):
        assert res[key]["perplexity"] > 1
    assert "kl_mean" in res["proj_f"] and "kl_mean" in res["proj_fg"]
    assert "Table 1" in text and (tmp_path / "kl.png").is_file()


def test_every_command_takes_quiet():
    names = []
    for name, cmd in leaf_commands():
        names.append(name)
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--quiet" in opts, f"{name} has no --quiet"
    assert len(names) >= 10 and "knnlm generate" in names


def test_commands_register_builds_fresh_groups_and_refuses_a_duplicate():
    """Each app gets its own group sub-apps (registering twice adds nothing twice), and a
    command name declared in two tables is refused."""
    import types

    import typer

    from knnlm.cli import commands, macondo_data, macondo_run

    first, second = typer.Typer(), typer.Typer()
    commands.register(first, [macondo_data, macondo_run])
    commands.register(second, [macondo_data, macondo_run])
    subs = []
    for app in (first, second):
        (group,) = app.registered_groups
        assert group.name == "macondo"
        assert [c.name for c in group.typer_instance.registered_commands] == ["generate", "run"]
        subs.append(group.typer_instance)
    assert subs[0] is not subs[1]
    twice = types.SimpleNamespace(COMMANDS=[("macondo run", macondo_run.run_cmd)])
    with pytest.raises(ValueError, match="'macondo run' is declared twice"):
        commands.register(typer.Typer(), [macondo_run, twice])


def _python_m(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "knnlm", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
        env=dict(os.environ, COLUMNS="100"),
    )  # fmt: skip


def test_usage_errors_end_to_end(tmp_path):
    """Through ``python -m knnlm``: click's usual text on stderr, exit 2; --help exits 0."""
    for args, msg in [
        (["eval", "--bogus"], "No such option: --bogus"),
        (["evall"], "No such command 'evall'"),
        (["generate", "--model", "m", "--prompt", "p", "--bogus"], "No such option"),
        (["train", "--preset", "gigantic", "--out", tmp_path / "t"], "'gigantic' is not one of"),
    ]:
        p = _python_m(*args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("Usage: python -m knnlm"), p.stderr
        assert lines[1].startswith("Try 'python -m knnlm") and "--help" in lines[1], p.stderr
        assert lines[-1].startswith("Error: ") and msg in lines[-1], p.stderr
    assert list(tmp_path.iterdir()) == []
    p = _python_m("--help", cwd=tmp_path)
    assert p.returncode == 0 and "eval" in p.stdout and p.stderr == ""


def test_eval_own_text_other_layout_excludes_and_warns_when_off(
    monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path
):
    ds = tmp_path / "ds"
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "--model", tiny_lm_dir,
                           "--corpus", tiny_corpus, "--split", "valid", "--out", ds,
                           "--context-len", 32, "--stride", 8, "--quiet")  # fmt: skip
    assert code == 0, err
    base = ["eval", "--model", tiny_lm_dir, "--corpus", tiny_corpus, "--split", "valid",
            "--context-len", 16, "--stride", 4, "--datastore", ds, "--k", 8, "--quiet"]  # fmt: skip
    res = {}
    for mode in ("auto", "no"):
        out_json = tmp_path / f"{mode}.json"
        code, _, err = run_cli(monkeypatch, capsys, *base, "--exclude-self", mode,
                               "--json", out_json)  # fmt: skip
        assert code == 0, err
        res[mode] = json.loads(out_json.read_text())
        warned = [line for line in err.splitlines() if line.startswith("warning: the evaluated")]
        assert len(warned) == (mode == "no"), err
    assert res["auto"]["settings"]["exclude_self"] is True
    assert res["no"]["settings"]["exclude_self"] is False
    assert "own" in res["no"]["warnings"][0]
    # Keeping the own row makes the kNN-LM look better: the difference exclusion makes.
    assert res["no"]["knnlm"]["perplexity"] < res["auto"]["knnlm"]["perplexity"]


def test_hurdle_on_your_own_gpt2_config(monkeypatch, capsys, tiny_lm_dir, tmp_path):
    """--model-config: the architecture of a saved model (2 layers, d=32, 2 heads), trained
    from scratch with and without its last MLP; another family's config is one line."""
    code, _, err = run_cli(monkeypatch, capsys, "hurdle", "--model-config", tiny_lm_dir,
                           "--quick", "--seeds", "1", "--steps", "2", "--eval-every", "1",
                           "--out", tmp_path / "h", "--json", tmp_path / "h.json", "-q")  # fmt: skip
    assert code == 0, err
    arch = json.loads((tmp_path / "h.json").read_text())["settings"]["preset"]
    cfg = json.loads((tiny_lm_dir / "config.json").read_text())
    assert (arch["n_layer"], arch["n_embd"], arch["n_head"]) == (2, 32, 2)
    assert arch["context_len"] == cfg["n_positions"] == 128
    other = tmp_path / "llama.json"
    other.write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(monkeypatch, capsys, "hurdle", "--model-config", other, "--quick",
                           "--out", tmp_path / "h2")  # fmt: skip
    assert code == 2 and err.strip().splitlines() == [
        f"Error: {other} is a 'llama' config; the hurdle trains GPT-2 models (the last MLP is "
        "dropped from a GPT-2 block)"
    ]
