"""CLI: knnlm reproduce (the whole paper, with a report)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from knnlm.cli.common import (
    GIVEN_NAMES,
    MAX_CHILDREN,
    PARENTS_PER_COUNT,
    QUIET,
    SEARCH,
    SENTENCES_PER_PAIR,
    SURNAMES,
    VILLAGERS,
    WAIT,
    Scale,
    Search,
    check_model,
    macondo_sizes,
    quiet_libraries,
    value,
)

# Sizes small enough for a test of the whole pipeline (a minute or two on 2 cores): the
# embedded slice cut short, two LM seeds, a few steps everywhere.
TINY = {
    "embedded_chars": {"train": 150_000, "valid": 12_000, "test": 12_000},
    "tokenizer_vocab": 2048,
    "lm_seeds": 2,
    "lm_max_steps": 30,
    "k": 32,
    "projection_positions": 40,
    "projection_max_steps": 60,
    "memory_hidden": 64,
    "memory_epochs": 1,
    "memory_max_steps": 20,
    "macondo_seeds": 2,
    "macondo_epochs": 1,
    "macondo_eval_every": 5,
    "macondo_sizes": {"n_villagers": 40, "n_parents_per_count": 2, "sentences_per_pair": 2},
    "macondo_tune": {
        "dev_share": 0.5,
        "k": [8, 32],
        "temperature": [1.0, 3.0],
        "knn_weight": [0.25, 0.5],
        "memory_weight": [0.25, 0.5],
    },
    "macondo_memory": {"hidden": 64, "epochs": 2, "lr": 1e-3, "batch_tokens": 128},
    "hurdle_seeds": 2,
    "hurdle_steps": 20,
    "hurdle_eval_every": 10,
    "hurdle_sizes": {"n_villagers": 60, "n_parents_per_count": 2},
    "hurdle_corpus_max_chars": 100_000,
    "sweep_weights": [0.1, 0.25, 0.5],
    "sweep_temperatures": [1.0, 3.0, 10.0],
    "memory_weights": [0.1, 0.25],
    "width_study": [32, 64],
}


def reproduce_cmd(
    out: Path = typer.Option(Path("knnlm-reproduction"), "--out", "-o", help="Output directory."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="The embedded default: a WikiText-2 slice shipped with the package (Sections 2, 3, "
        "5, Figure 5) and Macondo (Section 4, Figure 4); no external data, CPU minutes.",
    ),
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        "-c",
        help="Natural-text corpus (dir of {train,valid,test}.txt or hf:...); replaces the "
        "embedded slice.",
    ),
    scale: Scale | None = typer.Option(
        None,
        "--scale",
        help="quick (as --quick) or paper: the paper's settings (GPU; WikiText-103 via HF "
        "datasets).  (default: quick, or your --corpus)",
        show_default=False,
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Analyse this pretrained LM instead of training one."
    ),
    seeds: int | None = typer.Option(
        None,
        "--seeds",
        help="Seeds for every part (LMs trained here, Macondo, hurdle; a --model is one LM).  "
        "(default: the scale's)",
        show_default=False,
    ),
    k: int | None = typer.Option(
        None,
        "--k",
        "-k",
        help="Neighbours per query.  (default: the scale's)",
        show_default=False,
    ),
    context_len: int | None = typer.Option(
        None,
        "--context-len",
        min=2,
        help="Tokens per window of every natural-text part.  (default: the scale's, at most "
        "the --model's maximum positions)",
        show_default=False,
    ),
    knn_temp: float | None = typer.Option(
        None,
        "--knn-temperature",
        help="kNN softmax temperature of the headline numbers (default: 1, the paper's; the "
        "report adds the best on valid)",
        show_default=False,
    ),
    epochs: int | None = typer.Option(
        None,
        "--epochs",
        help="Epochs of the LM trained here.  (default: the scale's)",
        show_default=False,
    ),
    search: Search = SEARCH,
    width_study: str | None = typer.Option(
        None,
        "--width-study",
        help="Section 3 against model width: comma-separated widths d, e.g. 64,128,256 (LMs "
        "differing only in d; not in the quick run by default: minutes per width).",
    ),  # fmt: skip
    villagers: int | None = VILLAGERS,
    parents_per_count: int | None = PARENTS_PER_COUNT,
    max_children: int | None = MAX_CHILDREN,
    sentences_per_pair: int | None = SENTENCES_PER_PAIR,
    given_names: list[Path] | None = GIVEN_NAMES,
    surnames: list[Path] | None = SURNAMES,
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="Test-sized run."),
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Run every analysis of the paper and write report.md, report.html, results.json, figures."""
    quiet_libraries()
    from knnlm.errors import KnnlmError
    from knnlm.experiments.reproduce import reproduce
    from knnlm.experiments.reproduce_config import SCALES, ReproduceConfig
    from knnlm.report.reproduction_report import write_reproduction_report

    preset = value(scale)
    if quick and preset == "paper":
        raise KnnlmError("--quick and --scale paper are different scales; choose one")
    check_model(model)
    sizes = macondo_sizes(
        villagers, parents_per_count, max_children, sentences_per_pair, given_names, surnames
    )
    quick = quick or preset == "quick"
    scale = "paper" if preset == "paper" else ("corpus" if corpus and not quick else "quick")
    overrides = dict(TINY) if tiny else {}
    if model is not None:
        overrides.pop("width_study", None)  # it trains LMs of the run's preset: none here
        overrides.pop("lm_seeds", None)  # one given LM
        if Path(model).expanduser().exists():  # the run's records name it from any folder
            model = str(Path(model).expanduser().resolve())
    widths = None
    if width_study is not None:
        try:
            widths = [int(x) for x in width_study.split(",") if x.strip()]
        except ValueError:
            raise KnnlmError(
                f"--width-study takes widths like 64,128,256; got {width_study!r}"
            ) from None
        if not widths or min(widths) < 1:
            raise KnnlmError(f"--width-study needs positive widths; got {width_study!r}")
    given = dict(corpus=corpus, model=model, k=k, search=value(search), lm_epochs=epochs,
                 lm_seeds=None if model else seeds, macondo_seeds=seeds, hurdle_seeds=seeds,
                 width_study=widths,
                 temperature=knn_temp, context_len=context_len)  # fmt: skip
    overrides.update({key: v for key, v in given.items() if v is not None})
    if sizes:  # on top of the scale's (or --tiny's) Macondo sizes
        scale_sizes = SCALES[scale].get("macondo_sizes", {})
        overrides["macondo_sizes"] = scale_sizes | overrides.get("macondo_sizes", {}) | sizes
    cfg = ReproduceConfig.for_scale(scale, **overrides)
    t0 = time.perf_counter()
    results = reproduce(cfg, out, progress=not quiet)
    inspect_page(out, results)
    results = write_reproduction_report(out, results)
    typer.echo(f"report: {out / 'report.md'} and {out / 'report.html'}")
    for c in results["claims"]:
        typer.echo(f"  [{c.get('status', 'held' if c['held'] else 'not held')}] {c['claim']}")
    typer.echo(f"wall time {time.perf_counter() - t0:.0f} s")


def inspect_page(out: Path, results: dict) -> None:
    """knnlm inspect's static page beside the report (report.html links it when written)."""
    from knnlm.inspect.report_page import write_report_page

    for part, why in write_report_page(out, results).items():
        typer.secho(f"warning: inspect.html has no {part} page ({why})", err=True)


COMMANDS = [("reproduce", reproduce_cmd)]
