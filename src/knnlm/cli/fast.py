"""CLI: the fast kNN-LM pieces, `knnlm gate train` and `knnlm datastore prune`."""

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
    KNN_TEMPERATURE,
    MODEL,
    NPROBE,
    QUIET,
    SEARCH,
    SEED,
    STRIDE,
    WAIT,
    Dtype,
    GateKind,
    K,
    Search,
    echo_json,
    load_model,
    one_path,
    value,
)
from knnlm.cli.datastore_eval import DS_ARG, DS_OPT


def gate_train_cmd(
    model: str = MODEL,
    datastore: Path = DATASTORE,
    corpus: str = CORPUS,
    split: str = typer.Option("valid", "--split", help="Held-out split (never the evaluated one)."),
    out: Path = typer.Option(..., "--out", "-o", help="Gate directory to create."),
    kind: GateKind = typer.Option(
        GateKind.mlp, "--kind", help="mlp (He et al.'s weight predictor) or entropy (baseline)."
    ),
    k: int = K,
    knn_temp: float = KNN_TEMPERATURE,
    nprobe: int | None = NPROBE,
    search: Search = SEARCH,
    epochs: int = typer.Option(20, "--epochs", help="Training epochs (best held-out kept)."),
    hidden: int = typer.Option(128, "--hidden", help="MLP width."),
    layers: int = typer.Option(5, "--layers", help="MLP linear layers."),
    l1: float = typer.Option(0.05, "--l1", help="L1 penalty on the predicted kNN weight."),
    context_len: int | None = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    seed: int = SEED,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Train (mlp) or calibrate (entropy) a retrieval gate on a held-out split."""
    from knnlm.fileio import claim_target
    from knnlm.forward_pass import WindowSettings
    from knnlm.retrieval.datastore import open_datastore
    from knnlm.retrieval.gate import CONFIG, KIND
    from knnlm.retrieval.gate_train import GateSettings, train_gate
    from knnlm.retrieval.retriever import KNN_FLAGS, MIX_FLAGS, KnnSettings, MixSettings
    from knnlm.settings import build, flag

    knn = build(KnnSettings, KNN_FLAGS, k=k, nprobe=nprobe, search=value(search))
    mix = build(MixSettings, MIX_FLAGS, temperature=knn_temp)
    window = build(WindowSettings, flag(), context_len=context_len, stride=stride)
    claim_target(out, KIND, CONFIG, what="retrieval gate")  # before the model is loaded
    open_datastore(datastore)
    lm = load_model(model, device, dtype).lm
    settings = build(
        GateSettings, flag(), split=split, kind=value(kind), knn=knn, mix=mix,
        window=window.for_model(lm.model), batch_size=batch_size, hidden=hidden, layers=layers,
        epochs=epochs, l1=l1, seed=seed,
    )  # fmt: skip
    report = train_gate(lm, datastore, corpus, out, settings, progress=not quiet)
    report.pop("held_out_history", None)
    typer.echo(f"gate written: {out}")
    echo_json(report)


def prune_cmd(
    ds: Path | None = DS_ARG,
    ds_opt: Path | None = DS_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Pruned datastore directory to create."),
    k: int = typer.Option(9, "--k", "-k", help="Neighbours of each entry considered for merging."),
    nprobe: int | None = NPROBE,
    quiet: bool = QUIET,
    wait: bool = WAIT,
) -> None:
    """Greedy merging (He et al.): merge each entry's same-token neighbours into one entry
    with a count (a weight in p_knn); resumable. Build the new store's index afterwards."""
    from knnlm.retrieval.prune import prune_datastore

    ds = one_path(ds, ds_opt, "--datastore")
    report = prune_datastore(ds, out, k=k, nprobe=nprobe, progress=not quiet)
    typer.echo(
        f"pruned datastore {out}: {report['entries_before']} -> {report['entries_after']} "
        f"entries ({100 * report['removed_share']:.1f}% merged)"
    )


COMMANDS = [("gate train", gate_train_cmd), ("datastore prune", prune_cmd)]
