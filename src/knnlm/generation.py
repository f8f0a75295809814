"""kNN-LM generation with ``model.generate``: a logits processor that mixes in p_knn."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from knnlm.errors import KnnlmError
from knnlm.lm.adapters import Adapter, position_limit
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.combiner import interpolate
from knnlm.retrieval.datastore import Datastore
from knnlm.retrieval.pointers import check_threshold
from knnlm.retrieval.retriever import KnnSettings, MixSettings, Retriever
from knnlm.retrieval.search.protocol import Neighbours


class KnnLogitsProcessor(LogitsProcessor):
    """Replaces the next-token scores by log((1 - w) p_lm + w p_knn).

    The query is the key of the last position, captured by the adapter's hooks during the
    forward that produced ``scores``. Made by :func:`attach_processor` (or
    ``KnnLM.logits_processor``) the hooks are attached already and ``close()`` (or leaving a
    ``with`` block) removes them; built by hand it needs ``adapter.capture()`` around it.

    Example::

        with knn_lm.logits_processor(datastore, k=16) as proc:
            out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]))
    """

    def __init__(
        self,
        store: dict[str, torch.Tensor],
        retriever: Retriever,
        release: Callable[[], None] | None = None,
        mix: MixSettings = MixSettings(),
    ):
        """``mix``: p_knn's weight and temperature, and RetoMaton's ``pointers``."""
        self.store, self.retriever, self._release, self.mix = store, retriever, release, mix
        # RetoMaton (knnlm.retrieval.pointers): the last step's neighbours, and the counts of
        # queries and of searches, whose difference is the searches the pointers saved
        self.pointers, self.previous, self.length, self.table = mix.pointers, None, 0, None
        self.queries = self.searches = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.store:
            raise KnnlmError(
                "the kNN logits processor saw no forward pass: its hooks are not attached "
                "(it was closed, or built without knn_lm.logits_processor / adapter.capture())"
            )
        key = Adapter.key_from(self.store, self.retriever.key_type)[:, -1]
        nb = self._neighbours(key, input_ids)
        knn_lp = self.retriever.log_probs(nb, scores.shape[-1], self.mix.temperature)
        lm_lp = torch.log_softmax(scores.float(), dim=-1)
        return interpolate(lm_lp, knn_lp.to(scores.device), self.mix.knn_weight).to(scores.dtype)

    def _neighbours(self, key: torch.Tensor, input_ids: torch.Tensor) -> Neighbours:
        """The search's neighbours, or with pointers the successors of the last step's
        neighbours whose value is the token just generated, where at least ``pointers``
        survive (the rows are the sequences of one batch, step after step)."""
        self.queries += key.shape[0]
        prev, self.previous = self.previous, None
        # a new generation (not one token longer than the last step's) starts by searching
        fresh = prev is None or input_ids.shape[1] != self.length + 1
        self.length = input_ids.shape[1]
        if self.pointers is None or fresh or prev.rows.shape[0] != key.shape[0]:
            self.searches += key.shape[0]
            nb = self.retriever.search(key)
            self.previous = nb.to("cpu") if self.pointers is not None else None
            return nb
        n = self.retriever.ds.n
        last = input_ids[:, -1].cpu()
        alive = (prev.rows >= 0) & (prev.values == last[:, None]) & (prev.rows + 1 < n)
        rows = torch.where(alive, prev.rows + 1, -1)
        few = alive.sum(1) < self.pointers  # these search instead
        need = few.nonzero().squeeze(1)
        dists = self.retriever.row_distances(key, rows.masked_fill(few[:, None], -1))
        if need.numel():
            found = self.retriever.search(key[need.to(key.device)]).to("cpu")
            rows[need], dists[need] = found.rows, found.distances.float()
            self.searches += int(need.numel())
        if self.table is None:  # the datastore's values as int64, once
            self.table = torch.from_numpy(np.asarray(self.retriever.ds.values, dtype=np.int64))
        self.previous = Neighbours.lookup(dists, rows, self.table)
        return self.previous.to(key.device)

    def close(self) -> None:
        """Remove the hooks this processor attached (a no-op when it attached none).

        Example: ``proc = knn_lm.logits_processor(ds); ...; proc.close()``.
        """
        if self._release is not None:
            self._release()
            self._release = None
        self.store.clear()

    def __enter__(self) -> KnnLogitsProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_processor(
    lm: LoadedLM, datastore: str | Path | Datastore, knn: KnnSettings,
    mix: MixSettings | None = None,
) -> KnnLogitsProcessor:  # fmt: skip
    """A :class:`KnnLogitsProcessor` whose key hooks are attached to ``lm``'s model now;
    ``mix``: p_knn's weight and temperature and ``pointers``, RetoMaton's threshold
    (:mod:`knnlm.retrieval.pointers`); generation mixes in no memory and no gate."""
    mix = mix or MixSettings()
    if mix.memory is not None or mix.gate is not None:
        raise KnnlmError("generation mixes in p_knn only: no memory, no gate")
    retriever = Retriever(lm, datastore, knn)
    if mix.pointers is not None and retriever.counts is not None:
        raise KnnlmError(
            "--pointers cannot follow a pruned datastore (row r + 1 does not follow r)"
        )
    stack = ExitStack()
    store = stack.enter_context(lm.adapter.capture())
    return KnnLogitsProcessor(store, retriever, release=stack.close, mix=mix)


def check_settings(
    prompts: list[str], generate_kwargs: dict[str, Any], pointers: float | None = None
) -> None:
    """The settings of :func:`generate` that need no model (checked again there)."""
    check_threshold(pointers)
    if pointers is not None and (generate_kwargs.get("num_beams") or 1) > 1:
        raise KnnlmError("--pointers and --num-beams > 1 do not combine (beams reorder rows)")
    if not prompts or any(not p for p in prompts):
        raise KnnlmError("the prompt is empty")
    max_new = generate_kwargs.get("max_new_tokens")
    if max_new is not None and max_new < 1:
        raise KnnlmError(f"--max-new-tokens must be at least 1, got {max_new}")
    top_p = generate_kwargs.get("top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise KnnlmError(f"--top-p must be in (0, 1], got {top_p}")
    temperature = generate_kwargs.get("temperature")
    if temperature is not None and temperature <= 0:
        raise KnnlmError(f"--temperature (sampling) must be positive, got {temperature}")
    for name in ("top_k", "num_beams", "num_return_sequences"):
        value = generate_kwargs.get(name)
        if value is not None and value < (0 if name == "top_k" else 1):
            raise KnnlmError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _check_length(lm: LoadedLM, width: int, max_new_tokens: int) -> None:
    limit = position_limit(lm.model)
    if limit is not None and width + max_new_tokens > limit[0]:
        raise KnnlmError(
            f"the prompt ({width} tokens) plus --max-new-tokens {max_new_tokens} is longer "
            f"than the model's {limit[0]} positions (config {limit[1]})"
        )


@torch.no_grad()
def generate(
    lm: LoadedLM,
    prompts: str | list[str],
    datastore: str | Path | Datastore | None = None,
    knn: KnnSettings | None = None,
    mix: MixSettings | None = None,
    *,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Continue each prompt with the kNN-LM (the plain LM when ``datastore`` is None), searched
    as ``knn`` says and mixed in as ``mix`` says.

    ``mix.pointers``: RetoMaton's threshold; one sequence per row, so not with ``num_beams`` > 1
    (beams reorder the rows between steps).

    Every ``model.generate`` argument passes through (``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``num_beams``, ``num_return_sequences``, ``max_new_tokens``, ...).
    Prompts are left-padded into one batch; returns one continuation per returned sequence,
    in prompt order. Example::

        generate(lm, ["The tower is", "A river"], "runs/ds", KnnSettings(k=16),
                 MixSettings(knn_weight=0.3), do_sample=True, top_p=0.9, max_new_tokens=20)
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    generate_kwargs.setdefault("max_new_tokens", 50)
    mix = mix or MixSettings()
    check_settings(prompts, generate_kwargs, mix.pointers)
    if seed is not None:
        torch.manual_seed(seed)
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # Left padding: the last column is every prompt's end (the user's tokenizer is restored).
    side, pad = tok.padding_side, tok.pad_token
    try:
        tok.padding_side, tok.pad_token = "left", pad if pad is not None else tok.eos_token
        enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
    finally:
        tok.padding_side, tok.pad_token = side, pad
    width = enc["input_ids"].shape[1]
    _check_length(lm, width, generate_kwargs["max_new_tokens"])
    generate_kwargs.setdefault("pad_token_id", pad_id)
    try:
        if datastore is None:
            out = lm.model.generate(**enc, **generate_kwargs)
        else:
            with attach_processor(lm, datastore, knn or KnnSettings(), mix) as proc:
                extra = list(generate_kwargs.pop("logits_processor", None) or [])
                processors = LogitsProcessorList([proc, *extra])
                out = lm.model.generate(**enc, logits_processor=processors, **generate_kwargs)
    except ValueError as exc:  # HF's word on settings that do not go together
        raise KnnlmError(f"generate: {str(exc).splitlines()[0]}") from None
    return tok.batch_decode(out[:, width:], skip_special_tokens=True)
