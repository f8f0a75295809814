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

The pieces live beside this module: the settings and result in :mod:`knnlm.lm.train_config`,
token blocks, examples and the batch order in :mod:`knnlm.lm.train_data`, LoRA in
:mod:`knnlm.lm.lora`, checkpoints, the final save and the finished-run check in
:mod:`knnlm.lm.checkpoint`; import their names from there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from knnlm.data.corpus import read_split, tokenize_text
from knnlm.errors import KnnlmError
from knnlm.fileio import ARTIFACT_KEY, claim_target, swap_in, temp_dir, write_json_atomic
from knnlm.lm.adapters import Adapter, position_limit
from knnlm.lm.checkpoint import (
    LOSS_CURVE,
    MODEL_KIND,
    TRAIN_META,
    checkpoint_key,
    find_checkpoint,
    finished_run,
    load_checkpoint,
    remove_checkpoints,
    run_key,
    save_checkpoint,
    save_final,
)
from knnlm.lm.loading import load_lm, pick_device
from knnlm.lm.lora import LORA_DEFAULTS, apply_lora, lora_targets
from knnlm.lm.presets import Preset, build_model_from_preset, get_preset
from knnlm.lm.train_config import LMTrainSettings, TrainConfig, TrainResult
from knnlm.lm.train_data import (
    StepPlan,
    make_dataset,
    train_tokenizer_for_corpus,
)
from knnlm.locking import locks

EvalFn = Callable[[int, nn.Module], dict]


# ---------------------------------------------------------------------------------------
# model construction helpers
# ---------------------------------------------------------------------------------------
def model_from_preset(
    preset: str, tokenizer, seed: int = 0, context_len: int | None = None
) -> nn.Module:
    """A randomly initialised GPT-2 of a named preset, sized to ``tokenizer``."""
    return build_model_from_preset(
        preset, len(tokenizer), tokenizer, seed=seed, context_len=context_len
    )


def model_from_pretrained(name_or_path: str, device: str | None = None):
    """(model, tokenizer) of a hub name or local dir, ready for training."""
    loaded = load_lm(name_or_path, device=device)
    model = loaded.model
    model.requires_grad_(True)
    model.train()
    return model, loaded.tokenizer


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
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    warmup = math.ceil(config.warmup_ratio * plan.total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, plan.total_steps)
    torch.manual_seed(config.seed)
    run = _Run(model, tokenizer, optimizer, scheduler, dataset, plan, config, out_dir)
    resumed_from = run.resume(own_folder)
    model.train()
    t0 = time.perf_counter()
    run.steps(on_eval, progress)
    seconds = time.perf_counter() - t0
    model.eval()
    with library_bars(progress):
        final = save_final(model, tokenizer, out_dir)
    state, curve = run.state, run.state["loss_curve"]
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
        tokens_seen=run.base_tokens + run.tokens_this_run,
        seconds=seconds,
        tokens_this_run=run.tokens_this_run,
        resumed_from=resumed_from,
        model=final,
    )


class _Run:
    """One training run's moving parts and its state (what a checkpoint saves)."""

    def __init__(self, model, tokenizer, optimizer, scheduler, dataset, plan, config, out_dir):
        self.model, self.tokenizer, self.dataset = model, tokenizer, dataset
        self.optimizer, self.scheduler = optimizer, scheduler
        self.plan, self.config, self.out_dir = plan, config, out_dir
        self.device = next(model.parameters()).device
        self.resume_key = {
            "config": config.resume_key(),
            "data": dataset.fingerprint,
            "n_items": dataset.n_items,
        }
        self.state: dict[str, Any] = {
            "step": 0,
            "tokens_seen": 0,
            "loss_curve": [],
            "evals": [],
            "resume_key": self.resume_key,
        }
        self.base_tokens = 0
        self.tokens_this_run = 0

    def resume(self, own_folder: bool) -> int | None:
        """Load the folder's checkpoint of this run, if any; the step it resumes from."""
        ckpt = find_checkpoint(self.out_dir)
        if ckpt is not None and own_folder and checkpoint_key(ckpt) != self.resume_key:
            remove_checkpoints(self.out_dir)  # our own temporary, left by other settings
            ckpt = None
        if ckpt is None:
            return None
        self.state = load_checkpoint(
            ckpt, self.model, self.optimizer, self.scheduler, self.resume_key
        )
        self.base_tokens = int(self.state["tokens_seen"])
        return self.state["step"]

    def steps(self, on_eval: EvalFn | None, progress: bool) -> None:
        """Every remaining optimizer step, with logging, evaluation and checkpoints."""
        plan, config, state = self.plan, self.config, self.state
        window: list[float] = []
        running = state["loss_curve"][-1]["loss"] if state["loss_curve"] else None
        bar = tqdm(total=plan.total_steps, initial=state["step"], desc="train", unit="step",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        try:
            for step, batches in plan.step_batches(state["step"]):
                value, lr = self.step(step, batches)
                done = step + 1
                window.append(value)
                running = value if running is None else 0.95 * running + 0.05 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.2e}", refresh=False)
                last = done == plan.total_steps
                if done % config.log_every == 0 or last:
                    state["loss_curve"].append(
                        {"step": done, "loss": sum(window) / len(window), "lr": lr}
                    )
                    window = []
                if (
                    on_eval is not None
                    and config.eval_every
                    and (done % config.eval_every == 0 or last)
                ):
                    evaluated = _run_eval(on_eval, done, self.model, self.device)
                    state["evals"].append({"step": done, **evaluated})
                state["step"] = done
                if config.checkpoint_every and done % config.checkpoint_every == 0 and not last:
                    snapshot = dict(state, tokens_seen=self.base_tokens + self.tokens_this_run)
                    save_checkpoint(self.out_dir, self.model, self.tokenizer, self.optimizer,
                                    self.scheduler, snapshot)  # fmt: skip
        finally:
            bar.close()

    def step(self, step: int, batches: list[np.ndarray]) -> tuple[float, float]:
        """One optimizer step over its forward batches: (mean loss, learning rate used)."""
        device, use_bf16 = self.device, self.config.precision == "bfloat16"
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for idx in batches:
            batch = {k: v.to(device) for k, v in self.dataset.collate(idx).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = self.model(**batch).loss
            (loss / len(batches)).backward()
            step_loss += loss.detach() / len(batches)
            self.tokens_this_run += int(batch["attention_mask"].sum())
        lr = self.scheduler.get_last_lr()[0]
        torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]],
            self.config.max_grad_norm,
        )
        self.optimizer.step()
        self.scheduler.step()
        value = float(step_loss)
        if not math.isfinite(value):
            raise KnnlmError(
                f"the training loss became {value} at step {step + 1}; lower the learning rate"
            )
        return value, lr


@contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars (e.g. while saving) unless progress is wanted."""
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
# the high-level entry point: a corpus in, a model folder out
# ---------------------------------------------------------------------------------------
@locks("out", "trained model")
def train_lm(
    corpus: str,
    out: str | Path,
    settings: LMTrainSettings = LMTrainSettings(),
    *,
    device: str | None = None,
    quiet: bool = False,
    on_eval: EvalFn | None = None,
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
    st = settings
    preset, base_model, lora, seed, context_len = (
        st.preset,
        st.base_model,
        st.lora,
        st.seed,
        st.context_len,
    )
    spec = get_preset(preset)
    out = Path(out)
    found = claim_target(out, MODEL_KIND, TRAIN_META, what="trained model")
    work = out.with_name(out.name + ".partial")
    text = read_split(corpus, "train")
    if base_model is not None:
        model, tokenizer, ctx = _pretrained(base_model, spec, context_len, device)
        # Fine-tuning defaults follow the paper: lr 1e-5 for full fine-tuning (Sec. 4.3),
        # the Trainer default 5e-5 with LoRA (App. C.1), warm-up 0.05, no weight decay.
        default_lr, weight_decay = (5e-5 if lora else 1e-5), 0.0
    else:
        model, tokenizer, ctx = _from_scratch(preset, corpus, text, work, seed, context_len, device)
        default_lr, weight_decay = spec.lr, spec.weight_decay
    if st.drop_last_mlp:
        Adapter(model).drop_last_mlp()
    if lora:
        model = apply_lora(model)
    data: np.ndarray | list[str]
    if st.examples:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        data = tokenize_text(tokenizer, text)
    config = TrainConfig(
        lr=st.lr if st.lr is not None else default_lr,
        batch_size=st.batch_size or spec.batch_size,
        epochs=st.epochs or spec.epochs,
        max_steps=st.max_steps,
        warmup_ratio=spec.warmup_ratio,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=st.data_seed,
        context_len=ctx,
        grad_accum=st.grad_accum,
        checkpoint_every=st.checkpoint_every,
        eval_every=st.eval_every,
        precision=st.precision,
    )
    n_params = sum(p.numel() for p in model.parameters())
    key = run_key(data, tokenizer, config)
    kept = _finished_before(out, work, key, found, overwrite)
    if kept is not None:
        return kept
    # Only a checkpoint is worth keeping; anything else there is a stale temporary of ours.
    resumable = work.is_dir() and find_checkpoint(work) is not None
    work = temp_dir(out, MODEL_KIND, TRAIN_META, fresh=not resumable)
    result = train(
        model, tokenizer, data, config, work, on_eval=on_eval, progress=not quiet, own_folder=True
    )
    result.out_dir = out
    meta = _train_meta(
        result, config, key, tokenizer, data, n_params, corpus=corpus, preset=preset,
        spec=spec, base_model=base_model, lora=lora, drop_last_mlp=st.drop_last_mlp,
        examples=st.examples,
    )  # fmt: skip
    # The marker goes in last; checkpoints are dropped only after it, then the swap.
    write_json_atomic(work / TRAIN_META, meta, default=str)
    remove_checkpoints(work)
    swap_in(work, out, MODEL_KIND, TRAIN_META)
    return result


def _train_meta(
    result: TrainResult,
    config: TrainConfig,
    key: dict,
    tokenizer,
    data: np.ndarray | list[str],
    n_params: int,
    *,
    corpus: str,
    preset: str,
    spec: Preset,
    base_model: str | None,
    lora: bool,
    drop_last_mlp: bool,
    examples: bool,
) -> dict:
    """train_meta.json: every setting of the run, its result and the artifact marker."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corpus": corpus,
        "preset": preset,
        "preset_settings": None if base_model else spec.to_json(),
        "base_model": base_model,
        "lora": dict(LORA_DEFAULTS, targets=lora_targets(result.model.config.model_type))
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


def _pretrained(base_model: str, spec: Preset, context_len: int | None, device: str | None):
    """(model, tokenizer, context length) to fine-tune ``base_model``."""
    model, tokenizer = model_from_pretrained(base_model, device)
    limit = position_limit(model)
    max_pos = limit[0] if limit else spec.context_len
    ctx = context_len or min(spec.context_len, int(max_pos))
    if ctx > int(max_pos):
        raise KnnlmError(f"context length {ctx} exceeds the model's {max_pos} positions")
    return model, tokenizer, ctx


def _from_scratch(
    preset: str,
    corpus: str,
    text: str,
    work: Path,
    seed: int,
    context_len: int | None,
    device: str | None,
):
    """(model, tokenizer, context length) of a fresh preset model; the tokenizer is trained on
    the corpus, or read back from the checkpoint a resumed run left in ``work``."""
    spec = get_preset(preset)
    ckpt = find_checkpoint(work) if work.is_dir() else None
    if ckpt is not None and (ckpt / "tokenizer").is_dir():
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
    max_pos = position_limit(model)[0]
    if ctx > int(max_pos):
        raise KnnlmError(f"context length {ctx} exceeds the model's {max_pos} positions")
    return model, tokenizer, ctx


def _finished_before(
    out: Path, work: Path, key: dict, found: str | None, overwrite: bool
) -> TrainResult | None:
    """The result of an identical run already finished at ``out`` (or finished in ``work``
    but not swapped in when a crash intervened); None when this run must train."""
    kept = finished_run(out, key) if found == "ours" else None
    if kept is not None and not overwrite:
        return kept
    if found == "ours" and kept is None and not overwrite:
        raise KnnlmError(
            f"{out} holds a model trained with other settings; pass --overwrite to replace it"
        )
    done = finished_run(work, key) if work.is_dir() else None
    if done is not None:  # a crash fell between marking it complete and the swap
        remove_checkpoints(work)
        swap_in(work, out, MODEL_KIND, TRAIN_META)
        return finished_run(out, key)
    return None
