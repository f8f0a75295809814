"""Training the adaptive-retrieval gate (:mod:`knnlm.retrieval.gate`) on a held-out split.

One pass over the split (never the datastore's own text, never the evaluated split) records per
token the gate's features, log p_lm(target) and log p_knn(target) with the given kNN settings.
The ``mlp`` gate is then fitted with He et al.'s mixture loss,
``-log(l_lm p_lm + l_knn p_knn) + l1 * l_knn`` (the L1 term pushes the kNN weight to zero where
retrieval does not help), on 90% of the tokens; the other 10% choose the best epoch and give the
score quantiles that turn a retrieval rate into a threshold. The ``entropy`` gate needs no fit:
its quantiles come from the same held-out tokens.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from knnlm.data.corpus import load_tokens
from knnlm.errors import KnnlmError
from knnlm.forward_pass import WindowSettings, score_stream
from knnlm.lm.loading import LoadedLM
from knnlm.locking import locks
from knnlm.retrieval.combiner import mix_log_weights
from knnlm.retrieval.datastore import corpus_fingerprint, open_datastore
from knnlm.retrieval.gate import (
    GATE_KINDS,
    Gate,
    GateMLP,
    gate_features,
    save_gate,
    score_quantiles,
)
from knnlm.retrieval.retriever import KnnSettings, MixSettings, Retriever
from knnlm.settings import Settings, require


def collect(
    lm: LoadedLM, retriever: Retriever, ids: np.ndarray, context_len: int, stride: int | None,
    batch_size: int, progress: bool, temperature: float,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per scored token: keys, LM stats (entropy, max log-prob), log p_lm and log p_knn (at
    ``temperature``)."""
    parts: dict[str, list[torch.Tensor]] = {"keys": [], "stats": [], "lm": [], "knn": []}
    for b in score_stream(
        lm.model, ids, context_len, stride, batch_size=batch_size,
        key_type=retriever.key_type, want_stats=True, progress=progress, desc="gate features",
    ):  # fmt: skip
        keys = b.keys.float().cpu()
        nb = retriever.search(keys)
        parts["keys"].append(keys)
        parts["stats"].append(b.lm_stats.cpu())
        parts["lm"].append(b.lm_log_prob.float().cpu())
        parts["knn"].append(retriever.target_log_prob(nb, b.targets, temperature).float())
    return {k: torch.cat(v) for k, v in parts.items()}


def _mixture_nll(log_w: torch.Tensor, lm: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
    return -mix_log_weights(log_w, lm, knn)


def fit_mlp(
    x: torch.Tensor, lm: torch.Tensor, knn: torch.Tensor, held: torch.Tensor, *,
    hidden: int, layers: int, epochs: int, lr: float, l1: float, seed: int, progress: bool,
) -> tuple[GateMLP, dict]:  # fmt: skip
    """The MLP minimising the mixture loss on the rows not ``held``; best held-out epoch kept."""
    torch.manual_seed(seed)
    model = GateMLP(x.shape[1], hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train = torch.nonzero(~held).squeeze(1)
    best, best_state, history = float("inf"), None, []
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="gate epochs", disable=not progress):
        model.train()
        for rows in torch.randperm(train.numel(), generator=gen).split(256):
            r = train[rows]
            log_w = model(x[r])
            loss = (_mixture_nll(log_w, lm[r], knn[r]) + l1 * log_w[:, 1].exp()).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(_mixture_nll(model(x[held]), lm[held], knn[held]).mean())
        history.append(val)
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, {"held_out_mixture_nll": best, "held_out_history": history}


@dataclass(frozen=True)
class GateSettings(Settings):
    """Every setting of one gate training (``knnlm gate train``): the held-out ``split``, the
    gate ``kind`` (mlp | entropy), the search (``knn``), p_knn's temperature (``mix``; its
    weight is what the gate learns), the windows, and the mlp's shape and training.
    Example: ``GateSettings(kind="entropy", knn=KnnSettings(k=16))``."""

    split: str = "valid"
    kind: str = "mlp"
    knn: KnnSettings = KnnSettings()
    mix: MixSettings = MixSettings()
    window: WindowSettings = WindowSettings(1024, 1024)
    batch_size: int = 8
    hidden: int = 128
    layers: int = 5
    epochs: int = 20
    lr: float = 1e-3
    l1: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.kind in GATE_KINDS, "kind",
                f"must be one of {', '.join(GATE_KINDS)}, got {self.kind!r}")  # fmt: skip
        for name in ("hidden", "layers", "epochs"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, name, f"must be at least 1, got {v!r}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.l1 >= 0, "l1", f"must be at least 0, got {self.l1}")


@locks("out", "retrieval gate")
def train_gate(
    lm: LoadedLM, datastore: str | Path, corpus: str, out: str | Path,
    settings: GateSettings = GateSettings(), *, progress: bool = True,
) -> dict:  # fmt: skip
    """Train (``mlp``) or calibrate (``entropy``) a gate on ``settings.split``; write it to
    ``out``. The windows are ``settings.window`` (None filled from the model)."""
    st = settings
    split, kind, knn, seed, batch_size = st.split, st.kind, st.knn, st.seed, st.batch_size
    window = st.window.for_model(lm.model)
    context_len, stride = window.context_len, window.stride
    ds = open_datastore(datastore)
    ids = load_tokens(lm.tokenizer, corpus, split)
    if ds.meta.get("corpus_fingerprint") == corpus_fingerprint(ids):
        raise KnnlmError(
            f"{corpus} {split} is the text datastore {ds.path} was built on; train the gate on "
            "held-out text (e.g. --split valid)"
        )
    retriever = Retriever(lm, ds, knn)
    t0 = time.time()
    data = collect(lm, retriever, ids, context_len, stride, batch_size, progress,
                   st.mix.temperature)  # fmt: skip
    n = data["lm"].numel()
    if n < 20:
        raise KnnlmError(f"{corpus} {split} has {n} scored tokens; the gate needs at least 20")
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, n // 10)]] = True
    x = gate_features(data["keys"], data["stats"])
    # The facts of the run beside its settings, whole (GateSettings.from_dict rebuilds them),
    # windows as used.
    config = {
        "model": lm.name, "model_fingerprint": lm.fingerprint, "datastore": str(ds.path),
        "corpus": corpus, "tokens": n, "held_out_tokens": int(held.sum()),
        "settings": {"gate": {**st.to_dict(), "window": window.to_dict()}},
    }  # fmt: skip
    gate = Gate(kind, config, np.zeros(0))
    if kind == "mlp":
        mean, scale = x[~held].mean(0), x[~held].std(0).clamp_min(1e-6)
        gate.model, report = fit_mlp(
            (x - mean) / scale, data["lm"], data["knn"], held, hidden=st.hidden, layers=st.layers,
            epochs=st.epochs, lr=st.lr, l1=st.l1, seed=seed, progress=progress,
        )  # fmt: skip
        gate.mean, gate.scale = mean, scale
        # The network's shape, read back by load_gate.
        config.update(report, in_dim=x.shape[1], hidden=st.hidden, layers=st.layers)
    gate.quantiles = score_quantiles(gate.scores(data["keys"][held], data["stats"][held]))
    config["seconds"] = round(time.time() - t0, 3)
    save_gate(out, gate)
    return config
