"""The perplexity change an approximate index causes: the kNN-LM on one split, searched
exactly and through the index, with everything else equal.

Recall@k (stored when an index is built) says how many true neighbours the index finds; this
says what its misses cost the model. Both searches see the same queries, k, temperature and
weight, so the difference is the index's alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from knnlm.data.corpus import Corpus
from knnlm.evaluate import evaluate
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.retriever import KnnSettings, MixSettings


def index_perplexity_check(
    lm: LoadedLM,
    corpus: Corpus,
    split: str,
    datastore: str | Path,
    knn: KnnSettings,
    mix: MixSettings,
    *,
    context_len: int,
    stride: int | None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """kNN-LM perplexity of ``split`` with exact search and with the datastore's index, p_knn
    mixed in at ``mix``'s weight and temperature."""
    ppl = {}
    for search in ("exact", "faiss"):
        res = evaluate(
            lm, corpus, split, context_len=context_len, stride=stride, batch_size=batch_size,
            datastore=datastore, knn=replace(knn, search=search), knn_weight=mix.knn_weight,
            knn_temperature=mix.temperature, progress=progress,
        )  # fmt: skip
        ppl[search] = res["knnlm"]["perplexity"]
        tokens = res["tokens"]
    return {
        "split": split,
        "corpus": str(corpus),
        "tokens": tokens,
        "k": knn.k,
        "temperature": mix.temperature,
        "knn_weight": mix.knn_weight,
        "lm_perplexity": res["lm"]["perplexity"],
        "exact_perplexity": ppl["exact"],
        "index_perplexity": ppl["faiss"],
        "relative_change": ppl["faiss"] / ppl["exact"] - 1.0,
    }
