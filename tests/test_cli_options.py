"""One consistent CLI: shared option names and short flags, choices and defaults in --help,
no second (hidden) names, one error style, a fast start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer

from knnlm.cli import app
from tiny import leaf_commands, run_cli

# Each option name has one short flag wherever it appears.
SHORT = {"--model": "-m", "--corpus": "-c", "--datastore": "-d", "--out": "-o", "--quiet": "-q",
         "--k": "-k"}  # fmt: skip


def _options(cmd) -> list:
    """Visible options (Typer may vendor its own click: classes are matched by name)."""
    return [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]


def test_short_flags_and_dtype_are_the_same_everywhere():
    seen = set()
    for name, cmd in leaf_commands():
        seen.update(o for opt in _options(cmd) for o in opt.opts)
        for opt in _options(cmd):
            for long, short in SHORT.items():
                if long in opt.opts:
                    assert short in opt.opts + opt.secondary_opts, f"{name} {long} lacks {short}"
            assert "--precision" not in opt.opts or name == "knnlm train", name
            if "--temperature" in opt.opts:  # HF's sampling temperature, generate only
                assert name == "knnlm generate", name
    assert {*SHORT, "--dtype", "--knn-temperature"} <= seen


def test_every_choice_is_listed_and_every_default_shows():
    choices, hidden = 0, []
    for name, cmd in leaf_commands():
        ctx = typer.Context(cmd)
        for opt in _options(cmd):
            flags, text = opt.get_help_record(ctx)
            choices += "|" in flags  # e.g. "--dtype <float32|bfloat16|float16>"
            if opt.required or (opt.is_flag and not opt.secondary_opts):  # a plain flag is off
                continue
            if opt.default is None:  # "not given": the help says what it falls back to, if any
                shown = opt.show_default is not False or "(default" in text
            else:
                shown = "[default:" in text
            if not shown:
                hidden.append(f"{name} {flags}")
    assert hidden == []
    assert choices >= 15  # dtype, key type, exclude-self, index type, metric, presets, ...


def test_preset_vocabularies_match_their_registries():
    from knnlm.cli.common import HurdlePreset, LmPreset, MacondoPreset
    from knnlm.experiments.hurdle.settings import HURDLE_PRESETS
    from knnlm.experiments.macondo.settings import RUN_PRESETS
    from knnlm.lm.presets import PRESETS

    assert [p.value for p in LmPreset] == list(PRESETS)
    assert {p.value for p in HurdlePreset} == {*HURDLE_PRESETS, *PRESETS}
    assert [p.value for p in MacondoPreset] == list(RUN_PRESETS)


def test_version(monkeypatch, capsys):
    from knnlm import __version__

    assert run_cli(monkeypatch, capsys, "--version") == (0, f"knnlm {__version__}\n", "")


# The names options had before 0.x settled on one vocabulary: each is now a usage error.
OLD_NAMES = [
    ["eval", "--temperature", "1"],
    ["gate", "train", "--temperature", "1"],
    ["project", "--temperature", "1"],
    ["macondo", "run", "--temperature", "1"],
    ["sweep", "c", "--weights", "0.1"],
    ["sweep", "c", "--temperatures", "1"],
    ["generate", "--sample"],
    ["reproduce", "--preset", "quick"],
    ["macondo", "run", "--macondo-preset", "quick"],
    ["hurdle", "--hurdle-preset", "quick"],
]


@pytest.mark.parametrize("args", OLD_NAMES, ids=lambda a: " ".join(a[:-1]))
def test_old_names_are_gone(monkeypatch, capsys, args):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "No such option" in err, err


def test_no_option_has_a_hidden_name():
    hidden = [
        f"{name} {opt.opts[0]}"
        for name, cmd in leaf_commands()
        for opt in cmd.params
        if opt.param_type_name == "option" and opt.hidden
    ]
    assert hidden == ["knnlm reproduce --tiny"]  # a test-sized run, not a second name


def test_one_preset_option_name():
    presets = {name for name, cmd in leaf_commands() for opt in _options(cmd)
               if "--preset" in opt.opts}  # fmt: skip
    assert presets == {"knnlm train", "knnlm macondo run", "knnlm hurdle"}
    scale = _help_of("knnlm reproduce")
    assert "quick|paper" in scale["--scale"] and "--quick" in scale


def test_flags_show_no_type(monkeypatch, capsys):
    """An on/off flag takes no value, so --help shows none (Typer would show <bool>)."""
    for name, _ in leaf_commands():
        code, out, _ = run_cli(monkeypatch, capsys, *name.split()[1:], "--help")
        assert code == 0 and "--help" in out and "<bool>" not in out, name
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert "<bool>" not in out and "--version" in out


@pytest.mark.parametrize(
    "model", ["./no-such-model", "/nonexistent/model", "{tmp}/nothing"], ids=["dot", "abs", "dir"]
)
def test_a_missing_local_model_says_so(monkeypatch, capsys, tmp_path, model):
    model = model.format(tmp=tmp_path.name)
    monkeypatch.chdir(tmp_path.parent)  # "{tmp}/nothing": a folder here, then a missing name
    for args in (["eval", "-m", model, "-c", "c"], ["macondo", "run", "-o", "o", "-m", model],
                 ["reproduce", "-m", model, "-o", "o"]):  # fmt: skip
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert err.strip().splitlines() == [f"Error: --model {model}: no such folder"], args
        assert code == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-m", "nowhere", "-p", "x", "--knn-temperature", "0"], "--knn-temperature"),
        (["generate", "-m", "nowhere", "-p", "x", "--knn-weight", "2"], "--knn-weight"),
        (["generate", "-m", "nowhere", "-p", "x", "--temperature", "0"], "sampling"),
        (["generate", "-m", "nowhere", "-p", "x", "--num-beams", "0"], "--num-beams"),
        (["neighbours", "-m", "nowhere", "-d", "nods", "-p", "x", "--k", "0"], "--k"),
    ],
)
def test_settings_refused_before_the_model_loads(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and err.startswith("Error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_sweep_on_a_datastore_says_it_is_not_a_cache(monkeypatch, capsys, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"knnlm_artifact": "datastore"}))
    code, _, err = run_cli(monkeypatch, capsys, "sweep", tmp_path)
    assert code == 2 and "is a datastore, not a neighbour cache" in err, err


def test_datastore_given_twice_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "info", tmp_path / "a", "-d",
                        tmp_path / "b")  # fmt: skip
    assert code == 2 and err.startswith("Usage: ") and "given twice" in err, err


def test_the_cli_starts_without_torch():
    code = (
        "import sys, typer; from knnlm.cli import app, register_all; register_all(); "
        "typer.main.get_command(app); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_missing_optional_package_names_its_extra(monkeypatch, capsys):
    import knnlm.cli.datastore_eval as datastore_eval

    def no_faiss(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(datastore_eval, "load_model", no_faiss)
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", "m", "-c", "c")
    assert code == 2 and err.strip().splitlines() == [
        "Error: this needs the 'faiss' package: pip install 'knnlm[faiss]' (GPU: or faiss-gpu)"
    ]


def _help_of(name: str) -> dict[str, str]:
    """Each visible option's flags of one command, e.g. {"--search": "--search <exact|...>"}."""
    cmd = dict(leaf_commands())[name]
    ctx = typer.Context(cmd)
    return {opt.opts[0]: opt.get_help_record(ctx)[0] for opt in _options(cmd)}


@pytest.mark.parametrize(
    "name, option, choices",
    [
        ("knnlm eval", "--search", "exact|faiss|auto"),
        ("knnlm eval", "--gate-weight", "fixed|learned"),
        ("knnlm project", "--search", "exact|faiss|auto"),
        ("knnlm generate", "--search", "exact|faiss|auto"),
        ("knnlm neighbours", "--search", "exact|faiss|auto"),
        ("knnlm gate train", "--search", "exact|faiss|auto"),
        ("knnlm gate train", "--kind", "mlp|entropy"),
        ("knnlm reproduce", "--search", "exact|faiss|auto"),
    ],
)
def test_new_commands_list_their_choices(name, option, choices):
    assert choices in _help_of(name)[option]


def test_new_commands_share_the_options_of_the_others():
    import knnlm.cli.common as common

    gate = _help_of("knnlm gate train")
    assert {"--knn-temperature", "--nprobe", "--search", "--dtype", "--wait"} <= set(gate)
    assert "--temperature" not in gate  # HF's sampling temperature: generate only
    prune = _help_of("knnlm datastore prune")
    assert "-d" in prune["--datastore"] and "-o" in prune["--out"]
    # one object per shared option: the new commands use common's, not their own copies
    engine = typer.main.get_command(app).commands["eval"]
    by_name = {p.name: p for p in engine.params}
    assert by_name["search"].default == common.Search.auto
    assert by_name["gate_weight"].default == common.GateWeight.fixed


def test_prune_takes_the_datastore_either_way(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "prune", "-d", tmp_path / "nods",
                        "-o", tmp_path / "p")  # fmt: skip
    assert code == 2 and err.startswith("Error: ") and "nods" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "prune", tmp_path / "a", "-d",
                        tmp_path / "b", "-o", tmp_path / "p")  # fmt: skip
    assert code == 2 and err.startswith("Usage: ") and "given twice" in err, err


@pytest.mark.parametrize("args", [["eval", "--search", "brute"], ["gate", "train", "--kind", "x"],
                                  ["eval", "--gate-weight", "mine"], ["eval", "--dtype", "float64"]])  # fmt: skip
def test_a_bad_choice_is_a_usage_error(monkeypatch, capsys, args):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and err.startswith("Usage: ") and "Invalid value" in err, err
    assert "Value error" not in err, err  # pydantic's prefix (Typer validates through it)


def test_dtype_wherever_a_model_is_loaded_to_score():
    """Every command that loads a model to score with it takes --dtype; the ones that train
    it (fine-tuning included) set their precision otherwise (train's --precision, Macondo's
    preset), and reproduce runs in float32."""
    training = {"knnlm train", "knnlm macondo run", "knnlm reproduce"}
    for name, cmd in leaf_commands():
        opts = {o for opt in _options(cmd) for o in opt.opts}
        if "--model" in opts and name not in training:
            assert "--dtype" in opts, name
