"""``knnlm memory train``: trains on a datastore, records it, and plugs into evaluation."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from knnlm.cli import commands
from knnlm.cli import memory as memory_cli
from knnlm.data.corpus import load_tokens
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.lm.loading import load_lm
from tiny import quiet_datastore, save_tiny_model

CTX = 32


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    commands.register(app, [memory_cli])
    return app


@pytest.fixture(scope="module")
def datastore(lm, tiny_corpus, tmp_path_factory):
    return quiet_datastore(lm, tiny_corpus, tmp_path_factory.mktemp("ds") / "ds", context_len=CTX)


def _hand_perplexity(lm, corpus) -> tuple[float, int]:
    """Windows of CTX tokens overlapping by one, each target scored once, by hand."""
    ids = load_tokens(lm.tokenizer, str(corpus), "valid")
    nll, n = 0.0, 0
    for b in range(0, len(ids) - 1, CTX - 1):
        seg = torch.as_tensor(np.asarray(ids[b : b + CTX], dtype=np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=seg[None]).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, seg[1:, None]).sum())
        n += len(seg) - 1
    return math.exp(nll / n), n


def test_memory_train_then_eval(app, tiny_lm_dir, tiny_corpus, datastore, tmp_path):
    mem, js = tmp_path / "mem", tmp_path / "mem.json"
    args = ["memory", "train", "--model", str(tiny_lm_dir), "--datastore", str(datastore)]
    args += ["--out", str(mem), "--hidden", "16", "--batch-tokens", "512", "--epochs", "2"]
    res = CliRunner().invoke(app, [*args, "--lr", "1e-3", "--json", str(js), "--quiet"])
    assert res.exit_code == 0, res.output

    n_keys = np.load(datastore / "values.npy", mmap_mode="r", allow_pickle=False).shape[0]
    steps = 2 * math.ceil(n_keys / 512)
    summary = json.loads(js.read_text())
    assert summary["steps"] == steps and summary["n_train"] == n_keys
    assert f"trained {steps} steps" in res.output
    assert math.isfinite(summary["final_loss"])

    cfg = json.loads((mem / "config.json").read_text())
    assert (cfg["hidden"], cfg["steps"], cfg["lr"], cfg["train_output"]) == (16, steps, 1e-3, False)
    meta_hash = hashlib.sha256((datastore / "meta.json").read_bytes()).hexdigest()[:16]
    assert cfg["datastore"]["path"] == str(datastore.resolve())
    assert cfg["datastore"]["meta_sha256"] == "sha256:" + meta_hash
    assert cfg["datastore"]["n"] == n_keys

    lm = load_lm(str(tiny_lm_dir))
    kw = dict(context_len=CTX, datastore=datastore, memory=mem, progress=False)
    result = evaluate(lm, str(tiny_corpus), "valid", memory_weight=0.0, **kw)
    hand, n = _hand_perplexity(lm, tiny_corpus)
    assert result["tokens"] == n
    assert result["lm"]["perplexity"] == pytest.approx(hand, rel=1e-5)
    assert result["mlp"]["perplexity"] == result["lm"]["perplexity"]  # weight 0: the LM exactly
    mixed = evaluate(lm, str(tiny_corpus), "valid", memory_weight=0.5, **kw)
    assert mixed["mlp"]["perplexity"] != result["lm"]["perplexity"]

    size = os.path.getsize
    files = size(mem / "model.safetensors") + size(mem / "config.json")
    ds_files = size(datastore / "keys.npy") + size(datastore / "values.npy")
    for storage in (result["storage"], summary["storage"]):
        assert storage["memory_bytes"] == files
        assert storage["datastore_bytes"] == ds_files
        assert storage["ratio_datastore_to_memory"] == pytest.approx(ds_files / files, rel=1e-9)
    assert f"memory {files:,} bytes" in res.output


def test_memory_train_refuses_another_model(app, tiny_tokenizer, datastore, tmp_path):
    other = save_tiny_model(tmp_path / "other", tiny_tokenizer, seed=1)
    mem = tmp_path / "mem"
    args = [
        "memory",
        "train",
        "--model",
        str(other),
        "--datastore",
        str(datastore),
        "--out",
        str(mem),
    ]
    res = CliRunner().invoke(app, [*args, "--quiet"])
    assert isinstance(res.exception, KnnlmError) and "another model" in str(res.exception)
    assert not mem.exists()
    missing = CliRunner().invoke(app, [*args[:4], "--datastore", str(tmp_path / "nope"), *args[6:]])
    assert isinstance(missing.exception, KnnlmError) and "no datastore" in str(missing.exception)
