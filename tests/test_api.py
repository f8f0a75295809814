"""The Python API: README's example runs as it stands, and its numbers match the CLI and a
brute-force reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example():
    """README's Python block, run once; its variables for the checks below."""
    scope: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), scope)
    return scope


def _cli(monkeypatch, capsys, *args) -> str:
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    return out


def test_readme_example_perplexity_equals_cli(example, tmp_path, monkeypatch, capsys):
    model, tok, result = example["model"], example["tokenizer"], example["result"]
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("".join(t + "\n" for t in example["train"]))
    (corpus / "valid.txt").write_text("".join(t + "\n" for t in example["valid"]))
    m, c = tmp_path / "lm", corpus
    _cli(monkeypatch, capsys, "datastore", "build", "-m", m, "-c", c, "-o", tmp_path / "ds", "-q")
    _cli(monkeypatch, capsys, "eval", "-m", m, "-c", c, "-d", tmp_path / "ds", "--k", 16,
         "--json", tmp_path / "e.json", "-q")  # fmt: skip
    cli = json.loads((tmp_path / "e.json").read_text())
    assert cli["tokens"] == result.tokens
    assert cli["lm"]["perplexity"] == pytest.approx(result.lm, rel=1e-6)
    assert cli["knnlm"]["perplexity"] == pytest.approx(result.knnlm, rel=1e-6)
    assert result.knnlm != pytest.approx(result.lm, rel=1e-3)
    assert set(result.to_dict()) == set(cli)
    assert "knnlm=" in repr(result) and "context_len=64" in repr(result)

    # knnlm neighbours and datastore info on the CLI's datastore: the API's entries again.
    want = example["knn_lm"].neighbours("the old house by the", example["ds"], k=3)
    _cli(monkeypatch, capsys, "neighbours", "-m", m, "-d", tmp_path / "ds", "-p",
         "the old house by the", "--k", 3, "--json", tmp_path / "nb.json")  # fmt: skip
    (got,) = [a["neighbours"] for a in json.loads((tmp_path / "nb.json").read_text())]
    assert [g["row"] for g in got] == [w["row"] for w in want]
    assert [g["context"] for g in got] == [w["context"] for w in want]
    out = _cli(monkeypatch, capsys, "generate", "-m", m, "-d", tmp_path / "ds", "--k", 16,
               "-p", "the river", "-p", "a baker was", "--num-beams", 3,
               "--num-return-sequences", 2, "--max-new-tokens", 4)  # fmt: skip
    beams = example["knn_lm"].generate(["the river", "a baker was"], example["ds"], k=16,
                                       num_beams=3, num_return_sequences=2, max_new_tokens=4)  # fmt: skip
    prompts = ["the river"] * 2 + ["a baker was"] * 2
    assert out == "".join(p + b + "\n" for p, b in zip(prompts, beams, strict=True))
    _cli(monkeypatch, capsys, "datastore", "info", tmp_path / "ds", "--json", tmp_path / "i.json")
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["n"] == len(example["ds"]) and info["context_len"] == 64 and info["index"] is None


def test_neighbours_match_brute_force(example):
    knn_lm, ds = example["knn_lm"], example["ds"]
    text, k = "the old house by the", 5
    got = knn_lm.neighbours(text, ds, k=k, knn_temperature=2.0)
    keys = np.asarray(ds.keys, dtype=np.float64)
    ids = knn_lm.tokenizer(text)["input_ids"]
    grabbed = {}
    ln2 = knn_lm.model.transformer.h[-1].ln_2
    handle = ln2.register_forward_hook(lambda m, a, o: grabbed.__setitem__("k", o))
    with torch.no_grad():
        knn_lm.model(torch.tensor([ids]))
    handle.remove()
    q = grabbed["k"][0, -1].double().numpy()
    d = ((keys - q) ** 2).sum(1)
    nn = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[nn] - d[nn].min()) / 2.0)
    w /= w.sum()
    assert [g["row"] for g in got] == nn.tolist()
    np.testing.assert_allclose([g["distance"] for g in got], d[nn], rtol=1e-4)
    np.testing.assert_allclose([g["weight"] for g in got], w, rtol=1e-4, atol=1e-6)
    stream = knn_lm.tokenizer("".join(t + "\n" for t in example["train"]))["input_ids"]
    values = np.asarray(ds.values)
    for g in got:  # row r: the context ends at token r, the target is token r + 1
        assert g["target"] == knn_lm.tokenizer.decode([stream[g["row"] + 1]])
        assert values[g["row"]] == stream[g["row"] + 1]
        assert g["context"] == knn_lm.tokenizer.decode(stream[max(0, g["row"] - 31) : g["row"] + 1])


def test_generation_shapes_and_own_generate_equals_api(example):
    knn_lm, ds, model, tok = (
        example["knn_lm"],
        example["ds"],
        example["model"],
        example["tokenizer"],
    )
    assert len(example["sampled"]) == 2 and len(example["beams"]) == 2
    greedy = knn_lm.generate(["the river"], ds, k=16, max_new_tokens=8)
    assert tok.decode(example["out"][0]) == "the river" + greedy[0]
    plain = knn_lm.generate(["the river"], max_new_tokens=8)
    assert plain != greedy  # the datastore changed the greedy path
    # Closed: the hooks are gone, and the processor says so instead of a KeyError.
    ln2 = model.transformer.h[-1].ln_2
    assert not ln2._forward_hooks
    from knnlm.errors import KnnlmError

    with pytest.raises(KnnlmError, match="hooks are not attached"):
        example["proc"](torch.tensor([[1]]), torch.zeros(1, len(tok)))


def test_settings_hf_refuses_are_one_knnlm_error(example):
    from knnlm.errors import KnnlmError

    with pytest.raises(KnnlmError, match="^generate: "):  # greedy cannot return 2 sequences
        example["knn_lm"].generate("the river", num_return_sequences=2, max_new_tokens=2)


def test_padded_prompts_continue_like_single_prompts(example):
    knn_lm, ds = example["knn_lm"], example["ds"]
    both = knn_lm.generate(["the river", "a baker was by the"], ds, k=16, max_new_tokens=6)
    one = [
        knn_lm.generate(p, ds, k=16, max_new_tokens=6)[0]
        for p in ["the river", "a baker was by the"]
    ]
    assert both == one


def test_corpus_as_dataset_and_unregistered_family(example, tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from knnlm import Datastore, KnnLM
    from knnlm.errors import KnnlmError

    tok, valid = example["tokenizer"], example["valid"]
    as_list = example["knn_lm"].perplexity(valid, context_len=32)
    as_ds = example["knn_lm"].perplexity(
        datasets.Dataset.from_dict({"text": valid}), context_len=32
    )
    assert as_ds.lm == as_list.lm
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    neox = KnnLM(GPTNeoXForCausalLM(cfg), tok)
    assert np.isfinite(neox.perplexity(valid).lm)  # plain LM perplexity needs no registry
    with pytest.raises(
        KnnlmError, match="registered: gpt2, llama, mistral, qwen2.*register_family"
    ):
        Datastore.build(neox, valid, tmp_path / "ds", progress=False)


def test_every_public_name_has_a_docstring_with_an_example():
    import inspect

    import knnlm

    missing = []
    for name in knnlm.__all__:
        if name == "__version__":
            continue
        obj = getattr(knnlm, name)
        members = [(name, obj)]
        if inspect.isclass(obj) and obj.__module__.startswith("knnlm"):
            members += [
                (f"{name}.{m}", v)
                for m, v in vars(obj).items()
                if not m.startswith("_") and (callable(v) or isinstance(v, (property, classmethod)))
            ]
        for label, member in members:
            doc = inspect.getdoc(getattr(member, "__func__", member)) or ""
            if "e.g." not in doc and "xample" not in doc:
                missing.append(label)
    assert missing == []


def test_a_registered_family_gets_keys_and_the_split(example, tmp_path):
    """register_family's docstring example: OLMo's split reproduces its logits, and a
    datastore builds; the registry entry is removed again afterwards."""
    from transformers import OlmoConfig, OlmoForCausalLM

    from knnlm import Datastore, KnnLM, register_family
    from knnlm.lm import adapters

    tok, valid = example["tokenizer"], example["valid"]
    eos = tok.eos_token_id
    cfg = OlmoConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    register_family("olmo", blocks="model.layers", norm2="post_attention_layernorm",
                    mlp="mlp", final_norm="model.norm",
                    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    try:
        olmo = KnnLM(OlmoForCausalLM(cfg), tok)
        ids = torch.tensor([tok("the old house by the river")["input_ids"]])
        with torch.no_grad(), olmo.lm.adapter.capture() as store:
            logits = olmo.model(ids).logits
            rebuilt = olmo.lm.adapter.fg_logits(store["enc"])
        torch.testing.assert_close(rebuilt, logits, atol=1e-5, rtol=1e-5)
        ds = Datastore.build(olmo, valid, tmp_path / "ds", progress=False)
        assert len(ds) == olmo.perplexity(valid, context_len=64, stride=32).tokens
    finally:
        adapters.unregister_family("olmo")


def test_index_and_info(example, tmp_path):
    from knnlm import Datastore

    knn_lm, train, valid = example["knn_lm"], example["train"], example["valid"]
    ds = Datastore.build(knn_lm, train[:60], tmp_path / "ds", context_len=32, progress=False)
    exact = knn_lm.perplexity(valid, ds, k=8)
    assert ds.info()["index"] is None and ds.info()["stride"] == 16
    assert ds.index("flat", progress=False) is ds
    info = Datastore.load(tmp_path / "ds").info()
    assert info["index"].startswith("flat") and info["bytes"] > ds.keys.nbytes
    assert knn_lm.perplexity(valid, ds, k=8).knnlm == pytest.approx(exact.knnlm, rel=1e-6)
