"""`knnlm reproduce --quick` end to end at a tiny scale: the embedded corpus, every key of the
results contract, and numbers re-derived by independent routes."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import pytest

from knnlm.experiments.results_schema import check_results
from tiny import USER_NAMES

N_KEYS = ["1", "2", "3", "4", "5"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "knnlm", "reproduce", "--quick", "--tiny", "--quiet", "--out",
         str(out), *extra],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_quick_runs_on_the_embedded_slice(run):
    out, r = run
    assert r["config"]["scale"] == "quick" and r["config"]["corpus"] is None
    assert r["corpus"]["name"].startswith("WikiText-2 slice (embedded)")
    assert "CC BY-SA 3.0" in r["corpus"]["license"]
    corpus = Path(r["corpus"]["corpus"])
    assert corpus.is_relative_to(out)  # extracted into the run's folder, not read elsewhere
    packaged = gzip.decompress(
        resources.files("knnlm.data.wikitext2").joinpath("train.txt.gz").read_bytes()
    ).decode()
    train = (corpus / "train.txt").read_text()
    assert train and packaged.startswith(train)  # --tiny keeps a prefix of whole lines
    assert "= Valkyria Chronicles III =" in train
    # Sections 2, 3, 5 read that corpus; Section 4 does not.
    assert r["knnlm"]["settings"]["corpus"] == str(corpus)
    assert r["projection"]["lr_0.1"]["settings"]["corpus"] == str(corpus)
    assert r["hurdle"]["settings"]["corpus"]["corpus"] == str(corpus)


def test_every_contract_key(run):
    _, r = run
    k = r["knnlm"]
    seeds = k["seeds"]
    assert len(seeds) == 2 and k["paper_setting"] == {"knn_weight": 0.25, "temperature": 1.0}
    assert [p["seed"] for p in k["per_seed"]] == seeds
    for p in k["per_seed"]:
        assert p["tuned"]["tuned_on"] == "valid"
        for split in ("valid", "test"):
            assert p[split]["tokens"] > 0
            for key in ("lm", "knnlm_paper", "knnlm_tuned"):
                assert math.isfinite(p[split][key]) and p[split][key] > 1
    assert Path(k["figure"]).is_file() and "sweep" in k and "settings" in k
    # Each seed's own heatmap, drawn by the report layer from the data saved beside it.
    assert all(Path(p["figure"]).is_file() for p in k["per_seed"])
    for name in ("lr_0.1", "lr_0.001"):
        p = r["projection"][name]
        assert p["split"] == "test" and p["seed"] == seeds[0] and p["positions"] > 0
        for key in ("lm", "knnlm"):
            assert p[key]["perplexity"] > 1
        for key in ("proj_f", "proj_fg"):
            assert set(p[key]) >= {"perplexity", "kl_mean", "kl_median", "steps_mean",
                                   "steps_max", "capped"}  # fmt: skip
            assert 0 <= p[key]["capped"] <= p["positions"]
            assert p[key]["steps_max"] <= p["max_steps"]
        assert Path(p["figure"]).is_file()
    m = r["memory"]
    assert m["seeds"] == seeds and [p["seed"] for p in m["per_seed"]] == seeds
    for p in m["per_seed"]:
        assert 0 <= p["weight"] <= 1
        assert set(p["valid"]) >= {"lm", "mlp"} and set(p["test"]) >= {"lm", "knnlm_tuned", "mlp"}
    assert set(m["storage"]) >= {"memory_bytes", "memory_bytes_without_shared_W",
                                 "datastore_bytes", "index_bytes"}  # fmt: skip
    mac = r["macondo"]
    assert mac["n_values"] == [1, 2, 3, 4, 5] and len(mac["seeds"]) == 2
    for p in mac["per_seed"]:
        for model in ("lm", "knnlm", "mlp"):
            assert sorted(p["test"][model]) == N_KEYS
            assert all(v <= 0 for v in p["test"][model].values())
        assert sorted(p["train"]["lm"]) == N_KEYS
    c = mac["curves"]
    assert c["steps"][0] == 0 and len(c["steps"]) >= 2
    for model in ("lm", "knnlm"):
        for n in N_KEYS:
            assert np.asarray(c[model][n]).shape == (len(mac["seeds"]), len(c["steps"]))
    assert Path(mac["figure1"]).is_file()
    h = r["hurdle"]
    assert len(h["seeds"]) == 2
    for part in ("loglik", "loss"):
        steps = h[part]["steps"]
        assert steps[0] == 0 and steps == sorted(steps)
        for v in ("with_mlp", "without_mlp"):
            assert np.asarray(h[part][v]).shape == (len(h["seeds"]), len(steps))
    # Both variants of a seed start from the same weights except the dropped MLP, so their
    # step-0 values differ; each is a real log-likelihood / loss.
    assert all(x <= 0 for row in h["loglik"]["with_mlp"] for x in row)
    assert Path(h["figure4"]).is_file() and Path(h["figure5"]).is_file()
    whats = " ".join(x["what"] for x in r["not_run"])
    assert "Figure 2" in whats and "GPT-2 XL" in whats and "WikiText-103" in whats
    assert all(x["why"] and x["command"] for x in r["not_run"])
    assert set(r["stages"]) >= {"corpus", "lm-0", "knnlm-1", "macondo", "hurdle"}
    w = r["wall_seconds"]
    assert isinstance(w, float) and math.isfinite(w) and w >= 0  # recorded, not timed
    assert {c["status"] for c in r["claims"]} <= {"held", "not held", "untestable here"}
    check_results(r)


def test_provenance_of_the_run(run):
    out, r = run
    p = r["provenance"]
    assert p["packages"]["torch"] == metadata.version("torch")
    assert p["packages"]["knnlm"] == metadata.version("knnlm")
    import torch

    assert p["cpu_count"] == os.cpu_count()
    assert p["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert p["torch_threads"] == 1  # --quick's torch_threads
    assert p["started_utc"] <= p["ended_utc"]
    assert "## Provenance" in (out / "report.md").read_text()


def test_tuned_on_valid_and_read_on_test(run):
    """The tuned cell is the valid argmin of the grid; its test number equals a fresh
    evaluation at that setting (no cache, no sweep)."""
    from knnlm.evaluate import evaluate
    from knnlm.lm.loading import load_lm
    from knnlm.retrieval.retriever import KnnSettings

    _, r = run
    k = r["knnlm"]
    sweep = k["sweep"]
    grid = np.asarray(sweep["valid"])
    wi, ti = np.unravel_index(int(np.nanargmin(grid)), grid.shape)
    p0 = k["per_seed"][0]
    assert p0["tuned"]["knn_weight"] == sweep["weights"][wi]
    assert p0["tuned"]["temperature"] == sweep["temperatures"][ti]
    cfg = r["config"]
    lm = load_lm(r["lm"][0]["model"])
    res = evaluate(
        lm, r["corpus"]["corpus"], "test", context_len=cfg["context_len"], stride=cfg["stride"],
        datastore=r["datastore"][0]["datastore"],
        knn=KnnSettings(k=cfg["k"]), knn_weight=p0["tuned"]["knn_weight"],
        knn_temperature=p0["tuned"]["temperature"],
        progress=False,
    )  # fmt: skip
    assert res["knnlm"]["perplexity"] == pytest.approx(p0["test"]["knnlm_tuned"], rel=1e-4)
    assert res["lm"]["perplexity"] == pytest.approx(p0["test"]["lm"], rel=1e-5)
    # The memory stage's LM pass is a second route to the same LM perplexity.
    assert r["memory"]["per_seed"][0]["test"]["lm"] == pytest.approx(p0["test"]["lm"], rel=1e-4)


def test_memory_weight_from_valid_and_its_test_number(run):
    from knnlm.evaluate import evaluate
    from knnlm.lm.loading import load_lm

    out, r = run
    p = r["memory"]["per_seed"][0]
    sw = p["weight_sweep"]
    assert p["weight"] == sw["weights"][int(np.argmin(sw["valid"]))]
    cfg = r["config"]
    res = evaluate(
        load_lm(r["lm"][0]["model"]), r["corpus"]["corpus"], "test",
        context_len=cfg["context_len"], stride=cfg["stride"],
        memory=out / "artifacts" / "memory-0" / "memory", memory_weight=p["weight"],
        progress=False,
    )  # fmt: skip
    assert res["mlp"]["perplexity"] == pytest.approx(p["test"]["mlp"], rel=1e-4)


def test_macondo_uses_the_seed0_lm_and_its_tokenizer(run):
    from knnlm.data.macondo import load_macondo, non_single_token_children
    from knnlm.lm.loading import load_tokenizer
    from knnlm.lm.tokenizer import tokenizer_view

    out, r = run
    mac = r["macondo"]
    assert mac["settings"]["model"] == r["lm"][0]["model"]
    tok = tokenizer_view(load_tokenizer(r["lm"][0]["model"]))
    for s in mac["seeds"]:
        ds = load_macondo(out / "artifacts" / "macondo" / f"seed-{s}" / "data")
        assert non_single_token_children(ds, tok) == []


def test_rerun_reuses_every_stage(run):
    out, _ = run
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert all(s["cached"] for s in again["stages"].values())
    # The provenance is the rerun's own (new times), and keys no stage's cache.
    assert again["provenance"]["started_utc"] >= run[1]["provenance"]["ended_utc"]


def test_embedded_slice_extracts_the_recorded_text(tmp_path):
    """Counts recorded in ATTRIBUTION.md when the slice was cut from WikiText-2."""
    from knnlm.data import wikitext2
    from knnlm.errors import KnnlmError

    out = wikitext2.extract(tmp_path / "wt")
    expect = {"train": (6939, 381_092), "valid": (429, 21_516), "test": (322, 19_820)}
    for split, (lines, words) in expect.items():
        text = (out / f"{split}.txt").read_text(encoding="utf-8")
        assert (text.count("\n"), len(text.split())) == (lines, words)
    assert "CC BY-SA 3.0" in (out / "ATTRIBUTION.md").read_text()
    with pytest.raises(KnnlmError):
        wikitext2.read_split("training")


def test_width_study_rows(run):
    _, r = run
    rows = r["width_study"]["rows"]
    assert [row["d"] for row in rows] == [32, 64]
    assert rows[1].get("main_lm") and not rows[0].get("main_lm")  # d = 64 is the run's own LM
    main = r["projection"]["lr_0.1"]
    assert rows[1]["lm"] == main["lm"]["perplexity"]
    for row in rows:
        f = row["proj_f"]
        gap = row["lm"] - row["knnlm"]
        assert f["share"] == pytest.approx((row["lm"] - f["perplexity"]) / gap)
        assert f["kl_mean"] <= f["kl_init_mean"] + 1e-9
    assert rows[0]["params"] < 2_000_000


def test_stage_plan_names_and_dependencies():
    """The registry: every stage once, its dependencies before it; the second process's groups
    need nothing from outside them but what the main process runs first (the corpus)."""
    from knnlm.cli.reproduce import TINY
    from knnlm.experiments.reproduce import second_process_groups, stage_plan
    from knnlm.experiments.reproduce_config import ReproduceConfig

    cfg = ReproduceConfig.for_scale("quick", **TINY)
    plan = stage_plan(cfg)
    names = [st.name for st in plan]
    per_seed = [f"{kind}-{s}" for s in (0, 1) for kind in ("lm", "datastore", "knnlm", "memory")]
    assert names == ["corpus", *per_seed, "projection", "projection_lr", "macondo", "width-32",
                     "hurdle"]  # fmt: skip
    for i, st in enumerate(plan):
        assert set(st.deps) <= set(names[:i]), st.name
    groups = second_process_groups(cfg)
    assert groups == ["hurdle", "seed-1"]
    theirs = {st.name for st in plan if st.group in groups}
    outside = {d for st in plan if st.name in theirs for d in st.deps} - theirs
    assert outside == {"corpus"}
    assert second_process_groups(ReproduceConfig.for_scale("quick", **TINY, workers=1)) == []


# A user's own model: its tokenizer, its positions, its given names.


@pytest.fixture(scope="module")
def users_model(tmp_path_factory) -> tuple[Path, Path]:
    from tiny import users_model

    return users_model(tmp_path_factory.mktemp("users"))


def test_reproduce_on_a_users_model(tmp_path, users_model):
    """The smallest run the options allow, on a saved model (no LM trained here) with its own
    given names, from another working directory: it runs to a report."""
    model, names = users_model
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "knnlm", "reproduce", "--quick", "--tiny", "--quiet", "--seeds",
         "1", "-m", os.path.relpath(model, tmp_path), "--given-names", str(names), "--out",
         "run"],
        capture_output=True, text=True, cwd=tmp_path, timeout=1200,
        env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["model"] == str(model)  # recorded absolute: resolvable from anywhere
    assert r["lm"][0] == {"model": str(model), "trained": False, "seed": 0}
    mac = r["macondo"]["settings"]
    assert mac["model"] == str(model) and mac["macondo"]["given_names"] == [str(names)]
    children = {x["child"] for s in r["macondo"]["seeds"]
                for x in _jsonl(out / "artifacts" / "macondo" / f"seed-{s}" / "data" / "test.jsonl")}  # fmt: skip
    assert children and children <= set(USER_NAMES)
    assert "width_study" not in r  # it studies LMs trained here
    assert (out / "report.md").is_file()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_windows_are_capped_at_the_models_positions(users_model, tmp_path):
    from knnlm.errors import KnnlmError
    from knnlm.experiments.reproduce_config import ReproduceConfig

    model, _ = users_model
    # The corpus scale's small preset reads 256 tokens: the 128-position model caps it, and
    # the stride (256) with it; a context or stride the user gave stays as given.
    cfg = ReproduceConfig.for_scale("corpus", corpus="c", model=str(model))
    assert (cfg.context_len, cfg.stride) == (128, 64)
    assert cfg.lm_seeds == 1 and cfg.macondo_seeds == 5  # one given LM; Macondo's seeds stay
    cfg = ReproduceConfig.for_scale("corpus", corpus="c", model=str(model), stride=16)
    assert (cfg.context_len, cfg.stride) == (128, 16)
    assert ReproduceConfig.for_scale("corpus", corpus="c", context_len=200).context_len == 200
    cfg = ReproduceConfig.for_scale("corpus", corpus="c", model=str(model), context_len=256)
    assert cfg.context_len == 256  # refused by the first stage that reads it, in one line
    with pytest.raises(KnnlmError, match="--width-study"):
        ReproduceConfig.for_scale("quick", model=str(model), width_study=[32])


# The stage cache: each stage's key holds the settings it read, whatever they are.


def _tiny_plan_names() -> list[str]:
    from knnlm.cli.reproduce import TINY
    from knnlm.experiments.reproduce import stage_plan
    from knnlm.experiments.reproduce_config import ReproduceConfig

    return [st.name for st in stage_plan(ReproduceConfig.for_scale("quick", **TINY))]


def _other(value):
    """A different value of the same JSON kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    if isinstance(value, dict):
        return {**value, "other": 1}
    return 1  # None


# Settings each stage must be found reading (the hurdle's architecture follows the scale,
# which no hand-kept key list had).
MUST_READ = {"corpus": {"embedded_chars", "tokenizer_vocab"}, "lm-0": {"lm_preset", "context_len"},
             "datastore-0": {"context_len", "stride"}, "knnlm-0": {"k", "sweep_weights"},
             "memory-0": {"memory_hidden"}, "projection": {"projection_positions"},
             "macondo": {"macondo_sizes", "k"}, "hurdle": {"scale", "hurdle_steps"},
             "width-32": {"lm_preset"}}  # fmt: skip


@pytest.mark.parametrize("name", _tiny_plan_names())
def test_changing_what_a_stage_read_reruns_it(run, tmp_path, name):
    """Through the pipeline's own cache check: the saved stage is reused with the run's
    settings, and rerun when any one setting it read changes (one at a time)."""
    from dataclasses import asdict, replace

    from knnlm.cli.reproduce import TINY
    from knnlm.experiments.reproduce import stage_plan
    from knnlm.experiments.reproduce_config import ReproduceConfig
    from knnlm.experiments.stages import Pipeline

    out, r = run
    cfg = ReproduceConfig.for_scale("quick", **TINY)
    assert asdict(cfg) == r["config"]
    stage = {st.name: st for st in stage_plan(cfg)}[name]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    saved = records[name]
    assert MUST_READ.get(name, set()) <= set(saved["read"])
    assert not {"workers", "torch_threads"} & set(saved["read"])  # where, not what
    pipe = Pipeline(tmp_path)
    pipe.fingerprints = {n: rec["fingerprint"] for n, rec in records.items()}
    record = tmp_path / "stages" / f"{name}.json"
    record.parent.mkdir()
    calls = []

    def check(config) -> bool:
        """Whether the stage would run again under ``config``."""
        record.write_text(json.dumps(saved))
        n = len(calls)
        pipe.run(name, saved["settings"], list(stage.deps), lambda v, art: calls.append(1) or {},
                 config)  # fmt: skip
        return len(calls) > n

    assert not check(cfg)
    for key, value in saved["read"].items():
        assert check(replace(cfg, **{key: _other(value)})), key
    assert not check(replace(cfg, workers=cfg.workers + 1, torch_threads=3))


def test_the_recorder_notes_what_is_read():
    from dataclasses import dataclass, field
    from typing import ClassVar

    from knnlm.experiments.stages import Pipeline, ReadRecorder

    @dataclass
    class Settings:
        NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset({"threads"})
        a: int = 1
        b: int = 2
        c: list = field(default_factory=list)
        threads: int = 1

        @property
        def both(self) -> int:
            return self.a + self.b

    view = ReadRecorder(Settings())
    assert view.both == 3 and view.threads == 1 and view.values() == {"a": 1, "b": 2}
    with pytest.raises(AttributeError):
        view.a = 5
    # A stage whose reads depend on a value: c is read only while a is 1.
    ran = []

    def stage(v, art):
        ran.append(1)
        return {"x": v.c if v.a == 1 else None}

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for settings, reran in [(Settings(), True), (Settings(), False), (Settings(c=[1]), True),
                                (Settings(a=2), True), (Settings(a=2, c=[5]), False),
                                (Settings(a=2, threads=4), False)]:  # fmt: skip
            n = len(ran)
            Pipeline(Path(tmp)).run("s", {}, [], stage, settings)
            assert (len(ran) > n) == reran, settings


# A new analysis through the three registration points only (ARCHITECTURE.md's worked example).


def _toy_stage(cfg, done, art):
    """Reads one setting (so it is in the toy stage's key) and an earlier stage's result."""
    return {"k": cfg.k, "tokens": done["corpus"]["vocab_size"], "gain": 1.0}


def test_a_toy_analysis_needs_one_line_in_each_registry(run, tmp_path, monkeypatch):
    import shutil
    import types
    from dataclasses import replace

    import typer
    from typer.testing import CliRunner

    from knnlm.cli import commands
    from knnlm.cli.reproduce import TINY
    from knnlm.experiments import reproduce as rep
    from knnlm.experiments.reproduce_config import ReproduceConfig
    from knnlm.experiments.stages import AnalysisStages, Stage
    from knnlm.report import analyses
    from knnlm.report.analysis import Analysis, Claim
    from knnlm.report.reproduction_report import write_reproduction_report
    from knnlm.report.verdicts import HELD, NOT_HELD, verdict

    toy = AnalysisStages(
        lambda cfg, done: {"toy": done["toy"]},
        after=lambda cfg: [Stage("toy", _toy_stage, deps=("corpus",))],
    )
    claim = "(t) the toy analysis gains"

    def judge(r):
        return verdict(claim, HELD if r["toy"]["gain"] > 0 else NOT_HELD, "gain > 0", "toy")

    section = Analysis(
        key="toy",
        title="Toy analysis",
        claims=(Claim(claim, "gain > 0", judge),),
        section=lambda r, figs: f"toy gain {r['toy']['gain']} at k={r['toy']['k']}\n",
    )
    monkeypatch.setattr(rep, "ANALYSES", [*rep.ANALYSES, toy])  # the stage plan
    monkeypatch.setattr(analyses, "ANALYSES", (*analyses.ANALYSES, section))  # the report
    cmd = types.SimpleNamespace(COMMANDS=[("toy", lambda: typer.echo("toy ran"))])
    monkeypatch.setattr(commands, "MODULES", [*commands.MODULES, cmd])  # the CLI

    out = tmp_path / "repro"
    shutil.copytree(run[0], out)
    cfg = replace(ReproduceConfig.for_scale("quick", **TINY), workers=1)
    results = write_reproduction_report(out, rep.reproduce(cfg, out, progress=False))
    assert results["toy"] == {"k": cfg.k, "tokens": results["corpus"]["vocab_size"], "gain": 1.0}
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert not stages["toy"]["cached"] and stages["corpus"]["cached"]  # only the toy ran
    assert [c["status"] for c in results["claims"] if c["claim"] == claim] == [HELD]
    assert "toy gain 1.0" in (out / "report.md").read_text()
    app = typer.Typer()
    commands.register(app)
    assert CliRunner().invoke(app, ["toy"]).output == "toy ran\n"


def test_width_study_over_seeds_at_corpus_scale():
    """At corpus scale every width runs for 3 LM seeds (the own width's first seed is the main
    LM); a width's row holds the shares per seed and their mean with t bounds."""
    from knnlm.experiments.reproduce import stage_plan
    from knnlm.experiments.reproduce_config import ReproduceConfig
    from knnlm.experiments.width_study.run import rows_over_seeds

    cfg = ReproduceConfig.for_scale("corpus", corpus="c", width_study=[128, 256])  # own: 256
    assert cfg.width_seeds == 3 and ReproduceConfig.for_scale("quick").width_seeds == 1
    names = [st.name for st in stage_plan(cfg)]
    assert [n for n in names if n.startswith("width")] == [
        "width-128", "width-128-seed-1", "width-128-seed-2", "width-256-seed-1",
        "width-256-seed-2",
    ]  # fmt: skip
    st = next(st for st in stage_plan(cfg) if st.name == "width-128-seed-2")
    assert st.args == {"seed": 2, "d": 128}

    def row(share):
        q = {"share": share, "perplexity": 1.0}
        return {"d": 64, "proj_f": q, "proj_fg": q}

    out = rows_over_seeds([(0, row(0.2)), (1, row(0.4)), (2, row(0.6))])
    iv = out["proj_f"]["share_over_seeds"]
    # mean 0.4, sd 0.2, t(0.95, df 2) = 2.919986: half width 2.919986 * 0.2 / sqrt(3)
    assert iv["mean"] == pytest.approx(0.4) and iv["n"] == 3
    assert iv["lower"] == pytest.approx(0.4 - 0.33717, abs=1e-4)
    assert out["proj_f"]["share_per_seed"] == [0.2, 0.4, 0.6] and out["seeds"] == [0, 1, 2]
    assert out["proj_f"]["perplexity"] == 1.0  # the first seed's row otherwise
    assert rows_over_seeds([(0, row(0.2))]) == row(0.2)  # one seed: the row as it was


def test_corpus_scale_runs_macondo_at_a_second_size_on_the_same_lm(tmp_path, monkeypatch):
    """``macondo-small``: after ``macondo``, on the same LM, with the quick scale's 6 parents
    per n in place of the run's sizes; not in the quick run."""
    from knnlm.cli.reproduce import TINY
    from knnlm.experiments import reproduce as R
    from knnlm.experiments.macondo.settings import MacondoSettings
    from knnlm.experiments.reproduce_config import ReproduceConfig

    assert "macondo-small" not in _tiny_plan_names()
    cfg = ReproduceConfig.for_scale("corpus", corpus="c")
    plan = {st.name: st for st in R.stage_plan(cfg)}
    names = list(plan)
    assert names.index("macondo-small") == names.index("macondo") + 1
    assert plan["macondo-small"].deps == plan["macondo"].deps == ("lm-0",)
    seen = {}

    class Stop(Exception):
        pass

    def capture(preset, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(MacondoSettings, "from_preset", capture)
    done = {"lm-0": {"model": "the-lm"}}
    for name, per_n in (("macondo", 20), ("macondo-small", 6)):
        with pytest.raises(Stop):
            plan[name].run(cfg, done, tmp_path)
        assert seen["sizes"] == {"n_parents_per_count": per_n} and seen["model"] == "the-lm"
    assert ReproduceConfig.for_scale("quick", **TINY).macondo_small_sizes is None


def test_lm_valid_loss_over_its_last_steps(run):
    """The LM's last evaluations: at most 5, the last after its last step, and the last loss
    near the log of its valid perplexity measured by the kNN-LM stage (another code path: a
    strided pass over the whole split, against 32 blocks here)."""
    import math

    _, r = run
    for lm, knn in zip(r["lm"], r["knnlm"]["per_seed"], strict=True):
        v = lm["valid_loss"]
        assert 1 <= len(v["steps"]) <= 5 and v["steps"][-1] == lm["steps"]
        assert v["steps"] == sorted(v["steps"])
        assert abs(v["loss"][-1] - math.log(knn["valid"]["lm"])) < 0.5
