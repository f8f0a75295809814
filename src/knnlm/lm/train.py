"""One training loop for every model the toolkit trains.

Training from scratch (a preset), fine-tuning a pretrained model, LoRA, Macondo fine-tuning
and the Appendix E "hurdle" runs all go through :func:`train`:

- AdamW, linear warm-up then linear decay, gradient clipping, optional gradient accumulation;
- data is either a token stream (cut into contiguous blocks of ``context_len``) or a list of
  example texts (one padded sequence each, eos appended);
- the batch order depends only on ``data_seed``, the epoch and the data (never on the model),
  so two models trained with the same ``data_seed`` see the same batches in the same order;
- checkpoints (weights, optimizer, scheduler, RNG states, step) every ``checkpoint_every``
  steps; a rerun with the same settings resumes from the last one and ends with the weights
  an uninterrupted run would have;
- the final model (LoRA merged) and tokenizer are saved in HF format, loadable with
  :func:`knnlm.lm.loading.load_lm`, together with ``loss_curve.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from knnlm.errors import KnnlmError
from knnlm.fileio import (
    ARTIFACT_KEY,
    claim_target,
    fsync_dir,
    fsync_tree,
    read_json,
    swap_in,
    temp_dir,
    write_json_atomic,
)
from knnlm.lm.adapters import Adapter

CHECKPOINT_DIR = "checkpoint"
LOSS_CURVE = "loss_curve.json"
TRAIN_META = "train_meta.json"  # carries the artifact marker of a model folder train_lm wrote
MODEL_KIND = "trained_model"
PRECISIONS = ("float32", "bfloat16")

# The paper's LoRA setup for Mistral (Appendix C.1): r=8, alpha=16, dropout 0.05 on the
# embeddings, the q/k/v/o projections and all MLP projections. GPT-2 fuses q/k/v into c_attn;
# c_proj names both the attention output and the MLP down projection.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc", "wte"],
    "llama": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
    ],
}
LORA_TARGETS["mistral"] = LORA_TARGETS["qwen2"] = LORA_TARGETS["llama"]
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}

EvalFn = Callable[[int, nn.Module], dict]


# ---------------------------------------------------------------------------------------
# configuration and result
# ---------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of one training run.

    ``max_steps`` (optimizer steps) overrides ``epochs`` when given. ``batch_size`` counts
    sequences per forward pass; ``grad_accum`` forward passes make one optimizer step.
    ``data_seed`` fixes the batch order (defaults to ``seed``, which fixes dropout).
    ``checkpoint_every`` / ``eval_every`` are in optimizer steps; 0 or None disables them.
    """

    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    data_seed: int | None = None
    context_len: int = 256
    grad_accum: int = 1
    checkpoint_every: int | None = 500
    eval_every: int | None = None
    log_every: int = 10
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.data_seed is None:
            self.data_seed = self.seed
        checks = [
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"max steps must be at least 1, got {self.max_steps}",
            ),
            (
                0 <= self.warmup_ratio < 1,
                f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm > 0, f"max grad norm must be positive, got {self.max_grad_norm}"),
            (self.context_len >= 2, f"context length must be at least 2, got {self.context_len}"),
            (self.grad_accum >= 1, f"gradient accumulation must be >= 1, got {self.grad_accum}"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
            (
                self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise KnnlmError(msg)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        d = asdict(self)
        for k in ("checkpoint_every", "eval_every", "log_every"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    total_steps: int
    epochs: float
    final_loss: float | None
    loss_curve: list[dict]
    evals: list[dict]
    tokens_seen: int
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    tokens_this_run: int
    resumed_from: int | None
    model: nn.Module | None = field(default=None, repr=False)
    reused: bool = False  # the finished model of an identical run was found and kept

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "steps": self.steps,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "final_loss": self.final_loss,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "resumed_from": self.resumed_from,
            "evals": self.evals,
        }


# ---------------------------------------------------------------------------------------
# data: token blocks or padded examples, and the batch order
# ---------------------------------------------------------------------------------------
def token_blocks(ids: np.ndarray, context_len: int) -> np.ndarray:
    """Contiguous, non-overlapping blocks of ``context_len`` tokens (the tail is dropped).

    A stream shorter than one block becomes a single shorter block.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise KnnlmError("a token stream must be a 1-d array of integer token ids")
    if ids.size < 2:
        raise KnnlmError("the token stream has fewer than two tokens: nothing to train on")
    n = ids.size // context_len
    if n == 0:
        return ids.astype(np.int64)[None, :]
    return ids[: n * context_len].astype(np.int64).reshape(n, context_len)


def batch_order(n_items: int, batch_size: int, epoch: int, data_seed: int) -> list[np.ndarray]:
    """Item indices of each batch of one epoch: a permutation seeded by (data_seed, epoch)."""
    rng = np.random.default_rng([data_seed, epoch])
    perm = rng.permutation(n_items)
    return [perm[i : i + batch_size] for i in range(0, n_items, batch_size)]


class _Blocks:
    """A token stream as fixed-length blocks; labels equal inputs (the model shifts them)."""

    def __init__(self, ids: np.ndarray, context_len: int):
        self.blocks = token_blocks(ids, context_len)
        self.n_items = len(self.blocks)
        self.fingerprint = _hash_bytes(self.blocks.tobytes())

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(self.blocks[idx])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


class _Examples:
    """One sequence per example text (eos appended), right-padded to the batch's longest."""

    def __init__(self, texts: Sequence[str], tokenizer, context_len: int):
        if not texts:
            raise KnnlmError("no training examples given")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise KnnlmError("the tokenizer has no eos token to end each example with")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        # Longer examples are cut at the context length (the model cannot see past it).
        self.seqs = [np.asarray(list(ids) + [eos], dtype=np.int64)[:context_len] for ids in enc]
        self.n_items = len(self.seqs)
        self.fingerprint = _hash_bytes(b"".join(s.tobytes() + b"|" for s in self.seqs))

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        seqs = [self.seqs[i] for i in idx]
        lengths = np.array([len(s) for s in seqs])
        width = int(lengths.max())
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full((len(seqs), width), self.pad, dtype=np.int64)
        ids[mask] = np.concatenate(seqs)
        x = torch.from_numpy(ids)
        m = torch.from_numpy(mask.astype(np.int64))
        return {"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100)}


def _hash_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def make_dataset(data: np.ndarray | Sequence[str], tokenizer, context_len: int):
    """Token stream (np.ndarray of ids) -> blocks; list of texts -> padded examples."""
    if isinstance(data, np.ndarray):
        return _Blocks(data, context_len)
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return _Examples(data, tokenizer, context_len)
    raise KnnlmError("training data must be a numpy array of token ids or a list of texts")


@dataclass(frozen=True)
class StepPlan:
    """Which forward batches make up each optimizer step."""

    n_items: int
    batch_size: int
    grad_accum: int
    data_seed: int
    total_steps: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_items / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    @classmethod
    def create(cls, n_items: int, config: TrainConfig) -> StepPlan:
        per_epoch = math.ceil(math.ceil(n_items / config.batch_size) / config.grad_accum)
        total = config.max_steps if config.max_steps else config.epochs * per_epoch
        return cls(n_items, config.batch_size, config.grad_accum, config.data_seed, total)

    def step_batches(self, start: int = 0) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(step, forward batches of that step) from ``start`` to the last step."""
        epoch, order = -1, []
        for step in range(start, self.total_steps):
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, batch_order(self.n_items, self.batch_size, e, self.data_seed)
            yield step, order[k * self.grad_accum : (k + 1) * self.grad_accum]


# ---------------------------------------------------------------------------------------
# model construction helpers
# ---------------------------------------------------------------------------------------
def model_from_preset(
    preset: str, tokenizer, seed: int = 0, context_len: int | None = None
) -> nn.Module:
    """A randomly initialised GPT-2 of a named preset, sized to ``tokenizer``."""
    from knnlm.lm.presets import build_model_from_preset

    return build_model_from_preset(
        preset, len(tokenizer), tokenizer, seed=seed, context_len=context_len
    )


def model_from_pretrained(name_or_path: str, device: str | None = None):
    """(model, tokenizer) of a hub name or local dir, ready for training."""
    from knnlm.lm.loading import load_lm

    loaded = load_lm(name_or_path, device=device)
    model = loaded.model
    model.requires_grad_(True)
    model.train()
    return model, loaded.tokenizer


def apply_lora(model: nn.Module, **overrides: Any) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (paper setup: r=8, alpha=16, dropout 0.05)."""
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise KnnlmError(
            f"no LoRA target modules known for {model_type!r}; supported: "
            + ", ".join(LORA_TARGETS)
        )
    # peft matches module names, so a removed last MLP simply contributes no targets.
    targets = list(LORA_TARGETS[model_type])
    settings = {**LORA_DEFAULTS, **overrides}
    config = LoraConfig(
        target_modules=targets,
        # GPT-2's Conv1D stores weights transposed.
        fan_in_fan_out=model_type == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
        **settings,
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights; a plain model is returned unchanged.

    With tied input/output embeddings, LoRA on the input embedding trains W + BA for the
    input while the output keeps W; merging into the shared tensor would change the output
    too, so the output embedding is untied and keeps W.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    base = model.get_base_model()
    out_emb = base.get_output_embeddings()
    in_emb = base.get_input_embeddings()
    keep = None
    if out_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr():
        keep = out_emb.weight.detach().clone()
    merged = model.merge_and_unload()
    if keep is not None:
        merged.get_output_embeddings().weight = nn.Parameter(keep)
        merged.config.tie_word_embeddings = False
    return merged


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
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


def _checkpoint_key(ckpt: Path) -> dict | None:
    state = read_json(ckpt / "state.json")
    return state.get("resume_key") if state else None


def remove_checkpoints(out_dir: Path) -> None:
    """Delete the checkpoint folders (only the names this module creates)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".tmp"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, expect: dict) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and other 1-d parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise KnnlmError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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


def train(
    model: nn.Module,
    tokenizer,
    data: np.ndarray | Sequence[str],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    on_eval: EvalFn | None = None,
    progress: bool = True,
    own_folder: bool = False,
) -> TrainResult:
    """Train ``model`` on ``data`` and save it (with ``tokenizer``) in HF format to ``out_dir``.

    ``data`` is a token stream (1-d int array) or a list of example texts. ``on_eval(step,
    model)`` runs every ``config.eval_every`` steps and after the last step, with the model in
    eval mode, gradients off and its own RNG stream (so evaluating never changes training);
    the dicts it returns are collected, with their step, in the result and ``loss_curve.json``.
    If ``out_dir`` holds a checkpoint of the same run, training resumes from it.

    ``own_folder``: ``out_dir`` is a temporary the caller swaps in afterwards (``train_lm``);
    a checkpoint of other settings there is discarded instead of refused, and checkpoints are
    left for the caller to remove once the finished folder is marked complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(data, tokenizer, config.context_len)
    plan = StepPlan.create(dataset.n_items, config)
    device = next(model.parameters()).device
    use_bf16 = config.precision == "bfloat16"

    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    warmup = math.ceil(config.warmup_ratio * plan.total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, plan.total_steps)
    torch.manual_seed(config.seed)

    resume_key = {
        "config": config.resume_key(),
        "data": dataset.fingerprint,
        "n_items": dataset.n_items,
    }
    state: dict[str, Any] = {
        "step": 0,
        "tokens_seen": 0,
        "loss_curve": [],
        "evals": [],
        "resume_key": resume_key,
    }
    resumed_from = None
    ckpt = find_checkpoint(out_dir)
    if ckpt is not None and own_folder and _checkpoint_key(ckpt) != resume_key:
        remove_checkpoints(out_dir)  # our own temporary, left by a run with other settings
        ckpt = None
    if ckpt is not None:
        state = _load_checkpoint(ckpt, model, optimizer, scheduler, resume_key)
        resumed_from = state["step"]

    model.train()
    start_step, base_tokens = state["step"], int(state["tokens_seen"])
    t0 = time.perf_counter()
    tokens_this_run = 0
    window: list[float] = []
    running = state["loss_curve"][-1]["loss"] if state["loss_curve"] else None
    bar = tqdm(
        total=plan.total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for step, batches in plan.step_batches(start_step):
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for idx in batches:
                batch = {k: v.to(device) for k, v in dataset.collate(idx).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model(**batch).loss
                (loss / len(batches)).backward()
                step_loss += loss.detach() / len(batches)
                tokens_this_run += int(batch["attention_mask"].sum())
            lr = scheduler.get_last_lr()[0]
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm
            )
            optimizer.step()
            scheduler.step()
            value = float(step_loss)
            if not math.isfinite(value):
                raise KnnlmError(
                    f"the training loss became {value} at step {step + 1}; lower the learning rate"
                )
            done = step + 1
            window.append(value)
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.2e}", refresh=False)

            if done % config.log_every == 0 or done == plan.total_steps:
                state["loss_curve"].append(
                    {"step": done, "loss": sum(window) / len(window), "lr": lr}
                )
                window = []
            if (
                on_eval is not None
                and config.eval_every
                and (done % config.eval_every == 0 or done == plan.total_steps)
            ):
                state["evals"].append({"step": done, **_run_eval(on_eval, done, model, device)})
            state["step"] = done
            if (
                config.checkpoint_every
                and done % config.checkpoint_every == 0
                and (done < plan.total_steps)
            ):
                snapshot = dict(state, tokens_seen=base_tokens + tokens_this_run)
                _save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, snapshot)
    finally:
        bar.close()

    tokens_seen = base_tokens + tokens_this_run
    seconds = time.perf_counter() - t0
    model.eval()
    with library_bars(progress):
        final = save_final(model, tokenizer, out_dir)
    curve = state["loss_curve"]
    write_json_atomic(out_dir / LOSS_CURVE, {"loss_curve": curve, "evals": state["evals"]})
    if not own_folder:
        remove_checkpoints(out_dir)
    return TrainResult(
        out_dir=out_dir,
        steps=state["step"],
        total_steps=plan.total_steps,
        epochs=state["step"] / plan.steps_per_epoch,
        final_loss=curve[-1]["loss"] if curve else None,
        loss_curve=curve,
        evals=state["evals"],
        tokens_seen=tokens_seen,
        seconds=seconds,
        tokens_this_run=tokens_this_run,
        resumed_from=resumed_from,
        model=final,
    )


@contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars (e.g. while saving) unless progress is wanted."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _run_eval(on_eval: EvalFn, step: int, model: nn.Module, device: torch.device) -> dict:
    devices = [device.index or 0] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = on_eval(step, model)
    finally:
        model.train()
    if not isinstance(out, dict):
        raise KnnlmError(f"the eval callback must return a dict, got {type(out).__name__}")
    return out


# ---------------------------------------------------------------------------------------
# tokenizer and the high-level entry point
# ---------------------------------------------------------------------------------------
def train_tokenizer_for_corpus(
    corpus_spec: str, vocab_size: int, min_frequency: int = 2, *, text: str | None = None
):
    """A byte-level BPE tokenizer trained on the corpus's train split (or on ``text``)."""
    from knnlm.data.corpus import read_split
    from knnlm.lm.tokenizer import train_bpe_tokenizer

    if vocab_size < 257:
        raise KnnlmError(
            f"a byte-level BPE vocabulary needs at least 257 entries, got {vocab_size}"
        )
    if text is None:
        text = read_split(corpus_spec, "train")
    return train_bpe_tokenizer(text.splitlines(keepends=True), vocab_size, min_frequency)


def train_lm(
    corpus: str,
    out: str | Path,
    preset: str = "small",
    base_model: str | None = None,
    lora: bool = False,
    drop_last_mlp: bool = False,
    epochs: int | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int | None = None,
    context_len: int | None = None,
    quiet: bool = False,
    *,
    data_seed: int | None = None,
    examples: bool = False,
    device: str | None = None,
    checkpoint_every: int | None = 500,
    eval_every: int | None = None,
    on_eval: EvalFn | None = None,
    precision: str = "float32",
    grad_accum: int = 1,
    overwrite: bool = False,
) -> TrainResult:
    """Train a causal LM on the train split of ``corpus`` and save it to ``out``.

    From scratch (``preset``, with a BPE tokenizer trained on the corpus) or fine-tuning
    ``base_model`` (optionally with LoRA; the preset then only supplies batch size, context and
    epochs). ``examples=True`` treats each non-empty line as one example instead of cutting
    one token stream into blocks. Writes ``train_meta.json`` with every setting.

    Training runs in ``<out>.partial`` (checkpoints included) and the finished folder is
    swapped in as ``out``. A folder that is not a model this function wrote is refused before
    any work; a finished model of the identical run is kept and returned (``reused``); one of
    other settings is replaced, once the new one is complete, only with ``overwrite``.
    """
    from knnlm.data.corpus import read_split, tokenize_text
    from knnlm.lm.loading import pick_device
    from knnlm.lm.presets import get_preset

    spec = get_preset(preset)
    out = Path(out)
    if lora and base_model is None:
        raise KnnlmError("LoRA fine-tunes a pretrained model: give --model as well")
    found = claim_target(out, MODEL_KIND, TRAIN_META, what="trained model")
    work = out.with_name(out.name + ".partial")
    text = read_split(corpus, "train")

    if base_model is not None:
        model, tokenizer = model_from_pretrained(base_model, device)
        # Fine-tuning defaults follow the paper: lr 1e-5 for full fine-tuning (Sec. 4.3),
        # the Trainer default 5e-5 with LoRA (App. C.1), warm-up 0.05, no weight decay.
        default_lr, weight_decay = (5e-5 if lora else 1e-5), 0.0
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", spec.context_len
        )
        ctx = context_len or min(spec.context_len, int(max_pos))
    else:
        ckpt = find_checkpoint(work) if work.is_dir() else None
        if ckpt is not None and (ckpt / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
            # Loading adds these to the saved config; drop them so a resumed run saves the
            # same tokenizer files as an uninterrupted one.
            for k in ("is_local", "local_files_only"):
                tokenizer.init_kwargs.pop(k, None)
        else:
            tokenizer = train_tokenizer_for_corpus(corpus, spec.tokenizer_vocab_size, text=text)
        ctx = context_len or spec.context_len
        model = model_from_preset(preset, tokenizer, seed=seed, context_len=ctx)
        model.to(pick_device(device))
        default_lr, weight_decay = spec.lr, spec.weight_decay
        max_pos = model.config.n_positions
    if ctx > int(max_pos):
        raise KnnlmError(f"context length {ctx} exceeds the model's {max_pos} positions")
    if drop_last_mlp:
        Adapter(model).drop_last_mlp()
    if lora:
        model = apply_lora(model)

    data: np.ndarray | list[str]
    if examples:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        data = tokenize_text(tokenizer, text)
    config = TrainConfig(
        lr=lr if lr is not None else default_lr,
        batch_size=batch_size or spec.batch_size,
        epochs=epochs or spec.epochs,
        max_steps=max_steps,
        warmup_ratio=spec.warmup_ratio,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=data_seed,
        context_len=ctx,
        grad_accum=grad_accum,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        precision=precision,
    )
    n_params = sum(p.numel() for p in model.parameters())
    key = run_key(data, tokenizer, config)
    kept = _finished(out, key) if found == "ours" else None
    if kept is not None and not overwrite:
        return kept
    if found == "ours" and kept is None and not overwrite:
        raise KnnlmError(
            f"{out} holds a model trained with other settings; pass --overwrite to replace it"
        )
    done = _finished(work, key) if work.is_dir() else None
    if done is not None:  # a crash fell between marking it complete and the swap
        remove_checkpoints(work)
        swap_in(work, out, MODEL_KIND, TRAIN_META)
        return _finished(out, key)
    # Only a checkpoint is worth keeping; anything else there is a stale temporary of ours.
    resumable = work.is_dir() and find_checkpoint(work) is not None
    work = temp_dir(out, MODEL_KIND, TRAIN_META, fresh=not resumable)
    result = train(
        model, tokenizer, data, config, work, on_eval=on_eval, progress=not quiet, own_folder=True
    )
    result.out_dir = out

    import transformers

    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corpus": corpus,
        "preset": preset,
        "preset_settings": None if base_model else spec.to_json(),
        "base_model": base_model,
        "lora": dict(LORA_DEFAULTS, targets=LORA_TARGETS.get(result.model.config.model_type))
        if lora
        else None,
        "drop_last_mlp": drop_last_mlp,
        "data_form": "examples" if examples else "token_stream",
        "n_train_items": len(data),
        "train_config": asdict(config),
        "vocab_size": len(tokenizer),
        "n_parameters_trained_model": n_params,
        "n_parameters_saved_model": sum(p.numel() for p in result.model.parameters()),
        "result": result.to_json(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "run_key": key,
        ARTIFACT_KEY: MODEL_KIND,
    }
    # The marker goes in last; checkpoints are dropped only after it, then the swap.
    write_json_atomic(work / TRAIN_META, meta, default=str)
    remove_checkpoints(work)
    swap_in(work, out, MODEL_KIND, TRAIN_META)
    return result


def run_key(data: np.ndarray | Sequence[str], tokenizer, config: TrainConfig) -> dict:
    """What identifies a training run: its settings and its data (as ``train`` resumes on)."""
    dataset = make_dataset(data, tokenizer, config.context_len)
    key = {"config": config.resume_key(), "data": dataset.fingerprint, "n_items": dataset.n_items}
    return json.loads(json.dumps(key, default=str))  # as it reads back from JSON


def _finished(folder: Path, key: dict) -> TrainResult | None:
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
