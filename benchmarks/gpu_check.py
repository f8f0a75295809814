"""One short check for a machine with a GPU; prints JSON (skips what the machine lacks).

    python benchmarks/gpu_check.py --n 500000 --dim 256 --queries 4096 --k 1024

Part ``torch_cuda`` (needs a CUDA device): a random ``small`` model on the embedded WikiText-2
slice, datastore built on the GPU, flat index searched on the CPU; LM and kNN-LM perplexity on
the GPU against the same run on the CPU (float32 both), the overlapped pass against the
sequential one (numbers equal, tokens/s of each), and bfloat16 against float32.

Part ``faiss_gpu`` (needs faiss-gpu): on a random clustered float16 datastore, flat and IVF-PQ
index build on the GPU (IVF training seeded: built twice, the files must be byte-identical),
search throughput on the GPU vs the CPU (flat; IVF-PQ with exact re-ranking), and exactness of
the GPU flat index: its top-k ids against the CPU's and its distances against float64 numpy.
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
import torch

from knnlm.retrieval.search.conventions import open_keys
from knnlm.retrieval.search.faiss_backend import FaissBackend
from knnlm.retrieval.search.index_build import build_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import make_ds  # noqa: E402
from common import quiet_libraries, random_small_model  # noqa: E402


def torch_cuda(k: int) -> dict:
    """kNN-LM evaluation with the model on CUDA against the same evaluation on the CPU."""
    import torch

    from knnlm.data import wikitext2
    from knnlm.evaluate import evaluate
    from knnlm.lm.loading import load_lm
    from knnlm.retrieval.datastore import build_datastore
    from knnlm.retrieval.retriever import KnnSettings

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    out: dict = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = wikitext2.extract(Path(tmp, "wt2"))
        model = str(random_small_model(corpus, Path(tmp, "model")))
        common = dict(context_len=256, stride=128, batch_size=8, progress=False)
        gpu = load_lm(model, device="cuda")
        ds, out["datastore_build_s"] = timed(
            lambda: build_datastore(gpu, str(corpus), "train", Path(tmp, "ds"), **common)
        )
        _, out["flat_index_build_s"] = timed(
            lambda: build_index(ds, "flat", use_gpu=False, progress=False)
        )
        knn = KnnSettings(k=k)
        runs = {}
        print(f"datastore and index built ({out['datastore_build_s']:.1f} s)", file=sys.stderr)
        for name, lm, overlap in (("cuda_overlap", gpu, True), ("cuda_sequential", gpu, False),
                                  ("cpu", load_lm(model, device="cpu"), False)):  # fmt: skip
            r = evaluate(lm, str(corpus), "valid", datastore=ds, knn=knn, overlap=overlap, **common)
            runs[name] = {"lm_ppl": r["lm"]["perplexity"], "knnlm_ppl": r["knnlm"]["perplexity"],
                          "tokens_per_s": r["timing"]["tokens_per_s"],
                          "search_s": r["timing"]["search_seconds"]}  # fmt: skip
            print(f"{name}: {runs[name]}", file=sys.stderr, flush=True)
        bf16 = evaluate(load_lm(model, device="cuda", dtype="bfloat16"), str(corpus), "valid",
                        **common)  # fmt: skip
        out["runs"] = runs
        out["tokens"] = r["tokens"]
        c, s, o = runs["cpu"], runs["cuda_sequential"], runs["cuda_overlap"]
        out["lm_ppl_rel_diff_cuda_vs_cpu"] = abs(s["lm_ppl"] / c["lm_ppl"] - 1)
        out["knnlm_ppl_rel_diff_cuda_vs_cpu"] = abs(s["knnlm_ppl"] / c["knnlm_ppl"] - 1)
        out["overlap_equal_to_sequential"] = o["knnlm_ppl"] == s["knnlm_ppl"]
        out["overlap_speedup"] = o["tokens_per_s"] / s["tokens_per_s"]
        out["lm_ppl_rel_diff_bf16_vs_fp32"] = abs(bf16["lm"]["perplexity"] / s["lm_ppl"] - 1)
    return out


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
    quiet_libraries()
    report = {"torch_cuda": torch_cuda(args.k), "faiss_gpu": faiss_gpu(args)}
    print(json.dumps(report, indent=2))


def faiss_gpu(args: argparse.Namespace) -> dict:
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        return {"skipped": "FAISS sees no GPU (faiss-gpu and a CUDA device needed)"}
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
        # the FAISS backend eval opens (open_backend picks use_gpu="auto"), GPU and CPU copies
        gpu = FaissBackend(flat, use_gpu=True, recompute=False)
        cpu = FaissBackend(flat, use_gpu=False, recompute=False)
        res["flat_on_gpu"] = gpu.index.on_gpu
        qt = torch.from_numpy(q)
        gnb, res["flat_search_gpu_s"] = timed(lambda: gpu.search(qt, k))
        cnb, res["flat_search_cpu_s"] = timed(lambda: cpu.search(qt, k))
        gd, gi, cd, ci = (t.numpy() for t in (gnb.distances, gnb.rows, cnb.distances, cnb.rows))
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
            s = FaissBackend(ivf, use_gpu=use)
            _, t = timed(lambda s=s: s.search(qt, k))
            res[f"ivfpq_rerank_search_{dev}_queries_per_s"] = len(q) / t
    return res


if __name__ == "__main__":
    main()
