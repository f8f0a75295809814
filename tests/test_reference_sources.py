"""``hf:NAME[:CONFIG]`` corpora through a mocked ``datasets.load_dataset`` (offline)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from knnlm.data.corpus import load_tokens, read_split
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.lm.loading import load_lm
from tiny import make_text


@pytest.fixture
def hub(monkeypatch):
    """A fake hub holding one dataset whose validation split is named "validation"."""
    lines = make_text(6, 31).splitlines()  # rows without their newline, as on the hub
    calls = []

    def load_dataset(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        if name == "offline/broken":
            raise ConnectionError("Couldn't reach the hub\nsecond line")
        if split != "validation":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['validation'].")
        return datasets.Dataset.from_dict({"text": lines, "id": list(range(len(lines)))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return lines, calls


def test_hf_name_config_reads_the_aliased_split(hub, tmp_path, tiny_tokenizer):
    lines, calls = hub
    text = read_split("hf:wikitext:wikitext-2-raw-v1", "valid")
    assert text == "".join(line + "\n" for line in lines)
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "valid"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
    ]
    calls.clear()
    assert read_split("hf:someone/corpus", "valid") == text  # no config
    assert calls[-1] == ("someone/corpus", None, "validation")
    (tmp_path / "valid.txt").write_text(text)
    np.testing.assert_array_equal(
        load_tokens(tiny_tokenizer, "hf:wikitext:wikitext-2-raw-v1", "valid"),
        load_tokens(tiny_tokenizer, str(tmp_path), "valid"),
    )


def test_hf_corpus_evaluates_like_the_same_text_on_disk(hub, tmp_path, tiny_lm_dir):
    lines, _ = hub
    (tmp_path / "valid.txt").write_text("".join(line + "\n" for line in lines))
    lm = load_lm(str(tiny_lm_dir))
    kw = dict(context_len=16, stride=8, progress=False)
    a = evaluate(lm, "hf:wikitext:wikitext-2-raw-v1", "valid", **kw)
    b = evaluate(lm, str(tmp_path), "valid", **kw)
    assert a["tokens"] == b["tokens"] > 0
    assert a["lm"]["nll_sum"] == b["lm"]["nll_sum"]


def test_hf_errors_are_one_clear_line(hub):
    with pytest.raises(KnnlmError, match="no split 'test'"):
        read_split("hf:wikitext:wikitext-2-raw-v1", "test")
    with pytest.raises(KnnlmError, match="no column 'body'"):
        read_split("hf:wikitext:wikitext-2-raw-v1", "valid", text_field="body")
    with pytest.raises(KnnlmError, match="cannot load dataset") as e:
        read_split("hf:offline/broken", "valid")
    assert "\n" not in str(e.value)
