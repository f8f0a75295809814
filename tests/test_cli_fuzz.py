"""A seeded fuzz of every CLI command: random subsets of its options with odd values.

The commands are enumerated from the Typer app, so a new command or option is fuzzed without
editing this file. Each case runs in-process through click's CliRunner against a workspace
holding a tiny model, corpus, datastore (+ index), neighbour cache and MLP memory. A case passes
when the command exits 0 or 2, and a refusal is one line (a ``KnnlmError`` the entry point prints
as one line; click's usage text for a bad option). Anything else (a traceback, exit 1) fails.

The long runs (training, the reproduction, the Macondo and hurdle experiments, the projection)
are replaced by a stub once the CLI has checked its options and calls the library: the fuzz tests
the command line, the library's own checks are covered by the bad-input table.
"""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from knnlm.cli import app, error_line, register_all

EXAMPLES = 25  # per command; derandomized, so every run tries the same cases

INTS = ["0", "-1", "1", "2", "999999999999", "-999999999999", "1.5", "abc"]
FLOATS = ["0", "-0.5", "1.5", "nan", "inf", "-inf", "1e308", "1e-308", "0.3", "abc"]
TEXT = ["", " ", "x" * 3000, "abc", "é\u0000", "--", "a,b,,", "0,1,nan", "hf:", "cuda:99", "-1"]
PATHS = ["{ws}/nope/deeper", "{ws}/mine", "{ws}/mine/notes.txt", "{ws}/new", "{ds}", "{cache}",
         "{mem}", "{model}", "{corpus}", "/dev/null", "/proc/1"]  # fmt: skip
# Values the commands can actually run with, so that cases get past the first check.
GOOD = {"model": "{model}", "corpus": "{corpus}", "datastore": "{ds}", "ds": "{ds}",
        "cache": "{cache}", "memory": "{mem}", "prompt": "the village", "k": "4",
        "context_len": "32", "split": "valid", "out": "{ws}/new", "max_new_tokens": "3",
        "preset": "tiny", "max_positions": "3"}  # fmt: skip
STUBBED = [
    ("knnlm.lm.train", "train_lm"),
    ("knnlm.experiments.mlp_memory.train", "train_memory"),
    ("knnlm.experiments.reproduce", "reproduce"),
    ("knnlm.experiments.hurdle.run", "run_hurdle"),
    ("knnlm.experiments.macondo.run", "run_macondo"),
    ("knnlm.experiments.projection.run", "run_projection"),
    ("knnlm.inspect.server", "serve"),  # knnlm inspect's server would run until Ctrl-C
]


class Reached(Exception):
    """A stubbed long run was called: the command line got through its checks."""


def leaf_commands() -> dict[str, Any]:
    register_all()  # the entry point registers the command modules on its first call
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):  # a group (Typer may vendor its own click)
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            out[" ".join(path)] = cmd

    walk(typer.main.get_command(app), ())
    return out


COMMANDS = leaf_commands()


def pool_for(param: Any) -> list[str]:
    """Odd values of the option's own type (mostly), so that cases get past click's parsing."""
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", str)
    types = set(getattr(ann, "__args__", (ann,)))
    if int in types:
        return INTS
    if float in types:
        return FLOATS
    if Path in types:
        return [*PATHS, "", "x" * 3000]
    return [*getattr(getattr(param, "type", None), "choices", ()), *TEXT, *PATHS]


def values_for(param: Any) -> st.SearchStrategy[list[str]]:
    """The argv pieces for one parameter: a flag, or its option name with an odd value."""
    if getattr(param, "is_flag", False):
        return st.just([param.opts[0]])
    pool = pool_for(param)
    good = GOOD.get(param.name or "")
    value = st.sampled_from(pool) if good is None else st.sampled_from([good, good, *pool])
    if param.param_type_name == "argument":
        return value.map(lambda v: [v])
    return value.map(lambda v: [param.opts[0], v])


@st.composite
def argv_for(draw, cmd: Any) -> list[str]:
    args: list[str] = []
    for param in cmd.params:
        if param.name in ("help",):
            continue
        needed = param.required or param.param_type_name == "argument"
        if needed and draw(st.integers(0, 9)) > 0:  # required ones mostly given
            args += draw(values_for(param))
        elif not needed and draw(st.booleans()):
            args += draw(values_for(param))
    return args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_lm_dir, tiny_corpus):
    """A datastore (+ flat index), cache and memory of the tiny model, built once."""
    from knnlm.evaluate import KnnSettings, evaluate
    from knnlm.lm.loading import load_lm
    from knnlm.retrieval.datastore import build_datastore, open_datastore
    from knnlm.retrieval.search.index_build import build_index
    from tiny import train_mem

    root = tmp_path_factory.mktemp("fuzz_artifacts")
    lm = load_lm(str(tiny_lm_dir))
    build_datastore(lm, str(tiny_corpus), "valid", root / "ds", context_len=32, progress=False)
    build_index(root / "ds", progress=False)
    evaluate(lm, str(tiny_corpus), "test", context_len=32, datastore=root / "ds",
             knn=KnnSettings(k=4), cache=root / "cache", progress=False)  # fmt: skip
    ds = open_datastore(root / "ds")
    W = lm.adapter.output_embedding.detach()
    train_mem(ds.keys, ds.values, W, root / "mem", hidden=8, max_steps=2, batch_tokens=64,
                 progress=False)  # fmt: skip
    return root


def run_case(argv: list[str], runner: CliRunner) -> str | None:
    """None when the case ends as the CLI promises, else what went wrong."""
    result = runner.invoke(app, argv, catch_exceptions=True)
    exc = result.exception
    if isinstance(exc, Reached):
        return None
    line = error_line(exc) if exc is not None else None
    if line is not None:  # main() prints it as "Error: ..." and exits 2
        return None if line and "\n" not in line else f"error of {len(line.splitlines())} lines"
    if exc is not None and not isinstance(exc, SystemExit):
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return "traceback:\n" + "".join(t[:300] for t in tb[-6:])
    if result.exit_code not in (0, 2):
        return f"exit {result.exit_code}: {result.output[-500:]}"
    return None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_fuzz_command(name, workspace, tiny_lm_dir, tiny_corpus, tmp_path, monkeypatch):
    import importlib

    # Import them all before stubbing any: a module imported while another's function is
    # stubbed would keep the stub (``from ... import fn``) for every later test.
    modules = [importlib.import_module(module) for module, _ in STUBBED]
    for mod, (_, fn) in zip(modules, STUBBED, strict=True):
        monkeypatch.setattr(mod, fn, _stub)
    monkeypatch.chdir(tmp_path)  # relative default outputs land here
    runner = CliRunner()
    names = {"{model}": str(tiny_lm_dir), "{corpus}": str(tiny_corpus)}
    path = name.split()
    counter = iter(range(10**6))

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(argv_for(COMMANDS[name]))
    def case(args: list[str]) -> None:
        ws = tmp_path / f"ws{next(counter)}"
        ws.mkdir()
        for artifact in ("ds", "cache", "mem"):
            shutil.copytree(workspace / artifact, ws / artifact)
        (ws / "mine").mkdir()
        (ws / "mine" / "notes.txt").write_text("my own notes\n")
        subs = dict(names, **{"{ws}": str(ws), "{ds}": str(ws / "ds"),
                              "{cache}": str(ws / "cache"), "{mem}": str(ws / "mem")})  # fmt: skip
        argv = [*path, *(_fill(a, subs) for a in args)]
        problem = run_case(argv, runner)
        shutil.rmtree(ws, ignore_errors=True)
        assert problem is None, f"knnlm {' '.join(argv)[:600]}\n{problem}"

    case()


def _fill(arg: str, subs: dict[str, str]) -> str:
    for k, v in subs.items():
        arg = arg.replace(k, v)
    return arg


def _stub(*args, **kwargs):
    raise Reached()


def test_every_command_is_fuzzed():
    assert {"eval", "datastore build", "datastore index", "sweep", "train"} <= set(COMMANDS)
    # the commands added since: generation and retrieval inspection, the fast kNN-LM pieces
    assert {"generate", "neighbours", "datastore info", "datastore prune", "gate train"} <= set(
        COMMANDS
    )
    assert len(COMMANDS) >= 15
