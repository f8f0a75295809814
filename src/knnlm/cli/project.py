"""CLI: knnlm project (Section 3, Eq. 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DEVICE,
    QUIET,
    SEARCH,
    output_file,
    quiet_libraries,
    write_json,
)
from knnlm.cli.engine import BATCH, CONTEXT, CORPUS, DTYPE, MODEL, STRIDE, TEXT_FIELD


def project_cmd(
    model: str = MODEL,
    datastore: Path = typer.Option(..., "--datastore", "-d", help="Datastore directory."),
    corpus: str = CORPUS,
    split: str = typer.Option("valid", "--split", help="Corpus split to project."),
    context_len: int = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    k: int = typer.Option(1024, "--k", help="Neighbours per query."),
    knn_weight: float = typer.Option(0.25, "--knn-weight", help="Weight on p_knn."),
    temperature: float = typer.Option(1.0, "--temperature", help="kNN softmax temperature."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="IVF lists probed (index default)."),
    search: str = SEARCH,
    max_positions: int | None = typer.Option(
        2000, "--max-positions", help="Seeded sample of positions (default 2000; 0 = all)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the position sample."),
    lr: float = typer.Option(0.1, "--lr", help="Adam learning rate on z (paper: 0.1)."),
    tol: float = typer.Option(1e-3, "--tol", help="Stop a position when its KL moves less."),
    max_steps: int = typer.Option(500, "--max-steps", help="Step cap per position."),
    steps: int | None = typer.Option(
        None,
        "--steps",
        help="Fixed number of steps, no early stop (Appendix E: --lr 1e-3 --steps 100).",
    ),
    solve_batch: int = typer.Option(256, "--solve-batch", help="Positions optimised at once."),
    json_out: Path | None = typer.Option(
        None, "--json", callback=output_file, help="Write results JSON here."
    ),
    png: Path | None = typer.Option(
        None, "--png", callback=output_file, help="KL histogram (or KL vs step with --steps)."
    ),
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
) -> None:
    """Project p_knnlm onto the output space of f and of f∘g (Eq. 2) and compare perplexities."""
    quiet_libraries()
    from knnlm.evaluate import open_inputs
    from knnlm.experiments.projection import run_projection
    from knnlm.lm.loading import load_lm
    from knnlm.report.tables import projection_tables
    from knnlm.retrieval.retriever import KnnSettings

    # What the user can get wrong is checked before the model is loaded.
    knn = KnnSettings(
        k=k, knn_weight=knn_weight, temperature=temperature, nprobe=nprobe, search=search
    )
    open_inputs(datastore, None, knn)
    lm = load_lm(model, device=device, dtype=dtype)
    result = run_projection(
        lm,
        corpus,
        datastore,
        split,
        context_len=context_len,
        stride=stride,
        batch_size=batch_size,
        knn=knn,
        max_positions=max_positions or None,
        seed=seed,
        lr=lr,
        tol=tol,
        max_steps=max_steps,
        fixed_steps=steps,
        solve_batch=solve_batch,
        text_field=text_field,
        progress=not quiet,
    )
    write_json(json_out, result)
    if png is not None:
        from knnlm.report.figures import plot_kl_hist, plot_kl_steps

        if steps is not None:
            plot_kl_steps(result["proj_f"]["kl_curve"], result["proj_fg"]["kl_curve"], png, lr=lr)
        else:
            plot_kl_hist(result["proj_f"]["kl"], result["proj_fg"]["kl"], png)
    typer.echo(projection_tables(result))


def register(app: typer.Typer) -> None:
    app.command("project")(project_cmd)
