"""The last-MLP hurdle (Appendix E): same init, same batches, curves, cache, JSON, figures, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.experiments.hurdle.curves import compare_curves
from knnlm.experiments.hurdle.run import VARIANTS, run_hurdle
from knnlm.experiments.hurdle.settings import (
    build_model,
    hurdle_settings,
    macondo_for_hurdle,
    resolve_preset,
)
from knnlm.lm.loading import load_lm
from knnlm.report.hurdle import render_hurdle

SIZES = {"n_villagers": 30, "n_parents_per_count": 2, "max_children": 3}
STEPS, EVERY = 12, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several threads thrash on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_without_mlp_lacks_exactly_the_last_mlp_and_shares_the_init(tiny_tokenizer):
    arch = resolve_preset("quick")
    full = build_model(arch, tiny_tokenizer, seed=3)
    cut = build_model(arch, tiny_tokenizer, seed=3, drop_last_mlp=True)
    last = arch.n_layer - 1
    # Independent count of the removed module: GPT-2's MLP is c_fc (d x 4d + 4d) and c_proj
    # (4d x d + d).
    d, inner = arch.n_embd, arch.n_inner
    assert sum(p.numel() for p in full.transformer.h[last].mlp.parameters()) == (
        d * inner + inner + inner * d + d
    )
    n_full = sum(p.numel() for p in full.parameters())
    n_cut = sum(p.numel() for p in cut.parameters())
    assert n_full - n_cut == d * inner + inner + inner * d + d

    sd_full, sd_cut = full.state_dict(), cut.state_dict()
    prefix = f"transformer.h.{last}.mlp."
    assert set(sd_cut) == {k for k in sd_full if not k.startswith(prefix)}
    assert any(k.startswith(prefix) for k in sd_full)
    for k, v in sd_cut.items():
        assert torch.equal(v, sd_full[k]), k
    # ... and a different seed gives a different init.
    other = build_model(arch, tiny_tokenizer, seed=4).state_dict()
    assert not torch.equal(other["transformer.wte.weight"], sd_full["transformer.wte.weight"])
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert not torch.allclose(full.eval()(input_ids=x).logits, cut.eval()(input_ids=x).logits)


def test_compare_curves_by_hand():
    steps = [0, 10, 20, 30, 40]
    with_mlp = [-5.0, -4.0, -3.0, -2.0, -1.0]
    without = [-5.0, -3.0, -2.5, -2.0, -1.5]
    cmp = compare_curves(steps, with_mlp, without, higher_is_better=True)
    assert cmp["gap_by_step"] == [0.0, 1.0, 0.5, 0.0, -0.5]
    # First half: the evaluations after step 0 up to 20, gaps 1 and 0.5 -> mean 0.75, the
    # same statistic claim (e) reads (issue 27: the trapezoid mean of step 0..20 was 0.625).
    assert cmp["mean_gap_first_half"] == pytest.approx(0.75)
    assert cmp["without_mlp_ahead_early"] is True
    assert cmp["steps_ahead_first_half"] == [10.0, 20.0]
    assert cmp["lead_at_end"] is False  # -0.5 at step 40
    # Threshold half-way from -5 to the best value -1: -3; with reaches it at 20, without at 10.
    assert cmp["threshold"] == pytest.approx(-3.0)
    assert cmp["first_step_reaching"] == {"with_mlp": 20.0, "without_mlp": 10.0}
    loss = compare_curves([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0], [4.0, 3.5, 2.5, 1.0], False)
    assert loss["gap_by_step"] == [0.0, -0.5, -0.5, 0.0]
    assert loss["without_mlp_ahead_early"] is False
    assert loss["mean_gap_first_half"] == pytest.approx(-0.25)  # steps 1, 2: gaps 0, -0.5
    assert loss["first_step_reaching"] == {"with_mlp": 3.0, "without_mlp": 3.0}
    with pytest.raises(KnnlmError):
        compare_curves([0, 1], [1.0], [1.0, 2.0], True)


def _hand_loglik(model_dir, records) -> float:
    """Mean log p(child | prompt) from the saved model, by hand (one sequence at a time)."""
    lm = load_lm(str(model_dir))
    tok, total = lm.tokenizer, 0.0
    for r in records:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        (c,) = tok(" " + r["child"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([p])).logits[0, -1]
        total += float(torch.log_softmax(logits.double(), -1)[c])
    return total / len(records)


def test_quick_run_same_batches_curves_cache_and_figures(tmp_path, tiny_corpus):
    seen: dict[tuple, list[np.ndarray]] = {}

    def on_model(part, seed, variant, model):
        batches = seen.setdefault((part, seed, variant), [])

        def hook(mod, _args, kwargs):
            if mod.training:
                batches.append(kwargs["input_ids"].numpy().copy())

        model.register_forward_pre_hook(hook, with_kwargs=True)

    out = tmp_path / "hurdle"
    settings = hurdle_settings(
        "quick",
        seeds=(0, 1),
        steps=STEPS,
        eval_every=EVERY,
        corpus=str(tiny_corpus),
        batch_size=4,
        **SIZES,
    )
    kept = replace(settings, keep_models=True)
    res = render_hurdle(out, run_hurdle(kept, out, progress=False, on_model=on_model))

    # Same batches, same order, for both variants of a seed; other seeds see other orders.
    assert len(seen) == 8
    for part in ("macondo", "corpus"):
        for seed in (0, 1):
            a, b = seen[(part, seed, "with_mlp")], seen[(part, seed, "without_mlp")]
            assert len(a) == STEPS
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        s0, s1 = seen[(part, 0, "with_mlp")], seen[(part, 1, "with_mlp")]
        assert not all(
            x.shape == y.shape and np.array_equal(x, y) for x, y in zip(s0, s1, strict=True)
        )

    logged = [0, 4, 8, 12]
    for v in VARIANTS:
        r = res[v]
        assert r["steps"] == logged
        assert len(r["loglik"]) == len(r["loglik_std"]) == len(logged)
        assert all(len(c) == len(logged) for c in r["loglik_per_seed"])
        assert r["loss_steps"] == [4, 8, 12] and len(r["loss"]) == 3
        per_seed = np.array(r["loglik_per_seed"])
        assert np.allclose(r["loglik"], per_seed.mean(0)) and np.allclose(
            r["loglik_std"], per_seed.std(0, ddof=1)
        )
        assert all(math.isfinite(x) and x < 0 for x in r["loglik"])
    # Step 0 is the shared initialisation; the variants differ only by the last MLP there.
    assert res["with_mlp"]["loglik"][0] != res["without_mlp"]["loglik"][0]
    assert res["params"]["with_mlp"] > res["params"]["without_mlp"]

    # The logged final value equals a by-hand evaluation of the saved model.
    ds, _ = macondo_for_hurdle(0, **SIZES)
    for v in VARIANTS:
        hand = _hand_loglik(out / "runs" / f"macondo-seed1-{v}", ds.test)
        assert res[v]["loglik_per_seed"][1][-1] == pytest.approx(hand, abs=1e-4)

    written = json.loads((out / "hurdle.json").read_text())
    for v in VARIANTS:
        assert {"steps", "loglik", "loglik_std", "loss_steps", "loss"} <= set(written[v])
    assert set(written["params"]) == set(VARIANTS)
    assert {"settings", "summary"} <= set(written)
    assert isinstance(written["summary"]["without_mlp_ahead_early"], bool)
    assert written["summary"]["loss"] is not None
    for name in ("figure4.png", "figure5.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun with the same settings trains nothing and gives the same curves.
    seen.clear()
    again = run_hurdle(settings, out, progress=False, on_model=on_model)
    assert seen == {}
    assert again["with_mlp"]["loglik"] == res["with_mlp"]["loglik"]
    # Another setting retrains.
    other = replace(settings, seeds=(0,), corpus=None, lr=1e-3)
    run_hurdle(other, out, progress=False, on_model=on_model)
    assert set(seen) == {("macondo", 0, "with_mlp"), ("macondo", 0, "without_mlp")}


def test_bad_arguments(tmp_path):
    with pytest.raises(KnnlmError, match="unknown preset"):
        resolve_preset("huge")
    with pytest.raises(KnnlmError, match="eval_every"):
        run_hurdle(hurdle_settings("quick", steps=5, eval_every=10), tmp_path, progress=False)


def test_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from knnlm.cli import commands
    from knnlm.cli import hurdle as hurdle_cli

    app = typer.Typer()
    commands.register(app, [hurdle_cli])

    @app.callback()
    def _root() -> None:  # keeps "hurdle" a subcommand
        pass

    runner = CliRunner()
    help_text = runner.invoke(app, ["hurdle", "--help"]).output
    for opt in ("--quick", "--seeds", "--steps", "--eval-every", "--corpus", "--json"):
        assert opt in help_text
    out, js = tmp_path / "h", tmp_path / "h.json"
    args = ["hurdle", "--out", str(out), "--quick", "--seeds", "1", "--steps", "6"]
    res = runner.invoke(app, [*args, "--eval-every", "3", "--json", str(js), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    for v in VARIANTS:
        assert data[v]["steps"] == [0, 3, 6] and len(data[v]["loglik"]) == 3
    assert data["params"]["with_mlp"] > data["params"]["without_mlp"]
    assert (out / "figure4.png").is_file() and not (out / "figure5.png").exists()
    assert "leads over the first half" in res.output
    bad = runner.invoke(app, ["hurdle", "--out", str(out), "--preset", "huge"])
    assert bad.exit_code != 0 and "'huge' is not one of" in bad.output


def test_interrupted_run_resumes_to_the_same_curve(tmp_path):
    settings = hurdle_settings(
        "quick", seeds=(0,), steps=STEPS, eval_every=EVERY, batch_size=4, **SIZES
    )
    straight = run_hurdle(settings, tmp_path / "a", progress=False)
    calls = {"n": 0}

    def crash_once(part, seed, variant, model):
        if variant != "without_mlp" or calls["n"]:
            return
        calls["n"] += 1
        steps = []

        def hook(mod, _args):
            if mod.training:
                steps.append(1)
                if len(steps) > 6:  # after the checkpoint at step 4
                    raise KeyboardInterrupt

        model.register_forward_pre_hook(hook)

    out, every4 = tmp_path / "b", replace(settings, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        run_hurdle(every4, out, progress=False, on_model=crash_once)
    assert (out / "runs" / "macondo-seed0-without_mlp" / "checkpoint").is_dir()
    resumed = run_hurdle(every4, out, progress=False, on_model=crash_once)
    for v in VARIANTS:
        assert resumed[v]["loglik"] == pytest.approx(straight[v]["loglik"], abs=1e-5)
    assert not (out / "runs" / "macondo-seed0-without_mlp").exists()  # removed once finished


def test_corpus_loss_is_cross_entropy_on_fixed_blocks_by_hand(tiny_tokenizer):
    """Figure 5's logged loss: mean next-token NLL over the chosen blocks, from a softmax
    computed here in numpy (float64)."""
    from knnlm.experiments.hurdle.settings import corpus_loss_fn

    arch = resolve_preset("quick")
    model = build_model(arch, tiny_tokenizer, seed=1).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(tiny_tokenizer), size=16 * 10 + 5)
    got = corpus_loss_fn(ids, 16, n_blocks=4)(0, model)["loss"]
    rows = np.linspace(0, 9, num=4).astype(int)  # 10 full blocks of 16, tail dropped
    blocks = ids[:160].reshape(10, 16)[rows]
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(blocks)).logits.double().numpy()
    z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, blocks[:, 1:, None], -1).mean()
    assert got == pytest.approx(nll, rel=1e-5)
