"""One identity for a model wherever it is loaded (issue 28 item 1), and the refusals of item 4:
artifacts built in Python from an in-memory model work through the CLI from another working
directory, and the other way round; foreign memories and gates, a k past the datastore's size,
a split of a single file and a family registered with the wrong layout are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import knnlm
from knnlm import Datastore, KnnLM, KnnlmError
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.experiments.projection.settings import ProjectionSettings
from knnlm.forward_pass import WindowSettings
from knnlm.lm.adapters import unregister_family
from knnlm.lm.loading import content_fingerprint, load_lm
from knnlm.retrieval.gate_train import GateSettings, train_gate
from knnlm.retrieval.retriever import KnnSettings
from tiny import SMALL_CTX, SMALL_STRIDE, run_cli

WINDOW = {"context_len": SMALL_CTX, "stride": SMALL_STRIDE}
CLI_WINDOW = ["--context-len", SMALL_CTX, "--stride", SMALL_STRIDE]


def _model(tokenizer, seed: int, model_type: str = "gpt2"):
    """A random tiny model built in memory (no folder, no hub name)."""
    torch.manual_seed(seed)
    special = dict.fromkeys(("bos_token_id", "eos_token_id"), tokenizer.eos_token_id)
    if model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_positions=128, n_embd=32,
                                   n_layer=2, n_head=2, **special)  # fmt: skip
    else:
        cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, **special)  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_one_fingerprint_in_memory_and_from_a_folder(tiny_tokenizer, tmp_path, model_type):
    model = _model(tiny_tokenizer, 0, model_type)
    in_memory = KnnLM(model, tiny_tokenizer).lm
    assert in_memory.name == "in-memory"
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_lm(str(tmp_path / "m"))
    assert loaded.fingerprint == in_memory.fingerprint
    assert loaded.name == str((tmp_path / "m").resolve())  # absolute: reloadable from anywhere
    assert load_lm(str(tmp_path / "m"), dtype="bfloat16").fingerprint != loaded.fingerprint
    # Two models differing only in the last byte of one tensor (far past its first 4 KiB).
    other = _model(tiny_tokenizer, 0, model_type)
    tensor = max(other.state_dict().values(), key=lambda t: t.numel())
    assert tensor.numel() * 4 > 4096
    last = tensor.view(-1)[-1].clone()
    with torch.no_grad():
        tensor.view(-1)[-1] += 1.0
    assert content_fingerprint(other) != in_memory.fingerprint
    with torch.no_grad():
        tensor.view(-1)[-1] = last
    assert content_fingerprint(other) == in_memory.fingerprint  # the cache follows the change


@pytest.fixture(scope="module")
def python_side(tmp_path_factory, tiny_tokenizer, small_corpus):
    """Datastore, index, memory and gate built in Python from an in-memory model, which is
    also saved to a folder."""
    root = tmp_path_factory.mktemp("python_side")
    model = _model(tiny_tokenizer, 0)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    knn_lm = KnnLM(model, tiny_tokenizer)
    ds = Datastore.build(knn_lm, small_corpus, root / "ds", key_dtype="float32", progress=False,
                         **WINDOW)  # fmt: skip
    ds.index("flat", progress=False)
    knn_lm.train_memory(ds, root / "mem", hidden=8, max_steps=2, batch_tokens=64)
    settings = GateSettings(kind="entropy", knn=KnnSettings(k=8), window=WindowSettings(**WINDOW))
    train_gate(knn_lm.lm, ds.path, str(small_corpus), root / "gate", settings, progress=False)
    return root, knn_lm


def test_python_artifacts_work_through_the_cli_elsewhere(
    python_side, small_corpus, tmp_path, monkeypatch, capsys
):
    root, knn_lm = python_side
    monkeypatch.chdir(tmp_path)  # another working directory
    (tmp_path / "models").mkdir()
    shutil.copytree(root / "model", tmp_path / "models" / "m")  # the same weights, elsewhere
    args = ["eval", "-m", "models/m", "-c", small_corpus, "-d", root / "ds", "--k", 8,
            "--memory", root / "mem", "--gate", root / "gate", "--retrieval-rate", 0.5,
            *CLI_WINDOW, "--json", tmp_path / "r.json", "-q"]  # fmt: skip
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    want = knn_lm.perplexity(small_corpus, root / "ds", k=8, memory=root / "mem",
                             gate=root / "gate", retrieval_rate=0.5, **WINDOW)  # fmt: skip
    assert (
        f"kNN-LM ppl {want.knnlm:.3f}" in out
        and f"LM+MLP ppl {want.raw['mlp']['perplexity']:.3f}" in out
    )
    # The index check must reload the model: an in-memory one has no name to reload.
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "index", root / "ds",
                           "--corpus", small_corpus, "--k", 8, "-q")  # fmt: skip
    assert code == 2 and "in memory" in err and "--model" in err and len(err.splitlines()) == 1
    code, out, err = run_cli(monkeypatch, capsys, "datastore", "index", root / "ds", "--corpus",
                             small_corpus, "-m", "models/m", "--k", 8, *CLI_WINDOW, "-q")  # fmt: skip
    assert code == 0, err


def test_cli_artifacts_work_from_python_and_from_elsewhere(
    python_side, small_corpus, tmp_path, monkeypatch, capsys
):
    root, knn_lm = python_side
    here = tmp_path / "a"
    (here / "models").mkdir(parents=True)
    shutil.copytree(root / "model", here / "models" / "m")
    monkeypatch.chdir(here)
    for args in (
        ["datastore", "build", "-m", "models/m", "-c", small_corpus, "-o", "ds",
         "--key-dtype", "float32", *CLI_WINDOW, "-q"],
        ["memory", "train", "-m", "models/m", "-d", "ds", "-o", "mem", "--hidden", 8,
         "--max-steps", 2, "--batch-tokens", 64, "-q"],
        ["gate", "train", "-m", "models/m", "-d", "ds", "-c", small_corpus, "-o", "gate",
         "--kind", "entropy", "--k", 8, *CLI_WINDOW, "-q"],
    ):  # fmt: skip
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
    assert Datastore.load(here / "ds").meta["model"] == str((here / "models" / "m").resolve())
    # The in-memory model with the same weights accepts all three.
    res = knn_lm.perplexity(small_corpus, here / "ds", k=8, memory=here / "mem",
                            gate=here / "gate", retrieval_rate=0.5, **WINDOW)  # fmt: skip
    py = knn_lm.perplexity(small_corpus, root / "ds", k=8, memory=root / "mem",
                           gate=root / "gate", retrieval_rate=0.5, **WINDOW)  # fmt: skip
    assert res.raw["mlp"]["perplexity"] == py.raw["mlp"]["perplexity"]  # same memory training
    assert res.knnlm == pytest.approx(py.knnlm, rel=1e-6)  # FAISS flat index vs exact search
    # From another directory the recorded (absolute) model path reloads for the index check.
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "index", here / "ds", "--corpus",
                           small_corpus, "--k", 8, *CLI_WINDOW, "-q")  # fmt: skip
    assert code == 0, err


def test_another_models_memory_gate_and_datastore_are_refused(
    python_side, small_corpus, tiny_tokenizer
):
    root, _ = python_side
    other = KnnLM(_model(tiny_tokenizer, 1), tiny_tokenizer)
    with pytest.raises(KnnlmError, match="memory .* trained for another model"):
        other.perplexity(small_corpus, memory=root / "mem", **WINDOW)
    with pytest.raises(KnnlmError, match="datastore .* built with another model"):
        other.perplexity(small_corpus, root / "ds", k=8, **WINDOW)
    with pytest.raises(KnnlmError, match="datastore .* built with another model"):
        other.train_memory(root / "ds", root / "never")
    from knnlm.retrieval.gate import check_gate_for, load_gate

    with pytest.raises(KnnlmError, match="gate was trained with another model"):
        check_gate_for(load_gate(root / "gate"), other.lm.fingerprint, 32)


def test_python_arguments_are_named_and_k_fits_the_datastore(python_side, small_corpus, tmp_path):
    root, knn_lm = python_side
    n = len(Datastore.load(root / "ds"))
    with pytest.raises(KnnlmError, match=rf"^k={n + 1} is more .* \({n} entries\)$"):
        knn_lm.perplexity(small_corpus, root / "ds", k=n + 1, **WINDOW)
    for kwargs, name in (({"k": 0}, "k"), ({"knn_weight": 2.0}, "knn_weight"),
                         ({"knn_temperature": 0}, "knn_temperature"),
                         ({"memory_weight": -1}, "memory_weight"),
                         ({"retrieval_rate": 0.5}, "retrieval_rate"),
                         ({"gate": root / "gate", "datastore": None}, "gate")):  # fmt: skip
        with pytest.raises(KnnlmError) as exc:
            knn_lm.perplexity(small_corpus, **{"datastore": root / "ds", **kwargs}, **WINDOW)
        assert str(exc.value).startswith(f"{name} ") and "--" not in str(exc.value)
    single = tmp_path / "one.txt"
    single.write_text((small_corpus / "valid.txt").read_text())
    assert knn_lm.perplexity(single, **WINDOW).tokens > 0  # no split: the file itself
    with pytest.raises(KnnlmError, match="single text file, which has no splits"):
        knn_lm.perplexity(single, split="test", **WINDOW)
    with pytest.raises(KnnlmError, match="knn_lm must be a knnlm.KnnLM"):
        Datastore.build("gpt2", small_corpus, tmp_path / "x")


def test_project_and_train_memory_from_python(python_side, small_corpus, tmp_path):
    root, knn_lm = python_side
    res = knn_lm.project(small_corpus, root / "ds", k=8, max_positions=20, max_steps=5,
                         **WINDOW)  # fmt: skip
    assert {"proj_f", "proj_fg"} <= set(res)
    run = ProjectionSettings.from_dict(res["settings"]["projection"])  # written whole
    assert run.window.context_len == SMALL_CTX and run.max_positions == 20 and run.max_steps == 5
    mem = knn_lm.train_memory(root / "ds", tmp_path / "mem", hidden=8, max_steps=1,
                              batch_tokens=32)  # fmt: skip
    assert mem.steps == 1 and mem.config["datastore"]["model_fingerprint"] == knn_lm.lm.fingerprint
    record = json.loads((tmp_path / "mem" / "loss_curve.json").read_text())
    assert MemoryTrainSettings.from_dict(record["settings"]["memory"]) == MemoryTrainSettings(
        hidden=8, max_steps=1, batch_tokens=32
    )


def test_missing_local_model_folder_says_so(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("models/gpt2", "./gpt2", str(tmp_path / "nothing")):
        with pytest.raises(KnnlmError, match="model folder .* does not exist"):
            load_lm(name)


def test_a_split_of_a_single_file_is_refused(small_corpus, tiny_tokenizer, tmp_path):
    single = tmp_path / "one.txt"
    single.write_text((small_corpus / "train.txt").read_text())
    knn_lm = KnnLM(_model(tiny_tokenizer, 0), tiny_tokenizer)
    with pytest.raises(KnnlmError, match="single text file, which has no splits"):
        Datastore.build(knn_lm, single, tmp_path / "ds", split="train", progress=False)
    assert len(Datastore.build(knn_lm, single, tmp_path / "ds", progress=False, **WINDOW)) > 0


def test_a_family_with_the_wrong_layout_is_refused(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma2", vocab_size=len(tiny_tokenizer), hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=128)  # fmt: skip
    gemma2 = AutoModelForCausalLM.from_config(cfg)
    neox_cfg = AutoConfig.for_model("gpt_neox", vocab_size=len(tiny_tokenizer), hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128,
                                    use_parallel_residual=False)  # fmt: skip
    neox = AutoModelForCausalLM.from_config(neox_cfg)
    try:
        knnlm.register_family(
            "gemma2",
            blocks="model.layers",
            norm2="pre_feedforward_layernorm",
            mlp="mlp",
            final_norm="model.norm",
        )  # Llama's layout
        with pytest.raises(KnnlmError, match="does not reproduce the model's logits") as exc:
            KnnLM(gemma2, tiny_tokenizer)
        assert len(str(exc.value).splitlines()) == 1
        neox_layout = dict(blocks="gpt_neox.layers", norm2="post_attention_layernorm",
                           mlp="mlp", final_norm="gpt_neox.final_layer_norm")  # fmt: skip
        knnlm.register_family("gpt_neox", lm_head="embed_out", **neox_layout)
        with pytest.raises(KnnlmError, match="lm_head='embed_out'"):
            KnnLM(neox, tiny_tokenizer)
        knnlm.register_family("gpt_neox", **neox_layout)  # sequential residual: Eq. 1 holds
        lm = KnnLM(neox, tiny_tokenizer).lm
        ids = torch.arange(1, 9).unsqueeze(0)
        with lm.adapter.capture() as store:
            logits = neox(input_ids=ids).logits
        split = lm.adapter.fg_logits(store["enc"])
        assert np.allclose(split.numpy(), logits.numpy(), rtol=1e-4, atol=1e-5)
    finally:
        unregister_family("gemma2")
        unregister_family("gpt_neox")


def test_cli_k_past_the_datastore_names_the_flag(python_side, small_corpus, monkeypatch, capsys):
    root, _ = python_side
    n = len(Datastore.load(root / "ds"))
    for cmd in (["eval"], ["project"]):
        code, _, err = run_cli(monkeypatch, capsys, *cmd, "-m", root / "model", "-c", small_corpus,
                               "-d", root / "ds", "--k", n + 1, "-q")  # fmt: skip
        assert code == 2 and f"--k={n + 1} is more neighbours" in err, err
        assert len(err.strip().splitlines()) == 1
