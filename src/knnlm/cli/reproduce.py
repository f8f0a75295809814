"""CLI: knnlm reproduce (the whole paper, with a report)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from knnlm.cli.common import QUIET, quiet_libraries

# Sizes small enough for a test of the whole pipeline in CI (about a minute on 2 cores).
TINY = {
    "lm_epochs": 2,
    "k": 32,
    "projection_positions": 40,
    "projection_max_steps": 60,
    "memory_hidden": 128,
    "memory_epochs": 2,
    "macondo_seeds": 2,
    "macondo_epochs": 1,
    "macondo_sizes": {"n_villagers": 60, "n_parents_per_count": 2},
    "hurdle_seeds": 2,
    "hurdle_steps": 20,
    "hurdle_eval_every": 10,
    "hurdle_sizes": {"n_villagers": 60, "n_parents_per_count": 2},
    "sweep_weights": [0.1, 0.25, 0.5],
    "sweep_temperatures": [1.0, 3.0, 10.0],
}


def reproduce_cmd(
    out: Path = typer.Option(Path("knnlm-reproduction"), "--out", "-o", help="Output directory."),
    quick: bool = typer.Option(
        False, "--quick", help="The embedded default: Macondo only, no external data, CPU minutes."
    ),
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        "-c",
        help="Natural-text corpus (dir of {train,valid,test}.txt or hf:...).",
    ),
    preset: str | None = typer.Option(
        None, "--preset", help="'paper': the paper's settings (GPU; WikiText-103 via HF datasets)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Analyse this pretrained LM instead of training one."
    ),
    seeds: int | None = typer.Option(None, "--seeds", help="Seeds for Macondo and the hurdle."),
    k: int | None = typer.Option(None, "--k", help="Neighbours per query."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs of the LM trained here."),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="Test-sized run."),
    quiet: bool = QUIET,
) -> None:
    """Run every analysis of the paper and write report.md, report.html, results.json, figures."""
    quiet_libraries()
    from knnlm.errors import KnnlmError
    from knnlm.experiments.reproduce import ReproduceConfig, reproduce

    if preset not in (None, "paper"):
        raise KnnlmError(f"unknown preset {preset!r}; the only preset is 'paper'")
    if quick and (corpus or preset):
        raise KnnlmError("--quick runs on the embedded Macondo data; drop --corpus / --preset")
    scale = "paper" if preset == "paper" else ("corpus" if corpus else "quick")
    overrides = dict(TINY) if tiny else {}
    given = dict(corpus=corpus, model=model, k=k, lm_epochs=epochs,
                 macondo_seeds=seeds, hurdle_seeds=seeds)  # fmt: skip
    overrides.update({key: v for key, v in given.items() if v is not None})
    cfg = ReproduceConfig.for_scale(scale, **overrides)
    t0 = time.perf_counter()
    results = reproduce(cfg, out, progress=not quiet)
    typer.echo(f"report: {out / 'report.md'} and {out / 'report.html'}")
    for c in results["claims"]:
        typer.echo(f"  [{'held' if c['held'] else 'not held'}] {c['claim']}")
    typer.echo(f"wall time {time.perf_counter() - t0:.0f} s")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_cmd)
