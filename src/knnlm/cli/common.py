"""Options and helpers shared by the CLI modules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

QUIET = typer.Option(False, "--quiet", "-q", help="Silence progress bars.")
SEED = typer.Option(0, "--seed", help="Random seed.")
DEVICE = typer.Option(None, "--device", help="torch device (default: cuda when present, else cpu).")


def quiet_libraries() -> None:
    """Keep transformers/datasets from printing their own bars and warnings."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_json(path: Path | None, obj: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))
