"""Fault injection: SIGKILL the real CLI at random instants, rerun it, compare the artifact.

For each command the driver first runs it once without interruption (the reference). Each
trial then starts the same command on a fresh target, kills it with SIGKILL after a seeded
random delay drawn from [0, reference wall time], and checks:

1. right after the kill, the target is either absent (or still holds the artifact it held
   before, for the --overwrite case) or byte-identical to the reference: a partial artifact
   is never left where a reader would take it as complete;
2. rerunning the same command exits 0 and leaves an artifact byte-identical to the reference,
   with no temporary left beside it.

"Byte-identical" compares every file of the artifact folder (hidden ones included, so a
stray temporary or marker counts as a difference); JSON metadata is compared after dropping
the fields that record wall-clock facts of a run (creation time, seconds, throughput,
"resumed_from"). Training (``train``, ``memory train``) is compared to the uninterrupted run
itself: on one machine with one thread, resuming from a checkpoint (weights, optimiser,
scheduler and RNG state) reproduces it bit for bit.

    python scripts/fault_inject.py --trials 10 --seed 0 [--commands build,index,...]

Prints one JSON object: per command the trial counts (killed while running / finished before
the kill / identical after rerun / failures with reasons) and timings.

``--concurrent`` runs two writers instead: each trial starts the command, then the same command
on the same target after a seeded random delay in [0, reference wall time], and checks that
both exit 0 or 2 (2 with one line naming the holder), at least one exits 0, the artifact is
identical to the reference and nothing else is left beside it (no lock file, no temporary).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Wall-clock facts of a run, not part of an artifact's content.
VOLATILE = {
    "created",
    "saved",
    "seconds",
    "build_seconds",
    "tokens_per_s",
    "tokens_per_second",
    "resumed_from",
    "timing",
}
TEMP_SUFFIXES = (".partial", ".knnlm-old")
TEMP_PARTS = ("partial", ".tmp", ".pending", ".knnlm-temp")  # temporaries inside a folder


def is_temp_name(name: str) -> bool:
    return any(part in name for part in TEMP_PARTS)


WORDS = (
    "the a village river old new house parent child friend born married year green quiet "
    "market bridge song winter summer road stone baker teacher of in to and was is who"
).split()


def _text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + " .\n"
        for _ in range(n_lines)
    )


def make_fixtures(work: Path, train_lines: int = 600) -> dict[str, Path]:
    """A word-salad corpus and a tiny random GPT-2 saved with save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from knnlm.lm.tokenizer import train_bpe_tokenizer

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "train.txt").write_text(_text(train_lines, 0))
    (corpus / "valid.txt").write_text(_text(120, 1))
    (corpus / "test.txt").write_text(_text(40, 2))
    tok = train_bpe_tokenizer(
        (corpus / "train.txt").read_text().splitlines(keepends=True), vocab_size=300
    )
    torch.manual_seed(0)
    special = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), tok.eos_token_id)
    cfg = AutoConfig.for_model(
        "gpt2", vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, **special
    )
    model_dir = work / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {"corpus": corpus, "model": model_dir}


def _env() -> dict[str, str]:
    # One thread: the same reductions in the same order in every run.
    return dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", TQDM_DISABLE="1"
    )


def cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "knnlm", *map(str, args)]


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def snapshot(
    folder: Path, trial: Path | None = None, skip_temps: bool = False
) -> dict[str, str] | None:
    """{relative path: content digest} of every file under ``folder`` (None if absent).

    In JSON files the trial folder's own path is written as {T}: the reference and each
    trial run in different folders. ``skip_temps`` leaves out temporaries inside the folder
    (right after a kill they may exist; what a reader takes as the artifact must not change).
    """
    if not folder.exists():
        return None
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if skip_temps and is_temp_name(str(p.relative_to(folder))):
            continue
        data = p.read_bytes()
        if p.suffix == ".json":
            try:
                text = data.decode()
                if trial is not None:
                    text = text.replace(str(trial), "{T}")
                data = json.dumps(_strip(json.loads(text)), sort_keys=True).encode()
            except (UnicodeDecodeError, ValueError):
                pass  # compared as bytes: a torn JSON file differs
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()[:16]
    return out


def _diff(a: dict | None, b: dict | None) -> str:
    if a is None or b is None:
        return f"present={a is not None} vs expected present={b is not None}"
    keys = sorted(set(a) | set(b))
    bad = [k for k in keys if a.get(k) != b.get(k)]
    return "differs in " + ", ".join(bad[:6])


def index_reader_view(folder: Path) -> None:
    """What the index loader reads after a kill between its two renames.

    ``index.json.pending`` names the new index file's SHA-256; the loader takes it as the
    metadata when ``index.faiss`` matches that hash (and the rerun commits it). Applied to a
    copy of the folder, so the check compares what a reader would use.
    """
    pending, index = folder / "index.json.pending", folder / "index.faiss"
    if not pending.is_file() or not index.is_file():
        return
    try:
        want = json.loads(pending.read_text()).get("index_sha256")
    except ValueError:
        return
    if want == hashlib.sha256(index.read_bytes()).hexdigest():
        shutil.copyfile(pending, folder / "index.json")


@dataclass
class Command:
    name: str
    argv: list[str]  # with {T} standing for the target folder
    target: str  # folder (relative to the trial dir) holding the artifact
    prepare: Any = None  # fn(trial_dir) called before each run on a fresh trial dir
    before: dict | None = None  # snapshot the target may hold before the command completes
    reader_view: Any = None  # fn(copy of the target) -> None: as its loader would read it

    def args(self, trial: Path) -> list[str]:
        return [str(a).replace("{T}", str(trial)) for a in self.argv]


@dataclass
class Stats:
    trials: int = 0
    killed: int = 0  # the kill landed while the command ran
    finished_first: int = 0  # the command ended before its instant
    target_present_after_kill: int = 0
    temp_present_after_kill: int = 0  # a temporary existed: the kill fell inside the writing
    identical: int = 0
    failures: list[str] = field(default_factory=list)
    reference_seconds: float = 0.0
    writing_seconds: float = 0.0  # of the reference run: while a temporary of it existed
    kill_instants: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _temps(trial: Path, target: Path) -> list[str]:
    names = [target.name + s for s in TEMP_SUFFIXES] + [f".{target.name}.knnlm-old"]
    found = [n for n in names if (target.parent / n).exists()]
    # Temporaries inside the artifact folder (index and checkpoints resume from there).
    if target.is_dir():
        found += [p.name for p in target.iterdir() if is_temp_name(p.name)]
    return found


def _left_behind(trial: Path, target: Path) -> list[str]:
    """Temporaries, and the writer lock file (its holder removes it; a killed one leaves it)."""
    lock = target.with_name(target.name + ".lock")
    return _temps(trial, target) + ([lock.name] if lock.exists() else [])


def _wait_for_temp(p: subprocess.Popen, trial: Path, target: Path) -> float | None:
    """Seconds until the command's first temporary appears (None: it ended first)."""
    t0 = time.perf_counter()
    while p.poll() is None:
        if _temps(trial, target):
            return time.perf_counter() - t0
        time.sleep(0.005)
    return None


def run_command(cmd: Command, root: Path, trials: int, rng: random.Random) -> Stats:
    st = Stats()
    t_all = time.perf_counter()
    ref_dir = root / f"{cmd.name.replace(' ', '_')}-ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    if cmd.prepare:
        cmd.prepare(ref_dir)
    before = snapshot(ref_dir / cmd.target, ref_dir)
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd.args(ref_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    to_temp = _wait_for_temp(p, ref_dir, ref_dir / cmd.target)
    t_temp = time.perf_counter()
    while p.poll() is None and _temps(ref_dir, ref_dir / cmd.target):
        time.sleep(0.005)  # the writing ends when its last temporary is gone
    st.writing_seconds = (time.perf_counter() - t_temp) if to_temp is not None else 0.0
    _, err = p.communicate()
    st.reference_seconds = time.perf_counter() - t0
    if p.returncode != 0:
        st.failures.append(f"reference run failed ({p.returncode}): {err.decode()[-300:]}")
        return st
    reference = snapshot(ref_dir / cmd.target, ref_dir)
    for i in range(trials):
        st.trials += 1
        trial = root / f"{cmd.name.replace(' ', '_')}-{i}"
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir(parents=True)
        if cmd.prepare:
            cmd.prepare(trial)
        before = snapshot(trial / cmd.target, trial)
        target = trial / cmd.target
        # Even trials: an instant anywhere in the run (start-up and checks included); odd
        # trials: an instant while the command writes (after its first temporary appeared, within
        # the time the reference run kept temporaries).
        anchored = i % 2 == 1
        span = st.writing_seconds if anchored else st.reference_seconds
        delay = rng.uniform(0.0, span)
        p = subprocess.Popen(
            cmd.args(trial), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        waited = (_wait_for_temp(p, trial, target) or 0.0) if anchored else 0.0
        instant = waited + delay
        st.kill_instants.append(round(instant, 3))
        try:
            p.wait(timeout=delay)
            st.finished_first += 1
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            st.killed += 1
        if cmd.reader_view is not None and target.is_dir():
            view = trial / ".reader_view"
            shutil.copytree(target, view)
            cmd.reader_view(view)
            after = snapshot(view, trial, skip_temps=True)
            shutil.rmtree(view)
        else:
            after = snapshot(target, trial, skip_temps=True)
        if _temps(trial, target):
            st.temp_present_after_kill += 1
        if after is not None and after != before:
            st.target_present_after_kill += 1
            if after != reference:
                st.failures.append(
                    f"trial {i} (kill at {instant:.2f}s): target after the kill is neither "
                    f"the previous content nor the finished artifact: {_diff(after, reference)}"
                )
                continue
        r = subprocess.run(cmd.args(trial), env=_env(), capture_output=True, text=True)
        if r.returncode != 0:
            st.failures.append(
                f"trial {i} (kill at {instant:.2f}s): rerun exit {r.returncode}: "
                f"{r.stderr.strip()[-300:]}"
            )
            continue
        got = snapshot(target, trial)
        left = _left_behind(trial, target)
        if got != reference:
            st.failures.append(f"trial {i} (kill at {instant:.2f}s): {_diff(got, reference)}")
        elif left:
            st.failures.append(f"trial {i} (kill at {instant:.2f}s): temporaries left: {left}")
        else:
            st.identical += 1
        shutil.rmtree(trial, ignore_errors=True)
    st.seconds = time.perf_counter() - t_all
    return st


def concurrent_trial(
    cmd: Command,
    trial: Path,
    delay: float,
    launch: Any,
    reference: dict,
    exits: list | None = None,
    anchored: bool = False,
) -> list:
    """Two writers of ``cmd`` on one target, the second ``delay`` s after the first (after the
    first one's first temporary appeared, when ``anchored``); returns the failures.

    ``launch(argv, err_path)`` starts a writer and returns an object with ``poll()`` and
    ``wait()`` as ``subprocess.Popen`` has (tests fork writers from a preloaded server).
    """
    if cmd.prepare:
        cmd.prepare(trial)
    errs = [trial.with_name(f"{trial.name}.err{i}") for i in range(2)]
    first = launch(cmd.args(trial), errs[0])
    if anchored:
        _wait_for_temp(first, trial, trial / cmd.target)
    time.sleep(delay)
    second = launch(cmd.args(trial), errs[1])
    codes = [first.wait(), second.wait()]
    if exits is not None:
        exits.append(codes)
    failures = []
    for who, code, err in zip(("first", "second"), codes, errs, strict=True):
        lines = err.read_text(errors="replace").strip().splitlines()
        if code not in (0, 2):
            failures.append(f"{who} writer exit {code}: {' | '.join(lines[-3:])}")
        elif code == 2 and (len(lines) != 1 or "being written by" not in lines[0]):
            failures.append(f"{who} writer refused without one line naming the holder: {lines}")
    if 0 not in codes:
        failures.append(f"no writer finished (exits {codes})")
    got = snapshot(trial / cmd.target, trial)
    if got != reference:
        failures.append(f"artifact {_diff(got, reference)}")
    left = _left_behind(trial, trial / cmd.target)
    if left:
        failures.append(f"left behind: {left}")
    return failures


def _popen(argv: list[str], err: Path) -> subprocess.Popen:
    with open(err, "w") as fh:
        return subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=fh)


def run_concurrent(cmd: Command, root: Path, trials: int, rng: random.Random) -> dict:
    """The reference run, then ``trials`` two-writer trials at seeded random offsets."""
    ref_dir = root / f"{cmd.name.replace(' ', '_')}-ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    if cmd.prepare:
        cmd.prepare(ref_dir)
    t0 = time.perf_counter()
    r = subprocess.run(cmd.args(ref_dir), env=_env(), capture_output=True, text=True)
    ref_seconds = time.perf_counter() - t0
    if r.returncode != 0:
        return {"failures": [f"reference run failed ({r.returncode}): {r.stderr[-300:]}"]}
    reference = snapshot(ref_dir / cmd.target, ref_dir)
    out: dict[str, Any] = {"trials": trials, "reference_seconds": round(ref_seconds, 2)}
    out.update(offsets=[], exits=[], failures=[])
    for i in range(trials):
        trial = root / f"{cmd.name.replace(' ', '_')}-c{i}"
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir(parents=True)
        delay = rng.uniform(0.0, ref_seconds)
        out["offsets"].append(round(delay, 2))
        bad = concurrent_trial(cmd, trial, delay, _popen, reference, out["exits"])
        out["failures"] += [f"trial {i} (offset {delay:.2f}s): {f}" for f in bad]
        shutil.rmtree(trial, ignore_errors=True)
    out["complete_and_identical"] = trials - len({f.split(":")[0] for f in out["failures"]})
    out["second_writer_refused"] = sum(1 for e in out["exits"] if 2 in e)
    return out


def commands(fx: dict[str, Path], base_ds: Path, quick: bool = False) -> dict[str, Command]:
    m, c = fx["model"], fx["corpus"]
    ds_args = ["--context-len", 32, "--stride", 16, "--batch-size", 2, "-q"]

    def copy_ds(trial: Path) -> None:
        shutil.copytree(base_ds, trial / "ds")

    def old_ds(trial: Path) -> None:  # a datastore of other settings, to be replaced
        shutil.copytree(base_ds, trial / "out")
        meta = json.loads((trial / "out" / "meta.json").read_text())
        meta["stride"] = 32
        (trial / "out" / "meta.json").write_text(json.dumps(meta))

    build = cli("datastore", "build", "-m", m, "-c", c, "-o", "{T}/out", *ds_args)
    return {
        "datastore build": Command("datastore build", build, "out"),
        "datastore build --overwrite": Command(
            "datastore build --overwrite", [*build, "--overwrite"], "out", prepare=old_ds
        ),
        "datastore index": Command(
            "datastore index",
            cli("datastore", "index", "{T}/ds", "--type", "ivfpq", "--nlist", 8, "--pq-bytes", 8)
            + ["-q"],
            "ds",
            prepare=copy_ds,
            reader_view=index_reader_view,
        ),
        "eval --cache": Command(
            "eval --cache",
            cli("eval", "-m", m, "-c", c, "--split", "valid", "--context-len", 32)
            + ["--datastore", base_ds, "--k", 64, "--cache", "{T}/cache", "-q"],
            "cache",
        ),
        "memory train": Command(
            "memory train",
            cli("memory", "train", "-m", m, "-d", base_ds, "-o", "{T}/mem", "--hidden", 128)
            + ["--epochs", 12, "--batch-tokens", 512, "-q"],
            "mem",
        ),
        "train": Command(
            "train",
            cli("train", "--corpus", c, "--out", "{T}/lm", "--preset", "tiny", "--max-steps")
            + [100, "--checkpoint-every", 10, "--batch-size", 4, "--context-len", 32, "-q"],
            "lm",
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="kill instants per command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", default="all", help="comma-separated names, or all")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a tmp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--concurrent", action="store_true", help="two writers instead of a kill")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="knnlm-faults-"))
    fx = make_fixtures(work)
    base_ds = work / "base_ds"
    subprocess.run(
        cli("datastore", "build", "-m", fx["model"], "-c", fx["corpus"], "-o", base_ds)
        + ["--context-len", "32", "--stride", "16", "--batch-size", "2", "-q"],
        env=_env(),
        check=True,
        capture_output=True,
    )
    cmds = commands(fx, base_ds)
    names = list(cmds) if args.commands == "all" else args.commands.split(",")
    rng = random.Random(args.seed)
    out: dict[str, Any] = {"seed": args.seed, "trials_per_command": args.trials, "commands": {}}
    out["mode"] = "concurrent" if args.concurrent else "kill"
    for name in names:
        if args.concurrent:
            out["commands"][name] = run_concurrent(cmds[name], work / "runs", args.trials, rng)
            continue
        st = run_command(cmds[name], work / "runs", args.trials, rng)
        out["commands"][name] = {
            "trials": st.trials,
            "killed_while_running": st.killed,
            "finished_before_kill": st.finished_first,
            "kills_with_temporary_present": st.temp_present_after_kill,
            "target_complete_after_kill": st.target_present_after_kill,
            "identical_after_rerun": st.identical,
            "failures": st.failures,
            "reference_seconds": round(st.reference_seconds, 2),
            "reference_writing_seconds": round(st.writing_seconds, 2),
            "kill_instants": st.kill_instants,
            "seconds": round(st.seconds, 1),
        }
    out["total_failures"] = sum(len(v["failures"]) for v in out["commands"].values())
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return out


if __name__ == "__main__":
    sys.exit(1 if main()["total_failures"] else 0)
