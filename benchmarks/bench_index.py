"""Index layer throughput and recall on a random clustered datastore; prints JSON.

    python benchmarks/bench_index.py --n 200000 --dim 64 --queries 1000 --k 64

Compares, in one run: chunked exact search, a flat index, and IVF-PQ with and without exact
re-ranking (recall@1 and overlap@k against exact search). Ratios are what matter here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from knnlm.retrieval.index import KnnIndex, Searcher, build_index, exact_search, open_keys


def make_ds(path: Path, n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 500), dim)).astype(np.float32) * 3
    keys = np.empty((n, dim), dtype=np.float16)
    for s in range(0, n, 100_000):  # bounded memory while generating
        m = min(100_000, n - s)
        keys[s : s + m] = centers[rng.integers(len(centers), size=m)] + rng.normal(size=(m, dim))
    np.save(path / "keys.npy", keys)
    np.save(path / "values.npy", np.zeros(n, dtype=np.int32))
    (path / "meta.json").write_text(json.dumps({"n": n, "dim": dim, "key_dtype": "float16"}))
    return centers


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res: dict = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k}
    with tempfile.TemporaryDirectory() as tmp:
        flat_ds, ivf_ds = Path(tmp, "flat"), Path(tmp, "ivf")
        for p in (flat_ds, ivf_ds):
            p.mkdir()
            centers = make_ds(p, args.n, args.dim, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        q = centers[rng.integers(len(centers), size=args.queries)]
        q = (q + rng.normal(size=q.shape)).astype(np.float32)
        keys, _ = open_keys(flat_ds)

        (ex_d, ex_i), res["exact_search_s"] = timed(lambda: exact_search(keys, q, args.k))
        _, res["flat_build_s"] = timed(lambda: build_index(flat_ds, "flat", progress=False))
        flat = KnnIndex.load(flat_ds, use_gpu=False)
        (_, fl_i), res["flat_search_s"] = timed(lambda: flat.search(q, args.k))
        _, res["ivfpq_build_s"] = timed(lambda: build_index(ivf_ds, "ivfpq", progress=False))
        res["ivfpq"] = json.loads((ivf_ds / "index.json").read_text())
        raw = Searcher(ivf_ds, args.k, nprobe=args.nprobe, recompute=False, use_gpu=False)
        rr = Searcher(ivf_ds, args.k, nprobe=args.nprobe, recompute=True, use_gpu=False)
        (_, raw_i), res["ivfpq_search_s"] = timed(lambda: raw.search(q, args.k))
        (_, rr_i), res["ivfpq_rerank_search_s"] = timed(lambda: rr.search(q, args.k))

        def overlap(ids: np.ndarray) -> float:
            hits = (ids[:, :, None] == ex_i[:, None, :]).any(-1)
            return float(hits.mean())

        res["flat_recall@1"] = float((fl_i[:, 0] == ex_i[:, 0]).mean())
        res["ivfpq_recall@1"] = float((raw_i[:, 0] == ex_i[:, 0]).mean())
        res["ivfpq_rerank_recall@1"] = float((rr_i[:, 0] == ex_i[:, 0]).mean())
        res["ivfpq_overlap@k"] = overlap(raw_i)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
