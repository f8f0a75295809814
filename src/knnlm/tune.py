"""``knnlm tune``: the perplexity / speed frontier of the kNN-LM on a held-out split, measured on
this machine over what varies without building anything, and the pick.

Perplexity: one pass per (datastore, nprobe) searches k_max neighbours for every token, and
every smaller k, weight, temperature and gate retrieval rate is re-scored from them
(:func:`knnlm.retrieval.combiner.prefix_log_probs`; a gate's skipped tokens keep p_lm exactly,
as in ``evaluate``); RetoMaton pointers change which tokens search, so each threshold is one
more pass (at k_max). Speed: per search setting (datastore, nprobe, k, rate, pointers), timed
passes over the first ``speed_tokens`` tokens, LM forward included, each right after a pass of
the LM alone, as a share of the LM's tok/s; weight and temperature cost nothing. The chosen point is then run once through :func:`knnlm.evaluate.evaluate`, whose
perplexity is the one reported for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.data.corpus import Corpus, load_tokens
from knnlm.evaluate import EvalSettings, check_pointers, open_gate, run_eval
from knnlm.forward_pass import WindowSettings, score_stream
from knnlm.frontier import gain_kept, pareto_front, pick
from knnlm.lm.loading import LoadedLM
from knnlm.retrieval.combiner import combine, perplexity, prefix_log_probs
from knnlm.retrieval.datastore import Datastore, corpus_fingerprint, open_datastore
from knnlm.retrieval.exclusion import should_exclude
from knnlm.retrieval.gate import Gate, check_gate_for
from knnlm.retrieval.retriever import KnnSettings, MixSettings, Retriever
from knnlm.retrieval.search.protocol import search_choices
from knnlm.settings import Settings, build, flag, require
from knnlm.token_scores import score_tokens

DEFAULT = {"k": 1024, "knn_weight": 0.25, "knn_temperature": 1.0}  # knnlm eval's defaults


# The list fields: JSON gives lists back, the settings hold tuples (so equal ones compare equal).
_GRIDS = ("ks", "knn_weights", "knn_temperatures", "nprobes", "retrieval_rates", "pointers")


@dataclass(frozen=True)
class TuneSettings(Settings):
    """Every setting of one ``knnlm tune`` run, checked where it is built and written whole into
    its results (``result["tune"]``). Measured on ``split`` (``text_field`` of an ``hf:``
    corpus) in ``window`` (None filled from the model) by ``batch_size``; varied: ``ks``,
    ``knn_weights``, ``knn_temperatures`` (eval's defaults k 1024, w 0.25, T 1 always added),
    ``nprobes`` (None: a quarter, half and all of the index's own, IVF indexes only),
    ``retrieval_rates`` of a ``gate`` (a folder), RetoMaton ``pointers`` thresholds (one pass
    each); searched by ``search``. Speed: ``speed_repeats`` rounds over ``speed_tokens`` tokens.
    The pick: the fastest point keeping ``keep_gain`` of the default kNN-LM's log-perplexity
    gain, or with ``min_speed`` the best perplexity at that share of the LM's tok/s.
    Example: ``TuneSettings(ks=(256, 64), knn_weights=(0.25, 0.5), min_speed=0.5)``.
    """

    split: str = "valid"
    window: WindowSettings = WindowSettings()
    batch_size: int = 8
    text_field: str = "text"
    ks: tuple[int, ...] = (1024, 256, 64)
    knn_weights: tuple[float, ...] = (0.1, 0.25, 0.4)
    knn_temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)
    nprobes: tuple[int, ...] | None = None
    retrieval_rates: tuple[float, ...] = (0.25, 0.5, 0.75)
    pointers: tuple[float, ...] = ()
    gate: str | None = None
    search: str = "auto"
    speed_tokens: int = 4096
    speed_repeats: int = 2
    keep_gain: float = 0.95
    min_speed: float | None = None

    def __post_init__(self) -> None:
        for name in _GRIDS:
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        if self.gate is not None:
            object.__setattr__(self, "gate", str(self.gate))
        for name in ("batch_size", "speed_tokens", "speed_repeats"):
            v = getattr(self, name)
            require(_whole(v) and v >= 1, name, f"must be a whole number of at least 1, got {v!r}")
        _each(self, "ks", lambda v: _whole(v) and v >= 1, "a whole number of at least 1")
        _each(self, "knn_weights", lambda v: 0 <= v <= 1, "in [0, 1]")
        _each(self, "knn_temperatures", lambda v: v > 0, "positive")
        _each(self, "nprobes", lambda v: _whole(v), "a whole number")
        _each(self, "retrieval_rates", lambda v: 0 <= v <= 1, "in [0, 1]")
        _each(self, "pointers", lambda v: v >= 1, "at least 1 (or inf)")
        require(self.search in search_choices(), "search",
                f"must be one of {', '.join(search_choices())}, got {self.search!r}")  # fmt: skip
        require(0 < self.keep_gain <= 1, "keep_gain", f"must be in (0, 1], got {self.keep_gain}")
        m = self.min_speed
        require(m is None or m > 0, "min_speed", f"must be positive, got {m}")


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _each(settings: TuneSettings, name: str, ok: Any, must: str) -> None:
    """Every value of the grid ``name`` (None: none) passes ``ok``."""
    for v in getattr(settings, name) or ():
        require(ok(v), name, f"values must each be {must}, got {v!r}")


def tune(
    lm: LoadedLM, corpus: Corpus, datastores: list[str | Path],
    settings: TuneSettings = TuneSettings(), *, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The frontier over ``settings``' grids on its split, the pick and its settings (see the
    module); ``progress`` shows the pick's check through eval."""
    st, window = settings, settings.window.for_model(lm.model)
    stores = [open_datastore(d) for d in datastores]
    gate = st.gate
    gate_obj = open_gate(MixSettings(gate=gate), stores[0], None) if gate is not None else None
    for th in st.pointers:  # pruned stores are tuned without pointers
        for ds in (d for d in stores if d.counts is None):
            check_pointers(build(MixSettings, flag(), pointers=th), ds, None)
    ids = load_tokens(lm.tokenizer, corpus, st.split, st.text_field)
    fp = corpus_fingerprint(ids)
    timer = _Timer(lm, ids[: st.speed_tokens + 1], st, window)
    lm_ppl, tokens, points, notes = None, 0, [], []
    for i, ds in enumerate(stores):
        ds.check_compatible(lm)
        if gate_obj is not None:
            check_gate_for(gate_obj, lm.fingerprint, ds.dim)
        exclude = should_exclude(ds, "auto", fp)
        found = _store_points(lm, ids, ds, exclude, st, gate_obj, timer, notes)
        lm_ppl, tokens = found["lm_ppl"], found["tokens"]
        points += [dict(p, datastore=str(ds.path), store=i) for p in found["points"]]
    lm_speed = {"perplexity": lm_ppl, "tok_s": timer.lm_tok_s()}
    for p in points:  # on the LM's best tok/s: the ratios were timed beside it
        p["tok_s"] = p["speed_share"] * lm_speed["tok_s"]
    default = next(p for p in points if _is_default(p, stores[0]))
    front = pareto_front(points)
    keep_gain, min_speed = st.keep_gain, st.min_speed
    chosen = pick(points, lm_speed, default["perplexity"], keep_gain, min_speed)
    gain = lm_ppl > default["perplexity"]  # else no share of it to keep (--min-speed picks)
    for p in points:
        p["gain_kept"] = gain_kept(p["perplexity"], lm_ppl, default["perplexity"]) if gain else None
    where, (knn, mix) = points[chosen]["datastore"], _pick_settings(points[chosen], st)
    checked = _check_pick(lm, corpus, st, window, where, knn, mix, progress)
    if gain and min_speed is None and gain_kept(checked, lm_ppl, default["perplexity"]) < keep_gain:
        notes.append(f"the pick's real search keeps less than {keep_gain:g} of the gain "
                     f"(perplexity {checked:.3f} against its prefix's "
                     f"{points[chosen]['perplexity']:.3f}): consider a pick that was searched")  # fmt: skip
    return {
        "split": st.split, "tokens": tokens, "speed_tokens": min(st.speed_tokens, len(ids) - 1),
        "speed_repeats": st.speed_repeats,
        "tune": {**st.to_dict(), "window": window.to_dict()},  # whole, the windows as used
        "lm": lm_speed, "default": default, "points": points, "frontier": front,
        "pick": dict(points[chosen], index=chosen, perplexity_checked=checked),
        "rule": {"min_speed": min_speed} if min_speed is not None else {"keep_gain": keep_gain},
        "settings": {"datastore": where, "knn": knn.to_dict(), "mix": mix.to_dict()},
        "notes": notes,
    }  # fmt: skip


def _pick_settings(point: dict, st: TuneSettings) -> tuple[KnnSettings, MixSettings]:
    """The settings objects of a point (the settings file holds them whole)."""
    rate = point["retrieval_rate"]
    knn = KnnSettings(k=point["k"], nprobe=point["nprobe"], search=st.search)
    mix = MixSettings(knn_weight=point["knn_weight"], temperature=point["knn_temperature"],
                      gate=None if rate is None else st.gate,
                      retrieval_rate=1.0 if rate is None else rate,
                      pointers=point["pointers"])  # fmt: skip
    return knn, mix


def _is_default(p: dict, ds: Datastore) -> bool:
    return (p["store"] == 0 and p["k"] == min(DEFAULT["k"], ds.n) and p["nprobe"] is None
            and p["knn_weight"] == DEFAULT["knn_weight"] and p["retrieval_rate"] is None
            and p["knn_temperature"] == DEFAULT["knn_temperature"] and p["pointers"] is None)  # fmt: skip


def _store_points(
    lm: LoadedLM, ids: np.ndarray, ds: Datastore, exclude: bool, st: TuneSettings,
    gate: Gate | None, timer: _Timer, notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """Every point of one datastore: per nprobe one grid pass, per pointer threshold one more."""
    ks = sorted({k for k in (*st.ks, DEFAULT["k"]) if k <= ds.n} | {min(DEFAULT["k"], ds.n)})
    weights = sorted({*st.knn_weights, DEFAULT["knn_weight"]})
    temps = sorted({*st.knn_temperatures, DEFAULT["knn_temperature"]})
    rates = sorted(r for r in st.retrieval_rates if 0 < r < 1) if gate is not None else []
    search = st.search
    base = Retriever(lm, ds, KnnSettings(k=max(ks), search=search))
    points, out = [], {}
    for nprobe in _nprobes(base, st):
        r = base if nprobe is None else Retriever(lm, ds, KnnSettings(k=max(ks), nprobe=nprobe,
                                                                      search=search))  # fmt: skip
        how = _prefix_kind(r)
        if how != "prefix" and len(ks) > 1:
            notes.append(f"prefix* ({ds.path}, nprobe {nprobe or 'default'}): the first k of "
                         "the k_max re-ranked candidates; a real search at k re-ranks fewer "
                         "candidates, so its perplexity can differ")  # fmt: skip
        out = _grid_pass(lm, ids, timer, r, exclude, ks, temps, weights, gate, rates)
        for (rate, k, t, w), nll in out["nll"].items():
            speed = timer.share(
                (ds.path, nprobe, k, rate, None), r, exclude, gate if rate is not None else None
            )
            points.append(_point(k, w, t, nprobe, rate, None, nll, out, speed,
                                 "searched" if k == max(ks) else how))  # fmt: skip
    for th in st.pointers if ds.counts is None else ():
        pt = _grid_pass(lm, ids, timer, base, exclude, [max(ks)], temps, weights, None, [], th)
        speed = timer.share((ds.path, None, max(ks), None, th), base, exclude, None)
        for (_, k, t, w), nll in pt["nll"].items():
            points.append(_point(k, w, t, None, None, th, nll, pt, speed, "searched"))
    return {"points": points, "lm_ppl": perplexity(out["lm_nll"], out["tokens"]),
            "tokens": out["tokens"]}  # fmt: skip


def _point(k, w, t, nprobe, rate, th, nll, run, speed, neighbours) -> dict[str, Any]:
    searched = run["searched"] / max(run["tokens"], 1) if rate is None else run["kept"][rate]
    return {"k": k, "knn_weight": w, "knn_temperature": t, "nprobe": nprobe,
            "retrieval_rate": rate, "pointers": th, "perplexity": perplexity(nll, run["tokens"]),
            "searched": searched, "speed_share": speed, "neighbours": neighbours}  # fmt: skip


def _nprobes(r: Retriever, st: TuneSettings) -> list[int | None]:
    """None (the index's own nprobe) first, then the others asked for; only an IVF index
    has an nprobe to vary."""
    info = r.backend.describe()
    own = info.get("nprobe")
    if info.get("search") != "faiss" or own is None or "ivf" not in str(info.get("index")).lower():
        return [None]
    others = st.nprobes if st.nprobes is not None else (own // 4, own // 2)
    return [None, *sorted({n for n in others if n >= 1 and n != own})]


def _prefix_kind(r: Retriever) -> str:
    """How a smaller k's neighbours relate to a real search at that k."""
    info = r.backend.describe()
    if info.get("exact_neighbours", False) or not info.get("exact_distances", False):
        return "prefix"  # sorted by the same distance a k search sorts by: the same rows
    return "prefix*"  # the k_max candidates re-ranked; a k search re-ranks a subset


def _grid_pass(
    lm: LoadedLM, ids: np.ndarray, timer: _Timer, r: Retriever, exclude: bool, ks: list[int],
    temps: list[float], weights: list[float], gate: Gate | None, rates: list[float],
    pointers: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Total NLL per (rate or None, k, temperature, weight) from one search at max(ks), in the
    run's windows and batch size (``timer``'s)."""
    window, batch_size = timer.window, timer.st.batch_size
    nll: dict[tuple, float] = {}
    r.knn = replace(r.knn, k=max(ks))
    lm_nll, tokens, searched, kept = 0.0, 0, 0, dict.fromkeys(rates, 0)
    stream = score_stream(lm.model, ids, window.context_len, window.stride,
                          batch_size=batch_size, key_type=r.key_type, want_lm=True,
                          progress=False, want_stats=gate is not None)  # fmt: skip
    overlap = lm.device.type != "cpu"
    for s in score_tokens(stream, retriever=r, mix=MixSettings(pointers=pointers),
                          exclude_self=exclude, overlap=overlap):  # fmt: skip
        nb, lm_lp, targets = s.neighbours.to("cpu"), s.lm_cpu, s.targets_cpu
        keeps = {rate: gate.keep(s.batch.keys.float(), s.batch.lm_stats, rate) for rate in rates}
        knn = prefix_log_probs(nb.distances, nb.rows, nb.values, targets, ks, temps,
                               r.row_counts(nb))  # fmt: skip
        for (k, t), lp in knn.items():
            for w in weights:
                mix = combine(lm_lp, lp, w)
                for rate in [None, *rates]:
                    v = mix if rate is None else torch.where(keeps[rate], mix, lm_lp)
                    nll[(rate, k, t, w)] = nll.get((rate, k, t, w), 0.0) - float(v.double().sum())
        for rate, keep in keeps.items():
            kept[rate] += int(keep.sum())
        lm_nll -= float(lm_lp.double().sum())
        tokens, searched = tokens + len(targets), searched + s.searched
    kept = {rate: n / max(tokens, 1) for rate, n in kept.items()}
    return {"nll": nll, "lm_nll": lm_nll, "tokens": tokens, "searched": searched, "kept": kept}


class _Timer:
    """Speed of a pass over the first ``speed_tokens`` tokens (LM forward, search and mixture)
    per search setting, as a share of the LM's: each of ``repeats`` rounds times the LM alone
    and then the setting, back to back, so that load from other jobs on the machine falls on
    both; the share is the median of the rounds' ratios. The LM's tok/s is the best seen."""

    def __init__(self, lm: LoadedLM, ids: np.ndarray, st: TuneSettings, window: WindowSettings):
        """``st``: the run's settings (its batch size, ``speed_repeats`` rounds); ``window``
        its windows filled in from the model."""
        self.lm, self.ids, self.st, self.window = lm, ids, st, window
        self.repeats = st.speed_repeats
        self.cache: dict[tuple, float] = {}
        self.lm_runs: list[float] = []

    def lm_tok_s(self) -> float:
        """The LM's best tok/s so far (timed now when nothing was timed yet)."""
        if not self.lm_runs:
            self._lm_pass()
        return max(self.lm_runs)

    def _lm_pass(self) -> float:
        if not self.lm_runs:
            self._run(None, False, None, 1.0, None)  # warm-up
        self.lm_runs.append(self._run(None, False, None, 1.0, None))
        return self.lm_runs[-1]

    def share(self, key: tuple, r: Retriever, exclude: bool, gate: Gate | None) -> float:
        """Share of the LM's tok/s at ``key`` = (datastore, nprobe, k, rate, pointers)."""
        if key not in self.cache:
            _, _, k, rate, pointers = key
            r.knn = replace(r.knn, k=k)  # the one setting a timed pass changes on a retriever
            rate = 1.0 if rate is None else rate
            ratios = [1 / self._lm_pass() * self._run(r, exclude, gate, rate, pointers)
                      for _ in range(self.repeats)]  # fmt: skip
            self.cache[key] = float(np.median(ratios))
        return self.cache[key]

    def _run(self, r, exclude, gate, rate, pointers) -> float:
        w = self.window
        stream = score_stream(self.lm.model, self.ids, w.context_len, w.stride,
                              batch_size=self.st.batch_size, key_type=r.key_type if r else None,
                              want_lm=True, progress=False, want_stats=gate is not None)  # fmt: skip
        mix = MixSettings(gate=gate, retrieval_rate=rate, pointers=pointers)
        t0, n = time.perf_counter(), 0
        for s in score_tokens(stream, retriever=r, mix=mix, exclude_self=exclude, gate=gate,
                              overlap=r is not None and self.lm.device.type != "cpu"):  # fmt: skip
            n += len(s.batch.targets)
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize()
        return n / max(time.perf_counter() - t0, 1e-9)


def _check_pick(
    lm: LoadedLM, corpus: Corpus, st: TuneSettings, window: WindowSettings, datastore: str,
    knn: KnnSettings, mix: MixSettings, progress: bool,
) -> float:  # fmt: skip
    """The chosen settings run once as ``knnlm eval`` runs them: the perplexity reported."""
    run = EvalSettings(st.split, window, st.batch_size, st.text_field, knn, mix)
    return run_eval(lm, corpus, run, datastore=datastore, progress=progress)["knnlm"]["perplexity"]
