"""One writer per artifact: an advisory lock on ``<target>.lock`` beside the target.

Every library function that writes an artifact (datastore, index, neighbour cache, MLP memory,
trained model, the reproduction / hurdle / Macondo work folders) holds ``writer_lock(target)``
while it works, so API users are covered as well as the CLI. The lock is an ``fcntl.flock`` on
the lock file: the OS releases it when its process dies, so a killed writer never blocks the
next run (which then resumes the killed one's temporary work).

- A second writer is refused at once with one line naming the holder (pid, host, start time,
  read from the JSON the holder wrote into the lock file), or, inside ``waiting()`` (the CLI's
  ``--wait``), blocks until the holder is done and then proceeds as a fresh start would.
- The holder removes the lock file before it lets go. A waiter may then hold a lock on the
  unlinked inode, so after acquiring it checks that the path still names the inode it locked,
  and starts over when not. A killed writer leaves its lock file (unlocked, harmless); the next
  writer takes it over and removes it.
- The lock is re-entrant within a process (the CLI probes it before loading a model, the library
  takes it again), and under ``torch.distributed`` rank 0 holds it for the group: the other
  ranks learn rank 0's outcome, so a refusal ends every rank with the same line.
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError

LOCK_SUFFIX = ".lock"
log = logging.getLogger("knnlm.locking")

_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("knnlm_lock_wait", default=False)
_held: dict[str, list] = {}  # lock path -> [fd or None (rank != 0), depth]
_guard = threading.Lock()


def lock_path(target: str | Path) -> Path:
    """``<target>.lock``, beside the target (absolute)."""
    target = Path(os.path.abspath(target))
    return target.with_name(target.name + LOCK_SUFFIX)


def set_wait(wait: bool) -> None:
    """Make writers in this context wait for a holder instead of being refused (``--wait``)."""
    _WAIT.set(bool(wait))


@contextmanager
def waiting(wait: bool = True) -> Iterator[None]:
    """Writers inside wait for the lock's holder instead of being refused."""
    token = _WAIT.set(bool(wait))
    try:
        yield
    finally:
        _WAIT.reset(token)


def held_here(target: str | Path) -> bool:
    """True when this process (or its rank group) holds the lock on ``target``."""
    return str(lock_path(target)) in _held


def _group() -> Any:
    """torch.distributed when a process group is up (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _holder(fd: int) -> str:
    """The holder as "pid P on host H since T", from the lock file (the holder writes it right after locking)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
        time.sleep(0.01)
    return "another process"


def _open(path: Path, what: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KnnlmError(f"cannot create the lock file {path} for {what}: {e.strerror}") from None


def _acquire(path: Path, what: str, wait: bool) -> int:
    """An fd holding LOCK_EX on the inode that ``path`` names; refusal or wait when taken."""
    while True:
        fd = _open(path, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise KnnlmError(
                    f"{what} is being written by {holder} (lock {path}); "
                    "wait for it, or pass --wait"
                ) from None
            log.warning("waiting for %s, being written by %s", what, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we waited on: lock the new one
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b"\n", 0)
    return fd


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (only if it is still ours), then unlock."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _group_outcome(dist: Any, error: str | None) -> None:
    """Rank 0 tells every rank whether it got the lock; the others raise its refusal."""
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise KnnlmError(box[0])


@contextmanager
def writer_lock(target: str | Path, what: str | None = None) -> Iterator[Path]:
    """Hold the one-writer lock on ``target`` for the block (see the module docstring)."""
    path = lock_path(target)
    what = what or str(target)
    key = str(path)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        dist = _group()
        rank = dist.get_rank() if dist is not None else 0
        fd = None
        if rank == 0:
            try:
                fd = _acquire(path, what, _WAIT.get())
            except KnnlmError as e:
                if dist is not None:
                    _group_outcome(dist, str(e))
                raise
        if dist is not None:
            _group_outcome(dist, None)
        with _guard:
            entry = _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last and entry[0] is not None:
            _release(path, entry[0])


def locks(arg: str, what: str) -> Callable:
    """Decorator: hold ``writer_lock`` on the call's argument ``arg`` (None: no lock)."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            target = sig.bind(*args, **kwargs).arguments.get(arg)
            if target is None:
                return fn(*args, **kwargs)
            with writer_lock(target, f"{what} {target}"):
                return fn(*args, **kwargs)

        return inner

    return wrap
