"""Shared plumbing of the benchmark scripts: arguments, machine info, corpus prefixes, the
model under test, JSON output and steps run in child processes (so each step's peak RSS is its
own). Benchmarks print JSON and compare ratios measured within one run; they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Relative to the repository root (resolved from this file), never a machine's absolute path.
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = str((REPO / ".." / "shared" / "data" / "wikitext-2").resolve())
DEFAULT_MODEL = str((REPO / ".." / "runs" / "small-wt2").resolve())
SPLITS = ("train", "valid", "test")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help="WikiText-style dir (train/valid/test); default ../shared/data/wikitext-2 beside "
        "the repository",
    )
    ap.add_argument(
        "--model",
        default=None,
        help=f"trained model dir (default {DEFAULT_MODEL} when it exists, else random weights)",
    )
    ap.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--workdir", default=None, help="keep intermediate files here (default: tmp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="show progress bars on stderr")


# --------------------------------------------------------------------------- output


def machine_info() -> dict:
    import faiss
    import numpy
    import torch
    import transformers

    import knnlm

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "cuda": torch.cuda.is_available(),
        # Other work on the machine skews absolute times; ratios within a run suffer less.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "faiss": faiss.__version__,
            "numpy": numpy.__version__,
            "knnlm": getattr(knnlm, "__version__", None),
        },
    }
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def emit(result: dict, out: str | None) -> None:
    """Print the JSON to stdout and, with ``out``, write it atomically to that file."""
    text = json.dumps(result, indent=2, default=_jsonable)
    print(text, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)


def run_and_emit(name: str, run: Callable[[argparse.Namespace, Path], dict], args) -> None:
    """``run(args, work)`` in ``--workdir`` (kept) or a temporary folder; emit its JSON."""
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        res = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            res = run(args, Path(tmp))
    emit(res, args.out)


def stderr_logger() -> Callable[[str], None]:
    """log(msg): ``msg`` on stderr with the seconds since this call (the JSON is on stdout)."""
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def _jsonable(x):
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def skip_unless_corpus(corpus: str, out: str | None) -> Path:
    """The corpus dir; when a split is missing, print {"skipped": reason} and exit 0."""
    path = Path(corpus)
    missing = [s for s in SPLITS if not (path / f"{s}.txt").is_file()]
    if missing:
        emit({"skipped": f"corpus {path} not found or lacks {', '.join(missing)}.txt"}, out)
        sys.exit(0)
    return path


# --------------------------------------------------------------------------- memory, time


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux's VmHWM belongs to the current address space, so a child started by fork + exec
    reports its own peak; ``ru_maxrss`` would carry the parent's peak across exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mib() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


# --------------------------------------------------------------------------- corpus, model


def prefix_corpus(src: Path, dst: Path, fractions: dict[str, float]) -> dict[str, int]:
    """Write ``dst/{split}.txt`` holding the first lines of each split, about ``fraction`` of its
    bytes (whole lines; at least one). Returns the bytes written per split."""
    dst.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        data = (src / f"{split}.txt").read_bytes()
        frac = fractions.get(split, 1.0)
        if not 0 < frac <= 1:
            raise SystemExit(f"--{split}-fraction must be in (0, 1], got {frac}")
        cut = len(data) if frac >= 1 else data.find(b"\n", int(len(data) * frac))
        part = data if cut < 0 else data[: cut + 1]
        tmp = dst / f".{split}.txt.tmp"
        tmp.write_bytes(part)
        tmp.replace(dst / f"{split}.txt")
        written[split] = len(part)
    return written


def resolve_model(arg: str | None) -> str | None:
    """The trained model to use: ``--model``, else the default run dir when present, else None."""
    if arg:
        if not Path(arg).is_dir():
            raise SystemExit(f"--model {arg} is not a directory")
        return arg
    return DEFAULT_MODEL if Path(DEFAULT_MODEL, "config.json").is_file() else None


def model_under_test(arg: str | None, corpus: Path, work: Path, seed: int) -> tuple[str, dict]:
    """(model dir, the result's ``model`` entry): the trained model of :func:`resolve_model`,
    else a random ``small`` one with a tokenizer trained on ``corpus`` (built under ``work``)."""
    model = resolve_model(arg)
    if model is not None:
        return model, {"path": model, "weights": "trained"}
    model = str(random_small_model(corpus, work / "random-small", seed))
    return model, {"path": None, "weights": "random weights (small preset)"}


def random_small_model(corpus: Path, out: Path, seed: int = 0) -> Path:
    """A random ``small``-preset GPT-2 with a BPE tokenizer trained on ``corpus``'s train split,
    saved in HF format at ``out`` (reused when already there)."""
    if (out / "config.json").is_file():
        return out
    from knnlm.lm.presets import build_model_from_preset, get_preset
    from knnlm.lm.train_data import train_tokenizer_for_corpus

    preset = get_preset("small")
    tok = train_tokenizer_for_corpus(str(corpus), preset.tokenizer_vocab_size)
    model = build_model_from_preset("small", len(tok), tok, seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def model_context(model_dir: str | Path) -> int:
    """The context the model was trained with (train_meta.json), else its position table size
    capped at the ``small`` preset's context."""
    from knnlm.lm.presets import get_preset

    meta = Path(model_dir, "train_meta.json")
    if meta.is_file():
        ctx = json.loads(meta.read_text()).get("train_config", {}).get("context_len")
        if ctx:
            return int(ctx)
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    n_pos = cfg.get("n_positions") or cfg.get("max_position_embeddings") or 1024
    return int(min(n_pos, get_preset("small").context_len))


# --------------------------------------------------------------------------- child steps

CHILD_FLAG = "--child-step"


def run_child(script: str, step: str, payload: dict, timeout: float | None = None) -> dict:
    """Run ``script --child-step STEP PAYLOAD`` in a fresh interpreter; return its JSON result.

    A fresh process per step makes the reported ``peak_rss_mib`` that step's own peak.
    """
    cmd = [sys.executable, script, CHILD_FLAG, step, json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"step {step!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(steps: dict[str, Callable[[dict], dict]]) -> bool:
    """When invoked as a child step, run it, print its JSON (with peak RSS) and return True."""
    if len(sys.argv) < 4 or sys.argv[1] != CHILD_FLAG:
        return False
    quiet_libraries()
    step, payload = sys.argv[2], json.loads(sys.argv[3])
    out = steps[step](payload)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, default=_jsonable), flush=True)
    return True


def quiet_libraries() -> None:
    """Silence library warnings and transformers' own bars: the JSON is the output."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
