"""``knnlm macondo run``: the over-specification experiment (paper Section 4, Table 5)."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DEVICE,
    GIVEN_NAMES,
    KNN_TEMPERATURE,
    KNN_WEIGHT,
    MAX_CHILDREN,
    PARENTS_PER_COUNT,
    QUIET,
    SEARCH,
    SENTENCES_PER_PAIR,
    SURNAMES,
    VILLAGERS,
    WAIT,
    K,
    MacondoPreset,
    Search,
    check_model,
    macondo_sizes,
    output_file,
    quiet_libraries,
    value,
    write_json,
)
from knnlm.errors import KnnlmError


def run_cmd(
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output directory: results.json, table5.md, figure1.png (figure3.png with "
        "--eval-every) and per-seed artifacts; a rerun skips finished seeds.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model directory (or hub name) to fine-tune, e.g. a `knnlm train` output. "
        "Default: --quick trains a tiny GPT-2 from scratch.",
    ),
    seeds: int = typer.Option(5, "--seeds", help="Number of seeds (0, 1, ..., N-1)."),
    quick: bool = typer.Option(
        False, "--quick", help="Preset quick: tiny GPT-2 from scratch on CPU (about a minute)."
    ),
    preset: MacondoPreset | None = typer.Option(
        None,
        "--preset",
        help="Run preset (default: quick without --model, default with it).",
        show_default=False,
    ),
    k: int = K,
    knn_weight: float = KNN_WEIGHT,
    knn_temp: float = KNN_TEMPERATURE,
    search: Search = SEARCH,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: the preset's)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the preset's)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch size (default: the preset's)."
    ),
    warmup_ratio: float | None = typer.Option(
        None, "--warmup-ratio", help="Warm-up ratio (default: the preset's, 0.05)."
    ),
    eval_every: int | None = typer.Option(
        None,
        "--eval-every",
        help="Every N steps, score the test set (LM and kNN-LM) for Figure 3.",
    ),
    lora: bool | None = typer.Option(
        None, "--lora/--no-lora", help="LoRA fine-tuning (default: the preset's)."
    ),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        callback=output_file,
        help="Also write the per-n mean log-likelihoods and settings here.",
    ),
    device: str | None = DEVICE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
    villagers: int | None = VILLAGERS,
    parents_per_count: int | None = PARENTS_PER_COUNT,
    max_children: int | None = MAX_CHILDREN,
    sentences_per_pair: int | None = SENTENCES_PER_PAIR,
    given_names: list[Path] | None = GIVEN_NAMES,
    surnames: list[Path] | None = SURNAMES,
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        min=1,
        help="Stop fine-tuning after this many optimizer steps.",
    ),
) -> None:
    """Fine-tune on Macondo, score children's names with the LM and the kNN-LM (Table 5)."""
    from knnlm.experiments.macondo.run import cli_summary, contract_view, run_macondo
    from knnlm.experiments.macondo.settings import MacondoSettings
    from knnlm.report.macondo_figures import render_macondo, table5

    preset = value(preset)
    if seeds < 1:
        raise KnnlmError(f"--seeds must be at least 1, got {seeds}")
    if quick and preset not in (None, "quick"):
        raise KnnlmError(f"--quick and --preset {preset} contradict each other; give one")
    check_model(model)
    sizes = macondo_sizes(
        villagers, parents_per_count, max_children, sentences_per_pair, given_names, surnames
    )
    quiet_libraries()
    settings = MacondoSettings.from_preset(
        "quick" if quick else preset,
        model=model,
        seeds=tuple(range(seeds)),
        k=k,
        knn_weight=knn_weight,
        temperature=knn_temp,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        warmup_ratio=warmup_ratio,
        lora=lora,
        eval_every=eval_every,
        sizes=sizes,
        search=value(search),
        device=device,
    )
    results = run_macondo(settings, out, progress=not quiet)
    render_macondo(out, results)
    write_json(json_out, cli_summary(results))
    typer.echo(table5(contract_view(results)))
    typer.echo(f"reproduced: {results['reproduced']['summary']}")
    typer.echo(f"results in {out}")


COMMANDS = [("macondo run", run_cmd)]
