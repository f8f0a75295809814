"""``knnlm train``: train a GPT-2 preset from scratch, or fine-tune / LoRA-tune a model."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import DEVICE, QUIET, SEED, WAIT, LmPreset, Precision, quiet_libraries, value


def train_cmd(
    corpus: str = typer.Option(
        ...,
        "--corpus",
        "-c",
        help="Corpus spec: a directory with train/valid/test.txt, a text file, or "
        "hf:NAME[:CONFIG]. Only the train split is read.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Model directory to write (HF format, loadable by every other command). "
        "Rerunning with the same settings resumes from its last checkpoint.",
    ),
    preset: LmPreset = typer.Option(
        LmPreset.small,
        "--preset",
        help="Model size: tiny (tests), small (4x256, the CPU default) or paper (the "
        "16-layer WikiText-103 model, GPU). With --model it only sets batch size, "
        "context length and epochs.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Hub name or local path of a pretrained causal LM to fine-tune instead of "
        "training a preset from scratch (its tokenizer is kept).",
    ),
    lora: bool = typer.Option(
        False,
        "--lora",
        help="Fine-tune --model with LoRA (r=8, alpha=16, dropout 0.05 on embeddings, "
        "attention and MLP projections); the adapters are merged into the saved model.",
    ),
    drop_last_mlp: bool = typer.Option(
        False,
        "--drop-last-mlp",
        help="Remove the last block's MLP before training (the Appendix E 'hurdle' "
        "model); loading the saved model keeps it removed.",
    ),
    examples: bool = typer.Option(
        False,
        "--examples",
        help="Treat each non-empty line as one training example (padded, eos appended) "
        "instead of cutting the corpus into blocks of --context-len tokens.",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Passes over the data (default: the preset's)."
    ),
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        min=1,
        help="Stop after this many optimizer steps (overrides --epochs).",
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Peak learning rate (default: the preset's from scratch; 1e-5 fine-tuning, "
        "5e-5 with --lora).",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Sequences per step (default: the preset's)."
    ),
    context_len: int | None = typer.Option(
        None,
        "--context-len",
        min=2,
        help="Tokens per training sequence (default: the preset's).",
    ),
    grad_accum: int = typer.Option(
        1, "--grad-accum", min=1, help="Batches accumulated into one optimizer step."
    ),
    checkpoint_every: int = typer.Option(
        500,
        "--checkpoint-every",
        min=0,
        help="Save a resumable checkpoint every N steps (0: never).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace a model trained with other settings (once the new one is complete).",
    ),
    precision: Precision = typer.Option(
        Precision.float32,
        "--precision",
        help="Mixed precision of training: float32, or bfloat16 autocast (GPUs, and CPUs with bf16 support: ~1.5x faster).",
    ),
    seed: int = SEED,
    device: str | None = DEVICE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Train a language model and save it in Hugging Face format."""
    from knnlm.lm.train import train_lm
    from knnlm.lm.train_config import LM_TRAIN_FLAGS, LMTrainSettings
    from knnlm.settings import build

    settings = build(
        LMTrainSettings, LM_TRAIN_FLAGS, preset=value(preset), base_model=model, lora=lora,
        drop_last_mlp=drop_last_mlp, examples=examples, epochs=epochs, max_steps=max_steps,
        lr=lr, batch_size=batch_size, context_len=context_len, grad_accum=grad_accum,
        seed=seed, checkpoint_every=checkpoint_every or None, precision=value(precision),
    )  # fmt: skip
    quiet_libraries()
    result = train_lm(corpus, out, settings, device=device, quiet=quiet, overwrite=overwrite)
    if result.reused:
        typer.echo(f"{result.out_dir} already holds this run's model ({result.steps} steps)")
        return
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    typer.echo(
        f"trained {result.steps} steps ({result.epochs:.2f} epochs){resumed}: "
        f"final loss {loss}, {result.tokens_seen:,} tokens, "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.seconds:.1f}s"
    )
    typer.echo(f"model saved to {result.out_dir}")


COMMANDS = [("train", train_cmd)]
