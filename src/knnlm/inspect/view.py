"""The view model of ``knnlm inspect``: what the page shows, computed from the library's scorer.

A text is scored and searched once at ``k_max`` (:func:`knnlm.token_scores.score_tokens`, the
one-pass scorer every perplexity uses); what it keeps per target is a :class:`Rows`. Every view
at other settings (k <= k_max, weight, temperature, the gate's retrieval rate, the memory's
weight) is recomputed from those rows with the kNN functions of :mod:`knnlm.retrieval.combiner`:
no second search and no second copy of the maths. The page's script only draws the numbers.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.forward_pass import default_window, score_stream
from knnlm.inspect.figures import perplexity_svg
from knnlm.inspect.token_view import colours, finite, first_k, token_details
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.combiner import interpolate, knn_target_log_prob
from knnlm.retrieval.datastore import Datastore
from knnlm.retrieval.gate import Gate, check_gate_for
from knnlm.retrieval.memory import MemoryMLP
from knnlm.retrieval.retriever import KnnSettings, Retriever
from knnlm.retrieval.search.protocol import Neighbours
from knnlm.token_scores import score_tokens


@dataclass(frozen=True)
class ViewSettings:
    """The page's controls: k (at most the server's k_max), the weight on p_knn, the kNN
    temperature, the gate's retrieval rate and the memory's weight (used when given at start)."""

    k: int = 16
    knn_weight: float = 0.25
    temperature: float = 1.0
    retrieval_rate: float = 1.0
    memory_weight: float = 0.25


@dataclass
class Rows:
    """What one pass keeps per scored target; row i predicts token i + 1 of the text."""

    targets: torch.Tensor  # (m,) long
    lm: torch.Tensor  # (m,) log p_lm(target)
    logits: torch.Tensor  # (m, V) the LM's logits
    neighbours: Neighbours  # (m, k_max) on the CPU, nearest first
    counts: torch.Tensor | None  # (m, k_max) entries per neighbour (a pruned store)
    keys: torch.Tensor  # (m, d) float32 queries
    stats: torch.Tensor | None  # (m, 2) LM entropy and max log-prob (for a gate)
    memory: torch.Tensor | None  # (m,) log p_memory(target)


@dataclass
class Mixed:
    """Per-target log-probs at one setting (from :class:`Rows`, no search)."""

    knn: torch.Tensor
    mix: torch.Tensor
    kept: torch.Tensor  # bool: the gate let this target search (all True without a gate)
    lm_memory: torch.Tensor | None


class Inspector:
    """A model and a datastore fixed at start; texts in, views out.

    Not thread-safe (the model's key hooks hold one forward at a time): the server runs every
    call on one worker thread. ``searches`` counts the queries searched since start.
    """

    def __init__(
        self, lm: LoadedLM, datastore: str | Path | Datastore, *, k_max: int = 256, search: str = "auto",
        nprobe: int | None = None, gate: Gate | None = None, memory: MemoryMLP | None = None,
        max_tokens: int = 256, cache_size: int = 4, examples: list[str] | None = None,
    ):  # fmt: skip
        knn = KnnSettings(k=k_max, exclude_self="no", search=search, nprobe=nprobe)
        self.retriever = Retriever(lm, datastore, knn)
        self.lm, self.k_max, self.max_tokens = lm, k_max, max_tokens
        ds = self.retriever.ds
        # Where each row's text is: the datastore's token stream, or (a datastore of
        # independent examples, ``examples``) the examples one after the other.
        if examples is not None:
            self.stream, self.positions = example_stream(lm, ds, examples)
        else:
            self.stream, self.positions = ds.tokens(lm.tokenizer), ds.positions
        ctx = ds.meta.get("context_len")
        self.context_len = int(ctx) if ctx else default_window(lm.model)[0]
        if gate is not None:
            check_gate_for(gate, lm.fingerprint, self.retriever.ds.dim)
        self.gate, self.memory = gate, memory
        self.searches = 0
        self.cache: OrderedDict[str, Rows] = OrderedDict()
        self.cache_size = cache_size
        self.busy = threading.Lock()  # one caller at a time, whoever calls

    # -- texts -------------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        """The text's token ids, at least two and at most ``max_tokens`` (one clear message)."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise KnnlmError("the text needs at least two tokens (the first has no prediction)")
        if len(ids) > self.max_tokens:
            raise KnnlmError(
                f"the text is {len(ids)} tokens; at most {self.max_tokens} are shown "
                "(knnlm inspect --max-tokens)"
            )
        return np.asarray(ids, dtype=np.int64)

    def config(self) -> dict[str, Any]:
        """What the page needs to draw its controls."""
        ds = self.retriever.ds
        return {
            "model": self.lm.name, "datastore": ds.path.name, "entries": ds.n,
            "k_max": self.k_max, "max_tokens": self.max_tokens,
            "gate": None if self.gate is None else self.gate.kind,
            "memory": self.memory is not None, "defaults": asdict(ViewSettings(k=min(16, self.k_max))),
        }  # fmt: skip

    # -- the one pass ----------------------------------------------------------------
    def rows(self, ids: np.ndarray) -> Rows:
        """The text's pass, from the cache when this text was seen recently."""
        key = hashlib.sha256(ids.tobytes()).hexdigest()
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        rows = self.score(ids)
        self.cache[key] = rows
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return rows

    @torch.no_grad()
    def score(self, ids: np.ndarray) -> Rows:
        """One scoring pass and one search at k_max for every target of ``ids``."""
        stream = score_stream(
            self.lm.model, ids, self.context_len, batch_size=8,
            key_type=self.retriever.key_type, want_lm=True, want_logits=True,
            want_stats=self.gate is not None, progress=False,
        )  # fmt: skip
        parts = list(score_tokens(stream, retriever=self.retriever, memory=self.memory))
        nb = [p.neighbours.to("cpu") for p in parts]
        neighbours = Neighbours(*(torch.cat([getattr(n, f) for n in nb]) for f in
                                  ("distances", "rows", "values")))  # fmt: skip
        counts = self.retriever.row_counts(neighbours)
        self.searches += sum(p.searched for p in parts)

        def cat(get):
            return torch.cat([get(p).float().cpu() for p in parts])

        return Rows(
            targets=torch.cat([p.targets_cpu for p in parts]).long(),
            lm=cat(lambda p: p.lm_cpu),
            logits=cat(lambda p: p.batch.lm_logits),
            neighbours=neighbours,
            counts=None if counts is None else counts.cpu(),
            keys=cat(lambda p: p.batch.keys),
            stats=cat(lambda p: p.batch.lm_stats) if self.gate is not None else None,
            memory=cat(lambda p: p.memory) if self.memory is not None else None,
        )

    # -- settings ----------------------------------------------------------------------
    def check(self, s: ViewSettings) -> None:
        """Refuse settings outside what was retrieved (one message naming the control)."""
        if not 1 <= s.k <= self.k_max:
            raise KnnlmError(
                f"k must be in [1, {self.k_max}] (the neighbours retrieved), got {s.k}"
            )
        for name in ("knn_weight", "retrieval_rate", "memory_weight"):
            if not 0.0 <= getattr(s, name) <= 1.0:
                raise KnnlmError(f"{name} must be in [0, 1], got {getattr(s, name)}")
        if not 1e-6 <= s.temperature <= 1e6:
            raise KnnlmError(f"temperature must be in [1e-6, 1e6], got {s.temperature}")

    def mixed(self, rows: Rows, s: ViewSettings) -> Mixed:
        """Every target's p_knn and mixture at ``s``, from the k_max neighbours kept."""
        nb, counts = first_k(rows, s.k)
        knn = knn_target_log_prob(
            nb.distances, nb.rows, nb.values, rows.targets, s.temperature, counts
        )
        mix = interpolate(rows.lm, knn, s.knn_weight)
        kept = torch.ones(len(rows.lm), dtype=torch.bool)
        if self.gate is not None:  # the tokens the gate skips keep p_lm exactly
            kept = self.gate.keep(rows.keys, rows.stats, s.retrieval_rate)
            mix = torch.where(kept, mix, rows.lm)
        lm_memory = None
        if rows.memory is not None:
            lm_memory = interpolate(rows.lm, rows.memory, s.memory_weight)
        return Mixed(knn, mix, kept, lm_memory)

    # -- views ---------------------------------------------------------------------------
    def view(self, ids: np.ndarray, s: ViewSettings, token: int | None = None) -> dict:
        """Tokens with colours and log-probs, running perplexities, the figure, and with
        ``token`` (1 .. len - 1) that token's neighbours and distributions."""
        self.check(s)
        rows = self.rows(ids)
        m = self.mixed(rows, s)
        out = {
            "tokens": self.token_list(ids, rows, m),
            "perplexity": running_perplexities(rows, m),
            "settings": asdict(s),
            "searches": self.searches,
        }
        out["figure"] = perplexity_svg(out["perplexity"])
        if token is not None:
            if not 1 <= token < len(ids):
                raise KnnlmError(f"token must be in [1, {len(ids) - 1}], got {token}")
            out["token"] = self.details(rows, m, s, token - 1)
        return out

    def details(self, rows: Rows, m: Mixed, s: ViewSettings, j: int) -> dict:
        """Row ``j``'s neighbours and distributions (:func:`token_details`)."""
        return token_details(self, rows, m, s, j)

    def token_list(self, ids: np.ndarray, rows: Rows, m: Mixed) -> list[dict]:
        pieces = self.lm.tokenizer.batch_decode([[int(i)] for i in ids])
        gain = m.mix - rows.lm
        paint = colours(gain)
        lm, knn, mix, gains = (finite(t) for t in (rows.lm, m.knn, m.mix, gain))
        mem = finite(m.lm_memory) if m.lm_memory is not None else None
        kept = m.kept.tolist()
        out = [{"index": 0, "text": pieces[0], "id": int(ids[0])}]
        for j in range(len(rows.lm)):  # the JSON rows themselves (the numbers are tensors)
            row = {"index": j + 1, "text": pieces[j + 1], "id": int(ids[j + 1]), "lm": lm[j],
                   "knn": knn[j], "mix": mix[j], "gain": gains[j], "colour": paint[j],
                   "searched": kept[j]}  # fmt: skip
            if mem is not None:
                row["lm_memory"] = mem[j]
            out.append(row)
        return out

    def static_view(self, ids: np.ndarray, s: ViewSettings) -> dict:
        """The view with every token's details, for a page with no server."""
        out = self.view(ids, s)
        rows = self.rows(ids)
        m = self.mixed(rows, s)
        out["details"] = {str(j + 1): self.details(rows, m, s, j) for j in range(len(rows.lm))}
        return out


def example_stream(lm: LoadedLM, ds: Datastore, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of a datastore built over independent examples
    (``build_example_datastore``: each text's tokens, EOS after each when the meta says so)
    and each row's position in it; checked against the stored values."""
    eos = lm.tokenizer.eos_token_id
    tail = [eos] if ds.meta.get("add_eos") and eos is not None else []
    examples = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] + tail for t in texts]
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream = np.concatenate([np.asarray(e, dtype=np.int64) for e in examples])
    # example i's rows predict its tokens 1 .. len - 1: row positions start + 0 .. len - 2
    positions = np.repeat(starts, lengths - 1) + (
        np.arange(int((lengths - 1).sum()))
        - np.repeat(np.cumsum(lengths - 1) - (lengths - 1), lengths - 1)
    )
    if len(positions) != ds.n or not np.array_equal(stream[positions + 1], np.asarray(ds.values)):
        raise KnnlmError(f"the examples given are not those datastore {ds.path} was built from")
    return stream, positions


def running_perplexities(rows: Rows, m: Mixed) -> dict[str, list]:
    """exp(mean NLL of the targets so far) of the LM, the kNN-LM (and LM + memory)."""
    n = torch.arange(1, len(rows.lm) + 1, dtype=torch.float64)

    def run(lp: torch.Tensor) -> list:
        return finite(torch.exp(torch.cumsum(-lp.double(), 0) / n))

    out = {"lm": run(rows.lm), "knnlm": run(m.mix)}
    if m.lm_memory is not None:
        out["lm_memory"] = run(m.lm_memory)
    return out
