"""Options and helpers shared by the CLI modules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from knnlm.errors import KnnlmError
from knnlm.fileio import write_json_atomic
from knnlm.locking import set_wait, writer_lock

QUIET = typer.Option(False, "--quiet", "-q", help="Silence progress bars.")
SEED = typer.Option(0, "--seed", help="Random seed.")
SEARCH = typer.Option(
    "auto",
    "--search",
    help="Neighbour search: exact (torch brute force on the model's device: exact neighbour "
    "sets), faiss (the datastore's FAISS index; IVF-PQ is approximate) or auto (faiss when "
    "the datastore has an index, else exact).",
)
DEVICE = typer.Option(None, "--device", help="torch device (default: cuda when present, else cpu).")
# Every command that writes an artifact takes it: one writer per artifact (knnlm.locking).
WAIT = typer.Option(
    False,
    "--wait",
    callback=set_wait,
    help="If another process is writing the same output, wait for it instead of stopping.",
)


def hold_lock(ctx: typer.Context, target: Path | None, what: str) -> None:
    """Hold the writer lock on ``target`` until the command ends. Taken before the model loads,
    so that of two commands started together the first is the one that writes."""
    if target is not None:
        ctx.with_resource(writer_lock(target, f"{what} {os.path.abspath(target)}"))


def output_file(value: Path | None) -> Path | None:
    """Option callback for --json / --png: refuse a folder before any work is done."""
    if value is not None and value.is_dir():
        raise KnnlmError(f"{value} is a folder; give a file name to write")
    return value


def quiet_libraries() -> None:
    """Keep transformers / huggingface_hub from printing their own bars and warnings (hub
    retries included), so that an error stays one line."""
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_json(path: Path | None, obj: Any) -> None:
    """Write a command's results JSON (atomically) when ``--json`` was given."""
    if path is not None:
        write_json_atomic(path, obj)


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))
