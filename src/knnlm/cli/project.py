"""CLI: knnlm project (Section 3, Eq. 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    BATCH,
    CONTEXT,
    CORPUS,
    DATASTORE,
    DEVICE,
    DTYPE,
    JSON_OUT,
    KNN_TEMPERATURE,
    KNN_WEIGHT,
    MODEL,
    NPROBE,
    QUIET,
    SEARCH,
    STRIDE,
    TEXT_FIELD,
    Dtype,
    K,
    Search,
    init_distributed,
    load_model,
    output_file,
    value,
    write_json,
)


def project_cmd(
    model: str = MODEL,
    datastore: Path = DATASTORE,
    corpus: str = CORPUS,
    split: str = typer.Option("valid", "--split", help="Corpus split to project."),
    context_len: int | None = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    k: int = K,
    knn_weight: float = KNN_WEIGHT,
    knn_temp: float = KNN_TEMPERATURE,
    nprobe: int | None = NPROBE,
    search: Search = SEARCH,
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
    json_out: Path | None = JSON_OUT,
    png: Path | None = typer.Option(
        None, "--png", callback=output_file, help="KL histogram (or KL vs step with --steps)."
    ),
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
) -> None:
    """Project p_knnlm onto the output space of f and of f∘g (Eq. 2) and compare perplexities.

    Under torchrun the exact search is sharded over the ranks; rank 0 writes and prints.
    """

    from knnlm.evaluate import open_inputs
    from knnlm.experiments.projection.run import run_projection
    from knnlm.experiments.projection.settings import PROJECTION_FLAGS, ProjectionSettings
    from knnlm.forward_pass import WindowSettings
    from knnlm.report.tables import projection_tables
    from knnlm.retrieval.retriever import KNN_FLAGS, MIX_FLAGS, KnnSettings, MixSettings
    from knnlm.settings import build, flag

    # What the user can get wrong is checked before the model is loaded.
    knn = build(KnnSettings, KNN_FLAGS, k=k, nprobe=nprobe, search=value(search))
    mix = build(MixSettings, MIX_FLAGS, knn_weight=knn_weight, temperature=knn_temp)
    settings = build(
        ProjectionSettings, PROJECTION_FLAGS, split=split,
        window=build(WindowSettings, flag(), context_len=context_len, stride=stride),
        batch_size=batch_size, knn=knn, mix=mix, max_positions=max_positions or None, seed=seed,
        lr=lr, tol=tol, max_steps=max_steps, fixed_steps=steps, solve_batch=solve_batch,
        text_field=text_field,
    )  # fmt: skip
    open_inputs(datastore, None, knn).check_k(k, "--k")
    # Under torchrun every rank projects the same positions and holds a shard of the
    # datastore for exact search (knnlm.retrieval.search.sharded); rank 0 alone writes and prints.
    rank = init_distributed()
    lm = load_model(model, device, dtype).lm
    result = run_projection(lm, corpus, datastore, settings, progress=not quiet and rank == 0)
    if rank != 0:
        return
    write_json(json_out, result)
    if png is not None:
        from knnlm.report.figures import plot_kl_hist, plot_kl_steps

        if steps is not None:
            plot_kl_steps(result["proj_f"]["kl_curve"], result["proj_fg"]["kl_curve"], png, lr=lr)
        else:
            plot_kl_hist(result["proj_f"]["kl"], result["proj_fg"]["kl"], png)
    typer.echo(projection_tables(result))


COMMANDS = [("project", project_cmd)]
