"""CLI: `knnlm tune` (the perplexity / speed frontier and its pick) and `--settings FILE`, the
tuned settings read by eval and generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from knnlm.cli.common import (
    BATCH,
    CONTEXT,
    CORPUS,
    DEVICE,
    DTYPE,
    GATE,
    JSON_OUT,
    MODEL,
    QUIET,
    SEARCH,
    STRIDE,
    TEXT_FIELD,
    Dtype,
    Search,
    load_model,
    output_file,
    value,
    write_json,
)
from knnlm.errors import KnnlmError

SETTINGS = typer.Option(
    None,
    "--settings",
    help="Settings file written by knnlm tune --out (k, weight, temperature, nprobe, search, "
    "pointers, gate, retrieval rate, datastore). A flag given beside it must agree with it.",
)

# settings-file key -> (the eval / generate parameter, its flag)
FLAGS = {
    "datastore": ("datastore", "--datastore"), "k": ("k", "--k"),
    "knn_weight": ("knn_weight", "--knn-weight"), "knn_temperature": ("knn_temp", "--knn-temperature"),
    "nprobe": ("nprobe", "--nprobe"), "search": ("search", "--search"),
    "pointers": ("pointers", "--pointers"), "gate": ("gate", "--gate"),
    "retrieval_rate": ("retrieval_rate", "--retrieval-rate"),
}  # fmt: skip


def apply_settings(ctx: typer.Context, path: Path | None, params: dict[str, Any]) -> dict:
    """``params`` (a command's parameters by name) with the settings file's values put in;
    a flag given on the command line that disagrees with the file is refused. Parameters the
    command lacks (generate has no gate) must be unused in the file."""
    if path is None:
        return params
    from knnlm.frontier import load_tuned_settings, merge_settings

    file = {key: _resolved(key, v) for key, v in load_tuned_settings(path).items()}
    given = {key: _plain(params[name]) for key, (name, _) in FLAGS.items()
             if name in params and _on_command_line(ctx, name)}  # fmt: skip
    merged = merge_settings(file, given, {k: flag for k, (_, flag) in FLAGS.items()}, path)
    out = dict(params)
    for key, v in merged.items():
        name, flag = FLAGS[key]
        if name not in params:
            if v is not None and not (key == "retrieval_rate" and v == 1.0):
                raise KnnlmError(f"--settings {path}: this command takes no {flag} (the file's "
                                 f"{key} = {v}); tune without it")  # fmt: skip
            continue
        out[name] = _typed(name, v)
    return out


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed the parameter (Typer may vendor its own click: by name)."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "COMMANDLINE"


def _plain(v: Any) -> Any:
    return str(Path(v).resolve()) if isinstance(v, Path) else value(v)


def _resolved(key: str, v: Any) -> Any:
    """Folders compared as absolute paths (``-d ds`` agrees with a file's ``/abs/ds``)."""
    return str(Path(v).resolve()) if key in ("datastore", "gate") and v is not None else v


def _typed(name: str, v: Any) -> Any:
    if v is None:
        return None
    if name in ("datastore", "gate"):
        return Path(v)
    return Search(v) if name == "search" and v in Search.__members__ else v


def _list(text: str | None, kind: type, option: str) -> tuple | None:
    if text is None:
        return None
    try:
        out = tuple(kind(float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        raise KnnlmError(f"{option} takes comma-separated numbers, got {text!r}") from None
    return out


def tune_cmd(
    model: str = MODEL,
    corpus: str = CORPUS,
    split: str = typer.Option("valid", "--split", help="Held-out split the frontier is measured on."),
    datastore: list[Path] = typer.Option(
        ..., "--datastore", "-d",
        help="Datastore; repeat to add other artifacts of it (a pruned or PCA-indexed store) to "
        "the frontier. The first is the default kNN-LM's.",
    ),
    ks: str = typer.Option("1024,256,64", "--ks", help="k values (eval's 1024 always added)."),
    knn_weights: str = typer.Option("0.1,0.25,0.4", "--knn-weights", help="kNN weights."),
    knn_temperatures: str = typer.Option("0.5,1,2", "--knn-temperatures", help="Temperatures."),
    nprobes: str | None = typer.Option(
        None, "--nprobes", help="nprobe values for an IVF index (default: its own, 1/2, 1/4).",
        show_default=False,
    ),
    gate: Path | None = GATE,
    retrieval_rates: str = typer.Option(
        "0.25,0.5,0.75", "--retrieval-rates", help="The gate's retrieval rates (with --gate)."
    ),
    pointers: str | None = typer.Option(
        None, "--pointers", help="RetoMaton thresholds to try, one pass each (default: none).",
        show_default=False,
    ),
    search: Search = SEARCH,
    keep_gain: float = typer.Option(
        0.95, "--keep-gain", help="Pick the fastest setting keeping this share of the default "
        "kNN-LM's log-perplexity gain over the LM."
    ),
    min_speed: float | None = typer.Option(
        None, "--min-speed", help="Instead: the best perplexity at this share of the LM's tok/s.",
    ),
    speed_tokens: int = typer.Option(4096, "--speed-tokens", help="Tokens of each timed pass."),
    speed_repeats: int = typer.Option(
        2, "--speed-repeats", help="Timing rounds per setting (the LM, then the setting); the "
        "median ratio counts."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", callback=output_file,
        help="Write the pick's settings file here (for eval / generate --settings).",
    ),
    plot: Path | None = typer.Option(
        None, "--plot", callback=output_file, help="Draw the frontier (PNG)."

    ),
    json_out: Path | None = JSON_OUT,
    context_len: int | None = CONTEXT,
    stride: int | None = STRIDE,
    batch_size: int = BATCH,
    text_field: str = TEXT_FIELD,
    device: str | None = DEVICE,
    dtype: Dtype = DTYPE,
    quiet: bool = QUIET,
) -> None:  # fmt: skip
    """Measure perplexity against tok/s on --split over k, nprobe, weight, temperature, a
    gate's retrieval rate and pointers (one search at the largest k per setting that changes
    the neighbours; smaller k are its prefixes), print the frontier and pick a setting."""
    from knnlm.forward_pass import WindowSettings
    from knnlm.frontier import write_tuned_settings
    from knnlm.retrieval.datastore import open_datastore
    from knnlm.settings import build, flag
    from knnlm.tune import TuneSettings, tune

    # Every setting checked once, here, before the model is loaded.
    settings = build(
        TuneSettings, flag(), split=split,
        window=build(WindowSettings, flag(), context_len=context_len, stride=stride),
        batch_size=batch_size, text_field=text_field, ks=_list(ks, int, "--ks"),
        knn_weights=_list(knn_weights, float, "--knn-weights"),
        knn_temperatures=_list(knn_temperatures, float, "--knn-temperatures"),
        nprobes=_list(nprobes, int, "--nprobes"),
        retrieval_rates=_list(retrieval_rates, float, "--retrieval-rates"),
        pointers=_list(pointers, float, "--pointers") or (), gate=gate, search=value(search),
        speed_tokens=speed_tokens, speed_repeats=speed_repeats, keep_gain=keep_gain,
        min_speed=min_speed,
    )  # fmt: skip
    for d in datastore:
        open_datastore(d)  # a missing store costs no model load
    knn_lm = load_model(model, device, dtype)
    result = tune(knn_lm.lm, corpus, [str(d) for d in datastore], settings, progress=not quiet)
    write_json(json_out, result)
    if out is not None:
        write_tuned_settings(out, result["settings"])
    if plot is not None:
        from knnlm.report.tune_figure import plot_frontier

        plot_frontier(result, plot)
    typer.echo(frontier_table(result))


def frontier_table(result: dict) -> str:
    """The frontier, fastest first, the LM and the default kNN-LM above it, the pick below."""
    head = (f"{'setting':<44}{'perplexity':>11}{'gain kept':>10}{'tok/s':>10}{'of LM':>7}"
            f"{'searched':>9}  neighbours")  # fmt: skip
    lm = result["lm"]
    lines = [head, f"{'LM':<44}{lm['perplexity']:>11.3f}{'-':>10}{lm['tok_s']:>10.0f}{'100%':>7}"]
    lines.append(_row("default kNN-LM: " + _name(result["default"]), result["default"]))
    lines += [_row(_name(result["points"][i]), result["points"][i]) for i in result["frontier"]]
    p = result["pick"]
    lines.append("")
    rule = result["rule"]
    why = (f"best perplexity at >= {rule['min_speed']:g} of the LM's tok/s" if "min_speed" in rule
           else f"fastest keeping >= {rule['keep_gain']:g} of the gain")  # fmt: skip
    lines.append(f"pick ({why}): {_name(p)}; perplexity through eval {p['perplexity_checked']:.3f}")
    lines += [f"note: {n}" for n in result["notes"]]
    lines.append(f"{len(result['points'])} points on {result['tokens']} tokens of "
                 f"{result['split']}; speed: the median of {result['speed_repeats']} rounds (the LM, "
                 f"then the setting) over {result['speed_tokens']} tokens")  # fmt: skip
    return "\n".join(lines)


def _name(p: dict) -> str:
    parts = [f"k {p['k']}", f"w {p['knn_weight']:g}", f"T {p['knn_temperature']:g}"]
    if p["nprobe"] is not None:
        parts.append(f"nprobe {p['nprobe']}")
    if p["retrieval_rate"] is not None:
        parts.append(f"gate {p['retrieval_rate']:g}")
    if p["pointers"] is not None:
        parts.append(f"pointers {p['pointers']:g}")
    if p["store"]:
        parts.append(f"-d {Path(p['datastore']).name}")
    return ", ".join(parts)


def _row(name: str, p: dict) -> str:
    kept = "-" if p["gain_kept"] is None else f"{100 * p['gain_kept']:.1f}%"
    return (f"{name:<44}{p['perplexity']:>11.3f}{kept:>10}{p['tok_s']:>10.0f}"
            f"{100 * p['speed_share']:>6.0f}%{100 * p['searched']:>8.0f}%  {p['neighbours']}")  # fmt: skip


COMMANDS = [("tune", tune_cmd)]
