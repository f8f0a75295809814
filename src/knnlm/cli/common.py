"""Options and helpers shared by the CLI modules.

One definition per option name, so every command spells, abbreviates, documents and
defaults it the same way; choices are enums, which ``--help`` lists. A command adds an
option with ``name: Annotated[Type, OPTION] = default`` or the older ``name: Type = OPTION``.

Short flags: ``-m`` model, ``-c`` corpus, ``-d`` datastore, ``-o`` output, ``-p`` prompt,
``-k`` neighbours, ``-q`` quiet. No option has a second, hidden name.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from knnlm.errors import KnnlmError
from knnlm.fileio import write_json_atomic
from knnlm.locking import set_wait, writer_lock


class Dtype(str, Enum):
    """Weight dtype of the model."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Precision(str, Enum):
    """Mixed precision of training (not the weight dtype)."""

    float32 = "float32"
    bfloat16 = "bfloat16"


class KeyType(str, Enum):
    ffn_input = "ffn_input"
    block_input = "block_input"
    final_hidden = "final_hidden"


class KeyDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class IndexType(str, Enum):
    flat = "flat"
    ivfpq = "ivfpq"


class Metric(str, Enum):
    l2 = "l2"
    ip = "ip"


class ExcludeSelf(str, Enum):
    auto = "auto"
    yes = "yes"
    no = "no"


# Presets: one vocabulary per option name (tests/test_cli_options.py checks these lists
# against the registries they name, which the CLI does not import at start-up).
class LmPreset(str, Enum):
    """``knnlm train --preset``: the model sizes of ``knnlm.lm.presets``."""

    tiny = "tiny"
    small = "small"
    paper = "paper"


class HurdlePreset(str, Enum):
    """``knnlm hurdle --preset``: its architectures and the model sizes."""

    gpt2_small = "gpt2-small"
    quick = "quick"
    corpus = "corpus"
    tiny = "tiny"
    small = "small"
    paper = "paper"


class MacondoPreset(str, Enum):
    """``knnlm macondo run --preset``: the run presets of the Section 4 experiment."""

    quick = "quick"
    quick_finetune = "quick-finetune"
    default = "default"
    paper_gpt2 = "paper-gpt2"
    paper_mistral = "paper-mistral"


class Scale(str, Enum):
    """``knnlm reproduce --scale``."""

    quick = "quick"
    paper = "paper"


class Search(str, Enum):
    """Neighbour search backend (knnlm.retrieval.search.protocol)."""

    exact = "exact"
    faiss = "faiss"
    auto = "auto"


class GateKind(str, Enum):
    """``knnlm gate train --kind``: the retrieval gate (knnlm.retrieval.gate)."""

    mlp = "mlp"
    entropy = "entropy"


class GateWeight(str, Enum):
    """``knnlm eval --gate-weight``: the kNN weight of the tokens the gate lets search."""

    fixed = "fixed"
    learned = "learned"


def value(choice: Enum | str | None) -> str | None:
    """The plain string of an enum choice (library code takes strings)."""
    return choice.value if isinstance(choice, Enum) else choice


def init_distributed() -> int:
    """Join the process group that torchrun / accelerate launch set up; returns the rank.

    Every command that searches joins it first, so its exact search is sharded over the
    ranks (knnlm.retrieval.search.sharded); rank 0 alone writes and prints.
    """
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


QUIET = typer.Option(False, "--quiet", "-q", help="Silence progress bars.")
SEED = typer.Option(0, "--seed", help="Random seed.")
SEARCH = typer.Option(
    Search.auto,
    "--search",
    help="Neighbour search: exact (torch brute force on the model's device: exact neighbour "
    "sets), faiss (the datastore's FAISS index, re-ranked exactly; IVF-PQ is approximate) or "
    "auto, the fastest for device and store: on a GPU, exact on the GPU when the keys fit its "
    "memory, whatever index exists (beyond it, streamed keys or the index, whichever is "
    "estimated faster); on the CPU, the index when there is one, else faiss.knn exact search "
    "(torch exact without FAISS). The choice and why are in the results JSON "
    "(settings.search.why).",
)
GATE = typer.Option(None, "--gate", help="Retrieval gate (knnlm gate train).")
RETRIEVAL_RATE = typer.Option(
    1.0, "--retrieval-rate", help="Share of tokens the gate lets search (1: all, 0: none)."
)
GATE_WEIGHT = typer.Option(
    GateWeight.fixed,
    "--gate-weight",
    help="Searched tokens use --knn-weight (fixed) or the weight "
    "the mlp gate predicts per token (learned).",
)
DEVICE = typer.Option(None, "--device", help="torch device (default: cuda when present, else cpu).")
# Every command that writes an artifact takes it: one writer per artifact (knnlm.locking).
WAIT = typer.Option(
    False,
    "--wait",
    callback=set_wait,
    help="If another process is writing the same output, wait for it instead of stopping.",
)
MODEL = typer.Option(..., "--model", "-m", help="HF hub name or local model directory.")
CORPUS = typer.Option(
    ...,
    "--corpus",
    "-c",
    help="Directory with {train,valid,test}.txt, a text file, or hf:NAME[:CONFIG] / hf:json:PATTERN.",
)
DATASTORE = typer.Option(..., "--datastore", "-d", help="Datastore directory.")
OPTIONAL_DATASTORE = typer.Option(None, "--datastore", "-d", help="Datastore: adds the kNN-LM.")
CONTEXT = typer.Option(
    None,
    "--context-len",
    help="Tokens per scoring window. (default: the model's maximum positions)",
    show_default=False,
)
STRIDE = typer.Option(
    None,
    "--stride",
    help="Step between windows; smaller = more context. (default: half of --context-len)",
    show_default=False,
)
BATCH = typer.Option(8, "--batch-size", help="Windows per forward pass.")
DTYPE = typer.Option(Dtype.float32, "--dtype", help="Weight dtype of the model.")
TEXT_FIELD = typer.Option("text", "--text-field", help="Text column of an hf: dataset.")
K = typer.Option(1024, "--k", "-k", help="Neighbours per query.")
KNN_WEIGHT = typer.Option(
    0.25, "--knn-weight", help="Weight w on p_knn: (1-w) p_lm + w p_knn (the paper's lambda = 1-w)."
)
KNN_TEMPERATURE = typer.Option(
    1.0, "--knn-temperature", help="Temperature T of the kNN softmax over -distance / T."
)
# The sizes and name lists of Macondo, under the same names in macondo generate / run and
# reproduce (None: the run's or the generator's default).
VILLAGERS = typer.Option(
    None, "--villagers", min=1, help="Villagers in Macondo.  (default: the run's)",
    show_default=False,
)  # fmt: skip
PARENTS_PER_COUNT = typer.Option(
    None, "--parents-per-count", min=1,
    help="Macondo parents for each number of children.  (default: the run's)", show_default=False,
)  # fmt: skip
MAX_CHILDREN = typer.Option(
    None, "--max-children", min=1,
    help="Largest number of children of a Macondo parent.  (default: the run's)",
    show_default=False,
)  # fmt: skip
SENTENCES_PER_PAIR = typer.Option(
    None, "--sentences-per-pair", min=1,
    help="Macondo training sentences per parent-child pair.  (default: the run's)",
    show_default=False,
)  # fmt: skip
GIVEN_NAMES = typer.Option(
    None,
    "--given-names",
    help="Given-name file(s), one name a line; repeat for several. Children are drawn from the "
    "names that are single tokens under the model's tokenizer.  (default: built-in lists)",
    show_default=False,
    metavar="<path>",
)
SURNAMES = typer.Option(
    None,
    "--surnames",
    help="Surname file(s), one a line; repeat for several.  (default: built-in lists)",
    show_default=False,
    metavar="<path>",
)


def macondo_sizes(villagers: int | None, parents_per_count: int | None,
                  max_children: int | None, sentences_per_pair: int | None,
                  given_names: list[Path] | None, surnames: list[Path] | None) -> dict:  # fmt: skip
    """The Macondo sizes and name files given (MacondoSettings.sizes); a missing name file is
    refused here, naming its option."""
    for flag, files in (("--given-names", given_names), ("--surnames", surnames)):
        for f in files or ():
            if not Path(f).is_file():
                raise KnnlmError(f"{flag} {f}: no such file")
    sizes = {
        "n_villagers": villagers,
        "n_parents_per_count": parents_per_count,
        "max_children": max_children,
        "sentences_per_pair": sentences_per_pair,
        "given_names": [str(Path(f).resolve()) for f in given_names] if given_names else None,
        "surnames": [str(Path(f).resolve()) for f in surnames] if surnames else None,
    }
    return {key: v for key, v in sizes.items() if v is not None}


NPROBE = typer.Option(None, "--nprobe", help="IVF lists probed. (default: the index's)")


def one_path(positional: Path | None, option: Path | None, name: str) -> Path:
    """The path given either positionally or as ``name`` (a usage error if neither or both)."""
    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"given twice ({positional} and {option})", param_hint=name)
    path = positional if positional is not None else option
    if path is None:
        raise typer.BadParameter("missing (positionally or as an option)", param_hint=name)
    return path


def hold_lock(ctx: typer.Context, target: Path | None, what: str) -> None:
    """Hold the writer lock on ``target`` until the command ends. Taken before the model loads,
    so that of two commands started together the first is the one that writes."""
    if target is not None:
        ctx.with_resource(writer_lock(target, f"{what} {os.path.abspath(target)}"))


def output_file(value: Path | None) -> Path | None:
    """Option callback for --json / --png: refuse a folder before any work is done."""
    if value is not None and value.is_dir():
        raise KnnlmError(f"{value} is a folder; give a file name to write")
    return value


JSON_OUT = typer.Option(None, "--json", callback=output_file, help="Write results JSON here.")


def quiet_libraries() -> None:
    """Keep transformers / huggingface_hub from printing their own bars and warnings (hub
    retries included), so that an error stays one line."""
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def looks_like_path(name: str) -> bool:
    """Hub names are "name" or "org/name"; a leading dot, slash or tilde, deeper nesting, or
    a first part that is a local folder means a local path."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def check_model(model: str | None, flag: str = "--model") -> None:
    """A local model folder that does not exist is refused as such (not as a failed hub
    download)."""
    if model is None or Path(model).expanduser().exists() or not looks_like_path(model):
        return
    raise KnnlmError(f"{flag} {model}: no such folder")


def load_model(model: str, device: str | None, dtype: Dtype | str):
    """``KnnLM.from_pretrained`` with the libraries kept quiet (the API object)."""
    check_model(model)
    quiet_libraries()
    from knnlm.api import KnnLM

    return KnnLM.from_pretrained(model, device=device, dtype=value(dtype))


def write_json(path: Path | None, obj: Any) -> None:
    """Write a command's results JSON (atomically) when ``--json`` was given."""
    if path is not None:
        write_json_atomic(path, obj)


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))
