"""Independent jobs (seeds, stages) over a few worker processes on one machine, tied to the
process that started them so that a run ends whole.

Workers are spawned, not forked: a forked copy of a process that already ran torch can
deadlock in its thread pools. Each worker sets its own torch CPU threads before its job.

No worker outlives its run:

- a worker dies with its parent: on Linux the kernel sends it SIGKILL when the parent goes
  (``prctl(PR_SET_PDEATHSIG)``; a SIGKILL or OOM kill of the main process included, and its
  own workers follow it the same way), and everywhere a watchdog thread exits it when its
  parent pid changes;
- when the parent stops for an error or a Ctrl-C, :func:`pool` kills its workers before the
  error goes on (``concurrent.futures`` would otherwise wait at exit for their jobs to end);
- a worker ignores SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the
  parent, not each worker, turns it into the end of the run;
- a worker that dies (killed, out of memory) fails the parent with one line.

Locks held by a worker are ``flock`` locks (:mod:`knnlm.locking`): the OS releases them with it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from knnlm.errors import KnnlmError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# How often the portable watchdog looks at its parent (seconds).
WATCH_INTERVAL = 0.5
# Seconds a worker gets to end on SIGTERM before SIGKILL.
TERMINATE_GRACE = 2.0


def die_with_parent(parent: int) -> None:
    """In a worker: end this process when ``parent`` is gone (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the watchdog alone
            pass
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)
    watchdog = threading.Thread(
        target=_watch_parent, args=(parent,), name="knnlm-parent-watch", daemon=True
    )
    watchdog.start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)  # orphaned: nothing is left to take this worker's results


def _call(threads: int | None, fn: Callable[..., Any], args: tuple) -> Any:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


@contextmanager
def pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn pool of ``workers`` processes bound to this one; on an error or a Ctrl-C in the
    block its workers are killed before the exception goes on, so the run ends whole."""
    before = set(multiprocessing.active_children())
    ex = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        yield ex
    except BrokenProcessPool:
        _kill([p for p in multiprocessing.active_children() if p not in before])
        ex.shutdown(wait=False, cancel_futures=True)
        raise KnnlmError(
            "a worker process of this run died (killed, or out of memory?); rerun the same "
            "command to resume from the finished stages"
        ) from None
    except BaseException:
        _kill([p for p in multiprocessing.active_children() if p not in before])
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True, cancel_futures=True)


def _kill(procs: list) -> None:
    """SIGTERM, a short grace, then SIGKILL; each waited for (no zombies left behind)."""
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def submit(
    ex: ProcessPoolExecutor, fn: Callable[..., Any], args: tuple, threads: int | None
) -> Future:
    """``fn(*args)`` in a worker with ``threads`` torch threads (``fn`` must be top level)."""
    return ex.submit(_call, threads, fn, args)


def first_failure(futures: Sequence[Future]) -> None:
    """Raise the error of the first of ``futures`` that has failed (a worker's error ends the
    run as soon as the parent looks, not when it asks for that result)."""
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            f.result()


def map_jobs(
    fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, threads: int | None
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes when there is more than one
    job and worker (in this process otherwise); results in the order of ``jobs``. The first
    job to fail ends the others."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    with pool(min(workers, len(jobs))) as ex:
        futures = [submit(ex, fn, job, threads) for job in jobs]
        for f in as_completed(futures):
            f.result()  # the first error raises here, and pool() stops the rest
        return [f.result() for f in futures]
