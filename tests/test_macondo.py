"""The Macondo over-specification experiment: numbers against independent computations."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.experiments.macondo.aggregate import aggregate_groups, group_means, reproduced
from knnlm.experiments.macondo.run import run_macondo
from knnlm.experiments.macondo.settings import MacondoSettings
from knnlm.report.macondo_figures import render_macondo

SIZES = {"n_villagers": 60, "n_parents_per_count": 3}
K, WEIGHT, TEMP = 16, 0.25, 2.0
# The module's run: one seed of the quick preset, curves every 15 steps.
RUN = {"seeds": (0,), "k": K, "knn_weight": WEIGHT, "temperature": TEMP, "max_steps": 30,
       "eval_every": 15, "sizes": SIZES}  # fmt: skip


def quick(**changes) -> MacondoSettings:
    return MacondoSettings.from_preset("quick", **changes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("macondo")
    results = run_macondo(quick(**RUN), out, progress=False)
    render_macondo(out, results)
    return out, results


def _seed(out, seed=0) -> dict:
    return json.loads((out / f"seed-{seed}" / "results.json").read_text())


def _model(out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = out / "seed-0" / "model"
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    return model, AutoTokenizer.from_pretrained(d)


def _forward(model, tok, prompt: str, child: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(log-probs at the last prompt position, ln_2 output of the last block there, child id)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(" " + child, add_special_tokens=False)["input_ids"]
    assert len(c) == 1, "children's names must be single tokens"
    seen = {}
    hook = model.transformer.h[-1].ln_2.register_forward_hook(
        lambda _m, _a, o: seen.__setitem__("key", o)
    )
    try:
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1]
    finally:
        hook.remove()
    return (
        torch.log_softmax(logits.double(), -1).numpy(),
        seen["key"][0, len(p) - 1].double().numpy(),
        c[0],
    )


def test_lm_log_likelihood_matches_a_direct_forward_pass(run):
    out, _ = run
    model, tok = _model(out)
    examples = _seed(out)["examples"]
    assert len(examples) == 3 * (1 + 2 + 3 + 4 + 5)
    for ex in examples[:6]:
        lp, _, child_id = _forward(model, tok, ex["prompt"], ex["child"])
        assert ex["lm"] == pytest.approx(lp[child_id], abs=1e-4)
        assert ex["lm"] < 0


def test_knnlm_matches_brute_force_over_the_stored_keys(run):
    out, _ = run
    model, tok = _model(out)
    ds = out / "seed-0" / "datastore"
    keys = np.load(ds / "keys.npy", allow_pickle=False).astype(np.float64)
    values = np.load(ds / "values.npy", allow_pickle=False)
    # The datastore holds one key per next token of every training sentence (eos appended).
    train = [json.loads(ln) for ln in (out / "seed-0" / "data" / "train.jsonl").open()]
    assert len(train) == 5 * 45
    assert len(keys) == sum(
        len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in train
    )
    for ex in _seed(out)["examples"][:4]:
        lp, q, child_id = _forward(model, tok, ex["prompt"], ex["child"])
        dists = np.empty(len(keys))
        for i in range(len(keys)):  # exact search, one key at a time
            diff = keys[i] - q
            dists[i] = float(diff @ diff)
        nearest = np.argsort(dists, kind="stable")[:K]
        logits = -dists[nearest] / TEMP
        w = np.exp(logits - logits.max())
        w /= w.sum()
        p_knn = sum(w[j] for j, row in enumerate(nearest) if values[row] == child_id)
        want = math.log((1 - WEIGHT) * math.exp(lp[child_id]) + WEIGHT * p_knn)
        assert ex["knnlm"] == pytest.approx(want, abs=2e-4)


def test_groups_are_means_of_the_examples(run):
    out, results = run
    examples = _seed(out)["examples"]
    for n in range(1, 6):
        sel = [e for e in examples if e["n_children"] == n]
        g = results["groups"][str(n)]
        assert g["lm"] == pytest.approx(sum(e["lm"] for e in sel) / len(sel))
        assert g["knnlm"] == pytest.approx(sum(e["knnlm"] for e in sel) / len(sel))
        assert g["perfect"] == pytest.approx(math.log(1 / n))
        assert g["lm_std"] is None  # one seed: the sample std is undefined


def test_grouping_math_on_a_hand_made_case():
    assert group_means([-1.0, -3.0, -2.0, -4.0, -0.5], [1, 1, 2, 2, 2]) == {
        "1": -2.0,
        "2": pytest.approx(-6.5 / 3),
    }
    seeds = [
        {"1": {"lm": -0.5, "knnlm": -0.2}, "2": {"lm": -1.0, "knnlm": -0.9}},
        {"1": {"lm": -0.7, "knnlm": -0.4}, "2": {"lm": -2.0, "knnlm": -0.7}},
    ]
    g = aggregate_groups(seeds)
    # Sample std (ddof=1) of two values a, b: |a - b| / sqrt(2).
    r2 = math.sqrt(2)
    assert g["1"]["lm"] == pytest.approx(-0.6) and g["1"]["lm_std"] == pytest.approx(0.2 / r2)
    assert g["2"]["knnlm"] == pytest.approx(-0.8) and g["2"]["knnlm_std"] == pytest.approx(0.2 / r2)
    assert g["2"]["lm_std"] == pytest.approx(1.0 / r2)
    assert g["2"]["perfect"] == pytest.approx(-math.log(2))
    verdict = reproduced(g)
    assert verdict["per_n"]["1"]["knnlm_closer"] and verdict["per_n"]["2"]["knnlm_closer"]
    assert verdict["held"]
    g["2"]["knnlm"] = -3.0  # now further from log(1/2) than the LM
    verdict = reproduced(g)
    assert not verdict["held"] and not verdict["per_n"]["2"]["knnlm_closer"]
    assert verdict["summary"].startswith("no")


def test_output_files_follow_the_contract(run):
    out, results = run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["groups"]) == {"1", "2", "3", "4", "5"}
    for g in saved["groups"].values():
        assert {"lm", "lm_std", "knnlm", "knnlm_std", "perfect"} <= set(g)
    assert {"per_seed", "settings", "reproduced", "curves"} <= set(saved)
    assert isinstance(saved["reproduced"]["held"], bool)
    assert saved["settings"]["k"] == K and saved["settings"]["temperature"] == TEMP
    assert saved["curves"]["steps"] == [0, 15, 30]
    assert len(saved["curves"]["groups"]["3"]["knnlm"]) == 3
    table = (out / "table5.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 2 + 5  # head, rule, n
    assert "Reproduced:" in table
    for name in ("figure1.png", "figure3.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_seed_is_not_rerun(run):
    out, results = run
    seed_file = out / "seed-0" / "results.json"
    before = seed_file.stat().st_mtime_ns
    again = run_macondo(quick(**RUN), out, progress=False)
    assert seed_file.stat().st_mtime_ns == before
    assert again["groups"] == results["groups"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seeds": ()},
        {"seeds": (0, 0)},
        {"model": "some-model"},  # the quick preset trains from scratch
        {"name": "default"},  # fine-tuning needs a model
        {"k": 0},
        {"knn_weight": 1.5},
        {"sizes": {"villagers": 10}},
    ],
)
def test_bad_settings_fail_clearly(kwargs):
    with pytest.raises(KnnlmError):
        MacondoSettings.from_preset(**{"name": "quick", **kwargs})


def test_settings_resolve_the_preset_and_record_what_the_run_computes():
    from knnlm.experiments.macondo.settings import RUN_PRESETS

    p = RUN_PRESETS["quick"]
    s = quick(epochs=None, lr=0.5, seeds=[2, 3], sizes=SIZES, memory={"hidden": 8},
              device="cpu", workers=2)  # fmt: skip
    assert (s.epochs, s.lr, s.batch_size, s.seeds) == (p.epochs, 0.5, p.batch_size, (2, 3))
    record = s.as_dict()
    assert record["seeds"] == [2, 3] and record["lr"] == 0.5 and record["model"] is None
    assert record["macondo"] == {"n_villagers": 60, "n_parents_per_count": 3,
                                 "min_children": None, "max_children": None,
                                 "sentences_per_pair": None}  # fmt: skip
    assert record["memory"] == {"hidden": 8, "epochs": 10, "lr": 1e-3, "batch_tokens": 256}
    assert not {"device", "workers", "sizes"} & set(record)  # where it runs, not what
    assert MacondoSettings.from_preset(model="gpt2").preset == "default"
    with pytest.raises(AttributeError):
        s.k = 3  # frozen


def _main(monkeypatch, args: list[str]) -> int:
    """Run the real ``knnlm`` entry point."""
    import knnlm.cli as cli

    monkeypatch.setattr(sys, "argv", ["knnlm", *args])
    try:
        cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_quick_run(monkeypatch, tmp_path, capsys):
    js = tmp_path / "out.json"
    code = _main(
        monkeypatch,
        ["macondo", "run", "--quick", "--seeds", "1", "--out", str(tmp_path / "run"),
         "--villagers", "60", "--parents-per-count", "2", "--max-steps", "20", "--k", "8",
         "--json", str(js), "--quiet"],
    )  # fmt: skip
    assert code == 0
    summary = json.loads(js.read_text())
    assert set(summary["groups"]) == {"1", "2", "3", "4", "5"}
    for n, g in summary["groups"].items():
        assert g["perfect"] == pytest.approx(math.log(1 / int(n)))
        assert g["lm"] < 0 and g["knnlm"] < 0
    assert summary["settings"]["macondo"]["n_villagers"] == 60
    shown = capsys.readouterr().out
    assert "kNN-LM" in shown and "reproduced:" in shown


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0"], "--seeds"),
        (["--model", "/no/such/model/dir"], "no such folder"),
        (["--quick", "--model", "gpt2"], "from scratch"),
    ],
)
def test_cli_bad_input_exits_with_one_line(monkeypatch, tmp_path, capsys, args, message):
    code = _main(monkeypatch, ["macondo", "run", "--out", str(tmp_path / "o"), *args])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_scoring_settings_reuse_the_trained_model(tmp_path):
    kw = {"seeds": (0,), "max_steps": 10, "sizes": SIZES}
    first = run_macondo(quick(k=8, **kw), tmp_path, progress=False)
    weights = tmp_path / "seed-0" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    second = run_macondo(quick(k=4, **kw), tmp_path, progress=False)
    assert weights.stat().st_mtime_ns == before  # not retrained
    assert second["settings"]["k"] == 4
    assert second["groups"]["2"]["lm"] == pytest.approx(first["groups"]["2"]["lm"])
    third = run_macondo(quick(k=4, epochs=2, **{**kw, "max_steps": 12}), tmp_path, progress=False)
    assert weights.stat().st_mtime_ns != before  # training settings changed: retrained
    assert third["per_seed"][0]["train"]["steps"] == 12


def test_search_exact_and_auto_give_the_same_results_and_are_recorded(monkeypatch, tmp_path):
    """``macondo run --search``: auto is exact on a Macondo datastore (it has no index), so the
    results are identical; the seed's results record the backend; changing --search rescores
    with the trained model instead of reusing results cached under the other backend."""
    run, js = tmp_path / "run", tmp_path / "out.json"
    args = ["macondo", "run", "--quick", "--seeds", "1", "--out", str(run), "--villagers", "60",
            "--parents-per-count", "2", "--max-steps", "10", "--k", "8", "--json", str(js),
            "--quiet"]  # fmt: skip
    assert _main(monkeypatch, [*args, "--search", "auto"]) == 0
    auto, auto_summary = _seed(run), json.loads(js.read_text())
    weights = run / "seed-0" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert _main(monkeypatch, [*args, "--search", "exact"]) == 0
    exact, exact_summary = _seed(run), json.loads(js.read_text())
    assert weights.stat().st_mtime_ns == before  # scoring-only setting: not retrained
    assert auto["search"] == {"requested": "auto", "used": "exact"}
    assert exact["search"] == {"requested": "exact", "used": "exact"}
    assert (auto["settings"]["search"], exact["settings"]["search"]) == ("auto", "exact")
    assert exact_summary["settings"]["search"] == "exact"
    assert [e["knnlm"] for e in exact["examples"]] == [e["knnlm"] for e in auto["examples"]]
    assert exact_summary["groups"] == auto_summary["groups"]
    results = json.loads((run / "results.json").read_text())
    assert results["per_seed"][0]["search"] == exact["search"]


def test_results_cached_before_the_search_option_are_reused_as_auto():
    from knnlm.experiments.macondo.settings import LEGACY_SEARCH, upgrade_settings

    assert upgrade_settings({"k": 8, "search": LEGACY_SEARCH}) == {"k": 8, "search": "auto"}
    assert upgrade_settings({"k": 8, "search": "exact"}) == {"k": 8, "search": "exact"}
    assert upgrade_settings(None) is None


def test_tuning_on_a_dev_share_of_the_parents(tmp_path):
    from knnlm.experiments.macondo.tuning import dev_mask

    grid = {"dev_share": 1 / 3, "k": [4, 16], "temperature": [1.0, 5.0],
            "knn_weight": [0.2, 0.6], "memory_weight": [0.3]}  # fmt: skip
    settings = quick(seeds=(0,), max_steps=10, sizes=SIZES, tune=grid, eval_every=5,
                     memory={"hidden": 16, "epochs": 1})  # fmt: skip
    res = run_macondo(settings, tmp_path, progress=False)
    seed = _seed(tmp_path)
    ex = seed["examples"]
    dev = [e for e in ex if e["split"] == "dev"]
    test = [e for e in ex if e["split"] == "test"]
    # One of the 3 parents per n is dev (all its children), the other two are read.
    for n in range(1, 6):
        assert len({e["villager"] for e in dev if e["n_children"] == n}) == 1
        assert len({e["villager"] for e in test if e["n_children"] == n}) == 2
        assert not {e["villager"] for e in dev} & {e["villager"] for e in test}
        sel = [e for e in test if e["n_children"] == n]
        assert res["groups"][str(n)]["knnlm"] == pytest.approx(
            sum(e["knnlm"] for e in sel) / len(sel)
        )
        # The default setting (k, w, T of the run) on the same parents, beside the tuned one.
        assert res["groups"][str(n)]["knnlm_default"] == pytest.approx(
            sum(e["knnlm_default"] for e in sel) / len(sel)
        )
        # Figure 1's curves read the verdict's parents: at the last step (the final model)
        # the LM's per-n mean is the verdict group's.
        last = seed["curve"][-1]
        assert last["step"] == 10 and last["parents"] == "verdict"
        assert last["lm"][str(n)] == pytest.approx(sum(e["lm"] for e in sel) / len(sel), abs=1e-5)
    tuned = seed["tuning"]["tuned"]
    sweep = seed["tuning"]["sweep"]
    assert len(sweep) == 8 and tuned["tuned_on"] == "dev"
    best = max(sweep, key=lambda s: s["dev"])
    assert (tuned["k"], tuned["temperature"], tuned["knn_weight"]) == (
        best["k"], best["temperature"], best["knn_weight"])  # fmt: skip
    # The chosen cell's dev mean is the dev examples' kNN-LM mean at it (stored per example).
    # The tuner averages float32 log-probs in float32: the tolerance is float32's rounding of a
    # sum of len(dev) terms (n eps_32 max|x|), not a float64 one (issue 27: an AMD EPYC ended
    # 1.0e-6 apart, over abs=1e-6).
    bound = len(dev) * float(np.finfo(np.float32).eps) * max(abs(e["knnlm"]) for e in dev)
    assert best["dev"] == pytest.approx(sum(e["knnlm"] for e in dev) / len(dev), abs=bound)
    # The read-out kNN-LM value of a test example against a brute-force search at the setting.
    model, tok = _model(tmp_path)
    ds = tmp_path / "seed-0" / "datastore"
    keys = np.load(ds / "keys.npy", allow_pickle=False).astype(np.float64)
    values = np.load(ds / "values.npy", allow_pickle=False)
    e = test[0]
    lp, q, child_id = _forward(model, tok, e["prompt"], e["child"])
    d = ((keys - q) ** 2).sum(1)
    nearest = np.argsort(d, kind="stable")[: tuned["k"]]
    w = np.exp(-(d[nearest] - d[nearest].min()) / tuned["temperature"])
    p_knn = w[values[nearest] == child_id].sum() / w.sum()
    lam = tuned["knn_weight"]
    assert e["knnlm"] == pytest.approx(math.log((1 - lam) * math.exp(lp[child_id]) + lam * p_knn),
                                       abs=2e-4)  # fmt: skip
    # The split is seeded: the same seed gives the same parents.
    records = [{"villager": x["villager"], "n_children": x["n_children"]} for x in ex]
    again = dev_mask(records, 0, 1 / 3)
    assert [x["split"] == "dev" for x in ex] == again.tolist()
    assert res["per_seed"][0]["tuning"]["tuned"] == tuned
    # The memory's weight, tuned on dev too, and its groups read on the other parents.
    assert tuned["memory_weight"] == 0.3 and seed["memory"]["weight"] == 0.3
    from knnlm.retrieval.memory import load_memory

    mem = load_memory(tmp_path / "seed-0" / "memory")
    with torch.no_grad():
        key = torch.tensor(q, dtype=torch.float32)[None]
        mem_lp = mem.target_log_prob(key, torch.tensor([child_id])).item()
    want = math.log(0.7 * math.exp(lp[child_id]) + 0.3 * math.exp(mem_lp))
    assert e["mlp"] == pytest.approx(want, abs=2e-4)
    sel = [e for e in test if e["n_children"] == 3]
    assert res["groups"]["3"]["mlp"] == pytest.approx(sum(e["mlp"] for e in sel) / len(sel))


def test_a_choice_at_the_top_of_the_grid_is_flagged():
    from knnlm.experiments.macondo.tuning import tune

    lm = np.log(np.full(6, 0.1))
    dev = np.array([True, True, True, False, False, False])
    grid = {"knn_weight": [0.2, 0.9], "memory_weight": [0.2, 0.9]}
    # p_knn = 0.9 everywhere: more kNN weight is always better, so the top weight wins.
    out = tune(lm, {(4, 10.0): np.log(np.full(6, 0.9))}, np.log(np.full(6, 0.05)), dev,
               grid | {"temperature": [1.0, 10.0]})  # fmt: skip
    assert out["tuned"]["at_grid_edge"] == ["temperature", "knn_weight"]
    # A memory worse than the LM picks the bottom weight: not flagged.
    assert out["tuned"]["memory_weight"] == 0.2
    # Where the kNN misses one dev child badly, a middle weight wins: nothing at the edge.
    mixed = np.log(np.array([0.9, 0.9, 1e-4, 0.9, 0.9, 0.9]))
    inner = tune(lm, {(4, 1.0): mixed}, None, dev,
                 {"knn_weight": [0.2, 0.6, 0.99], "temperature": [1.0, 10.0]})  # fmt: skip
    assert inner["tuned"]["knn_weight"] == 0.6
    assert inner["tuned"]["at_grid_edge"] == []
