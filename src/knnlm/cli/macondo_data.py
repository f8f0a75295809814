"""``knnlm macondo generate``: write the Macondo over-specification dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import QUIET, SEED, echo_json


def generate(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (replaced atomically)."),
    seed: int = SEED,
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="Model/tokenizer directory or tiktoken-gpt2: children's names must be one token "
        "under it. Default: no tokenizer check (any single word).",
    ),
    conv: bool = typer.Option(
        False, "--conv", help="Macondo-Conv: 125 parents with 2 children, chat JSONL too."
    ),
    given_names: list[Path] | None = typer.Option(
        None, "--given-names", help="Given-name file(s); repeat for several (default: built-in)."
    ),
    surnames: list[Path] | None = typer.Option(
        None, "--surnames", help="Surname file(s); repeat for several (default: built-in)."
    ),
    villagers: int | None = typer.Option(
        None, "--villagers", help="Number of villagers (default 500; 125 with --conv)."
    ),
    parents_per_count: int | None = typer.Option(
        None, "--parents-per-count", help="Parents for each number of children (default 20)."
    ),
    max_children: int | None = typer.Option(
        None, "--max-children", help="Largest number of children (default 5; 2 with --conv)."
    ),
    sentences_per_pair: int = typer.Option(
        5, "--sentences-per-pair", help="Training sentences per parent-child pair."
    ),
    quiet: bool = QUIET,
) -> None:
    """Generate Macondo (or Macondo-Conv) into --out: train/test .jsonl and .txt, meta.json."""
    from knnlm.data.macondo import generate_macondo, write_macondo
    from knnlm.lm.tokenizer import tokenizer_view

    if tokenizer is not None and not tokenizer.startswith("tiktoken-"):
        from knnlm.cli.common import quiet_libraries

        quiet_libraries()
    ds = generate_macondo(
        seed=seed,
        tokenizer=None if tokenizer is None else tokenizer_view(tokenizer),
        given_names=list(given_names) if given_names else None,
        surnames=list(surnames) if surnames else None,
        n_villagers=villagers,
        n_parents_per_count=parents_per_count,
        max_children=max_children,
        sentences_per_pair=sentences_per_pair,
        conv=conv,
    )
    path = write_macondo(ds, out)
    if not quiet:
        echo_json({"out": str(path), "variant": ds.meta["variant"], **ds.meta["counts"]})


COMMANDS = [("macondo generate", generate)]
