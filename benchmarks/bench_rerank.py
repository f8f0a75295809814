"""Exact re-ranking against PQ search alone, on synthetic clustered keys; prints JSON.

    python benchmarks/bench_rerank.py [--n 100000] [--dim 256] [--queries 256] [--k 1024]

An IVF-PQ index over float16 keys, searched through ``open_backend(ds, "faiss")`` as eval
does: PQ distances alone (``recompute=False``), exact re-ranking with the keys in RAM (the
default: one parallel ``fvec_L2sqr_by_idx`` over the batch's (n, k) ids), and with the keys
gathered from the memmap (stores beyond the RAM budget); beside them the former in-RAM path,
``faiss.IndexRefine`` over a float16 scalar-quantizer copy (per-neighbour decode), built here
for the comparison. Fastest of ``--repeats`` alternated runs; ratios to PQ alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from knnlm.retrieval.search.choose import open_backend
from knnlm.retrieval.search.faiss_lib import faiss, faiss_metric
from knnlm.retrieval.search.index_build import build_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import make_ds  # noqa: E402
from common import machine_info  # noqa: E402


def former_refine(backend, keys: np.ndarray):
    """``backend`` re-ranking through IndexRefine(index, float16 SQ copy of the keys), the
    in-RAM path before this change (the same backend code around it)."""
    d = keys.shape[1]
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss_metric("l2"))
    sq.add_sa_codes(np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), 2 * d))
    r = faiss.IndexRefine(backend.index.faiss_index, sq)
    r.k_factor = 1.0
    backend.refined = r  # FaissBackend.nearest searches an IndexRefine it is given
    return backend, sq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "ds"
        centers = make_ds(ds, args.n, args.dim, seed=0)
        build_index(ds, "ivfpq", nlist=max(16, int(args.n**0.5)), use_gpu=False, progress=False)
        rng = np.random.default_rng(1)
        q = centers[rng.integers(len(centers), size=args.queries)]
        q = torch.from_numpy((q + rng.normal(size=q.shape)).astype(np.float32))
        kw = {"nprobe": args.nprobe}
        pq = open_backend(ds, "faiss", recompute=False, **kw)
        ram = open_backend(ds, "faiss", **kw)
        from knnlm.retrieval.search.faiss_backend import FaissBackend

        disk = FaissBackend(ds, keys_in_ram=False, use_gpu=False, **kw)
        former, _sq = former_refine(open_backend(ds, "faiss", **kw), np.load(ds / "keys.npy"))
        runs = {
            "pq_s": lambda: pq.search(q, args.k),
            "rerank_in_ram_s": lambda: ram.search(q, args.k),
            "rerank_from_memmap_s": lambda: disk.search(q, args.k),
            "former_index_refine_fp16_s": lambda: former.search(q, args.k),
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):  # alternated: a change of load hits all alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        a, b = ram.search(q, args.k), former.search(q, args.k)
    out = {"benchmark": "rerank", "machine": machine_info(), **vars(args), **best}
    for name in runs:
        out[name.removesuffix("_s") + "_over_pq"] = best[name] / best["pq_s"]
    out["same_rows_as_former"] = float((a.rows == b.rows).float().mean())
    out["max_distance_difference"] = float((a.distances - b.distances).abs().max())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
