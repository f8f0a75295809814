"""What training leaves on disk, and how a run finds it again.

- a checkpoint (weights, optimizer, scheduler, RNG states, step) in ``checkpoint/``, written
  to a temporary and swapped in, so a crash never leaves half of one; a rerun with the same
  settings and data (:func:`run_key`) resumes from it;
- the final model (LoRA merged) and tokenizer in HF format, with ``loss_curve.json``;
- ``train_meta.json``, written last by :func:`knnlm.lm.train.train_lm`: it carries the artifact
  marker of the model folder and the run key, so a finished run of the same key is recognised
  (:func:`finished_run`) instead of being trained again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from knnlm.errors import KnnlmError
from knnlm.fileio import ARTIFACT_KEY, fsync_dir, fsync_tree, read_json, write_json_atomic
from knnlm.lm.lora import merge_lora
from knnlm.lm.train_config import TrainConfig, TrainResult
from knnlm.lm.train_data import make_dataset

CHECKPOINT_DIR = "checkpoint"
LOSS_CURVE = "loss_curve.json"
TRAIN_META = "train_meta.json"  # carries the artifact marker of a model folder train_lm wrote
MODEL_KIND = "trained_model"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path, model, tokenizer, optimizer, scheduler, state: dict[str, Any]
) -> None:
    """Written to a temporary dir, then swapped in, so a crash never leaves half a checkpoint."""
    from safetensors.torch import save_model

    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    old = out_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / "trainer.pt",
    )
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    write_json_atomic(tmp / "state.json", state)  # written last: marks it complete
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: Path) -> Path | None:
    """The last complete checkpoint under ``out_dir`` (if a swap was cut short, the old one)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        d = Path(out_dir) / name
        if (d / "state.json").is_file():
            return d
    return None


def checkpoint_key(ckpt: Path) -> dict | None:
    state = read_json(ckpt / "state.json")
    return state.get("resume_key") if state else None


def remove_checkpoints(out_dir: Path) -> None:
    """Delete the checkpoint folders (only the names this module creates)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".tmp"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, expect: dict) -> dict[str, Any]:
    from safetensors.torch import load_model

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("resume_key") != expect:
        raise KnnlmError(
            f"{ckpt} was written by a run with other settings or data; rerun with the same "
            "settings to resume, or delete that directory to start over"
        )
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise KnnlmError(
            f"{ckpt} does not match this model's architecture; delete it to start over"
        )
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return state


def save_final(model: nn.Module, tokenizer, out_dir: Path) -> nn.Module:
    """Save the plain HF model (LoRA merged) and tokenizer into ``out_dir`` atomically per file."""
    model = merge_lora(model)
    tmp = out_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for f in sorted(tmp.iterdir()):
        f.replace(out_dir / f.name)
    tmp.rmdir()
    return model


def run_key(data: np.ndarray | Sequence[str], tokenizer, config: TrainConfig) -> dict:
    """What identifies a training run: its settings and its data (as ``train`` resumes on)."""
    dataset = make_dataset(data, tokenizer, config.context_len)
    key = {"config": config.resume_key(), "data": dataset.fingerprint, "n_items": dataset.n_items}
    return json.loads(json.dumps(key, default=str))  # as it reads back from JSON


def finished_run(folder: Path, key: dict) -> TrainResult | None:
    """The result recorded by a finished ``train_lm`` run with this key in ``folder``."""
    meta = read_json(folder / TRAIN_META)
    if not meta or meta.get(ARTIFACT_KEY) != MODEL_KIND or meta.get("run_key") != key:
        return None
    r = meta.get("result") or {}
    curve = read_json(folder / LOSS_CURVE) or {}
    return TrainResult(
        out_dir=folder,
        steps=int(r.get("steps", 0)),
        total_steps=int(r.get("total_steps", 0)),
        epochs=float(r.get("epochs", 0.0)),
        final_loss=r.get("final_loss"),
        loss_curve=list(curve.get("loss_curve", [])),
        evals=list(curve.get("evals", [])),
        tokens_seen=int(r.get("tokens_seen", 0)),
        seconds=0.0,
        tokens_this_run=0,
        resumed_from=r.get("resumed_from"),
        reused=True,
    )
