"""Exact kNN-LM evaluation against PQ-distance evaluation, all in one process; prints JSON.

    python benchmarks/bench_exact.py --train-fraction 0.06 --valid-fraction 0.015 --k 1024

Steps, in order, on WikiText-2 prefixes with the ``small`` model (trained when found, else
random weights): datastore build; IVF-PQ index build (library defaults); LM-only evaluation;
kNN-LM evaluation with PQ distances (``recompute=False``) and with exact re-ranking (the
default), alternated ``--repeats`` times (fastest kept); the same exact evaluation with the
keys left on disk (memmap gather path) as a second, independent re-ranking; and search alone
on the evaluation's queries with and without re-ranking (alternated batch by batch), to set
the re-ranking time against the memory limit (bytes gathered / a measured copy bandwidth).

Summary: ``exact_over_pq`` (target <= 1.15), tokens/s of each evaluation, the perplexities
(exact in-RAM vs on-disk re-ranking must agree to 1e-6 relative) and
``rerank_over_memory_limit``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Timer,
    add_common_args,
    machine_info,
    model_context,
    model_under_test,
    peak_rss_mib,
    prefix_corpus,
    quiet_libraries,
    resolve_model,
    run_and_emit,
    skip_unless_corpus,
    stderr_logger,
)


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large np.copyto (read + write counted once, as a gather moves)."""
    import numpy as np

    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best


def run(args: argparse.Namespace, work: Path) -> dict:
    import json

    from knnlm.data.corpus import load_tokens
    from knnlm.evaluate import evaluate
    from knnlm.forward_pass import score_stream
    from knnlm.lm.loading import load_lm
    from knnlm.retrieval.datastore import build_datastore, open_datastore
    from knnlm.retrieval.retriever import KnnSettings
    from knnlm.retrieval.search.choose import open_backend
    from knnlm.retrieval.search.index_build import build_index

    corpus = skip_unless_corpus(args.corpus, args.out)
    res: dict = {"benchmark": "exact", "machine": machine_info()}
    log = stderr_logger()
    part = work / "corpus"
    sizes = prefix_corpus(
        corpus, part, {"train": args.train_fraction, "valid": args.valid_fraction, "test": 0.01}
    )
    if resolve_model(args.model) is None:
        log("random small model (tokenizer trained on the train prefix)")
    model, res["model"] = model_under_test(args.model, part, work, args.seed)
    ctx = args.context_len or model_context(model)
    stride = args.stride or ctx // 2
    lm = load_lm(model, device=args.device)
    common = dict(context_len=ctx, stride=stride, batch_size=args.batch_size, progress=False)
    res["settings"] = {
        "train_fraction": args.train_fraction,
        "valid_fraction": args.valid_fraction,
        "train_bytes": sizes["train"],
        "valid_bytes": sizes["valid"],
        "context_len": ctx,
        "stride": stride,
        "batch_size": args.batch_size,
        "k": args.k,
        "repeats": args.repeats,
        "device": args.device,
    }
    steps: dict = {}
    ds = work / "ds"
    log("datastore build")
    with Timer() as t:
        build_datastore(lm, str(part), "train", ds, key_type="ffn_input", **common)
    n_keys = open_datastore(ds).n
    steps["datastore_build"] = {"seconds": t.seconds, "keys": n_keys,
                                "tokens_per_s": n_keys / t.seconds}  # fmt: skip
    log(f"IVF-PQ index build ({n_keys} keys)")
    with Timer() as t:
        build_index(ds, "ivfpq", nprobe=args.nprobe, progress=False)
    info = json.loads((ds / "index.json").read_text())
    keep = ("nlist", "pq_m", "pq_bits", "nprobe", "train_size", "scan_fraction")
    steps["index_build"] = {"seconds": t.seconds, **{k: info[k] for k in keep},
                            "index_bytes": (ds / "index.faiss").stat().st_size}  # fmt: skip

    def ev(recompute: bool | None, overlap: bool | None = None) -> dict:
        knn = None if recompute is None else KnnSettings(k=args.k, recompute=recompute)
        r = evaluate(lm, str(part), "valid", datastore=None if knn is None else ds, knn=knn,
                     overlap=overlap, **common)  # fmt: skip
        out = {"tokens": r["tokens"], "seconds": r["timing"]["seconds"],
               "tokens_per_s": r["timing"]["tokens_per_s"],
               "lm_perplexity": r["lm"]["perplexity"]}  # fmt: skip
        if knn is not None:
            out["search_seconds"] = r["timing"]["search_seconds"]
            out["knnlm_perplexity"] = r["knnlm"]["perplexity"]
        return out

    for r in range(args.repeats):
        for name, rc in (("lm_eval", None), ("knnlm_eval_pq", False), ("knnlm_eval_exact", True)):
            log(f"{name} {r + 1}/{args.repeats}")
            _keep_best(steps, name, ev(rc))
    if args.device != "cpu":
        # The default pass overlaps the forward of batch i+1 with the search of batch i.
        log("knnlm_eval_exact without overlap (sequential)")
        steps["knnlm_eval_exact_sequential"] = ev(True, overlap=False)
    log("knnlm_eval_exact with keys on disk (memmap gather)")
    os.environ["KNNLM_RERANK_RAM_BYTES"] = "0"
    try:
        steps["knnlm_eval_exact_disk"] = ev(True)
    finally:
        del os.environ["KNNLM_RERANK_RAM_BYTES"]

    log("search alone on the evaluation's queries")
    ids = load_tokens(lm.tokenizer, str(part), "valid")
    qs = [b.keys.float().cpu() for b in score_stream(lm.model, ids, ctx, stride,
          batch_size=args.batch_size, key_type="ffn_input", want_lm=False, progress=False)]  # fmt: skip
    nq = sum(len(q) for q in qs)
    # PQ and exact search alternate batch by batch (fastest of --repeats per batch), so a
    # change in the machine's load hits both alike; the difference is the re-ranking.
    searchers = {name: open_backend(ds, "faiss", recompute=rc)
                 for name, rc in (("pq", False), ("exact", True))}  # fmt: skip
    timings = {"pq": 0.0, "exact": 0.0}
    for q in qs:
        for name, s in searchers.items():
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                s.search(q, args.k)
                best = min(best, time.perf_counter() - t0)
            timings[name] += best
    bw = copy_bandwidth()
    dim = open_datastore(ds).dim
    gathered = nq * args.k * dim * 2  # float16 keys
    rerank = max(timings["exact"] - timings["pq"], 0.0)
    steps["search_alone"] = {"queries": nq, "pq_seconds": timings["pq"],
                             "exact_seconds": timings["exact"]}  # fmt: skip
    pq, ex, disk = steps["knnlm_eval_pq"], steps["knnlm_eval_exact"], steps["knnlm_eval_exact_disk"]
    res["steps"] = steps
    res["summary"] = {
        "datastore_keys": n_keys,
        "datastore_build_tokens_per_s": steps["datastore_build"]["tokens_per_s"],
        "index_build_seconds": steps["index_build"]["seconds"],
        "lm_eval_tokens_per_s": steps["lm_eval"]["tokens_per_s"],
        "knnlm_pq_tokens_per_s": pq["tokens_per_s"],
        "knnlm_exact_tokens_per_s": ex["tokens_per_s"],
        "exact_over_pq": ex["seconds"] / pq["seconds"],
        "exact_over_pq_target": 1.15,
        # Less load-sensitive: the PQ evaluation plus the re-ranking measured by interleaving.
        "pq_plus_rerank_over_pq": (pq["seconds"] + rerank) / pq["seconds"],
        "perplexity": {
            "lm": steps["lm_eval"]["lm_perplexity"],
            "knnlm_pq": pq["knnlm_perplexity"],
            "knnlm_exact": ex["knnlm_perplexity"],
            "knnlm_exact_keys_on_disk": disk["knnlm_perplexity"],
            "exact_ram_vs_disk_rel_diff": abs(
                ex["knnlm_perplexity"] / disk["knnlm_perplexity"] - 1
            ),
        },  # fmt: skip
        "exact_keys_on_disk_tokens_per_s": disk["tokens_per_s"],
        "rerank": {
            "queries": nq,
            "seconds": rerank,
            "ms_per_query": 1e3 * rerank / max(nq, 1),
            "bytes_gathered": gathered,
            "copy_bandwidth_gb_s": bw / 1e9,
            "memory_limit_seconds": gathered / bw,
            "rerank_over_memory_limit": rerank / (gathered / bw),
        },
        "peak_rss_mib": peak_rss_mib(),
    }
    if "knnlm_eval_exact_sequential" in steps:
        seq = steps["knnlm_eval_exact_sequential"]
        res["summary"]["overlap"] = {
            "sequential_tokens_per_s": seq["tokens_per_s"],
            "overlapped_tokens_per_s": ex["tokens_per_s"],
            "speedup": seq["seconds"] / ex["seconds"],
            "perplexity_equal": seq["knnlm_perplexity"] == ex["knnlm_perplexity"],
        }
    return res


def _keep_best(steps: dict, name: str, new: dict) -> None:
    old = steps.get(name)
    runs = (old["runs_seconds"] if old else []) + [new["seconds"]]
    best = new if old is None or new["seconds"] < old["seconds"] else old
    steps[name] = {**best, "runs_seconds": runs}


def main() -> None:
    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--train-fraction", type=float, default=0.06)
    ap.add_argument("--valid-fraction", type=float, default=0.015)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=None, help="default: the library's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--stride", type=int, default=None, help="default: half the context")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the LM runs (search stays on CPU)")
    run_and_emit("exact", run, ap.parse_args())


if __name__ == "__main__":
    main()
