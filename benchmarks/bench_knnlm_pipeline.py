"""kNN-LM engine on WikiText-2 with the small model: throughput, memory, recall, perplexity.

    python benchmarks/bench_knnlm_pipeline.py --quick            # a few minutes on 2 cores
    python benchmarks/bench_knnlm_pipeline.py --out engine.json  # full defaults, about half an hour

Every step runs in its own child process, so each step's peak RSS is its own. Steps, in
order: plain forward over the train prefix; datastore build over the same prefix (and over a
quarter of it, for memory vs corpus length); flat and IVF-PQ index builds; plain forward over
the valid prefix; the valid queries (keys); search alone (flat, IVF-PQ) on those queries in
the evaluation's batches; recall of IVF-PQ against flat; kNN-LM evaluation (flat, IVF-PQ).
Ratios to read: ``build_over_forward`` (target <= 1.10) and
``eval_over_forward_plus_search`` (target <= 1.15); ``peak_rss_ratio_full_over_quarter``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Timer,
    add_common_args,
    child_main,
    machine_info,
    model_context,
    model_under_test,
    prefix_corpus,
    quiet_libraries,
    rss_mib,
    run_and_emit,
    run_child,
    skip_unless_corpus,
    stderr_logger,
)

SCRIPT = str(Path(__file__).resolve())


# --------------------------------------------------------------------------- child steps


def _lm(p: dict):
    from knnlm.lm.loading import load_lm

    return load_lm(p["model"], device="cpu")


def step_forward(p: dict) -> dict:
    """model(ids) only, over the same windows and batches as the scoring pass; no hooks."""
    import numpy as np
    import torch

    from knnlm.data.corpus import load_tokens
    from knnlm.data.windows import make_windows
    from knnlm.forward_pass import window_batches

    lm = _lm(p)
    with Timer() as tt:
        ids = load_tokens(lm.tokenizer, p["corpus"], p["split"])
    windows = make_windows(len(ids), p["context_len"], p["stride"])
    batches = window_batches(windows, p["batch_size"])
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    rss0 = rss_mib()
    n_scored = 0
    with torch.no_grad(), Timer() as t:
        for lo, hi in batches:
            group = windows[lo:hi]
            width = max(w.length for w in group)
            begins = torch.tensor([w.begin for w in group])
            lengths = torch.tensor([w.length for w in group])
            col = torch.arange(width)
            src = begins[:, None] + col[None, :]
            inside = col[None, :] < lengths[:, None]
            batch_ids = torch.where(inside, ids_t[src.clamp(max=len(ids) - 1)], 0)
            lm.model(input_ids=batch_ids, attention_mask=inside.long(), use_cache=False)
            n_scored += sum(w.n_scored for w in group)
    return {
        "tokens": n_scored,
        "seconds": t.seconds,
        "tokens_per_s": n_scored / t.seconds,
        "tokenize_seconds": tt.seconds,
        "rss_before_loop_mib": rss0,
    }


def step_build(p: dict) -> dict:
    from knnlm.retrieval.datastore import build_datastore, open_datastore

    lm = _lm(p)
    rss0 = rss_mib()
    with Timer() as t:
        build_datastore(
            lm,
            p["corpus"],
            p["split"],
            p["out"],
            context_len=p["context_len"],
            stride=p["stride"],
            batch_size=p["batch_size"],
            key_type=p["key_type"],
            progress=p["progress"],
        )
    ds = open_datastore(p["out"])
    return {
        "keys": ds.n,
        "dim": ds.dim,
        "seconds": t.seconds,
        "tokens_per_s": ds.n / t.seconds,
        "datastore_bytes": ds.storage_bytes(),
        "rss_before_mib": rss0,
    }


def step_index(p: dict) -> dict:
    import json

    from knnlm.retrieval.search.index_build import build_index

    with Timer() as t:
        build_index(p["ds"], p["kind"], nprobe=p["nprobe"], use_gpu=False, progress=p["progress"])
    info = json.loads(Path(p["ds"], "index.json").read_text())
    keep = ("type", "n", "dim", "nlist", "pq_m", "pq_bits", "train_size", "nprobe")
    return {
        "seconds": t.seconds,
        "index_bytes": Path(p["ds"], "index.faiss").stat().st_size,
        "settings": {k: info.get(k) for k in keep},
    }


def step_queries(p: dict) -> dict:
    """The evaluation's queries (keys of the valid split), float32, and its batch sizes."""
    import numpy as np

    from knnlm.forward_pass import score_stream

    lm = _lm(p)
    from knnlm.data.corpus import load_tokens

    ids = load_tokens(lm.tokenizer, p["corpus"], p["split"])
    keys, counts = [], []
    for b in score_stream(
        lm.model,
        ids,
        p["context_len"],
        p["stride"],
        batch_size=p["batch_size"],
        key_type=p["key_type"],
        want_lm=False,
        progress=p["progress"],
    ):
        keys.append(b.keys.float().numpy())
        counts.append(len(b.targets))
    np.save(p["out"], np.concatenate(keys))
    np.save(p["counts"], np.asarray(counts, dtype=np.int64))
    return {"queries": int(sum(counts)), "batches": len(counts)}


def step_search(p: dict) -> dict:
    """The search eval runs (open_backend, --search faiss) alone, on the same queries in the
    same batches as the evaluation."""
    import numpy as np
    import torch

    from knnlm.retrieval.search.choose import open_backend

    q = torch.from_numpy(np.load(p["queries"], allow_pickle=False))
    counts = np.load(p["counts"], allow_pickle=False)
    s = open_backend(p["ds"], "faiss", nprobe=p["nprobe"], recompute=p["recompute"])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    rss0 = rss_mib()
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        t = time.perf_counter()
        s.search(q[a:b], p["k"])
        total += time.perf_counter() - t
    return {
        "queries": int(len(q)),
        "seconds": total,
        "queries_per_s": len(q) / total,
        "rss_before_mib": rss0,
    }


def step_recall(p: dict) -> dict:
    """IVF-PQ top-k ids against flat top-k ids on a sample of real valid queries."""
    import numpy as np
    import torch

    from knnlm.retrieval.search.choose import open_backend

    q = np.load(p["queries"], allow_pickle=False)
    rng = np.random.default_rng(p["seed"])
    q = torch.from_numpy(q[np.sort(rng.choice(len(q), min(p["sample"], len(q)), replace=False))])
    k = p["k"]
    flat = open_backend(p["flat_ds"], "faiss", recompute=False)
    n = flat.n
    ref = flat.search(q, k).rows.numpy()
    out: dict = {"queries": int(len(q)), "k": k, "nprobe": p["nprobe"]}
    for name, rerank in (("no_rerank", False), ("rerank", True)):
        s = open_backend(p["ivf_ds"], "faiss", nprobe=p["nprobe"], recompute=rerank)
        ids = s.search(q, k).rows.numpy()
        # recall@k: share of the flat top-k found anywhere in the IVF-PQ top-k; (row, id)
        # pairs are folded into one integer so a single np.isin compares all rows at once.
        row = np.arange(len(q), dtype=np.int64)[:, None] * (n + 1)
        valid = ref >= 0
        hits = np.isin((row + ref)[valid], (row + ids)[ids >= 0])
        out[name] = {
            "recall@1": float((ids[:, 0] == ref[:, 0]).mean()),
            "recall@k": float(hits.mean()) if hits.size else float("nan"),
        }
    return out


def step_eval(p: dict) -> dict:
    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings

    lm = _lm(p)
    knn = KnnSettings(k=p["k"], nprobe=p["nprobe"], recompute=p["recompute"])
    rss0 = rss_mib()
    res = evaluate(
        lm,
        p["corpus"],
        p["split"],
        context_len=p["context_len"],
        stride=p["stride"],
        batch_size=p["batch_size"],
        datastore=p["ds"],
        knn=knn,
        progress=p["progress"],
    )
    return {
        "tokens": res["tokens"],
        "seconds": res["timing"]["seconds"],
        "tokens_per_s": res["timing"]["tokens_per_s"],
        "search_seconds_inside": res["timing"].get("search_seconds"),
        "lm_perplexity": res["lm"]["perplexity"],
        "knnlm_perplexity": res["knnlm"]["perplexity"],
        "index": res["settings"]["index"],
        "rss_before_mib": rss0,
    }


STEPS = {
    "forward": step_forward,
    "build": step_build,
    "index": step_index,
    "queries": step_queries,
    "search": step_search,
    "recall": step_recall,
    "eval": step_eval,
}


# --------------------------------------------------------------------------- orchestration


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--train-fraction", type=float, default=None,
                    help="prefix of train (bytes) to build on (default 0.1; quick 0.012)")  # fmt: skip
    ap.add_argument("--valid-fraction", type=float, default=None,
                    help="prefix of valid to evaluate on (default 0.1; quick 0.03)")  # fmt: skip
    ap.add_argument("--k", type=int, default=None, help="neighbours (default 1024; quick 128)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--stride", type=int, default=None, help="default: the context length")
    ap.add_argument("--key-type", default="ffn_input")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each timed forward/build/search/eval step, fastest kept "
                         "(default 2; quick 1)")  # fmt: skip
    ap.add_argument("--recall-queries", type=int, default=None, help="default 2000; quick 500")
    args = ap.parse_args()
    q = args.quick
    args.train_fraction = args.train_fraction or (0.012 if q else 0.1)
    args.valid_fraction = args.valid_fraction or (0.03 if q else 0.1)
    args.k = args.k or (128 if q else 1024)
    args.recall_queries = args.recall_queries or (500 if q else 2000)
    args.repeats = max(1, args.repeats or (1 if q else 2))
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    corpus = skip_unless_corpus(args.corpus, args.out)
    res: dict = {"benchmark": "engine", "quick": args.quick, "machine": machine_info()}
    with Timer() as t:
        model, res["model"] = model_under_test(args.model, corpus, work, args.seed)
    res["model"]["prepare_seconds"] = t.seconds
    ctx = args.context_len or model_context(model)
    stride = args.stride or ctx
    full, quarter = work / "corpus", work / "corpus-quarter"
    fr = {"train": args.train_fraction, "valid": args.valid_fraction, "test": 0.01}
    sizes = prefix_corpus(corpus, full, fr)
    prefix_corpus(full, quarter, {"train": 0.25, "valid": 1.0, "test": 1.0})
    res["settings"] = {
        "corpus": str(corpus),
        "train_fraction": args.train_fraction,
        "valid_fraction": args.valid_fraction,
        "train_bytes": sizes["train"],
        "valid_bytes": sizes["valid"],
        "context_len": ctx,
        "stride": stride,
        "batch_size": args.batch_size,
        "key_type": args.key_type,
        "key_dtype": "float16",
        "k": args.k,
        "nprobe": args.nprobe,
        "repeats": args.repeats,
    }
    base = {"model": model, "context_len": ctx, "stride": stride, "batch_size": args.batch_size,
            "key_type": args.key_type, "progress": args.progress}  # fmt: skip
    ds, ds_ivf, ds_q = work / "ds", work / "ds-ivfpq", work / "ds-quarter"
    for d in (ds, ds_ivf, ds_q):  # a kept workdir must not turn a build into a reuse
        shutil.rmtree(d, ignore_errors=True)
    log = stderr_logger()

    steps: dict = {}
    train = {**base, "corpus": str(full), "split": "train"}
    # Forward and build alternate --repeats times; the fastest of each is kept (min-of-N is
    # the least load-sensitive estimate on a shared machine).
    for r in range(args.repeats):
        log(f"plain forward (train) {r + 1}/{args.repeats}")
        _keep_best(steps, "forward_train", run_child(SCRIPT, "forward", train))
        shutil.rmtree(ds, ignore_errors=True)
        log(f"datastore build (train) {r + 1}/{args.repeats}")
        _keep_best(steps, "datastore_build", run_child(SCRIPT, "build", {**train, "out": str(ds)}))
    log("datastore build (quarter of train, memory)")
    steps["datastore_build_quarter"] = run_child(
        SCRIPT, "build", {**base, "corpus": str(quarter), "split": "train", "out": str(ds_q)}
    )
    # The IVF-PQ index lives in a second directory sharing the same key/value files.
    ds_ivf.mkdir(exist_ok=True)
    for f in ("keys.npy", "values.npy", "meta.json"):
        if not (ds_ivf / f).exists():
            os.symlink(ds / f, ds_ivf / f)
    idx = {"nprobe": args.nprobe, "progress": args.progress}
    log("index build (flat)")
    steps["index_flat"] = run_child(SCRIPT, "index", {**idx, "ds": str(ds), "kind": "flat"})
    log("index build (ivfpq)")
    steps["index_ivfpq"] = run_child(SCRIPT, "index", {**idx, "ds": str(ds_ivf), "kind": "ivfpq"})
    valid = {**base, "corpus": str(full), "split": "valid"}
    qf, qc = work / "queries.npy", work / "query-counts.npy"
    log("valid queries")
    steps["queries"] = run_child(SCRIPT, "queries", {**valid, "out": str(qf), "counts": str(qc)})
    srch = {"queries": str(qf), "counts": str(qc), "k": args.k, "nprobe": args.nprobe,
            "recompute": True}  # fmt: skip
    evl = {**valid, "k": args.k, "nprobe": args.nprobe, "recompute": True}
    for r in range(args.repeats):
        log(f"plain forward (valid) {r + 1}/{args.repeats}")
        _keep_best(steps, "forward_valid", run_child(SCRIPT, "forward", valid))
        for kind, d in (("flat", ds), ("ivfpq", ds_ivf)):
            log(f"search alone ({kind}) {r + 1}/{args.repeats}")
            _keep_best(steps, f"search_{kind}", run_child(SCRIPT, "search", {**srch, "ds": str(d)}))
            log(f"kNN-LM eval ({kind}) {r + 1}/{args.repeats}")
            _keep_best(steps, f"eval_{kind}", run_child(SCRIPT, "eval", {**evl, "ds": str(d)}))
    log("recall")
    steps["recall_ivfpq_vs_flat"] = run_child(
        SCRIPT,
        "recall",
        {"queries": str(qf), "flat_ds": str(ds), "ivf_ds": str(ds_ivf), "k": args.k,
         "nprobe": args.nprobe, "sample": args.recall_queries, "seed": args.seed},
    )  # fmt: skip
    res["steps"] = steps
    res["summary"] = summarize(steps, args.k)
    return res


def _keep_best(steps: dict, name: str, new: dict) -> None:
    """Keep the fastest run of a repeated step; record every run's seconds and peak RSS."""
    old = steps.get(name)
    runs = (old["runs_seconds"] if old else []) + [new["seconds"]]
    peaks = (old["runs_peak_rss_mib"] if old else []) + [new["peak_rss_mib"]]
    best = new if old is None or new["seconds"] < old["seconds"] else old
    steps[name] = {**best, "runs_seconds": runs, "runs_peak_rss_mib": peaks}


def summarize(s: dict, k: int) -> dict:
    fwd, build, q = s["forward_train"], s["datastore_build"], s["datastore_build_quarter"]
    fwd_total = fwd["seconds"] + fwd["tokenize_seconds"]
    out: dict = {
        "plain_forward_tokens_per_s": fwd["tokens_per_s"],
        "datastore_build_tokens_per_s": build["tokens_per_s"],
        # The build call includes reading and tokenizing the text; so does this denominator.
        "build_over_forward": build["seconds"] / fwd_total,
        "build_over_forward_target": 1.10,
        "index_build_seconds": {
            "flat": s["index_flat"]["seconds"],
            "ivfpq": s["index_ivfpq"]["seconds"],
        },  # fmt: skip
        "peak_rss_mib": {name: v["peak_rss_mib"] for name, v in s.items()},
        "datastore_build_peak_rss_mib": {
            "full": build["peak_rss_mib"],
            "quarter": q["peak_rss_mib"],
            "keys_full": build["keys"],
            "keys_quarter": q["keys"],
        },  # fmt: skip
        "peak_rss_ratio_full_over_quarter": build["peak_rss_mib"] / q["peak_rss_mib"],
        "peak_rss_growth_mib": build["peak_rss_mib"] - q["peak_rss_mib"],
        "datastore_growth_mib": (build["datastore_bytes"] - q["datastore_bytes"]) / 2**20,
    }
    fv = s["forward_valid"]["seconds"]
    for kind in ("flat", "ivfpq"):
        e, se = s[f"eval_{kind}"], s[f"search_{kind}"]["seconds"]
        out[f"knnlm_eval_{kind}"] = {
            "tokens_per_s": e["tokens_per_s"],
            "eval_seconds": e["seconds"],
            "forward_seconds": fv,
            "search_alone_seconds": se,
            "eval_over_forward_plus_search": e["seconds"] / (fv + se),
            "target": 1.15,
            "lm_perplexity": e["lm_perplexity"],
            "knnlm_perplexity": e["knnlm_perplexity"],
        }
    r = s["recall_ivfpq_vs_flat"]
    out["ivfpq_recall"] = {"k": k, **{n: r[n] for n in ("no_rerank", "rerank")}}
    out["valid_perplexity"] = {
        "lm": s["eval_flat"]["lm_perplexity"],
        "knnlm_flat": s["eval_flat"]["knnlm_perplexity"],
        "knnlm_ivfpq": s["eval_ivfpq"]["knnlm_perplexity"],
        "k": k,
        "knn_weight": 0.25,
        "temperature": 1.0,
    }
    out["targets_met"] = {
        "build_over_forward<=1.10": out["build_over_forward"] <= 1.10,
        "eval_flat<=1.15": out["knnlm_eval_flat"]["eval_over_forward_plus_search"] <= 1.15,
        "eval_ivfpq<=1.15": out["knnlm_eval_ivfpq"]["eval_over_forward_plus_search"] <= 1.15,
    }
    return out


def main() -> None:
    if child_main(STEPS):
        return
    quiet_libraries()
    run_and_emit("engine", run, parse_args())


if __name__ == "__main__":
    main()
