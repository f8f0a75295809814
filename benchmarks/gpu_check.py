"""One short check for a machine with a GPU and faiss-gpu; prints JSON (skips without a GPU).

    python benchmarks/gpu_check.py --n 500000 --dim 256 --queries 4096 --k 1024

On a random clustered float16 datastore, in one run: flat and IVF-PQ index build on the GPU
(IVF training seeded: built twice, the files must be byte-identical), search throughput on the
GPU vs the CPU (flat; IVF-PQ with exact re-ranking), and exactness of the GPU flat index:
its top-k ids against the CPU's and its distances against float64 numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from knnlm.retrieval.index_build import build_index
from knnlm.retrieval.index_common import open_keys
from knnlm.retrieval.search import KnnIndex, Searcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import make_ds  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        print(json.dumps({"skipped": "FAISS sees no GPU (faiss-gpu and a CUDA device needed)"}))
        return
    res: dict = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
                 "faiss": faiss.__version__, "gpus": faiss.get_num_gpus()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        flat, ivf, ivf2 = Path(tmp, "flat"), Path(tmp, "ivf"), Path(tmp, "ivf2")
        centers = make_ds(flat, args.n, args.dim, args.seed)
        for d in (ivf, ivf2):
            d.mkdir()
            for f in ("keys.npy", "values.npy", "meta.json"):
                (d / f).symlink_to(flat / f)
        rng = np.random.default_rng(args.seed + 1)
        q = centers[rng.integers(len(centers), size=args.queries)]
        q = (q + rng.normal(size=q.shape)).astype(np.float32)

        _, res["flat_build_s"] = timed(lambda: build_index(flat, "flat", progress=False))
        _, res["ivfpq_build_gpu_s"] = timed(
            lambda: build_index(ivf, "ivfpq", use_gpu=True, progress=False)
        )
        build_index(ivf2, "ivfpq", use_gpu=True, progress=False)
        res["ivfpq_gpu_build_deterministic"] = (ivf / "index.faiss").read_bytes() == (
            ivf2 / "index.faiss"
        ).read_bytes()

        k = min(args.k, 2048)
        gpu = KnnIndex.load(flat, use_gpu=True)
        cpu = KnnIndex.load(flat, use_gpu=False)
        res["flat_on_gpu"] = gpu.on_gpu
        (gd, gi), res["flat_search_gpu_s"] = timed(lambda: gpu.search(q, k))
        (cd, ci), res["flat_search_cpu_s"] = timed(lambda: cpu.search(q, k))
        keys = np.asarray(open_keys(flat)[0], dtype=np.float64)
        sub = slice(0, min(64, len(q)))
        ref = ((q[sub, None, :].astype(np.float64) - keys[gi[sub]]) ** 2).sum(-1)
        res["flat_gpu_vs_cpu_same_ids"] = float((gi == ci).mean())
        res["flat_gpu_vs_cpu_same_id_sets"] = float(
            np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(gi, ci, strict=True)])
        )
        res["flat_gpu_max_rel_dist_err_vs_numpy"] = float(np.max(np.abs(gd[sub] - ref) / ref))
        res["flat_cpu_max_rel_dist_err_vs_numpy"] = float(
            np.max(np.abs(cd[sub] - ((q[sub, None, :] - keys[ci[sub]]) ** 2).sum(-1)) / ref)
        )
        for dev, use in (("gpu", True), ("cpu", False)):
            s = Searcher(ivf, k, use_gpu=use)
            _, t = timed(lambda s=s: s.search(q, k))
            res[f"ivfpq_rerank_search_{dev}_queries_per_s"] = len(q) / t
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
