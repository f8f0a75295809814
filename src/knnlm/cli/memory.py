"""``knnlm memory train``: the MLP that replaces kNN retrieval (paper Section 5, Appendix D).

Evaluation of a trained memory is ``knnlm eval --memory DIR``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DEVICE,
    DTYPE,
    QUIET,
    SEED,
    WAIT,
    Dtype,
    hold_lock,
    load_model,
    write_json,
)


def memory_train(
    ctx: typer.Context,
    model: str = typer.Option(
        ..., "--model", "-m", help="HF hub name or local directory of the LM the datastore used."
    ),
    datastore: Path = typer.Option(
        ..., "--datastore", "-d", help="Datastore directory (from knnlm datastore build)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Memory directory to write (model.safetensors, config.json); a rerun with the "
        "same settings resumes from its last checkpoint.",
    ),
    hidden: int = typer.Option(
        4096, "--hidden", min=1, help="Hidden size of the MLP (paper: 4096, the LM's own FFN)."
    ),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Passes over the datastore."),
    lr: float = typer.Option(1e-5, "--lr", help="Constant learning rate (AdamW)."),
    batch_tokens: int = typer.Option(
        9216, "--batch-tokens", min=1, help="Keys per step (paper: 3 x 3072 = 9216)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop after this many optimizer steps in total."
    ),
    micro_batch: int | None = typer.Option(
        None,
        "--micro-batch",
        min=1,
        help="Split each batch into pieces of this many keys to save memory (same gradient).",
    ),
    train_output: bool = typer.Option(
        False,
        "--train-output/--freeze-output",
        help="Also train W (initialised from the LM's output embedding); frozen by default, so "
        "a deployment need not store it twice.",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace a memory trained with other settings (once the new one is complete).",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the summary JSON here."),
    seed: int = SEED,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Train the memory MLP logits = W (z + LN(MLP(z))) on a datastore's keys -> next tokens."""
    from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
    from knnlm.experiments.mlp_memory.train import train_memory
    from knnlm.fileio import claim_target
    from knnlm.retrieval.datastore import datastore_record, open_datastore
    from knnlm.retrieval.memory import CONFIG_FILE, KIND, memory_storage, storage_report
    from knnlm.settings import build, flag

    settings = build(
        MemoryTrainSettings, flag(), hidden=hidden, lr=lr, batch_tokens=batch_tokens,
        epochs=epochs, max_steps=max_steps, seed=seed, train_output=train_output,
        micro_batch=micro_batch,
    )  # fmt: skip
    hold_lock(ctx, out, "memory model")
    claim_target(out, KIND, CONFIG_FILE, what="memory model")  # before loading anything
    ds = open_datastore(datastore)
    lm = load_model(model, device, dtype).lm
    ds.check_compatible(lm)
    record = datastore_record(ds)
    result = train_memory(
        ds.keys, ds.values, lm.adapter.output_embedding.detach(), out, settings, device=device,
        progress=not quiet, overwrite=overwrite, datastore=record,
    )  # fmt: skip
    storage = storage_report(ds, memory_storage(out))
    summary = {
        "out": str(out),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "n_train": result.n_train,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
        "storage": storage,
        "datastore": record,
    }
    write_json(json_out, summary)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    typer.echo(
        f"trained {result.steps} steps on {result.n_train:,} keys{resumed}: "
        f"final loss {result.final_loss:.4f}, {result.seconds:.1f}s"
    )
    typer.echo(
        f"memory {storage['memory_bytes']:,} bytes "
        f"({storage['memory_bytes_without_shared_W']:,} without the LM's W); "
        f"datastore keys+values+index {storage['datastore_bytes'] + storage['index_bytes']:,} "
        f"bytes ({storage['ratio_datastore_to_memory']:.2f}x the memory)"
    )
    if record["key_type"] != "ffn_input":
        typer.echo(
            f"note: trained on {record['key_type']} keys; evaluate with knnlm eval --memory "
            f"{out} --datastore {datastore} so the same key type is used"
        )
    typer.echo(f"memory saved to {out}")


COMMANDS = [("memory train", memory_train)]
