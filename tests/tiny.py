"""Builders of the tests' tiny inputs: word-salad corpora, random tiny LMs, datastores (built
quietly, or written from arrays), and in-process CLI calls. Plain functions; the shared fixtures
of conftest.py use them."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import typer

from knnlm.cli import app, main, register_all
from knnlm.retrieval.datastore import build_datastore
from knnlm.retrieval.search.choose import open_backend
from knnlm.retrieval.search.faiss_backend import FaissBackend

_WORDS = (
    "the a village river old new house parent child friend born married year green quiet "
    "market bridge song winter summer road stone baker teacher of in to and was is who"
).split()

# The windows of the small corpus's datastore (tests of the engine, pruning and the gate).
SMALL_CTX, SMALL_STRIDE = 24, 8


def make_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 14)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + " .\n")
    return "".join(lines)


def write_corpus(folder: Path, **splits: tuple[int, int]) -> Path:
    """A WikiText-style folder: for each ``split=(n_lines, seed)`` a ``split.txt`` of
    ``make_text(n_lines, seed)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (n_lines, seed) in splits.items():
        (folder / f"{split}.txt").write_text(make_text(n_lines, seed))
    return folder


def save_tiny_model(
    out: Path, tokenizer, model_type: str = "gpt2", seed: int = 0, hidden: int = 32
) -> Path:
    """A random tiny causal LM of ``model_type`` (hidden size ``hidden``) saved with
    ``tokenizer`` in HF format."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    special = dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id"), tokenizer.eos_token_id
    )
    if model_type == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2", vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=2, n_head=2, **special
        )
    else:
        cfg = AutoConfig.for_model(
            model_type,
            **special,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def quiet_datastore(lm, corpus: Path, out: Path, split: str = "train", **settings) -> Path:
    """``build_datastore`` of ``corpus``'s ``split`` into ``out`` with no progress bar."""
    return build_datastore(lm, str(corpus), split, out, progress=False, **settings)


def small_datastore(lm, corpus: Path, out: Path, **settings) -> Path:
    """The train split's float32 datastore in SMALL_CTX / SMALL_STRIDE windows; ``settings``
    override or add build settings."""
    small = dict(context_len=SMALL_CTX, stride=SMALL_STRIDE, key_dtype="float32")
    return quiet_datastore(lm, corpus, out, **{**small, **settings})


def array_datastore(path: Path, keys: np.ndarray, values: np.ndarray | None = None, **meta) -> Path:
    """A datastore folder from arrays, no model: ``keys`` saved as given, ``values`` as int32
    (by default each row's index mod 7), and a meta.json of n, dim and ``meta``."""
    path.mkdir(parents=True, exist_ok=True)
    if values is None:
        values = np.arange(len(keys)) % 7
    np.save(path / "keys.npy", keys)
    np.save(path / "values.npy", values.astype(np.int32))
    (path / "meta.json").write_text(json.dumps({"n": len(keys), "dim": keys.shape[1], **meta}))
    return path


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``knnlm *args`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["knnlm", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def leaf_commands() -> list[tuple[str, object]]:
    """(name, click command) of every runnable command, groups walked."""
    register_all()
    todo, leaves = [("knnlm", typer.main.get_command(app))], []
    while todo:
        name, cmd = todo.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            todo.extend((f"{name} {n}", c) for n, c in subs.items())
        else:
            leaves.append((name, cmd))
    return leaves


def project(lm, corpus, ds, split: str = "valid", *, context_len: int, stride: int | None = None,
            progress: bool = False, **settings) -> dict:  # fmt: skip
    """``run_projection`` with its ProjectionSettings as keywords; ``stride`` None is
    ``context_len`` (one window after another)."""
    from knnlm.experiments.projection.run import run_projection
    from knnlm.experiments.projection.settings import ProjectionSettings
    from knnlm.forward_pass import WindowSettings

    window = WindowSettings(context_len, stride or context_len)
    settings = ProjectionSettings(split, window, **settings)
    return run_projection(lm, str(corpus), ds, settings, progress=progress)


def train_mem(keys, values, W, out, **kw):
    """``train_memory`` with its MemoryTrainSettings fields among the keywords."""
    import dataclasses

    from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
    from knnlm.experiments.mlp_memory.train import train_memory

    names = {f.name for f in dataclasses.fields(MemoryTrainSettings)}
    settings = MemoryTrainSettings(**{k: v for k, v in kw.items() if k in names})
    rest = {k: v for k, v in kw.items() if k not in names}
    return train_memory(keys, values, W, out, settings, **rest)


# Given names a users_model's tokenizer keeps as single tokens (Macondo needs 30 at test size).
USER_NAMES = ("Ada Bela Cora Dina Edda Fenn Gus Hana Ivo Jana Kai Lena Milo Nora Otto Pia Rosa "
              "Sami Tomas Uma Vera Wim Xena Yara Zeno Alma Bruno Cleo Dario Elsa Fritz Greta "
              "Hugo Ines Jonas Karla Luca Mara Nils Olga").split()  # fmt: skip


def users_model(folder: Path) -> tuple[Path, Path]:
    """A user's saved model: a random 2-layer, 128-position GPT-2 whose own BPE keeps each of
    USER_NAMES one token, in ``folder/model``; and ``folder/names.txt`` listing them."""
    from knnlm.lm.tokenizer import train_bpe_tokenizer

    lines = make_text(300, 0).splitlines(keepends=True)
    lines += [f"the child of {n} is {n} .\n" for n in USER_NAMES] * 3
    tok = train_bpe_tokenizer(lines, vocab_size=600, min_frequency=1)
    folder.mkdir(parents=True, exist_ok=True)
    names = folder / "names.txt"
    names.write_text("\n".join(USER_NAMES) + "\n")
    return save_tiny_model(folder / "model", tok), names


def nearest(ds, q, k, exclude=None, **kw):
    """``--search faiss``'s (distances, rows) for numpy queries, as numpy: the index's when
    the datastore has one, else faiss.knn brute force."""
    q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    has = (Path(ds) / "index.faiss").is_file()
    backend = FaissBackend(ds, **kw) if has else open_backend(ds, "faiss")
    nb = backend.search(q, k, exclude_rows=exclude)
    return nb.distances.numpy(), nb.rows.numpy()
