"""The MLP memory model of paper Section 5 / Appendix D: a small network that replaces kNN retrieval.

    logits = W (z + LN(MLP(z)))

where MLP is one hidden layer (d -> hidden -> d, exact GELU), LN a LayerNorm(d) (eps 1e-5,
affine) and W (V x d) starts as a copy of the LM's output embedding. The LM combines it with its
own distribution like the kNN component (log-space mix, ``knnlm.retrieval.combiner``).

This module holds what evaluation needs: the model, loading a saved one and its storage
accounting. Training (the Section 5 experiment) lives in the experiments layer
(``experiments/mlp_memory/train.py``).

Files of a saved memory (one folder): ``model.safetensors`` and ``config.json`` are the model;
``train_state.safetensors`` (optimiser state) and ``loss_curve.json`` are training artefacts and
do not count towards its storage.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from knnlm.errors import KnnlmError
from knnlm.fileio import disk_full_error, fsync_dir, is_disk_full
from knnlm.lm.loading import LoadedLM, pick_device
from knnlm.retrieval.datastore import Datastore

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"
CURVE_FILE = "loss_curve.json"
OUTPUT_WEIGHT = "output.weight"  # name of W in the state dict
KIND = "mlp_memory"  # config.json "kind" and its artifact marker


class MemoryMLP(nn.Module):
    """logits = W (z + LN(MLP(z))), the model of Appendix D."""

    def __init__(self, dim: int, hidden: int, vocab: int, train_output: bool = False):
        super().__init__()
        if min(dim, hidden, vocab) < 1:
            raise KnnlmError(
                f"dim, hidden and vocab must be positive, got {dim}, {hidden}, {vocab}"
            )
        self.dim, self.hidden, self.vocab = int(dim), int(hidden), int(vocab)
        self.train_output = bool(train_output)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ln = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight.requires_grad_(self.train_output)

    @classmethod
    def from_output_embedding(
        cls, W: torch.Tensor, hidden: int = 4096, train_output: bool = False
    ) -> MemoryMLP:
        """A fresh model whose W is a float32 copy of ``W`` (V x d), e.g. ``lm_head.weight``."""
        if W.ndim != 2:
            raise KnnlmError(
                f"output embedding must be 2-D (vocab, dim), got shape {tuple(W.shape)}"
            )
        vocab, dim = W.shape
        model = cls(dim, hidden, vocab, train_output)
        with torch.no_grad():
            model.output.weight.copy_(W.detach().float())
        return model

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """z + LN(MLP(z)), the vector W is applied to."""
        z = z.to(self.output.weight.dtype)
        return z + self.ln(self.mlp(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.dim:
            raise KnnlmError(
                f"keys have dimension {z.shape[-1]}, the memory model expects {self.dim}"
            )
        return self.output(self.features(z))

    def log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary, shape (..., V)."""
        return torch.log_softmax(self(z), dim=-1)

    def target_log_prob(
        self, z: torch.Tensor, targets: torch.Tensor, chunk: int = 4096
    ) -> torch.Tensor:
        """log p_mem(target | z) for each row, shape (n,).

        The normaliser needs every logit, but only ``chunk`` rows of them live at a time, so
        scoring many tokens never builds the full (n x V) matrix.
        """
        z = z.reshape(-1, self.dim)
        targets = targets.reshape(-1).to(device=z.device, dtype=torch.long)
        if len(targets) != len(z):
            raise KnnlmError(f"{len(z)} keys but {len(targets)} targets")
        out = []
        for s in range(0, len(z), chunk):
            logits = self(z[s : s + chunk])
            picked = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
            out.append(picked - torch.logsumexp(logits, dim=-1))
        return torch.cat(out) if out else z.new_zeros(0)


# -- files -------------------------------------------------------------------------------


def write_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """``tensors`` saved to ``path`` through a temporary name, fsynced before the rename."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), meta)
    except Exception as e:  # safetensors raises its own error type for I/O failures
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise disk_full_error(tmp, need) from None
        raise
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data is on disk before the name points at it
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, offsets; metadata)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise KnnlmError(f"corrupt safetensors file {path}: {e}") from e


def _check_size(path: Path) -> None:
    """A truncated safetensors file is refused before it is mapped."""
    header = safetensors_header(path)
    try:
        (n,) = struct.unpack("<Q", path.open("rb").read(8))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, KeyError, TypeError, ValueError, struct.error) as e:
        raise KnnlmError(f"corrupt safetensors file {path}: {e}") from None
    if path.stat().st_size != 8 + n + end:
        raise KnnlmError(
            f"corrupt safetensors file {path}: {path.stat().st_size} bytes, its header "
            f"describes {8 + n + end} (truncated?)"
        )


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Byte size of each tensor in a safetensors file, read from its header (no data loaded)."""
    header = safetensors_header(path)
    return {
        k: int(v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__"
    }


def read_memory_config(out_dir: Path) -> dict[str, Any]:
    """config.json of a saved memory, checked to describe one (KnnlmError otherwise)."""
    cfg_path, model_path = out_dir / CONFIG_FILE, out_dir / MODEL_FILE
    if not cfg_path.is_file() or not model_path.is_file():
        raise KnnlmError(
            f"no memory model in {out_dir} (expected {CONFIG_FILE} and {MODEL_FILE}; "
            "train one with train_memory first)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise KnnlmError(f"unreadable {cfg_path}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != KIND:
        raise KnnlmError(f"{cfg_path} does not describe an MLP memory model")
    return cfg


def load_memory(out_dir: str | Path, device: str | torch.device | None = None) -> MemoryMLP:
    """Load a memory model saved by ``train_memory`` (safetensors only; no pickle)."""
    out_dir = Path(out_dir)
    cfg = read_memory_config(out_dir)
    _check_size(out_dir / MODEL_FILE)
    try:
        model = MemoryMLP(cfg["dim"], cfg["hidden"], cfg["vocab"], cfg["train_output"])
    except (KeyError, TypeError, ValueError) as e:
        raise KnnlmError(f"{out_dir / CONFIG_FILE} lacks a valid {e}") from None
    try:
        state = load_file(str(out_dir / MODEL_FILE))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise KnnlmError(f"corrupt or mismatching {out_dir / MODEL_FILE}: {e}") from e
    return model.to(pick_device(device)).eval()


def check_memory_for(out_dir: str | Path, lm: LoadedLM) -> None:
    """Refuse a memory trained for another model (its config records the datastore's model
    fingerprint) or for another key size / vocabulary, like a foreign datastore."""
    out_dir = Path(out_dir)
    cfg = read_memory_config(out_dir)
    record = cfg.get("datastore") or {}
    trained_for = record.get("model_fingerprint")
    if trained_for is not None and trained_for != lm.fingerprint:
        raise KnnlmError(
            f"memory {out_dir} was trained for another model ({record.get('model')}, "
            f"{trained_for}); this model is {lm.name} ({lm.fingerprint})"
        )
    if (cfg.get("dim"), cfg.get("vocab")) != (lm.adapter.hidden_size, lm.adapter.vocab_size):
        raise KnnlmError(
            f"memory {out_dir} maps keys of size {cfg.get('dim')} to {cfg.get('vocab')} tokens; "
            f"this model has {lm.adapter.hidden_size} and {lm.adapter.vocab_size}"
        )


def memory_bytes(out_dir: str | Path) -> int:
    """Bytes on disk of the saved memory model: ``model.safetensors`` + ``config.json``.

    The optimiser state and loss curve kept for resuming are training artefacts, not counted.
    """
    out_dir = Path(out_dir)
    read_memory_config(out_dir)
    return sum(os.path.getsize(out_dir / f) for f in (MODEL_FILE, CONFIG_FILE))


def memory_storage(out_dir: str | Path) -> dict[str, int]:
    """Storage of the memory model, for comparison with the datastore and its index.

    - ``memory_bytes``: the files on disk (see ``memory_bytes``); they always include W.
    - ``memory_bytes_without_shared_W``: the bytes of the parameter tensors in
      ``model.safetensors`` excluding W when W is frozen — a frozen W is an exact copy of the
      LM's output embedding, so a deployment that ships the LM need not store it again. When
      W was trained it is the memory's own and is counted. Tensor sizes are read from the
      safetensors header (file header and config are not counted here).
    - ``output_bytes``: the bytes of W itself.
    """
    out_dir = Path(out_dir)
    cfg = read_memory_config(out_dir)
    sizes = _tensor_bytes(out_dir / MODEL_FILE)
    w = sizes.get(OUTPUT_WEIGHT, 0)
    params = sum(sizes.values())
    return {
        "memory_bytes": memory_bytes(out_dir),
        "memory_bytes_without_shared_W": params - (0 if cfg["train_output"] else w),
        "output_bytes": w,
    }


def storage_report(ds: Datastore | None, mem_storage: dict) -> dict:
    """Bytes on disk, measured from the files, and the datastore / memory ratio.

    The kNN side counts everything a kNN-LM deployment stores besides the LM: keys, values and
    the FAISS index when one was built (``index_bytes``, 0 for exact search). ``mem_storage``
    is :func:`memory_storage` of the memory; the ratio divides by its ``memory_bytes``.
    """
    out = dict(mem_storage)
    if ds is not None:
        out["datastore_bytes"] = ds.storage_bytes()
        index = ds.path / "index.faiss"  # index_common.INDEX_FILE (not imported: it loads FAISS)
        out["index_bytes"] = index.stat().st_size if index.is_file() else 0
        out["ratio_datastore_to_memory"] = (out["datastore_bytes"] + out["index_bytes"]) / max(
            out["memory_bytes"], 1
        )
    return out
