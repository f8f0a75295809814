"""Two writers, one artifact: the same command started twice on one target at seeded random
offsets, per artifact kind. The finished artifact must be identical to an uninterrupted run's,
each writer must exit 0 or 2 (2 with one line naming the holder), one of them 0, and nothing but
the artifact may remain (no lock file, no temporary).

Writers are real processes (a lock is per process), forked from a server that has imported the
CLI once, so a trial costs the command's own work, not Python's start-up. The trial logic is
``concurrent_trial`` of scripts/fault_inject.py, whose ``--concurrent`` mode runs more trials.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

PRELOAD = [
    "torch",
    "transformers.models.gpt2.modeling_gpt2",
    "knnlm.cli",
    "knnlm.cli.commands",
    "knnlm.retrieval.datastore",
    "knnlm.retrieval.search.index_build",
    "knnlm.evaluate",
    "knnlm.lm.train",
    "knnlm.experiments.mlp_memory.train",
]
TRIALS = {"datastore build": 3, "datastore index": 2, "eval --cache": 2, "memory": 2, "train": 2}


def _driver():
    path = Path(__file__).resolve().parents[1] / "scripts" / "fault_inject.py"
    spec = importlib.util.spec_from_file_location("fault_inject", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_inject"] = mod
    spec.loader.exec_module(mod)
    return mod


def _cli_child(argv: list[str], err: str) -> None:
    """The CLI's entry point in a forked writer; stderr to ``err`` (main() exits with the code)."""
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    import torch

    from knnlm.cli import main

    torch.set_num_threads(1)
    sys.argv = ["knnlm", *argv]
    main()


class _Writer:
    def __init__(self, ctx, argv: list[str], err: Path):
        self.p = ctx.Process(target=_cli_child, args=(argv, str(err)))
        self.p.start()

    def poll(self) -> int | None:
        return None if self.p.is_alive() else self.p.exitcode

    def wait(self) -> int:
        self.p.join(timeout=300)
        return self.p.exitcode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the server and writers inherit them
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    fi = _driver()
    work = tmp_path_factory.mktemp("concurrency")
    fx = fi.make_fixtures(work, train_lines=1500)
    base = work / "base_ds"
    subprocess.run(
        fi.cli("datastore", "build", "-m", fx["model"], "-c", fx["corpus"], "-o", base)
        + ["--context-len", "32", "--stride", "16", "--batch-size", "2", "-q"],
        env=fi._env(),
        check=True,
        capture_output=True,
    )
    cmds = fi.commands(fx, base)
    m = fx["model"]
    # Lighter than the driver's: the tests check the locking, not the training.
    cmds["memory"] = fi.Command(
        "memory",
        fi.cli("memory", "train", "-m", m, "-d", base, "-o", "{T}/mem", "--hidden", 64)
        + ["--epochs", 3, "--batch-tokens", 512, "-q"],
        "mem",
    )
    cmds["train"].argv[cmds["train"].argv.index("--max-steps") + 1] = "30"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    def launch(argv: list[str], err: Path) -> _Writer:
        return _Writer(ctx, [str(a) for a in argv[3:]], err)  # drop "python -m knnlm"

    return fi, cmds, launch, work


@pytest.mark.parametrize("name", list(TRIALS))
def test_two_writers_one_artifact(setup, name):
    fi, cmds, launch, work = setup
    cmd = cmds[name]
    ref = work / f"{name.replace(' ', '_')}-ref"
    ref.mkdir()
    if cmd.prepare:
        cmd.prepare(ref)
    t0 = time.perf_counter()
    assert launch(cmd.args(ref), ref.with_name(ref.name + ".err")).wait() == 0
    seconds = time.perf_counter() - t0
    reference = fi.snapshot(ref / cmd.target, ref)
    rng = random.Random(f"{name}-0")
    failures = []
    for i in range(TRIALS[name]):
        trial = work / f"{name.replace(' ', '_')}-{i}"
        trial.mkdir()
        # From the first one's first temporary: the second starts while the first writes.
        delay = rng.uniform(0.0, 0.3 * seconds)
        bad = fi.concurrent_trial(cmd, trial, delay, launch, reference, anchored=True)
        failures += [f"trial {i} (second writer at +{delay:.2f}s): {f}" for f in bad]
        shutil.rmtree(trial, ignore_errors=True)
    assert not failures, "\n".join(failures)


def test_wait_proceeds_after_the_holder(setup, tmp_path):
    """--wait blocks while another process holds the lock, then finishes as a fresh start."""
    from knnlm.locking import lock_path, writer_lock

    fi, cmds, launch, _ = setup
    cmd = cmds["datastore build"]
    out = tmp_path / "out"
    with writer_lock(out, "datastore"):
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        waiter = launch([*cmd.args(tmp_path), "--wait"], tmp_path.with_name("wait.err"))
        time.sleep(1.0)
        assert waiter.p.is_alive() and not out.exists()  # still waiting, nothing touched
    assert waiter.wait() == 0
    assert (out / "meta.json").is_file() and not lock_path(out).exists()


def test_killed_holder_never_blocks(setup, tmp_path):
    """A writer killed while it holds the lock leaves the lock file; the next one takes it."""
    fi, cmds, launch, _ = setup
    cmd = cmds["datastore build"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "from knnlm.locking import writer_lock\n"
         f"with writer_lock({str(tmp_path / 'out')!r}):\n    import time; time.sleep(60)"],
        env=fi._env(),
    )  # fmt: skip
    lock = tmp_path / "out.lock"
    while not lock.is_file() or not lock.read_text():
        time.sleep(0.05)
    refused = launch(cmd.args(tmp_path), tmp_path.with_name("held.err"))
    assert refused.wait() == 2
    line = tmp_path.with_name("held.err").read_text().strip()
    assert line.count("\n") == 0 and f"pid {holder.pid}" in line, line
    holder.kill()
    holder.wait()
    assert lock.exists()  # left by the killed holder, unlocked
    assert launch(cmd.args(tmp_path), tmp_path.with_name("after.err")).wait() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("argv", [["reproduce"], ["hurdle"], ["macondo", "run"]])
def test_work_folder_held_is_refused(setup, tmp_path, argv):
    """The reproduction / hurdle / Macondo folders: a second run is refused before any work."""
    from knnlm.locking import writer_lock

    fi, cmds, launch, _ = setup
    out = tmp_path / "run"
    err = tmp_path.with_name(f"{tmp_path.name}.err")
    # Another process (this one) holds the folder; the forked run must stop, touching nothing.
    with writer_lock(out, "work folder"):
        code = launch(["python", "-m", "knnlm", *argv, "--out", out, "-q"], err).wait()
    lines = err.read_text().strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0], lines
    assert list(tmp_path.iterdir()) == []
