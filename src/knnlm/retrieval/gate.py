"""Adaptive retrieval (He et al., EMNLP 2021): a gate decides per token whether to search.

Two gates score each token from features the LM forward gives for free (higher = retrieve):

- ``mlp``: He et al.'s weight predictor, a small MLP over the query vector, the LM's entropy and
  its max log-probability, predicting the interpolation weight of p_knn (trained with the
  mixture loss in :mod:`knnlm.retrieval.gate_train`); the score is that weight;
- ``entropy``: the simplest baseline, the LM's entropy itself (an unsure LM retrieves).

A target retrieval rate R becomes a threshold through the quantiles of the scores measured on
held-out tokens of the training split (never the evaluated one): tokens above the (1 - R)
quantile are searched. R = 1 searches every token (exactly the kNN-LM), R = 0 none (exactly
the LM).

A gate is a folder: ``gate.safetensors`` (MLP weights, feature mean and scale) and
``config.json`` (kind, sizes, score quantiles, the model it belongs to; with the artifact
marker), written into a temporary sibling and swapped in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from knnlm.errors import KnnlmError
from knnlm.fileio import ARTIFACT_KEY, claim_target, read_meta, swap_in, temp_dir, write_json_atomic
from knnlm.locking import locks

KIND = "retrieval_gate"
CONFIG = "config.json"
WEIGHTS = "gate.safetensors"
GATE_KINDS = ("mlp", "entropy")
N_QUANTILES = 1001


class GateMLP(nn.Module):
    """``layers`` linear layers (ReLU, dropout between); out: log [weight of p_lm, of p_knn]."""

    def __init__(self, in_dim: int, hidden: int = 128, layers: int = 5, dropout: float = 0.2):
        super().__init__()
        mods: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        mods.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net(x), dim=-1)


def gate_features(keys: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(n, d + 2): the query vector, the LM's entropy and max log-probability."""
    return torch.cat([keys.float(), stats.float()], dim=1)


@dataclass
class Gate:
    kind: str
    config: dict
    quantiles: np.ndarray  # score quantiles on held-out tokens, N_QUANTILES levels
    model: GateMLP | None = None
    mean: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def scores(self, keys: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Per token, higher means retrieve: the predicted p_knn weight, or the LM entropy.
        Computed on the device of ``keys`` (the MLP moves there once)."""
        if self.kind == "entropy":
            return stats[:, 0].float()
        if self.mean.device != keys.device:
            self.model.to(keys.device)
            self.mean, self.scale = self.mean.to(keys.device), self.scale.to(keys.device)
        x = (gate_features(keys, stats.to(keys.device)) - self.mean) / self.scale
        with torch.no_grad():
            return self.model(x)[:, 1].exp()

    def threshold(self, rate: float) -> float:
        levels = np.linspace(0.0, 1.0, N_QUANTILES)
        return float(np.interp(1.0 - rate, levels, self.quantiles))

    def decide(
        self, keys: torch.Tensor, stats: torch.Tensor, rate: float, want_scores: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep, scores): bool (n,) on the CPU, which tokens to search at retrieval rate
        ``rate`` (1: all, 0: none), and with ``want_scores`` the scores (on the CPU) that a
        learned weight reads; the MLP runs at most once."""
        n = keys.shape[0]
        scores = None
        if want_scores or 0.0 < rate < 1.0:
            scores = self.scores(keys, stats).cpu()
        wanted = scores if want_scores else None
        if rate >= 1.0:
            return torch.ones(n, dtype=torch.bool), wanted
        if rate <= 0.0:
            return torch.zeros(n, dtype=torch.bool), wanted
        return scores > self.threshold(rate), wanted

    def keep(self, keys: torch.Tensor, stats: torch.Tensor, rate: float) -> torch.Tensor:
        """Bool (n,): which tokens to search at retrieval rate ``rate`` (1: all, 0: none)."""
        return self.decide(keys, stats, rate)[0]


def score_quantiles(scores: torch.Tensor) -> np.ndarray:
    return np.quantile(scores.double().numpy(), np.linspace(0.0, 1.0, N_QUANTILES))


@locks("out", "retrieval gate")
def save_gate(out: str | Path, gate: Gate) -> Path:
    """Write ``gate`` to the folder ``out`` by the artifact rule (temporary sibling, swap)."""
    claim_target(out, KIND, CONFIG, what="retrieval gate")
    partial = temp_dir(out, KIND, CONFIG, fresh=True)
    tensors = {"quantiles": torch.from_numpy(gate.quantiles.astype(np.float64))}
    if gate.model is not None:
        tensors.update({f"net.{k}": v.contiguous() for k, v in gate.model.state_dict().items()})
        tensors.update(mean=gate.mean.contiguous(), scale=gate.scale.contiguous())
    save_file(tensors, str(partial / WEIGHTS))
    write_json_atomic(partial / CONFIG, dict(gate.config, kind=gate.kind, **{ARTIFACT_KEY: KIND}))
    return swap_in(partial, out, KIND, CONFIG)


def load_gate(path: str | Path) -> Gate:
    """A gate written by :func:`save_gate`; anything else is a one-line error."""
    path = Path(path)
    what = f"retrieval gate {path}"
    if not (path / CONFIG).is_file():
        raise KnnlmError(f"no retrieval gate at {path}; create one with `knnlm gate train`")
    config = read_meta(path / CONFIG, what)
    kind = config.get("kind")
    if config.get(ARTIFACT_KEY) != KIND or kind not in GATE_KINDS:
        raise KnnlmError(f"{what}: config.json is not a knnlm retrieval gate")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (OSError, ValueError, RuntimeError) as e:
        raise KnnlmError(f"{what}: cannot read {WEIGHTS} ({e})") from None
    try:
        gate = Gate(kind, dict(config, path=str(path)), tensors["quantiles"].numpy())
        if kind == "mlp":
            sizes = (int(config["in_dim"]), int(config["hidden"]), int(config["layers"]))
            gate.model = GateMLP(*sizes)
            state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
            gate.model.load_state_dict(state)
            gate.model.eval()
            gate.mean, gate.scale = tensors["mean"], tensors["scale"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KnnlmError(f"{what}: the weights do not match config.json ({msg})") from None
    return gate


def check_gate_for(gate: Gate, model_fingerprint: str, dim: int) -> None:
    """Refuse a gate trained on another model's features."""
    if gate.config.get("model_fingerprint") not in (None, model_fingerprint):
        raise KnnlmError(
            f"the retrieval gate was trained with another model ({gate.config.get('model')}); "
            "train one for this model with `knnlm gate train`"
        )
    if gate.kind == "mlp" and int(gate.config["in_dim"]) != dim + 2:
        raise KnnlmError(f"the retrieval gate expects keys of size {gate.config['in_dim'] - 2}")
