"""Training the MLP that replaces kNN retrieval (paper Section 5, Appendix D).

The model itself (``MemoryMLP``, loading, storage) is in ``knnlm.retrieval.memory``. The
datastore's key-value pairs (key z = a context representation, value = the next token)
train a small model

    logits = W (z + LN(MLP(z)))

where MLP is one hidden layer (d -> hidden -> d, GELU; the paper uses hidden = 4096, "the same
as the last MLP layer of the vanilla LM"), LN a LayerNorm(d), and W (V x d) starts as a copy of
the LM's output embedding (``Adapter.output_embedding``, i.e. ``lm_head.weight``). The LM
combines it with its own distribution exactly like the kNN component (log-space mix with a
weight on the memory); that interpolation lives in ``knnlm.retrieval.combiner``.

Choices the paper leaves open, made here:

- W is frozen by default (``train_output=False``): the cheaper reading of "W from the LM", and
  the one under which a deployment need not store W at all (it already ships with the LM).
  ``train_output=True`` trains it too.
- A bias of the LM's ``lm_head`` (some models have one) is ignored: the formula has none.
- GELU is the exact (erf) form; LayerNorm has eps = 1e-5 and elementwise affine parameters.
- Optimiser: AdamW (with the default ``weight_decay=0`` it is Adam), constant learning rate
  1e-5, batches of 3 x 3072 = 9216 keys (the LM's tokens per batch), cross-entropy.

Training streams the keys from the datastore's memmap: each epoch walks a seeded permutation
of row indices, and each batch gathers only its own rows (sorted, for locality) and converts
them to float32, in a thread while the batch before trains. The whole key matrix is never
loaded at once. The batch order depends only on (seed, epoch), so a run resumes exactly at the
step where its last checkpoint stopped. The data and its batches are in ``batches.py``, the
checkpoints and what a resume must share in ``checkpoint.py``; this module runs the steps.

Saved files (``out_dir``): ``model.safetensors`` and ``config.json`` are the memory model;
``train_state.safetensors`` (optimiser state, for resuming) and ``loss_curve.json`` are
training artefacts and do not count towards its storage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from knnlm.experiments.mlp_memory.batches import check_inputs, train_batches
from knnlm.experiments.mlp_memory.checkpoint import (
    optimizer_tensors,
    partial_path,
    restore,
    resume_point,
    resume_settings,
)
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.fileio import (
    ARTIFACT_KEY,
    claim_target,
    swap_in,
    temp_dir,
    write_json_atomic,
)
from knnlm.lm.loading import pick_device
from knnlm.locking import locks
from knnlm.prefetch import prefetch
from knnlm.retrieval.memory import (
    CONFIG_FILE,
    CURVE_FILE,
    FORMAT_VERSION,
    KIND,
    MODEL_FILE,
    STATE_FILE,
    MemoryMLP,
    read_memory_config,
    write_safetensors_atomic,
)


@dataclass
class MemoryTrainResult:
    out_dir: Path
    model: MemoryMLP
    steps: int  # optimiser steps taken in total (including those of a resumed run)
    n_train: int
    losses: list[float]  # mean cross-entropy of each step
    final_loss: float  # mean loss of the last min(steps per epoch, 100) steps
    seconds: float  # wall time of this call
    resumed_from: int = 0  # step the run continued from (0: fresh)
    config: dict[str, Any] = field(default_factory=dict)


@locks("out_dir", "memory model")
def train_memory(
    keys: Any,
    values: Any,
    W: torch.Tensor,
    out_dir: str | Path,
    settings: MemoryTrainSettings = MemoryTrainSettings(),
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    datastore: dict[str, Any] | None = None,
    eval_fn: Callable[[MemoryMLP], dict[str, Any]] | None = None,
) -> MemoryTrainResult:
    """Train the memory MLP on datastore keys -> values and save it in ``out_dir``.

    ``keys`` (N, d) float16/float32 and ``values`` (N,) integer arrays are typically
    ``np.load(path, mmap_mode="r")`` memmaps; any array that supports ``a[index_array]``
    works. Only the current batch of rows and at most two gathered ahead are in memory.
    ``W`` (V x d) is the LM's output embedding (copied; a bias of the LM head is ignored).
    ``settings`` (:class:`MemoryTrainSettings`): ``batch_tokens`` defaults to the paper's
    3 x 3072; ``micro_batch`` splits each batch to save memory (same gradient). Training runs
    ``epochs`` passes, or stops after ``max_steps`` optimiser steps in total.

    Checkpoints (model, optimiser state, loss curve, config) go to ``<out_dir>.partial`` at
    the end of every epoch; when training is complete that folder is swapped in as
    ``out_dir``. With ``resume=True`` a matching checkpoint (the temporary one, or the memory
    already at ``out_dir``) is continued from its step (a finished one is returned as is); a
    memory with other settings is an error unless ``overwrite`` (or ``resume=False``), and
    then replaced only once the new one is complete. A folder that is not a memory model is
    refused before any work. ``datastore`` (e.g. path and fingerprint) goes to config.json.
    ``eval_fn(model)`` runs (under no_grad) at every checkpoint; its dicts go to
    loss_curve.json under "evals".
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    claim_target(out_dir, KIND, CONFIG_FILE, what="memory model")
    check_inputs(keys, values, W)
    st = settings
    batch_tokens, epochs, max_steps, lr, seed = (
        st.batch_tokens,
        st.epochs,
        st.max_steps,
        st.lr,
        st.seed,
    )
    dev = pick_device(device)
    n = int(values.shape[0])
    per_epoch = math.ceil(n / batch_tokens)
    total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
    model = _new_model(W, st.hidden, st.train_output, seed).to(dev)
    resume_key = resume_settings(model, W, lr, st.weight_decay, batch_tokens, seed, n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=st.weight_decay)
    start, curve, source = resume_point(out_dir, resume_key, total, resume, overwrite)
    if source == out_dir and start == total:  # finished: returned as is
        return _finished(out_dir, model, start, curve["loss"], per_epoch, n, t0)
    # A temporary that is not the checkpoint we continue from is stale: start it afresh.
    partial = temp_dir(out_dir, KIND, CONFIG_FILE, fresh=source != partial_path(out_dir))
    run = _Training(
        keys=keys,
        values=values,
        model=model,
        opt=opt,
        device=dev,
        settings=resume_key,
        out_dir=out_dir,
        partial=partial,
        batch_tokens=batch_tokens,
        micro=st.micro_batch or batch_tokens,
        per_epoch=per_epoch,
        total=total,
        whole=st,
        datastore=datastore,
        eval_fn=eval_fn,
        losses=list(curve["loss"]) if curve else [],
        evals=list(curve.get("evals", [])) if curve else [],
    )
    if source is not None:
        restore(source, model, opt)
    step, cfg = _train_steps(run, start, progress)
    return _trained(run, start, step, cfg, t0)


def _trained(
    run: _Training, start: int, step: int, cfg: dict[str, Any], t0: float
) -> MemoryTrainResult:
    """The result of a call that trained steps ``start..step-1``."""
    run.model.eval()
    tail = run.losses[-min(run.per_epoch, 100) :]
    return MemoryTrainResult(
        out_dir=run.out_dir,
        model=run.model,
        steps=step,
        n_train=run.settings["n_train"],
        losses=list(run.losses),
        final_loss=float(np.mean(tail)) if tail else float("nan"),
        seconds=time.perf_counter() - t0,
        resumed_from=start,
        config=cfg,
    )


def _finished(
    out_dir: Path,
    model: MemoryMLP,
    steps: int,
    losses: list[float],
    per_epoch: int,
    n: int,
    t0: float,
) -> MemoryTrainResult:
    """The complete memory at ``out_dir`` (trained for ``steps``), loaded into ``model``."""
    model.load_state_dict(load_file(str(out_dir / MODEL_FILE)))
    return MemoryTrainResult(
        out_dir=out_dir,
        model=model.eval(),
        steps=steps,
        n_train=n,
        losses=list(losses),
        final_loss=float(np.mean(losses[-min(per_epoch, 100) :])),
        seconds=time.perf_counter() - t0,
        resumed_from=steps,
        config=read_memory_config(out_dir),
    )


def _new_model(W: torch.Tensor, hidden: int, train_output: bool, seed: int) -> MemoryMLP:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        return MemoryMLP.from_output_embedding(W, hidden, train_output)


@dataclass
class _Training:
    """One training call: what its steps read, and the curve they grow."""

    keys: Any
    values: Any
    model: MemoryMLP
    opt: torch.optim.Optimizer
    device: torch.device
    settings: dict[str, Any]
    out_dir: Path
    partial: Path  # the checkpoint folder, swapped in as out_dir when complete
    batch_tokens: int
    micro: int
    per_epoch: int
    total: int
    whole: MemoryTrainSettings  # this call's settings, as given
    datastore: dict[str, Any] | None
    eval_fn: Callable[[MemoryMLP], dict[str, Any]] | None
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    # losses still on the device, fetched in groups (no sync per step)
    pending: list[torch.Tensor] = field(default_factory=list)


def _train_steps(run: _Training, start: int, progress: bool) -> tuple[int, dict[str, Any]]:
    """Steps ``start..total-1``, a checkpoint at each epoch's end and at the last step;
    (last step, its config)."""
    run.model.train()
    bar = tqdm(total=run.total, initial=start, desc="memory MLP", unit="step", disable=not progress)
    cfg: dict[str, Any] | None = None
    step = start
    batches = train_batches(
        run.keys, run.values, run.batch_tokens, run.settings["seed"], start, run.total
    )
    for zb, yb in prefetch(batches, depth=1):
        run.pending.append(_train_batch(run, zb, yb))
        step += 1
        bar.update(1)
        if len(run.pending) >= 50:
            _flush(run, bar)
        if step % run.per_epoch == 0 or step == run.total:
            _flush(run, bar)
            if run.eval_fn is not None:
                run.model.eval()
                with torch.no_grad():
                    run.evals.append({"step": step, **run.eval_fn(run.model)})
                run.model.train()
            cfg = _save(run, step, complete=step == run.total)
    bar.close()
    if cfg is None:  # nothing left to train: the checkpoint already had every step
        cfg = _save(run, step, complete=True)
    return step, cfg


def _train_batch(run: _Training, zb: np.ndarray, yb: np.ndarray) -> torch.Tensor:
    """One optimiser step on a batch (in micro-batches, same gradient); its mean loss."""
    z = torch.from_numpy(zb).to(run.device, non_blocking=True)
    y = torch.from_numpy(yb).to(run.device, non_blocking=True)
    run.opt.zero_grad(set_to_none=True)
    batch_loss = torch.zeros((), device=run.device)
    for s in range(0, len(y), run.micro):
        logits = run.model(z[s : s + run.micro])
        loss = nn.functional.cross_entropy(logits, y[s : s + run.micro], reduction="sum") / len(y)
        loss.backward()
        batch_loss += loss.detach()
    run.opt.step()
    return batch_loss


def _flush(run: _Training, bar: tqdm) -> None:
    if run.pending:
        run.losses.extend(torch.stack(run.pending).tolist())
        run.pending.clear()
        bar.set_postfix(loss=f"{np.mean(run.losses[-50:]):.4f}")


def _save(run: _Training, step: int, complete: bool) -> dict[str, Any]:
    """Checkpoint ``step`` into the partial folder (swapped in when ``complete``); its config."""
    meta = {"step": str(step)}
    write_safetensors_atomic(run.partial / MODEL_FILE, run.model.state_dict(), meta)
    write_safetensors_atomic(run.partial / STATE_FILE, optimizer_tensors(run.opt), meta)
    curve = {"step": step, "batch_tokens": run.batch_tokens, "n_train": run.settings["n_train"]}
    # The training record holds this call's settings whole (config.json's bytes are the
    # memory's storage figure, so its flat keys stay as they are).
    curve.update(loss=run.losses, evals=run.evals, settings={"memory": run.whole.to_dict()})
    write_json_atomic(run.partial / CURVE_FILE, curve, default=str)
    cfg = {
        ARTIFACT_KEY: KIND,
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        **run.settings,
        "activation": "gelu",
        "ln_eps": run.model.ln.eps,
        "epochs": int(run.whole.epochs),
        "max_steps": run.whole.max_steps,
        "steps": step,
        "total_steps": run.total,
        "steps_per_epoch": run.per_epoch,
        "complete": complete,
        "keys_dtype": str(run.keys.dtype),
        "datastore": run.datastore,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # Written last: it marks the set consistent (and, with complete, finished).
    write_json_atomic(run.partial / CONFIG_FILE, cfg, default=str)
    if complete:
        swap_in(run.partial, run.out_dir, KIND, CONFIG_FILE)
    return cfg


# A held-out loss that moves by less than this between checks has stopped improving.
MIN_IMPROVEMENT = 1e-4


def stopped_improving(losses: list[float], min_improvement: float = MIN_IMPROVEMENT) -> bool:
    """Whether the last held-out check failed to improve on the one before by at least
    ``min_improvement`` (nats): training until the held-out loss stops improving."""
    return len(losses) > 1 and not losses[-1] < losses[-2] - min_improvement
