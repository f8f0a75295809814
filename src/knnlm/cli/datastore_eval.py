"""CLI: datastore build / index / info, eval, sweep."""

from __future__ import annotations

from pathlib import Path

import typer

from knnlm.cli.common import (
    BATCH,
    CONTEXT,
    CORPUS,
    DEVICE,
    DTYPE,
    GATE,
    GATE_WEIGHT,
    JSON_OUT,
    KNN_TEMPERATURE,
    KNN_WEIGHT,
    MODEL,
    NPROBE,
    OPTIONAL_DATASTORE,
    QUIET,
    RETRIEVAL_RATE,
    SEARCH,
    STRIDE,
    TEXT_FIELD,
    WAIT,
    Dtype,
    ExcludeSelf,
    GateWeight,
    IndexType,
    K,
    KeyDtype,
    KeyType,
    Metric,
    Search,
    hold_lock,
    init_distributed,
    load_model,
    one_path,
    output_file,
    value,
    write_json,
)
from knnlm.cli.tune import SETTINGS, apply_settings
from knnlm.errors import KnnlmError

DS_ARG = typer.Argument(None, help="Datastore directory (or --datastore/-d).", show_default=False)
DS_OPT = typer.Option(None, "--datastore", "-d", help="Datastore directory (or positionally).")


def datastore_build(
    ctx: typer.Context,
    model: str = MODEL,
    corpus: str = CORPUS,
    out: Path = typer.Option(..., "--out", "-o", help="Datastore directory to create."),
    split: str = typer.Option("train", "--split", help="Corpus split to store."),
    context_len: int | None = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    key_type: KeyType = typer.Option(KeyType.ffn_input, "--key-type", help="What a key is."),
    key_dtype: KeyDtype = typer.Option(KeyDtype.float16, "--key-dtype", help="Stored key dtype."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different datastore."),
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Score a corpus split and store one (key, next token) pair per position; resumable.

    Under torchrun / accelerate launch each process scores its share of the windows.
    """
    from knnlm.data.corpus import pick_split
    from knnlm.fileio import claim_target
    from knnlm.forward_pass import WindowSettings
    from knnlm.retrieval.datastore import KIND, META, Datastore, DatastoreSettings
    from knnlm.settings import build, flag

    rank = init_distributed()  # first: rank 0 takes the writer lock for the group
    hold_lock(ctx, out, "datastore")
    claim_target(out, KIND, META)  # a foreign --out is refused before the model is loaded
    window = build(WindowSettings, flag(), context_len=context_len, stride=stride)
    settings = build(
        DatastoreSettings, flag(), split=pick_split(corpus, split, "train"), window=window,
        batch_size=batch_size, key_type=value(key_type), key_dtype=value(key_dtype),
        text_field=text_field,
    )  # fmt: skip
    knn_lm = load_model(model, device, dtype)
    ds = Datastore.make(knn_lm, corpus, out, settings, overwrite=overwrite, progress=not quiet)
    if rank == 0:
        typer.echo(f"datastore {ds.path}: {len(ds)} keys of size {ds.info()['dim']} "
                   f"({ds.meta['key_type']})")  # fmt: skip


def datastore_index(
    ds: Path | None = DS_ARG,
    ds_opt: Path | None = DS_OPT,
    type_: IndexType = typer.Option(IndexType.flat, "--type", help="flat (exact) or IVF-PQ."),
    metric: Metric = typer.Option(Metric.l2, "--metric", help="squared L2 or inner product."),
    nlist: int | None = typer.Option(None, "--nlist", help="IVF lists. (default: ~4*sqrt(N))"),
    pq_m: int | None = typer.Option(None, "--pq-bytes", help="PQ bytes per vector (divides d)."),
    pq_bits: int = typer.Option(8, "--pq-bits", help="Bits per PQ code."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="Lists probed. (default: 32+)"),
    train_size: int | None = typer.Option(None, "--train-size", help="Cap on training sample."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training sample."),
    factory: str | None = typer.Option(
        None, "--factory", help='Any faiss.index_factory string instead (e.g. "HNSW32").'
    ),
    pca: int | None = typer.Option(None, "--pca", help="PCA keys to D dims in front of the index."),
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        "-c",
        help="Also measure the perplexity change the index causes on a "
        "split of this corpus (kNN-LM with exact search vs through the index).",
    ),
    split: str = typer.Option("valid", "--split", help="Split of --corpus for that check."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="LM for the check. (default: the datastore's model)"
    ),
    k: int = K,
    knn_weight: float = KNN_WEIGHT,
    knn_temp: float = KNN_TEMPERATURE,
    context_len: int | None = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    device: str | None = DEVICE,
    dtype: Dtype | None = typer.Option(
        None,
        "--dtype",
        help="Weight dtype of the model for the --corpus check.  (default: the datastore's)",
        show_default=False,
    ),
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Build a FAISS index beside the datastore (index.faiss + index.json); resumable.

    Approximate indexes report their recall@k against exact search, and with --corpus the
    kNN-LM perplexity change they cause on --split (both stored in index.json)."""
    from knnlm.retrieval.retriever import KNN_FLAGS, MIX_FLAGS, KnnSettings, MixSettings
    from knnlm.retrieval.search.index_build import index_summary, make_index
    from knnlm.retrieval.search.index_settings import INDEX_FLAGS, IndexSettings
    from knnlm.settings import build

    ds = one_path(ds, ds_opt, "--datastore")
    # before the build: a bad setting or a missing split costs nothing
    settings = build(
        IndexSettings, INDEX_FLAGS, kind=value(type_), metric=value(metric), nlist=nlist,
        pq_m=pq_m, pq_bits=pq_bits, nprobe=nprobe, train_size=train_size, seed=seed,
        factory=factory, pca=pca,
    )  # fmt: skip
    knn = build(KnnSettings, KNN_FLAGS, k=k)
    mix = build(MixSettings, MIX_FLAGS, knn_weight=knn_weight, temperature=knn_temp)
    if corpus is not None:
        from knnlm.data.corpus import read_split
        from knnlm.lm.loading import reload_name
        from knnlm.retrieval.datastore import open_datastore

        read_split(corpus, split)
        model = model or reload_name(open_datastore(ds).meta["model"], f"datastore {ds}",
                                     "pass --model")  # fmt: skip
    path = make_index(ds, settings, progress=not quiet)
    typer.echo(f"index written: {path} ({index_summary(ds)})")
    if corpus is not None:
        _index_check(
            ds, corpus, split, model, (knn, mix), (context_len, stride, batch_size),
            (device, dtype), quiet,
        )  # fmt: skip


def _index_check(ds: Path, corpus: str, split: str, model: str | None, knn_mix: tuple,
                 window: tuple, placement: tuple, quiet: bool) -> None:  # fmt: skip
    """The kNN-LM perplexity with exact search and through the new index, recorded beside it;
    ``knn_mix``: the KnnSettings and MixSettings of both runs."""
    from knnlm.index_perplexity import index_perplexity_check
    from knnlm.retrieval.datastore import open_datastore
    from knnlm.retrieval.search.conventions import index_identity, record_index_check

    meta = open_datastore(ds).meta
    knn, mix = knn_mix
    sha = index_identity(ds)
    context_len, stride, batch_size = window
    device, dtype = placement
    dtype = value(dtype) or meta.get("model_dtype") or "float32"
    knn_lm = load_model(model, device, dtype)
    check = index_perplexity_check(
        knn_lm.lm, corpus, split, ds, knn, mix, context_len=context_len or meta.get("context_len"),
        stride=stride or meta.get("stride"), batch_size=batch_size, progress=not quiet,
    )  # fmt: skip
    record_index_check(ds, check, sha)
    typer.echo(
        f"kNN-LM perplexity on {split} ({check['tokens']} tokens, k={knn.k}): exact "
        f"{check['exact_perplexity']:.3f}, through the index {check['index_perplexity']:.3f} "
        f"({100 * check['relative_change']:+.2f}%)"
    )


def datastore_info(
    ds: Path | None = DS_ARG,
    ds_opt: Path | None = DS_OPT,
    json_out: Path | None = JSON_OUT,
    quiet: bool = QUIET,  # nothing to silence; accepted so that every command takes --quiet
) -> None:
    """Size, key type, model, corpus, index and bytes on disk of a datastore."""
    from knnlm.retrieval.datastore import Datastore

    info = Datastore.load(one_path(ds, ds_opt, "--datastore")).info()
    write_json(json_out, info)
    width = max(map(len, info))
    for key, val in info.items():
        typer.echo(f"{key:<{width}}  {val if val is not None else '-'}")


def eval_cmd(
    ctx: typer.Context,
    model: str = MODEL,
    corpus: str = CORPUS,
    split: str = typer.Option("valid", "--split", help="Corpus split to score."),
    context_len: int | None = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    datastore: Path | None = OPTIONAL_DATASTORE,
    k: int = K,
    knn_weight: float = KNN_WEIGHT,
    knn_temp: float = KNN_TEMPERATURE,
    recompute: bool = typer.Option(
        True, "--recompute/--no-recompute", help="Exact distances from stored keys."
    ),
    nprobe: int | None = NPROBE,
    search: Search = SEARCH,
    exclude_self: ExcludeSelf = typer.Option(
        ExcludeSelf.auto,
        "--exclude-self",
        help="Drop each target's own datastore row: auto (when the text is the datastore's "
        "own token stream, whatever the context/stride), yes (refused for other text) or no.",
    ),
    memory: Path | None = typer.Option(None, "--memory", help="MLP memory directory (Section 5)."),
    memory_weight: float = typer.Option(0.25, "--memory-weight", help="Weight on the MLP memory."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Store neighbours per token for knnlm sweep."
    ),
    json_out: Path | None = JSON_OUT,
    gate: Path | None = GATE,
    retrieval_rate: float = RETRIEVAL_RATE,
    gate_weight: GateWeight = GATE_WEIGHT,
    pointers: float | None = typer.Option(
        None,
        "--pointers",
        help="RetoMaton: search only where fewer than this many pointers "
        "from the previous token's neighbours survive (inf: every token).",
    ),
    settings: Path | None = SETTINGS,
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Perplexity of the LM, and of the kNN-LM / LM + MLP memory when given, from one pass."""
    from dataclasses import replace

    from knnlm.evaluate import EvalSettings, check_pointers, open_gate, open_inputs, run_eval
    from knnlm.forward_pass import WindowSettings
    from knnlm.retrieval.retriever import KNN_FLAGS, MIX_FLAGS, KnnSettings, MixSettings
    from knnlm.settings import build, flag

    if settings is not None:  # the tuned settings (knnlm tune --out); flags must agree
        tuned = apply_settings(ctx, settings, dict(
            datastore=datastore, k=k, knn_weight=knn_weight, knn_temp=knn_temp, nprobe=nprobe,
            search=search, pointers=pointers, gate=gate, retrieval_rate=retrieval_rate))  # fmt: skip
        datastore, k, knn_weight, knn_temp = (tuned[n] for n in ("datastore", "k", "knn_weight",
                                                                 "knn_temp"))  # fmt: skip
        nprobe, search, pointers = tuned["nprobe"], tuned["search"], tuned["pointers"]
        gate, rate = tuned["gate"], tuned["retrieval_rate"]
        retrieval_rate = 1.0 if rate is None else rate  # the file's null: no gate
    # What the user can get wrong is checked before the model is loaded.
    window = build(WindowSettings, flag(), context_len=context_len, stride=stride)
    knn = build(KnnSettings, KNN_FLAGS, k=k, recompute=recompute, nprobe=nprobe,
                exclude_self=value(exclude_self), search=value(search))  # fmt: skip
    mix = build(MixSettings, MIX_FLAGS, knn_weight=knn_weight, temperature=knn_temp,
                memory=memory, memory_weight=memory_weight, gate=gate,
                retrieval_rate=retrieval_rate, gate_weight=value(gate_weight),
                pointers=pointers)  # fmt: skip
    # Under torchrun every rank scores the whole split and holds a shard of the datastore for
    # exact search (knnlm.retrieval.search.sharded); rank 0 alone writes and prints, and holds the
    # cache's lock for the group (so the group joins before the lock is taken).
    rank = init_distributed()
    hold_lock(ctx, cache, "neighbour cache")
    datastore = open_inputs(datastore, cache, knn)
    if datastore is not None:
        datastore.check_k(k, "--k")
    gate_obj = open_gate(mix, datastore, cache)
    check_pointers(mix, datastore, cache)
    knn_lm = load_model(model, device, dtype)
    settings = EvalSettings(split, window.for_model(knn_lm.model), batch_size, text_field, knn,
                            mix if gate_obj is None else replace(mix, gate=gate_obj))  # fmt: skip
    result = run_eval(knn_lm.lm, corpus, settings, datastore=datastore,
                      cache=cache if rank == 0 else None,
                      progress=not quiet and rank == 0)  # fmt: skip
    if rank != 0:
        return
    for warning in result["warnings"]:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    write_json(json_out, result)
    line = f"tokens {result['tokens']}  LM ppl {result['lm']['perplexity']:.3f}"
    if "knnlm" in result:
        line += f"  kNN-LM ppl {result['knnlm']['perplexity']:.3f}"
        if gate_obj is not None or pointers is not None:
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


def _check_cache(cache: Path) -> None:
    from knnlm.fileio import artifact_kind

    if artifact_kind(cache, "meta.json") == "datastore":
        raise KnnlmError(
            f"{cache} is a datastore, not a neighbour cache; make one with "
            f"knnlm eval ... -d {cache} --cache CACHE"
        )


def sweep_cmd(
    cache: Path | None = typer.Argument(
        None, help="Neighbour cache written by knnlm eval --cache (or --cache).", show_default=False
    ),
    cache_opt: Path | None = typer.Option(None, "--cache", help="Neighbour cache directory."),
    weights: str = typer.Option(
        "0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6",
        "--knn-weights",
        help="Comma-separated kNN weights w (as --knn-weight).",
    ),
    temperatures: str = typer.Option(
        "0.5,1,2,3,5,10", "--knn-temperatures", help="Comma-separated kNN temperatures."
    ),
    ks: str | None = typer.Option(
        None, "--ks", help="Comma-separated k values (<= cached k). (default: the cached k)"
    ),
    json_out: Path | None = typer.Option(
        None, "--json", callback=output_file, help="Write the grid as JSON here."
    ),
    png: Path | None = typer.Option(
        None, "--png", callback=output_file, help="Heat map of the grid (largest k)."
    ),
    quiet: bool = QUIET,
) -> None:
    """Re-score cached neighbours over kNN weight x temperature x k without searching again;
    prints the perplexity table per k and the best point."""
    from knnlm.sweep import sweep

    cache = one_path(cache, cache_opt, "--cache")
    _check_cache(cache)
    result = sweep(
        cache,
        _numbers(weights, float, "--knn-weights"),
        _numbers(temperatures, float, "--knn-temperatures"),
        _numbers(ks, int, "--ks"),
        progress=not quiet,
    )
    write_json(json_out, sweep_json(result))
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
    typer.echo(sweep_table(result))


def sweep_json(result: dict) -> dict:
    """The sweep's results under the option names of the CLI (knn_weights, knn_temperatures,
    knn_weight, knn_temperature)."""
    best = dict(result["best"])
    best["knn_temperature"] = best.pop("temperature")
    out = {key: v for key, v in result.items() if key not in ("weights", "temperatures", "best")}
    return out | {
        "knn_weights": result["weights"],
        "knn_temperatures": result["temperatures"],
        "best": best,
    }


def sweep_table(result: dict) -> str:
    """kNN-LM perplexity per k: one row per kNN weight, one column per temperature; the LM's
    perplexity and the best point below."""
    temps = result["temperatures"]
    lines = []
    for k, grid in zip(result["ks"], result["perplexity"], strict=True):
        lines.append(f"k={k}   kNN weight \\ kNN temperature")
        lines.append(" " * 8 + "".join(f"{t:>10g}" for t in temps))
        for w, row in zip(result["weights"], grid, strict=True):
            lines.append(f"{w:>8g}" + "".join(f"{p:>10.3f}" for p in row))
        lines.append("")
    best = result["best"]
    lines.append(f"LM perplexity {result['lm']['perplexity']:.3f}; best: k={best['k']}, "
                 f"--knn-weight {best['knn_weight']:g}, --knn-temperature "
                 f"{best['temperature']:g}: {best['perplexity']:.3f}")  # fmt: skip
    return "\n".join(lines)


COMMANDS = [
    ("datastore build", datastore_build),
    ("datastore index", datastore_index),
    ("datastore info", datastore_info),
    ("eval", eval_cmd),
    ("sweep", sweep_cmd),
]
