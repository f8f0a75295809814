"""Overlap the LM forward of batch i+1 with the search of batch i.

:func:`prefetch` runs a producer (e.g. ``score_stream``) in a background thread, at most
``depth`` items ahead, and yields its items in their original order, so any consumer sees
exactly the sequence it would see without it (results identical to the sequential pass). Torch
and FAISS release the GIL in their kernels, so the forward and the search really run at the same
time. Worth it when they use different devices (forward on a GPU, search on CPU or a second
stream); on a CPU-only machine both compete for the same cores.

Hook in an evaluation loop::

    for batch in prefetch(score_stream(model, ids, ...), depth=1):
        neighbours = retriever.search(batch.keys)
        ...

The producer must not reuse the buffers of items it has yielded (``score_stream`` allocates
fresh tensors per batch).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead.

    ``depth=0`` iterates in the calling thread. An exception in the producer is raised in the
    consumer at the point where the failed item would have arrived; closing the consumer early
    stops the producer after its current item.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if depth == 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    worker = threading.Thread(target=produce, name="knnlm-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
