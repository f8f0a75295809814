"""The one place FAISS is imported (guarded: FAISS is optional), and its helpers: the metric
constant and moving indexes to a GPU.

Every module of the search package takes ``faiss`` from here; it is None where the package is
not installed, and whatever needs it first calls :func:`require_faiss` (a one-line error).
Exact search (:mod:`knnlm.retrieval.search.exact`) runs without it.
"""

from __future__ import annotations

from typing import Any

from knnlm.errors import KnnlmError

try:
    import faiss
except ImportError as _e:  # only a missing faiss is tolerated; any other import error is a bug
    if _e.name != "faiss":
        raise
    faiss = None
from knnlm.retrieval.search.conventions import log

GPU_MAX_K = 2048  # FAISS GPU k-selection limit


def has_faiss() -> bool:
    return faiss is not None


def require_faiss(what: str) -> None:
    """A one-line error naming ``what`` needs FAISS, where it is not installed."""
    if faiss is None:
        raise KnnlmError(
            f"{what} needs the faiss package (pip install faiss-cpu); --search exact runs without it"
        )


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def want_gpu(use_gpu: bool | str) -> bool:
    if use_gpu not in (True, False, "auto"):
        raise KnnlmError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    if use_gpu is False:
        return False
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not has:
        raise KnnlmError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
    return has


def gpu_cloner_options(index: Any) -> Any:
    """Options for the GPU copy of ``index``.

    A flat index keeps float32 storage and maths on the GPU: it is the exact index, and
    ``useFloat16`` would make it fp16. IVF-PQ keeps float16 lookup tables (needed by the GPU
    kernels for large ``pq_m``); its distances are approximate anyway and re-ranked exactly.
    """
    co = faiss.GpuClonerOptions()
    is_flat = isinstance(index, faiss.IndexFlat) or "Flat" in type(index).__name__
    co.useFloat16 = not is_flat
    co.useFloat16CoarseQuantizer = False  # the coarse quantizer picks lists: keep it exact
    return co


def to_gpu(index: Any, use_gpu: bool | str) -> tuple[Any, Any]:
    """(index, resources): a GPU copy when wanted and supported, else the CPU index and None."""
    if not want_gpu(use_gpu):
        return index, None
    try:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index, gpu_cloner_options(index)), res
    except (RuntimeError, AttributeError) as e:  # e.g. a pq_m the GPU kernels do not support
        if use_gpu is True:
            raise KnnlmError(f"cannot move this index to the GPU: {e}") from e
        log.warning("FAISS GPU cannot hold this index (%s); using the CPU", e)
        return index, None


def to_cpu(index: Any, res: Any) -> Any:
    return faiss.index_gpu_to_cpu(index) if res is not None else index
