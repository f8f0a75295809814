"""Checkpoints of an MLP-memory training: the settings a checkpoint must share to be resumed,
the furthest consistent checkpoint (the temporary ``<out>.partial`` or the finished memory), and
the optimiser state saved beside the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from knnlm.errors import KnnlmError
from knnlm.fileio import read_json, sha256_hex
from knnlm.retrieval.memory import (
    CURVE_FILE,
    MODEL_FILE,
    STATE_FILE,
    MemoryMLP,
    read_memory_config,
    safetensors_header,
)

# Settings that must agree for a run to resume from an existing checkpoint.
RESUME_KEYS = (
    "dim",
    "hidden",
    "vocab",
    "train_output",
    "lr",
    "weight_decay",
    "batch_tokens",
    "seed",
    "n_train",
    "output_init_sha256",
)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            out[f"{idx}.{name}"] = torch.as_tensor(t)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _checkpoint(
    folder: Path, settings: dict[str, Any], strict: bool
) -> tuple[int, dict[str, Any] | None]:
    """(step, curve) of a consistent checkpoint in ``folder`` with these settings, else (0, None).

    ``strict``: a checkpoint with other settings is an error (the finished memory the user
    named); otherwise it is ignored (an unfinished temporary of ours).
    """
    try:
        cfg = read_memory_config(folder)
    except KnnlmError:
        return 0, None
    if not (folder / STATE_FILE).is_file():
        return 0, None
    diff = [k for k in RESUME_KEYS if cfg.get(k) != settings[k]]
    if diff:
        if not strict:
            return 0, None
        raise KnnlmError(
            f"{folder} holds a memory model trained with other settings ({', '.join(diff)}); "
            "choose another output directory or pass --overwrite to replace it"
        )
    step = cfg.get("steps")
    curve = read_json(folder / CURVE_FILE)
    # The files are renamed one after another; resume only from a consistent set.
    try:
        marks = [
            safetensors_header(folder / f).get("__metadata__", {}).get("step")
            for f in (MODEL_FILE, STATE_FILE)
        ]
    except KnnlmError:
        return 0, None
    if (
        not isinstance(step, int)
        or curve is None
        or marks != [str(step)] * 2
        or len(curve.get("loss", ())) != step
        or curve.get("step") != step
    ):
        return 0, None
    return step, curve


def partial_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def restore(folder: Path, model: MemoryMLP, opt: torch.optim.Optimizer) -> None:
    model.load_state_dict(load_file(str(folder / MODEL_FILE)))
    _load_optimizer(opt, load_file(str(folder / STATE_FILE)))


def resume_settings(
    model: MemoryMLP,
    W: torch.Tensor,
    lr: float,
    weight_decay: float,
    batch_tokens: int,
    seed: int,
    n: int,
) -> dict[str, Any]:
    """The settings a checkpoint must share to be resumed (``RESUME_KEYS``)."""
    return {
        "dim": model.dim,
        "hidden": model.hidden,
        "vocab": model.vocab,
        "train_output": model.train_output,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_tokens": int(batch_tokens),
        "seed": int(seed),
        "n_train": n,
        "output_init_sha256": sha256_hex(W.detach().float().contiguous().cpu().numpy()),
    }


def resume_point(
    out_dir: Path, settings: dict[str, Any], total: int, resume: bool, overwrite: bool
) -> tuple[int, dict[str, Any] | None, Path | None]:
    """(step, curve, folder) of the checkpoint to continue from; (0, None, None): none.

    Training is a function of (settings, step): the furthest consistent checkpoint wins.
    """
    start, curve, source = 0, None, None
    partial_step, partial_curve = _checkpoint(partial_path(out_dir), settings, strict=False)
    if resume:
        out_step, out_curve = _checkpoint(out_dir, settings, strict=not overwrite)
        start, curve, source = max(
            (0, None, None),
            (out_step, out_curve, out_dir),
            (partial_step, partial_curve, partial_path(out_dir)),
            key=lambda c: c[0],
        )
    if start > total:
        raise KnnlmError(
            f"{out_dir} holds a memory model already trained for {start} steps, more than the "
            f"{total} requested; pass resume=False to train a new one"
        )
    return start, curve, source
