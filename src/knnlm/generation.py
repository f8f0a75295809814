"""kNN-LM generation with ``model.generate``: a logits processor that mixes in p_knn."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from knnlm.errors import KnnlmError
from knnlm.lm.adapters import Adapter, position_limit
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.knn import interpolate
from knnlm.retrieval.retriever import KnnSettings, Retriever


class KnnLogitsProcessor(LogitsProcessor):
    """Replaces the next-token scores by log((1 - w) p_lm + w p_knn).

    The query is the key of the last position, captured by the adapter's hooks during the
    forward that produced ``scores``; use it inside ``adapter.capture()`` (see :func:`generate`).
    """

    def __init__(self, store: dict[str, torch.Tensor], retriever: Retriever):
        self.store, self.retriever = store, retriever

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        key = Adapter.key_from(self.store, self.retriever.key_type)[:, -1]
        nb = self.retriever.search(key)
        knn_lp = self.retriever.log_probs(nb, scores.shape[-1]).to(scores.device)
        lm_lp = torch.log_softmax(scores.float(), dim=-1)
        return interpolate(lm_lp, knn_lp, self.retriever.knn.knn_weight).to(scores.dtype)


@torch.no_grad()
def check_settings(prompt: str, max_new_tokens: int, top_p: float) -> None:
    """The settings of :func:`generate` that need no model (checked again there)."""
    if not prompt:
        raise KnnlmError("the prompt is empty")
    if max_new_tokens < 1:
        raise KnnlmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise KnnlmError(f"--top-p must be in (0, 1], got {top_p}")


def generate(
    lm: LoadedLM,
    prompt: str,
    datastore: str | Path | None = None,
    *,
    k: int = 1024,
    knn_weight: float = 0.25,
    temperature: float = 1.0,
    max_new_tokens: int = 50,
    do_sample: bool = False,
    top_p: float = 1.0,
    seed: int = 0,
    nprobe: int | None = None,
    search: str = "auto",
) -> str:
    """Continue ``prompt`` with the kNN-LM (or the plain LM when ``datastore`` is None)."""
    check_settings(prompt, max_new_tokens, top_p)
    torch.manual_seed(seed)
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    limit = position_limit(lm.model)
    total = enc["input_ids"].shape[1] + max_new_tokens
    if limit is not None and total > limit[0]:
        raise KnnlmError(
            f"the prompt ({enc['input_ids'].shape[1]} tokens) plus --max-new-tokens "
            f"{max_new_tokens} is longer than the model's {limit[0]} positions "
            f"(config {limit[1]})"
        )
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id,
    )
    if do_sample:
        kwargs["top_p"] = top_p
    if datastore is None:
        out = lm.model.generate(**enc, **kwargs)
    else:
        knn = KnnSettings(
            k=k, knn_weight=knn_weight, temperature=temperature, nprobe=nprobe, search=search
        )
        retriever = Retriever(lm, datastore, knn)
        with lm.adapter.capture() as store:
            proc = KnnLogitsProcessor(store, retriever)
            out = lm.model.generate(**enc, logits_processor=LogitsProcessorList([proc]), **kwargs)
    return lm.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
