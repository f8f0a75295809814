"""docs/walkthrough.md runs as it stands: a user's saved model and text through a datastore,
evaluation, the four analyses and the report (its last command at test size)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tiny import run_cli, users_model, write_corpus

WALKTHROUGH = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"


def walkthrough_commands() -> list[list[str]]:
    """The ``knnlm`` command lines of the walkthrough's bash block, without ``knnlm``."""
    text = WALKTHROUGH.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    commands = [shlex.split(ln) for ln in lines]
    assert all(c[0] == "knnlm" for c in commands)
    return [c[1:] for c in commands]


def test_the_walkthrough_runs(monkeypatch, capsys, tmp_path):
    model, names = users_model(tmp_path / "given")
    model.rename(tmp_path / "my-model")
    names.rename(tmp_path / "names.txt")
    write_corpus(tmp_path / "my-text", train=(200, 0), valid=(30, 1), test=(30, 2))
    monkeypatch.chdir(tmp_path)
    commands = walkthrough_commands()
    assert [c[0] for c in commands] == ["datastore", "eval", "sweep", "neighbours", "project",
                                        "memory", "eval", "macondo", "hurdle", "reproduce"]  # fmt: skip
    for args in commands:
        if args[0] == "reproduce":
            args = [*args, "--tiny"]  # the test-sized run (README: a CPU minute or two)
        code, out, err = run_cli(monkeypatch, capsys, *args, *(["-q"] if "-q" not in args else []))
        assert code == 0, (args, err[-2000:])
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["lm"]["perplexity"] > 1 and ev["knnlm"]["perplexity"] > 1
    assert json.loads((tmp_path / "memory.json").read_text())["mlp"]["perplexity"] > 1
    assert "proj_f" in json.loads((tmp_path / "project.json").read_text())
    assert (tmp_path / "macondo" / "results.json").is_file()
    assert (tmp_path / "hurdle" / "hurdle.json").is_file()
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["config"]["model"] == str(tmp_path / "my-model")
    assert (tmp_path / "report" / "report.md").is_file()
