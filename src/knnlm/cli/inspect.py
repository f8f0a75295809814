"""CLI: inspect, a local page (or a static HTML file) showing what the kNN-LM retrieved."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DATASTORE,
    DEVICE,
    DTYPE,
    GATE,
    KNN_TEMPERATURE,
    KNN_WEIGHT,
    MODEL,
    NPROBE,
    QUIET,
    SEARCH,
    Dtype,
    Search,
    load_model,
    value,
)
from knnlm.errors import KnnlmError

MAX_K = 4096  # neighbours kept per token of a text (memory: tokens x k_max)


def inspect_cmd(
    model: str = MODEL,
    datastore: Path = DATASTORE,
    k_max: int = typer.Option(
        256, "--k-max", help="Neighbours retrieved once per text; the page's k goes up to it."
    ),
    k: int = typer.Option(16, "--k", "-k", help="The page's starting k (at most --k-max)."),
    knn_weight: float = KNN_WEIGHT,
    knn_temp: float = KNN_TEMPERATURE,
    gate: Path | None = GATE,
    retrieval_rate: float = typer.Option(
        1.0, "--retrieval-rate", help="The gate's starting retrieval rate (with --gate)."
    ),
    memory: Path | None = typer.Option(None, "--memory", help="MLP memory directory (Section 5)."),
    memory_weight: float = typer.Option(0.25, "--memory-weight", help="Weight on the MLP memory."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on (other than loopback: anyone who can "
        "reach it can use the model).",
    ),  # fmt: skip
    port: int = typer.Option(0, "--port", help="Port to listen on (0: a free one)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest text the page takes."),
    max_pending: int = typer.Option(
        16, "--max-pending", help="Requests served or queued at once (at least 8); more get 429."
    ),
    text: Path | None = typer.Option(
        None, "--text", help="With --html: the text file to show on a static page."
    ),
    html: Path | None = typer.Option(
        None, "--html", help="Write a self-contained static page for --text here (no server)."
    ),
    search: Search = SEARCH,
    nprobe: int | None = NPROBE,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
) -> None:
    """Show what the kNN-LM retrieved for each token of a text: a local page (printed URL),
    or with --text and --html a static page written to a file."""
    from knnlm.inspect.view import ViewSettings

    settings = ViewSettings(k, knn_weight, knn_temp, retrieval_rate, memory_weight)
    pre_checks(settings, k_max, max_tokens, max_pending, port, text, html)
    if retrieval_rate != 1.0 and gate is None:
        raise KnnlmError("--retrieval-rate needs --gate (the gate decides which tokens)")
    if html is None:
        need_server_extra()
    passage = read_text(text) if text is not None else None
    insp = open_inspector(model, datastore, k_max, search, nprobe, gate, memory, max_tokens,
                          device, dtype)  # fmt: skip
    insp.check(settings)
    if html is not None:
        from knnlm.inspect.static import write_static

        write_static(insp, [(text.name, passage)], settings, html)
        typer.echo(f"wrote {html}")
        return
    run_server(insp, settings, host, port, max_pending)


def pre_checks(settings, k_max, max_tokens, max_pending, port, text, html) -> None:
    """What needs no model: bounds of the numbers, and --text / --html given together."""
    if not 1 <= k_max <= MAX_K:
        raise KnnlmError(f"--k-max must be in [1, {MAX_K}], got {k_max}")
    if not 1 <= settings.k <= k_max:
        raise KnnlmError(f"--k must be in [1, --k-max {k_max}], got {settings.k}")
    if not 0.0 <= settings.knn_weight <= 1.0:
        raise KnnlmError(f"--knn-weight must be in [0, 1], got {settings.knn_weight}")
    if settings.temperature <= 0:
        raise KnnlmError(f"--knn-temperature must be positive, got {settings.temperature}")
    if not 0.0 <= settings.memory_weight <= 1.0:
        raise KnnlmError(f"--memory-weight must be in [0, 1], got {settings.memory_weight}")
    if not 0.0 <= settings.retrieval_rate <= 1.0:
        raise KnnlmError(f"--retrieval-rate must be in [0, 1], got {settings.retrieval_rate}")
    if not 2 <= max_tokens <= 4096:
        raise KnnlmError(f"--max-tokens must be in [2, 4096], got {max_tokens}")
    if max_pending < 8:
        raise KnnlmError(f"--max-pending must be at least 8, got {max_pending}")
    if not 0 <= port <= 65535:
        raise KnnlmError(f"--port must be in [0, 65535], got {port}")
    if (text is None) != (html is None):
        raise KnnlmError("--text and --html go together (a static page of that text)")
    if html is not None and html.is_dir():
        raise KnnlmError(f"--html {html} is a folder; give a file name to write")


def need_server_extra() -> None:
    """The page's server needs the ``inspect`` extra (the static page does not)."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn")):
        raise KnnlmError("knnlm inspect's server needs its extra: pip install 'knnlm[inspect]'")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KnnlmError(f"--text {path} is not UTF-8 text") from None


def open_inspector(model, datastore, k_max, search, nprobe, gate, memory, max_tokens, device,
                   dtype):  # fmt: skip
    """The model, datastore, gate and memory, opened once (checked before the model loads)."""
    from knnlm.inspect.view import Inspector
    from knnlm.retrieval.datastore import open_datastore
    from knnlm.retrieval.gate import load_gate
    from knnlm.retrieval.memory import load_memory

    ds = open_datastore(datastore)
    gate_obj = load_gate(gate) if gate is not None else None
    knn_lm = load_model(model, device, dtype)
    mem = load_memory(memory, device=str(knn_lm.device)) if memory is not None else None
    return Inspector(knn_lm.lm, ds, k_max=k_max, search=value(search), nprobe=nprobe,
                     gate=gate_obj, memory=mem, max_tokens=max_tokens)  # fmt: skip


def run_server(insp, settings, host: str, port: int, max_pending: int) -> None:
    from knnlm.inspect.server import InspectApp, bind, is_loopback, serve, url_of

    app = InspectApp(insp, settings, max_pending)
    if not is_loopback(host):
        typer.secho(
            f"warning: listening on {host}, not loopback: anyone who can reach this address "
            "can use the model and read the datastore's text",
            err=True, fg=typer.colors.YELLOW,
        )  # fmt: skip
    sock = bind(host, port)
    typer.echo(f"knnlm inspect: serving on {url_of(sock)}  (Ctrl-C stops it)", err=False)
    serve(app, sock, host)


COMMANDS = [("inspect", inspect_cmd)]
