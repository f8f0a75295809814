"""The writer lock (knnlm.locking) and what a reader sees while a writer swaps a folder in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from knnlm import fileio
from knnlm.errors import KnnlmError
from knnlm.locking import held_here, lock_path, waiting, writer_lock
from knnlm.retrieval import datastore as dsmod


def fake_datastore(path: Path, n: int, dim: int = 4, seed: int = 0) -> Path:
    """A datastore folder as open_datastore reads it (random keys; no model needed)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    np.save(path / "keys.npy", rng.standard_normal((n, dim)).astype(np.float16))
    np.save(path / "values.npy", rng.integers(0, 50, n).astype(np.int32))
    meta = {fileio.ARTIFACT_KEY: dsmod.KIND, "format_version": dsmod.FORMAT_VERSION, "n": n}
    meta.update(dim=dim, key_dtype="float16")
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def hold_in_child(target: Path, script: str = "time.sleep(30)") -> subprocess.Popen:
    """Another process holding ``target``'s lock (running ``script`` while it holds it)."""
    code = (
        "import os, shutil, time\nfrom knnlm.locking import writer_lock\n"
        f"with writer_lock({str(target)!r}):\n    print('held', flush=True)\n    {script}\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_reentrant_and_removed_by_its_holder(tmp_path):
    t = tmp_path / "a"
    with writer_lock(t):
        info = json.loads(lock_path(t).read_text())
        assert info["pid"] == os.getpid()
        with writer_lock(t):  # the CLI's probe, then the library: one holder
            assert held_here(t)
        assert held_here(t) and lock_path(t).exists()
    assert not held_here(t) and not lock_path(t).exists()
    assert list(tmp_path.iterdir()) == []


def test_refusal_names_the_holder_and_touches_nothing(tmp_path):
    target = tmp_path / "ds"
    p = hold_in_child(target)
    try:
        with pytest.raises(KnnlmError, match=f"being written by pid {p.pid} on host .* since"):
            fileio.claim_target(target, dsmod.KIND, dsmod.META)
    finally:
        p.kill()
        p.wait()
    assert [x.name for x in tmp_path.iterdir()] == ["ds.lock"]  # the killed holder's, unlocked
    with writer_lock(target):  # taken over at once
        pass
    assert list(tmp_path.iterdir()) == []


def test_waiter_relocks_when_the_holder_removed_the_file(tmp_path):
    """A waiter blocked on the old inode must not think it holds the lock on the new file."""
    target = tmp_path / "x"
    p = hold_in_child(target, "time.sleep(1.0)")
    with waiting(), writer_lock(target):
        st = os.stat(lock_path(target))
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
        assert p.wait() == 0
        # The lock we hold is on the file at the path, so a third process is refused.
        r = subprocess.run(
            [sys.executable, "-c", f"from knnlm.locking import writer_lock\n"
             f"with writer_lock({str(target)!r}): pass"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 1 and "being written by" in r.stderr
        assert os.stat(lock_path(target)).st_ino == st.st_ino


def test_reader_waits_for_a_swap_in_progress(tmp_path):
    """Mid-swap (two-rename fallback: target missing, old one aside), a reader must neither
    undo the swap nor fail: it waits for the writer, then opens the new datastore."""
    target = tmp_path / "ds"
    fake_datastore(tmp_path / "new", n=7)
    fake_datastore(fileio.aside_path(target), n=5)
    p = hold_in_child(
        target,
        f"time.sleep(1.0); os.rename({str(tmp_path / 'new')!r}, {str(target)!r}); "
        f"shutil.rmtree({str(fileio.aside_path(target))!r})",
    )
    ds = dsmod.open_datastore(target)
    assert p.wait() == 0
    assert ds.n == 7 and ds.keys.shape == (7, 4)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ds"]


def test_reader_recovers_after_a_crash_between_renames(tmp_path):
    target = tmp_path / "ds"
    fake_datastore(fileio.aside_path(target), n=5)
    assert dsmod.open_datastore(target).n == 5
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ds"]


def test_reader_reopens_when_a_swap_fell_inside_its_read(tmp_path, monkeypatch):
    """meta.json of the old datastore, keys of the new: the reader must read again."""
    target = fake_datastore(tmp_path / "ds", n=5)
    fake_datastore(tmp_path / "ds.partial", n=9, seed=1)
    real, calls = dsmod.check_npy, []

    def swap_first_time(*args, **kwargs):
        if not calls:
            fileio.swap_in(tmp_path / "ds.partial", target, dsmod.KIND, dsmod.META)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dsmod, "check_npy", swap_first_time)
    ds = dsmod.open_datastore(target)
    assert ds.n == 9 and ds.keys.shape == (9, 4) and ds.values.shape == (9,)
    expect = np.load(target / "keys.npy")
    assert np.array_equal(np.asarray(ds.keys), expect)


def test_swap_stays_atomic_for_a_polling_reader(tmp_path):
    """Every open during repeated swaps sees a whole datastore (one n, matching files)."""
    target = fake_datastore(tmp_path / "ds", n=5)
    code = (
        f"import json, shutil, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom pathlib import Path\n"
        "from test_locking import fake_datastore\nfrom knnlm import fileio\n"
        f"from knnlm.locking import writer_lock\nt = Path({str(target)!r})\n"
        "for i in range(40):\n"
        "    with writer_lock(t):\n"
        "        fake_datastore(Path(str(t) + '.partial'), n=5 + i % 3 * 4, seed=i)\n"
        "        fileio.swap_in(Path(str(t) + '.partial'), t, 'datastore', 'meta.json')\n"
    )
    w = subprocess.Popen([sys.executable, "-c", code])
    seen = set()
    t0 = time.time()
    while w.poll() is None and time.time() - t0 < 60:
        ds = dsmod.open_datastore(target)
        assert ds.keys.shape == (ds.n, 4) and ds.values.shape == (ds.n,)
        seen.add(ds.n)
    assert w.wait() == 0
    assert seen <= {5, 9, 13}
