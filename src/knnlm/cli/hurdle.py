"""``knnlm hurdle``: the last-MLP hurdle of Appendix E (Figures 4 and 5)."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DEVICE,
    QUIET,
    WAIT,
    HurdlePreset,
    output_file,
    quiet_libraries,
    value,
    write_json,
)
from knnlm.errors import KnnlmError


def hurdle_cmd(
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output directory: hurdle.json, figure4.png, figure5.png (with --corpus) and "
        "runs/ (one cached curve per seed and variant; a rerun skips finished runs).",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="A tiny 4-layer model, 300 steps, a curve point every 25 steps: about a "
        "minute or two on 2 CPU cores. Explicit options still win.",
    ),
    seeds: int = typer.Option(
        3, "--seeds", min=1, help="Number of seeds (0..N-1); curves are averaged over them."
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        min=1,
        help="Optimizer steps per run (default 8000; 300 with --quick).",
    ),
    eval_every: int | None = typer.Option(
        None,
        "--eval-every",
        min=1,
        help="Log the Macondo log-likelihood and the training loss every N steps "
        "(default 1000 as in the paper; 25 with --quick).",
    ),
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        "-c",
        help="Also train on this corpus's train split (e.g. the WikiText-2 directory) and "
        "compare training-loss curves (Figure 5).",
    ),
    preset: HurdlePreset | None = typer.Option(
        None,
        "--preset",
        help="Architecture: gpt2-small (the paper's), quick, or a model size of knnlm "
        "train --preset.  (default: gpt2-small; quick with --quick)",
        show_default=False,
    ),
    model_config: Path | None = typer.Option(
        None,
        "--model-config",
        help="Your own GPT-2 architecture instead of --preset: a config.json, or a model "
        "folder holding one (trained from scratch here, with and without its last MLP).  "
        "(default: --preset's)",
        show_default=False,
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak learning rate (default: the preset's)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Sequences per step (default: the preset's)."
    ),
    macondo_seed: int = typer.Option(
        0, "--macondo-seed", help="Seed of the generated Macondo dataset."
    ),
    keep_models: bool = typer.Option(
        False, "--keep-models", help="Keep every trained model under OUT/runs/."
    ),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        callback=output_file,
        help="Also write the results JSON here (it is always written to OUT/hurdle.json).",
    ),
    device: str | None = DEVICE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Train GPT-2 models with and without the last MLP from the same initialisation on the
    same batches, and compare how fast they learn (paper Appendix E)."""
    from knnlm.experiments.hurdle.run import run_hurdle
    from knnlm.experiments.hurdle.settings import hurdle_settings
    from knnlm.report.hurdle import render_hurdle

    preset = value(preset)
    if model_config is not None:
        if preset is not None:
            raise KnnlmError("--preset and --model-config both name the architecture; give one")
        if not model_config.exists():
            raise KnnlmError(f"--model-config {model_config}: no such file or folder")
        preset = str(model_config.resolve())
    quiet_libraries()
    settings = hurdle_settings(
        "quick" if quick else "full",
        seeds=range(seeds),
        preset=preset,
        steps=steps,
        eval_every=eval_every,
        corpus=corpus,
        lr=lr,
        batch_size=batch_size,
        macondo_seed=macondo_seed,
        keep_models=keep_models,
        device=device,
    )
    result = run_hurdle(settings, out, progress=not quiet)
    render_hurdle(out, result)
    write_json(json_out, result)
    w, wo = result["with_mlp"], result["without_mlp"]
    typer.echo(
        f"parameters: {result['params']['with_mlp']:,} with, "
        f"{result['params']['without_mlp']:,} without the last MLP"
    )
    typer.echo("step     loglik with   loglik without")
    for s, a, b in zip(w["steps"], w["loglik"], wo["loglik"], strict=True):
        typer.echo(f"{s:>6}   {a:>11.4f}   {b:>14.4f}")
    for line in result["summary"]["text"]:
        typer.echo(line)
    typer.echo(f"figures: {', '.join(result['figures'].values())}")
    typer.echo(f"results: {Path(out) / 'hurdle.json'} ({result['wall_seconds']:.0f}s)")


COMMANDS = [("hurdle", hurdle_cmd)]
