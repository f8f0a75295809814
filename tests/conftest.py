"""Shared fixtures: a tiny corpus and tiny random models with their own tokenizer (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT2 = SHARED / "data" / "wikitext-2"
NAMES = SHARED / "data" / "names"

# The mutation driver runs its own selection of tests (python tests/mutation/run.py).
collect_ignore = ["mutation"]

_WORDS = (
    "the a village river old new house parent child friend born married year green quiet "
    "market bridge song winter summer road stone baker teacher of in to and was is who"
).split()


def make_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 14)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + " .\n")
    return "".join(lines)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A WikiText-style directory with train/valid/test.txt of random word salad."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(make_text(300, 0))
    (d / "valid.txt").write_text(make_text(40, 1))
    (d / "test.txt").write_text(make_text(40, 2))
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    from knnlm.lm.tokenizer import train_bpe_tokenizer

    text = (tiny_corpus / "train.txt").read_text()
    return train_bpe_tokenizer(text.splitlines(keepends=True), vocab_size=300, min_frequency=1)


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


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random GPT-2 (2 layers, d=32) with its BPE tokenizer, saved in HF format."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), tiny_tokenizer)


@pytest.fixture
def requires_wikitext():
    if not (WIKITEXT2 / "train.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT2}")
    return WIKITEXT2


@pytest.fixture
def requires_names():
    if not NAMES.is_dir():
        pytest.skip(f"name lists not found at {NAMES}")
    return NAMES


# Tiny models run faster on one thread, and a loaded 2-core machine makes OpenMP spin.
torch.set_num_threads(1)
