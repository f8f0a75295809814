"""The training loop: loss goes down, resume is exact, batch order, last-MLP removal, LoRA, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from knnlm.data.corpus import load_tokens
from knnlm.errors import KnnlmError
from knnlm.lm.loading import load_lm
from knnlm.lm.lora import apply_lora
from knnlm.lm.presets import PRESETS, build_model_from_preset
from knnlm.lm.train import train, train_lm
from knnlm.lm.train_config import LMTrainSettings, TrainConfig
from knnlm.lm.train_data import batch_order, make_dataset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several threads thrash on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_ids(tiny_corpus, tiny_tokenizer) -> np.ndarray:
    return load_tokens(tiny_tokenizer, str(tiny_corpus), "train")


def _mean_loss(model, ids: np.ndarray, ctx: int = 64) -> float:
    """Token-weighted mean NLL over contiguous blocks, computed by hand from the logits."""
    n = ids.size // ctx
    x = torch.from_numpy(ids[: n * ctx].reshape(n, ctx))
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
    return float(nll.mean())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_unknown_preset_lists_names():
    with pytest.raises(KnnlmError, match="tiny, small, paper"):
        build_model_from_preset("huge", 100)
    cfg = PRESETS["paper"].model_config(50000)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_positions) == (
        16,
        1024,
        16,
        4096,
        3072,
    )


def test_training_reduces_loss(tiny_corpus, tmp_path):
    out = tmp_path / "lm"
    result = train_lm(str(tiny_corpus), out, LMTrainSettings("tiny", epochs=4), quiet=True)
    assert not (out / "checkpoint").exists()
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["preset"] == "tiny" and meta["train_config"]["epochs"] == 4
    curve = json.loads((out / "loss_curve.json").read_text())["loss_curve"]
    assert curve[-1]["step"] == result.steps == result.total_steps

    loaded = load_lm(str(out))
    valid = load_tokens(loaded.tokenizer, str(tiny_corpus), "valid")
    untrained = build_model_from_preset("tiny", tokenizer=loaded.tokenizer, seed=0)
    before = _mean_loss(untrained, valid)
    after = _mean_loss(loaded.model, valid)
    assert before > math.log(len(loaded.tokenizer)) - 0.5  # random init: near uniform
    assert after < before - 1.5, (before, after)


def test_resume_equals_straight_run(tiny_tokenizer, train_ids, tmp_path):
    cfg = TrainConfig(
        lr=3e-3,
        batch_size=4,
        max_steps=10,
        context_len=32,
        checkpoint_every=4,
        eval_every=3,
        log_every=1,
        seed=0,
    )

    def record(step, model):
        return {"seen": step}

    straight = train(
        build_model_from_preset("tiny", tokenizer=tiny_tokenizer, seed=0),
        tiny_tokenizer,
        train_ids,
        cfg,
        tmp_path / "a",
        on_eval=record,
        progress=False,
    )

    def crash(step, model):
        if step == 6:
            raise RuntimeError("interrupted")
        return record(step, model)

    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="interrupted"):
        train(
            build_model_from_preset("tiny", tokenizer=tiny_tokenizer, seed=0),
            tiny_tokenizer,
            train_ids,
            cfg,
            out,
            on_eval=crash,
            progress=False,
        )
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4

    # Other settings must not silently continue someone else's run.
    with pytest.raises(KnnlmError, match="other settings"):
        other = TrainConfig(**{**cfg.__dict__, "lr": 1e-3})
        train(
            build_model_from_preset("tiny", tokenizer=tiny_tokenizer, seed=0),
            tiny_tokenizer,
            train_ids,
            other,
            out,
            progress=False,
        )

    # A different initialisation: every weight must come from the checkpoint.
    resumed = train(
        build_model_from_preset("tiny", tokenizer=tiny_tokenizer, seed=5),
        tiny_tokenizer,
        train_ids,
        cfg,
        out,
        on_eval=record,
        progress=False,
    )
    assert resumed.resumed_from == 4
    assert not (out / "checkpoint").exists()
    assert resumed.loss_curve == straight.loss_curve
    assert (
        [e["step"] for e in resumed.evals] == [3, 6, 9, 10] == [e["seen"] for e in straight.evals]
    )
    a, b = _state(straight.model), _state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and training did move the weights (so the equality means something).
    init = _state(build_model_from_preset("tiny", tokenizer=tiny_tokenizer, seed=0))
    assert not torch.equal(
        a["transformer.h.0.mlp.c_fc.weight"], init["transformer.h.0.mlp.c_fc.weight"]
    )


def test_same_data_seed_same_batches(tiny_tokenizer, train_ids, tmp_path):
    ctx, bs = 32, 4
    train_ids = train_ids[:1600]  # 50 blocks: a few steps per epoch
    n_blocks = train_ids.size // ctx
    blocks = train_ids[: n_blocks * ctx].reshape(n_blocks, ctx)  # independent of the code

    def run(seed, data_seed, drop_mlp, name):
        model = build_model_from_preset("tiny", tokenizer=tiny_tokenizer, seed=seed)
        if drop_mlp:
            from knnlm.lm.adapters import Adapter

            Adapter(model).drop_last_mlp()
        seen = []
        model.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["input_ids"].numpy().copy()), with_kwargs=True
        )
        steps_per_epoch = math.ceil(n_blocks / bs)
        cfg = TrainConfig(
            batch_size=bs,
            max_steps=steps_per_epoch + 3,
            context_len=ctx,
            seed=seed,
            data_seed=data_seed,
            checkpoint_every=None,
        )
        train(model, tiny_tokenizer, train_ids, cfg, tmp_path / name, progress=False)
        return seen, steps_per_epoch

    a, spe = run(0, 7, False, "a")
    b, _ = run(1, 7, True, "b")
    c, _ = run(0, 8, False, "c")
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # One epoch shows every block exactly once; the next epoch is a new permutation.
    rows = np.concatenate(a[:spe])
    assert sorted(map(bytes, rows)) == sorted(map(bytes, blocks))
    epoch0 = batch_order(n_blocks, bs, 0, 7)
    epoch1 = batch_order(n_blocks, bs, 1, 7)
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    assert np.array_equal(a[spe], blocks[epoch1[0]])


def test_examples_are_padded_with_eos(tiny_tokenizer):
    texts = ["the old river", "a child was born in the village of stone"]
    ds = make_dataset(texts, tiny_tokenizer, context_len=64)
    batch = ds.collate(np.array([0, 1]))
    eos = tiny_tokenizer.eos_token_id
    for i, t in enumerate(texts):
        ids = tiny_tokenizer.encode(t, add_special_tokens=False) + [eos]
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["labels"][i, :n].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert (batch["labels"][i, n:] == -100).all()


def test_drop_last_mlp_removes_exactly_that_mlp(tiny_corpus, tmp_path):
    out = tmp_path / "nomlp"
    settings = LMTrainSettings("tiny", max_steps=3, drop_last_mlp=True)
    result = train_lm(str(tiny_corpus), out, settings, quiet=True)
    loaded = load_lm(str(out))
    reference = build_model_from_preset("tiny", tokenizer=loaded.tokenizer, seed=0)
    last_mlp = sum(p.numel() for p in reference.transformer.h[-1].mlp.parameters())
    full = sum(p.numel() for p in reference.parameters())
    assert last_mlp > 0
    assert sum(p.numel() for p in result.model.parameters()) == full - last_mlp
    assert sum(p.numel() for p in loaded.model.parameters()) == full - last_mlp
    assert not loaded.adapter.has_last_mlp()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    last = len(reference.transformer.h) - 1
    assert not any(f"h.{last}.mlp." in k for k in keys)
    assert any("h.0.mlp." in k for k in keys)
    x = torch.arange(20)[None] % len(loaded.tokenizer)
    with torch.no_grad():
        assert torch.allclose(result.model(input_ids=x).logits, loaded.model(input_ids=x).logits)


def test_lora_trains_and_saves_a_plain_model(tiny_lm_dir, tiny_tokenizer, tmp_path):
    base = load_lm(str(tiny_lm_dir))
    model = apply_lora(base.model.requires_grad_(True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("wte" in n for n in trainable) and any("c_fc" in n for n in trainable)

    x = torch.arange(30)[None] % len(tiny_tokenizer)
    final_logits = {}

    def capture(step, m):  # runs on the adapted (unmerged) model after the last step
        final_logits["peft"] = m(input_ids=x).logits.clone()
        return {}

    texts = ["the old river is green", "a child was born", "the baker of the market"] * 4
    cfg = TrainConfig(lr=1e-2, batch_size=4, epochs=3, context_len=32, eval_every=100)
    train(model, tiny_tokenizer, texts, cfg, tmp_path / "lora", on_eval=capture, progress=False)
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    loaded = load_lm(str(tmp_path / "lora"))
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    with torch.no_grad():
        merged = loaded.model(input_ids=x).logits
        original = load_lm(str(tiny_lm_dir)).model(input_ids=x).logits
    assert torch.allclose(merged, final_logits["peft"], atol=1e-4)
    assert not torch.allclose(merged, original, atol=1e-3)


def test_cli_train_and_bad_preset(tiny_corpus, tmp_path):
    import typer
    from typer.testing import CliRunner

    from knnlm.cli import commands
    from knnlm.cli import train as train_cli

    app = typer.Typer()
    commands.register(app, [train_cli])

    @app.callback()
    def _root() -> None:  # keeps "train" a subcommand
        pass

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "--drop-last-mlp" in help_text and "--lora" in help_text

    out = tmp_path / "cli_lm"
    args = ["train", "--corpus", str(tiny_corpus), "--preset", "tiny", "--out", str(out)]
    res = runner.invoke(app, [*args, "--max-steps", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    bad = runner.invoke(
        app,
        ["train", "--corpus", str(tiny_corpus), "--preset", "huge", "--out", str(tmp_path / "x")],
    )
    assert bad.exit_code != 0
    message = " ".join(bad.output.replace("│", " ").split())  # undo the error panel's wrapping
    assert "'huge' is not one of" in message and "'tiny', 'small', 'paper'" in message
    assert not (tmp_path / "x").exists()
