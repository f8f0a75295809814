"""CLI: datastore build / index, eval, sweep, generate."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    DEVICE,
    QUIET,
    SEARCH,
    WAIT,
    echo_json,
    hold_lock,
    output_file,
    quiet_libraries,
    write_json,
)
from knnlm.errors import KnnlmError

datastore_app = typer.Typer(help="Build a kNN datastore and its FAISS index.", no_args_is_help=True)

MODEL = typer.Option(..., "--model", "-m", help="HF hub name or local model directory.")
CORPUS = typer.Option(
    ...,
    "--corpus",
    "-c",
    help="Directory with {train,valid,test}.txt, a text file, or hf:NAME[:CONFIG] / hf:json:PATTERN.",
)
CONTEXT = typer.Option(1024, "--context-len", help="Tokens per scoring window.")
STRIDE = typer.Option(
    None, "--stride", help="Step between windows (default: context-len); smaller = more context."
)
BATCH = typer.Option(8, "--batch-size", help="Windows per forward pass.")
DTYPE = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16.")
TEXT_FIELD = typer.Option("text", "--text-field", help="Text column of an hf: dataset.")


def _init_distributed() -> int:
    """Join the process group that torchrun / accelerate launch set up; returns the rank."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _load(model: str, device: str | None, dtype: str):
    quiet_libraries()
    from knnlm.lm.loading import load_lm

    return load_lm(model, device=device, dtype=dtype)


@datastore_app.command("build")
def datastore_build(
    ctx: typer.Context,
    model: str = MODEL,
    corpus: str = CORPUS,
    out: Path = typer.Option(..., "--out", "-o", help="Datastore directory to create."),
    split: str = typer.Option("train", "--split", help="Corpus split to store."),
    context_len: int = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    key_type: str = typer.Option(
        "ffn_input", "--key-type", help="ffn_input (default), block_input or final_hidden."
    ),
    key_dtype: str = typer.Option("float16", "--key-dtype", help="float16 (default) or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different datastore."),
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Score a corpus split and store one (key, next token) pair per position; resumable.

    Under torchrun / accelerate launch each process scores its share of the windows.
    """
    from knnlm.fileio import claim_target
    from knnlm.retrieval.datastore import KIND, META, build_datastore, open_datastore

    rank = _init_distributed()  # first: rank 0 takes the writer lock for the group
    hold_lock(ctx, out, "datastore")
    claim_target(out, KIND, META)  # a foreign --out is refused before the model is loaded
    lm = _load(model, device, dtype)
    path = build_datastore(
        lm,
        corpus,
        split,
        out,
        context_len=context_len,
        stride=stride,
        batch_size=batch_size,
        key_type=key_type,
        key_dtype=key_dtype,
        text_field=text_field,
        overwrite=overwrite,
        progress=not quiet,
    )
    if rank == 0:
        ds = open_datastore(path)
        typer.echo(f"datastore {path}: {ds.n} keys of size {ds.dim} ({ds.meta['key_type']})")


@datastore_app.command("index")
def datastore_index(
    ds: Path = typer.Argument(..., help="Datastore directory."),
    type_: str = typer.Option("flat", "--type", help="flat (exact) or ivfpq."),
    metric: str = typer.Option("l2", "--metric", help="l2 (squared L2) or ip (inner product)."),
    nlist: int | None = typer.Option(None, "--nlist", help="IVF lists (default ~4*sqrt(N))."),
    pq_m: int | None = typer.Option(None, "--pq-bytes", help="PQ bytes per vector (divides d)."),
    pq_bits: int = typer.Option(8, "--pq-bits", help="Bits per PQ code."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="Lists probed (default 32+)."),
    train_size: int | None = typer.Option(None, "--train-size", help="Cap on training sample."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training sample."),
    factory: str | None = typer.Option(
        None, "--factory", help='Any faiss.index_factory string instead (e.g. "HNSW32").'
    ),
    pca: int | None = typer.Option(None, "--pca", help="PCA keys to D dims in front of the index."),
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Build a FAISS index beside the datastore (index.faiss + index.json); resumable.

    Approximate indexes report their recall@k against exact search (stored in index.json)."""
    from knnlm.retrieval.index_build import build_index, index_summary

    path = build_index(
        ds,
        kind=type_,
        metric=metric,
        nlist=nlist,
        pq_m=pq_m,
        pq_bits=pq_bits,
        nprobe=nprobe,
        train_size=train_size,
        seed=seed,
        progress=not quiet,
        factory=factory,
        pca=pca,
    )
    typer.echo(f"index written: {path} ({index_summary(ds)})")


def eval_cmd(
    ctx: typer.Context,
    model: str = MODEL,
    corpus: str = CORPUS,
    split: str = typer.Option("valid", "--split", help="Corpus split to score."),
    context_len: int = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    datastore: Path | None = typer.Option(
        None, "--datastore", "-d", help="Datastore: also report the kNN-LM."
    ),
    k: int = typer.Option(1024, "--k", help="Neighbours per query."),
    knn_weight: float = typer.Option(
        0.25,
        "--knn-weight",
        help="Weight w on p_knn: (1-w) p_lm + w p_knn (the paper's lambda = 1 - w).",
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature on -d."),
    recompute: bool = typer.Option(
        True, "--recompute/--no-recompute", help="Exact distances from stored keys."
    ),
    nprobe: int | None = typer.Option(None, "--nprobe", help="IVF lists probed."),
    search: str = SEARCH,
    exclude_self: str = typer.Option(
        "auto",
        "--exclude-self",
        help="Drop each target's own datastore row: auto (when the text is the datastore's "
        "own token stream, whatever the context/stride), yes (refused for other text) or no.",
    ),
    memory: Path | None = typer.Option(None, "--memory", help="MLP memory directory (Section 5)."),
    memory_weight: float = typer.Option(0.25, "--memory-weight", help="Weight on the MLP memory."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Store neighbours per token for knnlm sweep."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", callback=output_file, help="Write results JSON here."
    ),
    gate: Path | None = typer.Option(None, "--gate", help="Retrieval gate (knnlm gate train)."),
    retrieval_rate: float = typer.Option(
        1.0, "--retrieval-rate", help="Share of tokens the gate lets search (1: all, 0: none)."
    ),
    gate_weight: str = typer.Option(
        "fixed",
        "--gate-weight",
        help="Searched tokens use --knn-weight (fixed) or the weight "
        "the mlp gate predicts per token (learned).",
    ),
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Perplexity of the LM, and of the kNN-LM / LM + MLP memory when given, from one pass."""
    from knnlm.evaluate import evaluate, open_gate, open_inputs
    from knnlm.retrieval.retriever import KnnSettings

    # What the user can get wrong is checked before the model is loaded.
    knn = KnnSettings(k, knn_weight, temperature, recompute, nprobe, exclude_self, search)
    # Under torchrun every rank scores the whole split and holds a shard of the datastore for
    # exact search (knnlm.retrieval.sharded); rank 0 alone writes and prints, and holds the
    # cache's lock for the group (so the group joins before the lock is taken).
    rank = _init_distributed()
    hold_lock(ctx, cache, "neighbour cache")
    datastore = open_inputs(datastore, cache, knn)
    gate_obj = open_gate(gate, retrieval_rate, datastore, cache, gate_weight)
    lm = _load(model, device, dtype)
    result = evaluate(
        lm,
        corpus,
        split,
        context_len=context_len,
        stride=stride,
        batch_size=batch_size,
        text_field=text_field,
        datastore=datastore,
        knn=knn,
        memory=memory,
        memory_weight=memory_weight,
        cache=cache if rank == 0 else None,
        progress=not quiet and rank == 0,
        gate=gate_obj,
        retrieval_rate=retrieval_rate,
        gate_weight=gate_weight,
    )
    if rank != 0:
        return
    for warning in result["warnings"]:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    write_json(json_out, result)
    line = f"tokens {result['tokens']}  LM ppl {result['lm']['perplexity']:.3f}"
    if "knnlm" in result:
        line += f"  kNN-LM ppl {result['knnlm']['perplexity']:.3f}"
        if gate_obj is not None:
            line += f" (searched {100 * result['knnlm']['retrieval_share']:.1f}% of tokens)"
    if "mlp" in result:
        line += f"  LM+MLP ppl {result['mlp']['perplexity']:.3f}"
    typer.echo(line)


def _numbers(text: str | None, kind: type, option: str) -> list | None:
    """A comma-separated list of ``kind`` from ``option``; one clear line when it is not."""
    if text is None:
        return None
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KnnlmError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise KnnlmError(f"{option} is empty")
    return values


def sweep_cmd(
    cache: Path = typer.Argument(..., help="Neighbour cache written by knnlm eval --cache."),
    weights: str = typer.Option(
        "0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6", "--weights", help="Comma-separated knn weights."
    ),
    temperatures: str = typer.Option(
        "0.5,1,2,3,5,10", "--temperatures", help="Comma-separated temperatures."
    ),
    ks: str | None = typer.Option(None, "--ks", help="Comma-separated k values (<= cached k)."),
    json_out: Path | None = typer.Option(
        None, "--json", callback=output_file, help="Write the grid as JSON here."
    ),
    png: Path | None = typer.Option(
        None, "--png", callback=output_file, help="Heat map of the grid (largest k)."
    ),
    quiet: bool = QUIET,
) -> None:
    """Re-score cached neighbours over knn_weight x temperature x k without searching again."""
    from knnlm.sweep import sweep

    result = sweep(
        cache,
        _numbers(weights, float, "--weights"),
        _numbers(temperatures, float, "--temperatures"),
        _numbers(ks, int, "--ks"),
        progress=not quiet,
    )
    write_json(json_out, result)
    if png is not None:
        from knnlm.report.figures import plot_sweep_heatmap

        plot_sweep_heatmap(
            result["weights"],
            result["temperatures"],
            result["perplexity"][-1],
            png,
            title=f"kNN-LM perplexity, k={result['ks'][-1]}",
            lm_ppl=result["lm"]["perplexity"],
        )
    echo_json(result["best"])


def generate_cmd(
    model: str = MODEL,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    datastore: Path | None = typer.Option(None, "--datastore", "-d", help="Datastore (kNN-LM)."),
    k: int = typer.Option(1024, "--k", help="Neighbours per step."),
    knn_weight: float = typer.Option(0.25, "--knn-weight", help="Weight on p_knn."),
    temperature: float = typer.Option(1.0, "--temperature", help="kNN softmax temperature."),
    max_new_tokens: int = typer.Option(50, "--max-new-tokens", help="Tokens to generate."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    search: str = SEARCH,
    device: str | None = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,  # no bar here; accepted so that every command takes --quiet
) -> None:
    """Continue a prompt with the kNN-LM (or the plain LM without --datastore)."""
    from knnlm.evaluate import open_inputs
    from knnlm.generation import check_settings, generate
    from knnlm.retrieval.retriever import KnnSettings

    # What the user can get wrong is checked before the model is loaded.
    check_settings(prompt, max_new_tokens, top_p)
    if datastore is not None:
        open_inputs(
            datastore,
            None,
            KnnSettings(k=k, knn_weight=knn_weight, temperature=temperature, search=search),
        )
    rank = _init_distributed()  # torchrun: the search is sharded, every rank generates
    lm = _load(model, device, dtype)
    text = generate(
        lm,
        prompt,
        datastore,
        k=k,
        knn_weight=knn_weight,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        top_p=top_p,
        seed=seed,
        search=search,
    )
    if rank == 0:
        typer.echo(prompt + text)


def register(app: typer.Typer) -> None:
    app.add_typer(datastore_app, name="datastore")
    app.command("eval")(eval_cmd)
    app.command("sweep")(sweep_cmd)
    app.command("generate")(generate_cmd)
