"""A run ends whole: no process of ``knnlm reproduce`` (its second process, the Macondo seed
workers, the multiprocessing resource tracker) outlives a failed stage, a Ctrl-C or a SIGKILL
of the main process, and its locks are free afterwards.

Every process of a run is found by a marker in its environment (children inherit it), so an
orphan is found even after it was re-parented to init."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from knnlm.experiments.parallel import map_jobs, pool, submit
from tiny import save_tiny_model

MARK = "KNNLM_TEST_RUN"
# Guards, not timings: how long a test waits for a worker to appear, and for every process
# of the run to be gone once the main one has stopped.
APPEAR_S, GONE_S = 600.0, 20.0


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _marked(mark: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds ``mark``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        st = _stat(int(entry.name))
        if f"{MARK}={mark}".encode() in env.split(b"\0") and st and st[0] != "Z":
            found[int(entry.name)] = cmd
    return found


def _start(args: list[str], mark: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **{MARK: mark})
    return subprocess.Popen(
        [sys.executable, "-m", "knnlm", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for_worker(proc: subprocess.Popen, mark: str) -> dict[int, str]:
    """The run's processes, once a spawned worker is among them."""
    deadline = time.monotonic() + APPEAR_S
    while time.monotonic() < deadline:
        procs = _marked(mark)
        if any("spawn_main" in cmd for cmd in procs.values()):
            return procs
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no worker process appeared")


def _assert_all_gone(mark: str) -> None:
    deadline = time.monotonic() + GONE_S
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked(mark) == {}


def _assert_locks_free(folder: Path) -> None:
    """Every lock file left under ``folder`` can be taken at once (nobody holds it)."""
    for path in folder.rglob("*.lock"):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises when still held
        finally:
            os.close(fd)


TINY_RUN = ["reproduce", "--quick", "--tiny", "--quiet"]


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill", "int", "term"]
)
def test_a_stopped_main_process_leaves_no_worker(tmp_path, sig):
    mark = uuid.uuid4().hex
    proc = _start([*TINY_RUN, "--out", str(tmp_path / "run")], mark)
    before = _wait_for_worker(proc, mark)
    assert len(before) >= 2  # the main process and its worker (and the resource tracker)
    time.sleep(1.0)  # the worker at work, not still starting
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=GONE_S)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    _assert_all_gone(mark)
    _assert_locks_free(tmp_path)


def test_a_failed_stage_ends_the_run(tmp_path, tiny_tokenizer):
    """The reported case: a user's 128-position model with windows of 256 fails in the main
    process while the second process works; the error is one line and nothing is left."""
    model = save_tiny_model(tmp_path / "model", tiny_tokenizer)
    mark = uuid.uuid4().hex
    proc = _start([*TINY_RUN, "-m", str(model), "--context-len", "256", "--out",
                   str(tmp_path / "run")], mark)  # fmt: skip
    _, err = proc.communicate(timeout=APPEAR_S)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("Error: --context-len 256 is longer than")
    _assert_all_gone(mark)
    _assert_locks_free(tmp_path)


# The pool itself, in this process: a failure on either side stops the other.


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _job(arg: str | tuple) -> None:
    """Fails at once with message ``arg``, or (seconds, file): sleeps, then writes the file."""
    if isinstance(arg, str):
        raise ValueError(arg)
    time.sleep(arg[0])
    Path(arg[1]).write_text("finished")


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        st = _stat(int(entry.name)) if entry.name.isdigit() else None
        if st is None or st[0] == "Z":
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def test_a_failing_job_stops_the_others(tmp_path):
    done = tmp_path / "finished"
    with pytest.raises(ValueError, match="job 1 failed"):
        map_jobs(_job, [((30.0, str(done)),), ("job 1 failed",)], 2, None)
    assert _workers() == []  # stopped, not waited for: it never wrote its file
    assert not done.exists()


def _workers() -> list[int]:
    return [p for p in _children_of(os.getpid()) if "spawn_main" in _cmd(p)]


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_an_error_in_the_parent_kills_its_workers():
    with pytest.raises(KeyError), pool(1) as ex:
        submit(ex, _sleep, (60.0,), None)
        while not _workers():
            time.sleep(0.1)
        raise KeyError("parent fails")
    assert _workers() == []


def test_a_worker_dies_with_its_parent(tmp_path):
    """A parent killed by SIGKILL (no cleanup at all): its worker ends by itself."""
    mark = uuid.uuid4().hex
    script = (
        "import time; from knnlm.experiments.parallel import pool, submit\n"
        "from test_run_ends_whole import _sleep\n"
        "if __name__ == '__main__':\n"
        "    with pool(1) as ex:\n"
        "        submit(ex, _sleep, (120.0,), None).result()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **{MARK: mark})
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=Path(__file__).parent)
    _wait_for_worker(proc, mark)
    proc.kill()
    proc.wait()
    _assert_all_gone(mark)
