"""Shared fixtures: a tiny corpus and tiny random models with their own tokenizer (no downloads),
built with the plain functions of tiny.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knnlm.lm.loading import load_lm
from tiny import save_tiny_model, write_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT2 = SHARED / "data" / "wikitext-2"
NAMES = SHARED / "data" / "names"

# The mutation driver runs its own selection of tests (python tests/mutation/run.py).
collect_ignore = ["mutation"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A WikiText-style directory with train/valid/test.txt of random word salad."""
    return write_corpus(
        tmp_path_factory.mktemp("corpus"), train=(300, 0), valid=(40, 1), test=(40, 2)
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    from knnlm.lm.tokenizer import train_bpe_tokenizer

    text = (tiny_corpus / "train.txt").read_text()
    return train_bpe_tokenizer(text.splitlines(keepends=True), vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random GPT-2 (2 layers, d=32) with its BPE tokenizer, saved in HF format."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), tiny_tokenizer)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    """The tiny GPT-2 loaded, one per test module."""
    return load_lm(str(tiny_lm_dir))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A smaller corpus (train, valid) for the tests that check every token against loops."""
    return write_corpus(tmp_path_factory.mktemp("small_corpus"), train=(25, 10), valid=(6, 11))


@pytest.fixture
def one_faiss_thread():
    """FAISS's OpenMP threads spin badly on a busy 2-core machine; one thread is faster here."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


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
