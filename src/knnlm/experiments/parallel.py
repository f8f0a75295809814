"""Independent jobs (seeds, stages) over a few worker processes on one machine.

Workers are spawned, not forked: a forked copy of a process that already ran torch can
deadlock in its thread pools. Each worker sets its own torch CPU threads before its job.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def _call(threads: int | None, fn: Callable[..., Any], args: tuple) -> Any:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


def pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def submit(
    ex: ProcessPoolExecutor, fn: Callable[..., Any], args: tuple, threads: int | None
) -> Future:
    """``fn(*args)`` in a worker with ``threads`` torch threads (``fn`` must be top level)."""
    return ex.submit(_call, threads, fn, args)


def map_jobs(
    fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, threads: int | None
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes when there is more than one
    job and worker (in this process otherwise); results in the order of ``jobs``."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    with pool(min(workers, len(jobs))) as ex:
        futures = [submit(ex, fn, job, threads) for job in jobs]
        return [f.result() for f in futures]
