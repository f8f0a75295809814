"""CLI: generate (HF-shaped sampling options) and neighbours (what was retrieved)."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DATASTORE,
    DEVICE,
    DTYPE,
    JSON_OUT,
    KNN_TEMPERATURE,
    KNN_WEIGHT,
    MODEL,
    NPROBE,
    OPTIONAL_DATASTORE,
    QUIET,
    SEARCH,
    Dtype,
    K,
    Search,
    init_distributed,
    load_model,
    value,
    write_json,
)
from knnlm.cli.tune import SETTINGS, apply_settings
from knnlm.errors import KnnlmError


def generate_cmd(
    ctx: typer.Context,
    model: str = MODEL,
    prompt: list[str] = typer.Option(
        ..., "--prompt", "-p", help="Text to continue; repeat for several (one batch)."
    ),
    datastore: Path | None = OPTIONAL_DATASTORE,
    k: int = K,
    knn_weight: float = KNN_WEIGHT,
    knn_temp: float = KNN_TEMPERATURE,
    nprobe: int | None = NPROBE,
    search: Search = SEARCH,
    max_new_tokens: int = typer.Option(50, "--max-new-tokens", help="Tokens to generate."),
    do_sample: bool = typer.Option(
        False, "--do-sample/--greedy", help="Sample instead of greedy (or beam) decoding."
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (HF)."),
    top_k: int = typer.Option(50, "--top-k", help="Sample from the k likeliest tokens (HF)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold (HF)."),
    num_beams: int = typer.Option(1, "--num-beams", help="Beam search width (HF)."),
    num_return_sequences: int = typer.Option(
        1, "--num-return-sequences", help="Continuations per prompt (HF)."
    ),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="Penalty on repeated tokens (HF)."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    pointers: float | None = typer.Option(
        None,
        "--pointers",
        help="RetoMaton: search only where fewer than this many pointers from the previous "
        "step's neighbours survive (inf: every step).",
    ),
    settings: Path | None = SETTINGS,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,  # no bar here; accepted so that every command takes --quiet
) -> None:
    """Continue prompts with the kNN-LM (or the plain LM without --datastore).

    Each returned sequence is printed as prompt + continuation, in prompt order.
    """
    from knnlm.evaluate import open_inputs
    from knnlm.generation import check_settings, generate
    from knnlm.retrieval.retriever import KNN_FLAGS, MIX_FLAGS, KnnSettings, MixSettings
    from knnlm.settings import build

    if settings is not None:  # the tuned settings (knnlm tune --out); flags must agree
        tuned = apply_settings(ctx, settings, dict(
            datastore=datastore, k=k, knn_weight=knn_weight, knn_temp=knn_temp, nprobe=nprobe,
            search=search, pointers=pointers))  # fmt: skip
        datastore, k, knn_weight, knn_temp = (tuned[n] for n in ("datastore", "k", "knn_weight",
                                                                 "knn_temp"))  # fmt: skip
        nprobe, search, pointers = tuned["nprobe"], tuned["search"], tuned["pointers"]

    hf = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
        num_return_sequences=num_return_sequences,
    )  # fmt: skip
    if do_sample:  # sampling options only where they act (HF warns about them otherwise)
        hf.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if repetition_penalty != 1.0:
        hf.update(repetition_penalty=repetition_penalty)
    # What the user can get wrong is checked before the model is loaded (the kNN settings
    # too: a bad --knn-temperature is a mistake even without a datastore).
    check_settings(prompt, dict(hf, temperature=temperature, top_k=top_k, top_p=top_p), pointers)
    knn = build(KnnSettings, KNN_FLAGS, k=k, nprobe=nprobe, search=value(search))
    mix = build(MixSettings, MIX_FLAGS, knn_weight=knn_weight, temperature=knn_temp,
                pointers=pointers)  # fmt: skip
    ds = open_inputs(datastore, None, knn) if datastore is not None else None
    if ds is not None:
        ds.check_k(k, "--k")
    rank = init_distributed()  # torchrun: the search is sharded, every rank generates
    knn_lm = load_model(model, device, dtype)
    texts = generate(knn_lm.lm, prompt, ds, knn, mix, seed=seed, **hf)
    if rank != 0:
        return
    for i, text in enumerate(texts):
        typer.echo(prompt[i // num_return_sequences] + text)


def neighbours_cmd(
    model: str = MODEL,
    datastore: Path = DATASTORE,
    prompts: list[str] = typer.Option(
        ...,
        "--prompt",
        "-p",
        help="Text whose next token is retrieved; repeat for several (answered in turn).",
    ),
    k: int = typer.Option(8, "--k", "-k", help="Neighbours to show."),
    knn_temp: float = KNN_TEMPERATURE,
    context_tokens: int = typer.Option(
        32, "--context-tokens", help="Tokens of each neighbour's preceding text shown."
    ),
    nprobe: int | None = NPROBE,
    search: Search = SEARCH,
    json_out: Path | None = JSON_OUT,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
) -> None:
    """Show the datastore entries retrieved for the token after each --prompt, nearest first.

    --json writes one {"prompt", "neighbours"} object per prompt, in the order given."""
    from knnlm.retrieval.datastore import Datastore
    from knnlm.retrieval.retriever import KNN_FLAGS, MIX_FLAGS, KnnSettings, MixSettings
    from knnlm.settings import build

    build(KnnSettings, KNN_FLAGS, k=k, nprobe=nprobe, search=value(search))
    build(MixSettings, MIX_FLAGS, temperature=knn_temp)
    if not all(prompts):
        raise KnnlmError("--prompt is empty")
    ds = Datastore.load(datastore)
    knn_lm = load_model(model, device, dtype)
    answers = []
    for text in prompts:
        found = knn_lm.neighbours(
            text, ds, k, knn_temperature=knn_temp, context_tokens=context_tokens,
            nprobe=nprobe, search=value(search),
        )  # fmt: skip
        answers.append({"prompt": text, "neighbours": found})
        typer.echo(f"prompt {text!r}:")
        for i, nb in enumerate(found, 1):
            typer.echo(
                f"{i:>3}  weight {nb['weight']:.3f}  distance {nb['distance']:.4g}  "
                f"row {nb['row']}\n     {nb['context']!r} -> {nb['target']!r}"
            )
    write_json(json_out, answers)


COMMANDS = [("generate", generate_cmd), ("neighbours", neighbours_cmd)]
