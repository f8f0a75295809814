"""Exact search in torch against its limits; prints JSON (ratios within one run, no asserts).

    python benchmarks/bench_search.py --part cpu [--corpus DIR] [--out FILE]
    python benchmarks/bench_search.py --part gpu --corpus DIR --out FILE   (benchmarks/gpu_session.sh)

``cpu``: (1) the two exact searches ``open_backend`` gives eval on the CPU, ``auto`` without an
index (``faiss.knn`` over float32 keys in RAM) and ``--search exact`` (torch, float32 keys in
RAM), on the same synthetic keys and queries: time, GFLOP/s (2 n d B flops for the q K^T
product) and its share of the cores' float32 FMA peak (:func:`fma_peak_gflops` states how it is
derived), and whether both return the same neighbours in the same order; (2) kNN-LM evaluation
tok/s per backend (``--search exact``, ``auto`` without an index = ``faiss.knn``, ``faiss``
with IVF-PQ) against the plain LM's tok/s, with a random GPT-2.

``gpu`` (needs no FAISS): (1) search of a 128-query batch (k = 1024) over 1M and 4M synthetic
float16 keys of d = 1024, opened through ``open_backend`` like eval (one split-precision GEMM),
after a warm-up, CUDA-synchronized, against the memory-bandwidth limit (the bytes of the fused
16-bit rows / measured copy bandwidth), and its agreement with a float64 brute force on a few
queries; (2) kNN-LM evaluation with exact search against the plain LM (random GPT-2 of 12
layers, d = 768, ~500k keys, k = 1024), each timed after a warm-up on the test split, with
CUDA synchronized around the timed call. Synthetic text (no ``--corpus``) has disjoint splits.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def best_of(fn, repeats: int, sync=lambda: None) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


# --------------------------------------------------------------------------- synthetic search


def key_store(work: Path, keys: np.ndarray) -> Path:
    """A datastore folder of synthetic keys (values 0), opened through open_backend like eval."""
    ds = work / f"keys-{keys.shape[0]}"
    ds.mkdir(exist_ok=True)
    np.save(ds / "keys.npy", keys)
    (ds / "meta.json").write_text(json.dumps({"n": keys.shape[0], "dim": keys.shape[1]}))
    return ds


def fma_peak_gflops() -> dict:
    """The cores' float32 FMA peak: cores x clock x FMA units x SIMD lanes x 2 flops.

    Cores: the CPUs this process may use; clock: the highest "cpu MHz" in /proc/cpuinfo (the
    current clock; a turbo clock would be higher); lanes: 16 with AVX-512, 8 with AVX2, 4
    else; FMA units per core: 2 (Intel Skylake-SP and later with AVX-512, AMD Zen, Intel
    client cores), an assumption: some Xeon SKUs have one AVX-512 FMA unit (halve the peak).
    """
    import os

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    mhz = max((float(x.split(":")[1]) for x in text.splitlines() if x.startswith("cpu MHz")),
              default=float("nan"))  # fmt: skip
    flags = set(next((x.split(":")[1].split() for x in text.splitlines()
                      if x.startswith("flags")), []))  # fmt: skip
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = len(os.sched_getaffinity(0))
    fma_units = 2
    peak = cores * mhz / 1e3 * fma_units * lanes * 2
    return {"cores": cores, "ghz": mhz / 1e3, "simd_lanes_fp32": lanes,
            "fma_units_per_core": fma_units, "peak_gflops": peak}  # fmt: skip


def cpu_search(n: int, d: int, b: int, k: int, repeats: int, work: Path) -> dict:
    from knnlm.retrieval.search.choose import open_backend

    rng = np.random.default_rng(0)
    ds = key_store(work, rng.standard_normal((n, d), dtype=np.float32).astype(np.float16))
    q = torch.from_numpy(rng.standard_normal((b, d), dtype=np.float32))
    # what eval opens: auto (faiss.knn over float32 keys in RAM), and --search exact (torch)
    backends = {"auto": open_backend(ds, "auto"), "exact": open_backend(ds, "exact")}
    res = {"n": n, "d": d, "queries": b, "k": k, "torch_threads": torch.get_num_threads(),
           "engines": {name: be.describe()["engine"] for name, be in backends.items()}}  # fmt: skip
    times = {name: [] for name in backends}
    out = {}
    for _ in range(repeats):  # alternated, fastest kept: the machine is shared
        for name, be in backends.items():
            t, out[name] = best_of(lambda be=be: be.search(q, k), 1)
            times[name].append(t)
    res.update({f"{name}_s": min(v) for name, v in times.items()})
    res["exact_over_auto"] = res["exact_s"] / res["auto_s"]
    peak = fma_peak_gflops()
    flops = 2.0 * n * d * b  # the q @ K^T product, one multiply-add = 2 flops
    res["fma_peak"] = peak
    for name in backends:
        res[f"{name}_gflops"] = flops / res[f"{name}_s"] / 1e9
        res[f"{name}_share_of_fma_peak"] = res[f"{name}_gflops"] / peak["peak_gflops"]
    a, e = out["auto"].rows.numpy(), out["exact"].rows.numpy()
    res["same_neighbours_in_order"] = bool((a == e).all())
    res["same_neighbour_sets"] = float(
        np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, e, strict=True)])
    )
    return res


def bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t, _ = best_of(lambda: y.copy_(x), 5, torch.cuda.synchronize)
    return 2 * x.numel() / t


def gpu_search(
    n: int, d: int, b: int, k: int, bw: float, check: int, work: Path, device: str = "cuda"
) -> dict:
    from knnlm.retrieval.search.choose import open_backend

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    host = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, 1 << 20):  # drawn on the GPU (fast), saved as a datastore's keys
        m = min(1 << 20, n - s)
        host[s : s + m] = torch.randn((m, d), generator=g, device=dev, dtype=torch.float16).cpu()
    ds = key_store(work, host)
    host = None
    ts = open_backend(ds, "auto", device=dev)  # what eval opens on a GPU
    keys = ts.keys
    q = torch.randn((b, d), generator=g, device=dev)
    ts.search(q, k)  # warm-up (kernels, allocator)
    sync()
    t, nb = best_of(lambda: ts.search(q, k), 5, sync)
    limit = n * ts.width * 2 / bw  # the fused 16-bit rows the one GEMM reads
    res = {"n": n, "d": d, "queries": b, "k": k, "search_s": t, "bandwidth_limit_s": limit,
           "over_limit": t / limit, "backend": ts.describe()}  # fmt: skip
    if check:  # float64 brute force on a few queries
        qd = q[:check].double()
        dd = torch.cat([((keys[a : a + (1 << 16)].double()[None] - qd[:, None]) ** 2).sum(-1)
                        for a in range(0, n, 1 << 16)], 1)  # fmt: skip
        ref = torch.topk(dd, k, largest=False).indices
        got = nb.rows[:check]
        res["agreement_with_float64"] = float(
            np.mean(
                [len(np.intersect1d(a.cpu(), c.cpu())) / k for a, c in zip(got, ref, strict=True)]
            )
        )
    keys = ts = nb = None  # free the device before the next size
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(ds)
    return res


# --------------------------------------------------------------------------- kNN-LM evaluation


def words(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 30))) + " .\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def make_corpus(src: str | None, work: Path, train_chars: int, valid_chars: int) -> Path:
    """Prefixes of a WikiText-style corpus (or synthetic words when none is given)."""
    out = work / "corpus"
    out.mkdir(exist_ok=True)
    for split, n in (("train", train_chars), ("valid", valid_chars), ("test", 10_000)):
        if src and (Path(src) / f"{split}.txt").is_file():
            text = (Path(src) / f"{split}.txt").read_text()[:n]
        else:
            text = words(n, seed={"train": 1, "valid": 2, "test": 3}[split])  # disjoint
        (out / f"{split}.txt").write_text(text)
    return out


def random_gpt2(corpus: Path, out: Path, n_layer: int, d: int, vocab: int, ctx: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from knnlm.lm.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer((corpus / "train.txt").read_text().splitlines(True), vocab)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_positions=ctx, n_embd=d,
                               n_layer=n_layer, n_head=max(1, d // 64),
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def eval_part(args, work: Path, device: str, backends: list[str]) -> dict:
    from knnlm.evaluate import evaluate
    from knnlm.lm.loading import load_lm
    from knnlm.retrieval.datastore import build_datastore
    from knnlm.retrieval.retriever import KnnSettings

    corpus = make_corpus(args.corpus, work, args.train_chars, args.valid_chars)
    model = random_gpt2(corpus, work / "model", args.layers, args.d_model, args.vocab, args.context)
    lm = load_lm(str(model), device=device, dtype=args.dtype)
    kw = dict(context_len=args.context, batch_size=args.batch_size, progress=False)
    t0 = time.perf_counter()
    ds = build_datastore(lm, str(corpus), "train", work / "ds", **kw)
    res = {"device": device, "datastore_build_s": time.perf_counter() - t0, "k": args.k,
           "model": f"random GPT-2, {args.layers} layers, d={args.d_model}", "evals": {}}  # fmt: skip
    evaluate(lm, str(corpus), "test", **kw)  # warm-up (kernels, allocator) on another split
    plain, plain_s = timed_eval(evaluate, lm, str(corpus), "valid", **kw)
    res["keys"] = int(np.load(Path(ds) / "keys.npy", mmap_mode="r").shape[0])
    plain_tps = plain["tokens"] / plain_s
    res["evals"]["lm"] = {"tokens_per_s": plain_tps, "perplexity": plain["lm"]["perplexity"]}
    for name in backends:
        search = name.split("+")[0]
        if name == "faiss+ivfpq":
            from knnlm.retrieval.search.index_build import build_index

            build_index(ds, "ivfpq", use_gpu=False, progress=False)
        knn = KnnSettings(k=args.k, search=search)
        evaluate(lm, str(corpus), "test", datastore=ds, knn=knn, **kw)  # warm-up
        r, r_s = timed_eval(evaluate, lm, str(corpus), "valid", datastore=ds, knn=knn, **kw)
        res["evals"][name] = {
            "tokens_per_s": r["tokens"] / r_s,
            "over_lm": r["tokens"] / r_s / plain_tps,
            "search_s": r["timing"]["search_seconds"],
            "perplexity": r["knnlm"]["perplexity"],
            "search": r["settings"]["search"],
        }
        log(f"{name}: {res['evals'][name]['tokens_per_s']:.0f} tok/s")
    return res


def timed_eval(evaluate, *a, **kw) -> tuple[dict, float]:
    """evaluate(...) and its wall time, CUDA-synchronized on both sides when a GPU is used."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    r = evaluate(*a, **kw)
    sync()
    return r, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["cpu", "gpu"], required=True)
    ap.add_argument("--corpus", default=None, help="WikiText-style dir (default: synthetic)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--sizes", default=None, help="synthetic key counts (comma-separated)")
    ap.add_argument("--k", type=int, default=1024)
    args, _ = ap.parse_known_args()
    gpu = args.part == "gpu"
    defaults = dict(layers=12 if gpu else 2, d_model=768 if gpu else 128,
                    vocab=32000 if gpu else 4000, context=1024 if gpu else 256,
                    batch_size=8, dtype="float32",
                    train_chars=2_400_000 if gpu else 120_000,
                    valid_chars=1_100_000 if gpu else 20_000)  # fmt: skip
    for name, v in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(v), default=v)
    args = ap.parse_args()
    out = {"part": args.part, "machine": platform.node(), "torch": torch.__version__,
           "command": " ".join(sys.argv)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if gpu:
            out["gpu"] = torch.cuda.get_device_name(0)
            bw = bandwidth(torch.device("cuda"))
            out["copy_bandwidth_GBps"] = bw / 1e9
            sizes = [int(x) for x in (args.sizes or "1000000,4000000").split(",")]
            sizes = [] if args.skip_search else sizes
            out["search"] = [gpu_search(n, 1024, 128, args.k, bw, 4 if n <= 2_000_000 else 0, work)
                             for n in sizes]  # fmt: skip
            log(json.dumps(out["search"]))
            if not args.skip_eval:
                out["eval"] = eval_part(args, work, "cuda", ["exact"])
        else:
            sizes = [int(x) for x in (args.sizes or "100000").split(",")]
            sizes = [] if args.skip_search else sizes
            out["search"] = [cpu_search(n, 256, 512, args.k, args.repeats, work) for n in sizes]
            log(json.dumps(out["search"]))
            if not args.skip_eval:
                out["eval"] = eval_part(args, work, "cpu", ["exact", "auto", "faiss+ivfpq"])
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
