"""The reproduction's static inspect page (``inspect.html`` beside report.html): a natural-text
passage under the run's first LM and its datastore, and a few Macondo test sentences under the
fine-tuned model and its datastore of training sentences, at the run's kNN settings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.fileio import write_text_atomic
from knnlm.inspect.static import render_static, static_data
from knnlm.inspect.view import Inspector, ViewSettings
from knnlm.lm.loading import load_lm

PAGE = "inspect.html"
PASSAGE_TOKENS = 120  # of the test split's first lines
SENTENCES = 4  # Macondo test sentences
K_MAX = 64


def settings_of(results: Mapping[str, Any]) -> ViewSettings:
    cfg = results.get("config", {})
    k = min(int(cfg.get("k", 16)), K_MAX)
    return ViewSettings(k, float(cfg.get("knn_weight", 0.25)), float(cfg.get("temperature", 1.0)))


def natural_pages(results: Mapping[str, Any], s: ViewSettings) -> list[dict]:
    """The first lines of the corpus's test split, cut to PASSAGE_TOKENS tokens."""
    run = results["knnlm"]["settings"]
    lm = load_lm(run["model"])
    insp = Inspector(lm, run["datastore"], k_max=max(s.k, 1))
    text = (Path(run["corpus"]) / "test.txt").read_text(encoding="utf-8")[:4000].lstrip()
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:PASSAGE_TOKENS]
    passage = lm.tokenizer.decode(ids)
    return [static_data(insp, passage, s) | {"label": "natural text: the test split's start"}]


def macondo_pages(results: Mapping[str, Any], s: ViewSettings) -> list[dict]:
    """The first SENTENCES test sentences under the first seed's fine-tuned model."""
    seed = Path(results["macondo"]["figure1"]).parent / "seed-0"
    data = seed / "data"
    train = [json.loads(x)["text"] for x in (data / "train.jsonl").read_text().splitlines() if x]
    tests = [json.loads(x)["text"] for x in (data / "test.jsonl").read_text().splitlines() if x]
    lm = load_lm(str(seed / "model"))
    insp = Inspector(lm, seed / "datastore", k_max=max(s.k, 1), examples=train)
    return [static_data(insp, t, s) | {"label": f"Macondo test sentence: {t}"}
            for t in tests[:SENTENCES]]  # fmt: skip


def write_report_page(out: str | Path, results: Mapping[str, Any]) -> dict[str, str]:
    """Write ``out/inspect.html`` from the run's artifacts; returns what was left out and why
    (a part whose results or artifacts are missing is skipped, never fatal)."""
    s = settings_of(results)
    pages, skipped = [], {}
    for name, make in (("natural text", natural_pages), ("Macondo", macondo_pages)):
        try:
            pages += make(results, s)
        except (KeyError, TypeError, OSError, ValueError, RuntimeError, KnnlmError) as e:
            skipped[name] = f"{type(e).__name__}: {e}"
    if pages:
        write_text_atomic(Path(out) / PAGE, render_static(pages, "knnlm: what was retrieved"))
    return skipped
