"""Fast kNN-LM trade-off: perplexity against tokens/s for every fast method and the tuner's pick.

    python benchmarks/bench_tradeoff.py --out tradeoff.json --png tradeoff.png   # ~12 min
    # full WikiText-2 (issue size: 2.44M keys, ~1 h 15 min on 2 cores), on the LM and datastore
    # of `knnlm reproduce --corpus ../shared/data/wikitext-2 --out wt2` (or --preset small
    # --lm-steps N to train one here):
    python benchmarks/bench_tradeoff.py --corpus ../shared/data/wikitext-2 --train-chars 0 \
        --model wt2/artifacts/lm-0/model --datastore wt2/artifacts/datastore-0/ds \
        --eval-chars 100000 --threads 2 --out tradeoff.json --png tradeoff.png

One run, one model, one datastore, one set of evaluated tokens (the test split, cut to
``--eval-chars``). By default a ``tiny`` GPT-2 is trained briefly on the WikiText-2 slice
shipped with the package, so the run needs no outside data; ``--corpus`` / ``--model`` /
``--datastore`` scale it up. The baseline of every ratio is ``knnlm eval``'s default kNN-LM
(k 1024, w 0.25, T 1, the IVF-PQ index at its own nprobe with exact re-ranking). Methods: the
LM; that kNN-LM, and beside it PQ distances without re-ranking (the re-ranking's cost); fewer
neighbours (k 256, 64) and fewer IVF lists probed; RetoMaton pointers at ``--pointers``
thresholds; the learned gate (He et al.) at 25/50/75% retrieval with the fixed weight and at
10-90% with its learned per-token weight; the entropy gate at 50%; PCA to d/2 and d/4 in front
of the IVF-PQ; the greedy-merged datastore; combinations; and the pick of ``knnlm tune`` (run
through the CLI on the valid split over the default, PCA d/4 and pruned stores and the mlp
gate, its settings file then evaluated on test with ``knnlm eval --settings``). Per method:
perplexity, the share of the LM -> kNN-LM gain kept (on log-perplexity), tokens/s, the
speed-up over the kNN-LM, tokens/s as a share of the LM's, seconds in and outside search,
storage (datastore + index bytes), the share of tokens searched. No row searches every key
exactly unless ``--with-exact``. The default IVF-PQ is built by ``knnlm datastore index`` in a
child process (its peak memory is reported; a ``--datastore``'s own index is not used, its
files are linked), with ``--train-per-list`` keys per list like every index here. The gate and
the tuner see the valid split, never test.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, machine_info, model_context, quiet_libraries, stderr_logger  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=None, help="WikiText-style dir (default: embedded slice)")
    ap.add_argument("--model", default=None, help="trained model dir (default: train one)")
    ap.add_argument("--datastore", default=None, help="a built datastore of --model over the "
                    "whole train split, with its IVF-PQ index (default: build both here)")  # fmt: skip
    ap.add_argument("--preset", default="tiny", help="preset of the model trained here")
    ap.add_argument("--lm-steps", type=int, default=600, help="training steps of that model")
    ap.add_argument("--train-chars", type=int, default=1_000_000, help="cut the train split "
                    "(0: whole)")  # fmt: skip
    ap.add_argument("--train-per-list", type=int, default=40,
                    help="IVF-PQ training keys per list (0: the library default, 256)")  # fmt: skip
    ap.add_argument("--eval-chars", type=int, default=60_000, help="cut valid and test")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--knn-weight", type=float, default=0.25)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--pointers", default="8,32", help="RetoMaton thresholds (comma-separated)")
    ap.add_argument("--no-tune", action="store_true", help="skip the knnlm tune row")
    ap.add_argument("--prune-k", type=int, default=9)
    ap.add_argument("--with-exact", action="store_true",
                    help="also the kNN-LM with the exact torch search (slow on CPU)")  # fmt: skip
    ap.add_argument("--gate-epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    ap.add_argument("--workdir", required=False, default=None, help="keep files here")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--png", default=None, help="perplexity vs tokens/s figure")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def prepare_corpus(args, work: Path) -> str:
    """The corpus dir, with train cut to --train-chars and valid/test to --eval-chars."""
    from knnlm.data import wikitext2

    src = Path(args.corpus) if args.corpus else wikitext2.extract(work / "embedded")
    out = work / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for split, cap in (("train", args.train_chars), ("valid", args.eval_chars),
                       ("test", args.eval_chars)):  # fmt: skip
        text = (src / f"{split}.txt").read_text(encoding="utf-8")
        if cap and len(text) > cap:
            text = text[: text.rfind("\n", 0, cap) + 1]
        (out / f"{split}.txt").write_text(text, encoding="utf-8")
    return str(out)


def prepare_model(args, corpus: str, work: Path) -> tuple[str, dict]:
    if args.model:
        return args.model, {"path": args.model, "trained_here": False}
    from knnlm.lm.train import train_lm
    from knnlm.lm.train_config import LMTrainSettings

    settings = LMTrainSettings(args.preset, max_steps=args.lm_steps, seed=args.seed,
                               checkpoint_every=None)  # fmt: skip
    res = train_lm(corpus, work / "model", settings, quiet=True)
    return str(work / "model"), {"preset": args.preset, "steps": res.steps,
                                 "final_loss": res.final_loss, "trained_here": True}  # fmt: skip


def linked_copy(src: Path, dst: Path) -> Path:
    """The datastore's files hard-linked into ``dst`` (its own index goes there)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (
        "keys.npy",
        "values.npy",
        "tokens.npy",
        "meta.json",
        "counts.npy",
        "positions.npy",
    ):
        if (src / name).is_file() and not (dst / name).exists():
            os.link(src / name, dst / name)
    return dst


def storage(ds_dir: Path) -> int:
    names = ("keys.npy", "values.npy", "counts.npy", "index.faiss")
    return sum((ds_dir / n).stat().st_size for n in names if (ds_dir / n).is_file())


def build(args, lm, corpus: str, work: Path, log) -> dict:
    """Datastore and its default IVF-PQ (or ``--datastore``), PCA copies, the pruned store and
    the two gates."""
    from knnlm.forward_pass import WindowSettings
    from knnlm.retrieval.datastore import build_datastore, open_datastore
    from knnlm.retrieval.gate_train import GateSettings, train_gate
    from knnlm.retrieval.prune import prune_datastore
    from knnlm.retrieval.retriever import KnnSettings, MixSettings
    from knnlm.retrieval.search.index_build import auto_nlist, build_index

    info: dict = {"seconds": {}}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        info["seconds"][name] = round(time.perf_counter() - t0, 2)
        log(f"{name}: {info['seconds'][name]} s")
        return out

    # IVF-PQ builds (four or five here) train k-means on a sample: 40 keys per list keeps each
    # to minutes at 2.44M keys; FAISS asks for at least 39.
    ivf = {"seed": args.seed, "progress": False}
    if args.datastore:  # its files linked; its own index, if any, is not the default's
        ds = linked_copy(Path(args.datastore), work / "ds")
        info["datastore_given"] = args.datastore
    else:
        ds = Path(timed("datastore", build_datastore, lm, corpus, "train", work / "ds",
                        context_len=args.context_len, progress=False))  # fmt: skip
    store = open_datastore(ds)
    dim, n = store.dim, store.n
    info.update(n=n, dim=dim)
    if args.train_per_list:
        ivf["train_size"] = args.train_per_list * auto_nlist(n)
    info["ivfpq_train_size"] = ivf.get("train_size", "library default")
    if not (ds / "index.faiss").is_file():
        # knnlm datastore index in a child process: its time and peak memory are its own
        info["index_build"] = index_build(ds, ivf.get("train_size"), args.seed)
        log(f"index_ivfpq: {info['index_build']}")
    stores = {"default": ds}
    for name, d in (("pca_d2", dim // 2), ("pca_d4", dim // 4)):
        stores[name] = linked_copy(ds, work / name)
        timed(f"index_{name}", build_index, stores[name], "ivfpq", pca=d, **ivf)
    report = timed("prune", prune_datastore, ds, work / "pruned", k=args.prune_k, progress=False)
    info["prune"] = report
    stores["pruned"] = work / "pruned"
    ivf_pruned = dict(ivf)
    if args.train_per_list:
        ivf_pruned["train_size"] = args.train_per_list * auto_nlist(report["entries_after"])
    timed("index_pruned", build_index, stores["pruned"], "ivfpq", **ivf_pruned)
    stores["combined"] = linked_copy(stores["pruned"], work / "combined")
    timed("index_combined", build_index, stores["combined"], "ivfpq", pca=dim // 2, **ivf_pruned)
    knn = KnnSettings(k=args.k)
    mix = MixSettings(knn_weight=args.knn_weight, temperature=args.temperature)
    window = WindowSettings(args.context_len, args.context_len)
    for kind in ("mlp", "entropy"):
        gs = GateSettings(kind=kind, knn=knn, mix=mix, window=window,
                          batch_size=args.batch_size, epochs=args.gate_epochs, seed=args.seed)  # fmt: skip
        timed(f"gate_{kind}", train_gate, lm, ds, corpus, work / f"gate_{kind}", gs,
              progress=False)  # fmt: skip
    info["stores"] = {k: str(v) for k, v in stores.items()}
    return info


def index_build(ds: Path, train_size: int | None, seed: int) -> dict:
    """The default IVF-PQ (nlist, PQ and nprobe as ``knnlm datastore index`` picks them) built
    by the CLI in a child process: its wall time and peak RSS, the process's own."""
    import resource
    import subprocess

    cmd = [
        *knnlm_cli(),
        "datastore",
        "index",
        str(ds),
        "--type",
        "ivfpq",
        "--seed",
        str(seed),
        "-q",
    ]
    if train_size:
        cmd += ["--train-size", str(train_size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"knnlm datastore index failed: {proc.stderr.strip()[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**20, 2),
            "peak_is_own": peak > before, "train_size": train_size or "library default"}  # fmt: skip


def knnlm_cli() -> list[str]:
    """The CLI of the knnlm this benchmark imports (its src first on the path)."""
    return [sys.executable, "-c", "from knnlm.cli import main; main()"]


def method(name, store="default", gate=None, rate=1.0, search="auto", **over) -> dict:
    """A row: ``over`` sets k / nprobe (``"third"``: a third of the index's) / recompute /
    pointers beside the defaults; ``gate`` "mlp+w" is the mlp gate with its learned weight."""
    return dict(name=name, store=store, gate=gate, rate=rate, search=search, over=over)


METHODS = [
    method("lm", store=None),
    method("knnlm"),
    method("knnlm_pq_only", recompute=False),  # the re-ranking's cost: knnlm / this
    method("k256", k=256),
    method("k256_nprobe_third", k=256, nprobe="third"),
    method("k64_nprobe_third", k=64, nprobe="third"),
    # pointers rows are added from --pointers
    method("adaptive_25", gate="mlp", rate=0.25),
    method("adaptive_50", gate="mlp", rate=0.5),
    method("adaptive_75", gate="mlp", rate=0.75),
    method("adaptive_10_learned_weight", gate="mlp+w", rate=0.1),
    method("adaptive_25_learned_weight", gate="mlp+w", rate=0.25),
    method("adaptive_50_learned_weight", gate="mlp+w", rate=0.5),
    method("adaptive_75_learned_weight", gate="mlp+w", rate=0.75),
    method("adaptive_90_learned_weight", gate="mlp+w", rate=0.9),
    method("entropy_50", gate="entropy", rate=0.5),
    method("pca_d2", store="pca_d2"),
    method("pca_d4", store="pca_d4"),
    method("pruned", store="pruned"),
    method("combined", store="combined", gate="mlp", rate=0.5),
    method("pca_d4_learned_25", store="pca_d4", gate="mlp+w", rate=0.25),
    method("pca_d4_learned_50", store="pca_d4", gate="mlp+w", rate=0.5),
    method("combined_learned_25", store="combined", gate="mlp+w", rate=0.25),
    method("combined_learned_50", store="combined", gate="mlp+w", rate=0.5),
]
# Exact torch search of every key: ~1.25 GFLOP a query at 2.44M x 256; opt-in.
EXACT_ROW = method("knnlm_exact_torch", search="exact")
# not combinations of the fast techniques (the tuner's pick is one)
BASELINES = ("lm", "knnlm", "knnlm_pq_only", "knnlm_exact_torch")


def methods(args) -> list[dict]:
    rows = METHODS[:6] + [EXACT_ROW] * args.with_exact
    for th in (float(t) for t in args.pointers.split(",") if t.strip()):
        rows.append(method(f"pointers_{th:g}", pointers=th))
    return rows + METHODS[6:]


def row_of(res: dict, part: dict, store_dir: str | None) -> dict:
    timing = res["timing"]
    return {
        "perplexity": part["perplexity"],
        "tokens": res["tokens"],
        "tokens_per_s": timing["tokens_per_s"],
        "seconds": timing["seconds"],
        "search_seconds": timing.get("search_seconds", 0.0),
        "seconds_outside_search": timing["seconds"] - timing.get("search_seconds", 0.0),
        "retrieval_share": part.get("retrieval_share", 0.0),
        "searches_saved": part.get("searches_saved"),
        "storage_bytes": storage(Path(store_dir)) if store_dir else 0,
    }


def measure(args, lm, corpus: str, work: Path, info: dict, log) -> dict:
    import json

    from knnlm.evaluate import evaluate
    from knnlm.retrieval.retriever import KnnSettings

    rows, index_nprobe = {}, None
    for m in methods(args):
        kw, over = {}, dict(m["over"])
        if m["store"] is not None:
            if over.get("nprobe") == "third":
                over["nprobe"] = max(1, round(index_nprobe / 3))
            pointers = over.pop("pointers", None)
            knn = KnnSettings(**{"k": args.k, "search": m["search"], **over})
            kw = dict(datastore=info["stores"][m["store"]], knn=knn, knn_weight=args.knn_weight,
                      knn_temperature=args.temperature, retrieval_rate=m["rate"],
                      pointers=pointers)  # fmt: skip
            if m["gate"] is not None:
                kind, _, learned = m["gate"].partition("+")
                kw.update(gate=work / f"gate_{kind}", gate_weight="learned" if learned else "fixed")
        res = evaluate(lm, corpus, "test", context_len=args.context_len,
                       batch_size=args.batch_size, progress=False, **kw)  # fmt: skip
        part = res["knnlm"] if m["store"] is not None else res["lm"]
        if m["name"] == "knnlm":
            index_nprobe = found_nprobe(res["settings"])
            info["search"] = found(res["settings"], "search")
        rows[m["name"]] = row_of(res, part, info["stores"].get(m["store"]))
        if "nprobe" in over:
            rows[m["name"]]["nprobe"] = over["nprobe"]
        log(
            f"{m['name']}: ppl {part['perplexity']:.3f}, {rows[m['name']]['tokens_per_s']:.0f} tok/s"
        )
        (work / "rows.json").write_text(json.dumps(rows, indent=1))  # a crash keeps the rows
    info["index_nprobe"] = index_nprobe
    if not args.no_tune:
        try:
            rows["tuner_pick"], info["tune"] = tuner_row(args, corpus, work, info, log)
        except RuntimeError as e:  # the other rows stand; the JSON says what failed
            info["tune"] = {"error": str(e)}
            log(f"tuner failed: {e}")
    return {"tokens": rows["lm"]["tokens"], "rows": ratios(rows)}


def found(d, key):
    """The first value under ``key`` anywhere in the nested dict ``d``."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            hit = found(v, key)
            if hit is not None:
                return hit
    return None


def found_nprobe(settings: dict) -> int:
    search = found(settings, "search") or {}
    return int(search.get("nprobe") or found(settings, "nprobe"))


def tuner_row(args, corpus: str, work: Path, info: dict, log) -> tuple[dict, dict]:
    """``knnlm tune`` on valid over the default, PCA d/4 and pruned stores and the mlp gate;
    its settings file evaluated on test by ``knnlm eval --settings``."""
    import json
    import subprocess

    common = ["--model", str(args.model_dir), "--corpus", corpus, "--context-len",
              str(args.context_len), "--batch-size", str(args.batch_size), "-q"]  # fmt: skip
    stores = [info["stores"][s] for s in ("default", "pca_d4", "pruned")]
    tune = [*knnlm_cli(), "tune", *common, "--split", "valid", "--gate", str(work / "gate_mlp"),
            *(["--pointers", args.pointers] if args.pointers.strip() else []),
            "--speed-tokens", "2048", "--speed-repeats", "1", "--out", str(work / "pick.json"),
            "--json", str(work / "tune.json"), "--plot", str(work / "tune.png")]  # fmt: skip
    for d in stores:
        tune += ["-d", d]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    for cmd in (tune, [*knnlm_cli(), "eval", *common, "--split", "test",
                       "--settings", str(work / "pick.json"), "--json", str(work / "pick_test.json")]):  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[3]} failed: {proc.stderr.strip()[-2000:]}")
    tuned = json.loads((work / "tune.json").read_text())
    res = json.loads((work / "pick_test.json").read_text())
    settings = json.loads((work / "pick.json").read_text())
    log(f"tuner pick: {settings}, ppl {res['knnlm']['perplexity']:.3f}")
    row = row_of(res, res["knnlm"], settings.get("datastore"))
    about = {"seconds": round(time.perf_counter() - t0, 1), "settings": settings,
             "valid": {k: tuned[k] for k in ("tokens", "lm", "default", "pick", "rule", "notes")},
             "points": len(tuned["points"])}  # fmt: skip
    return row, about


def ratios(rows: dict) -> dict:
    lm, base = rows["lm"], rows["knnlm"]
    gain = math.log(lm["perplexity"]) - math.log(base["perplexity"])
    for r in rows.values():
        kept = math.log(lm["perplexity"]) - math.log(r["perplexity"])
        r["gain_kept"] = kept / gain if gain else float("nan")
        r["speedup_over_knnlm"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["share_of_lm_tokens_per_s"] = r["tokens_per_s"] / lm["tokens_per_s"]
    return rows


def targets(rows: dict, info: dict) -> dict:
    """The issue's targets, each as measured here (ratios within this run)."""
    best = max((n for n in rows if n not in BASELINES and rows[n]["gain_kept"] >= 0.95),
               key=lambda n: rows[n]["share_of_lm_tokens_per_s"], default=None)  # fmt: skip
    out = {"best_method_95pct_gain": best,
           "fastest_method": max((n for n in rows if n not in BASELINES),
                                 key=lambda n: rows[n]["share_of_lm_tokens_per_s"])}  # fmt: skip
    if best:
        out["best_share_of_lm_tokens_per_s"] = rows[best]["share_of_lm_tokens_per_s"]
    pick = rows.get("tuner_pick")
    if pick:
        out["tuner_pick_gain_kept"] = pick["gain_kept"]
        out["tuner_pick_share_of_lm"] = pick["share_of_lm_tokens_per_s"]
        out["tuner_pick_met_95pct_gain_at_50pct_lm"] = (
            pick["gain_kept"] >= 0.95 and pick["share_of_lm_tokens_per_s"] >= 0.5)  # fmt: skip
    ptr = [n for n in rows if n.startswith("pointers_")]
    out["pointers"] = {n: {"searches_saved": rows[n]["searches_saved"],
                           "gain_kept": rows[n]["gain_kept"]} for n in ptr}  # fmt: skip
    out["pointers_met_50pct_saved_at_97pct_gain"] = any(
        (rows[n]["searches_saved"] or 0) >= 0.5 and rows[n]["gain_kept"] >= 0.97 for n in ptr
    )
    pq = rows["knnlm_pq_only"]["search_seconds"]
    out["rerank_time_ratio"] = rows["knnlm"]["search_seconds"] / pq if pq else None
    out["rerank_time_ratio_le_1_15"] = bool(pq) and out["rerank_time_ratio"] <= 1.15
    if info.get("index_build"):
        out["index_build_peak_gib"] = info["index_build"]["peak_rss_gib"]
        out["index_build_peak_le_3_8_gb"] = info["index_build"]["peak_rss_gib"] * 2**30 <= 3.8e9
    out["pruned_gain_kept_ge_97pct"] = rows["pruned"]["gain_kept"] >= 0.97
    out["pca_d2_gain_kept_ge_97pct"] = rows["pca_d2"]["gain_kept"] >= 0.97
    return out


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, r in rows.items():
        ax.scatter(r["tokens_per_s"], r["perplexity"], s=30)
        ax.annotate(name, (r["tokens_per_s"], r["perplexity"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")  # the plain LM is far faster than any retrieval
    ax.set_xlabel("tokens / s, log scale (higher is faster)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Fast kNN-LM: perplexity vs throughput (one run)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def context_of(args, model: str) -> int:
    """The datastore's context when one is given (its keys were made with it), else the
    model's training context."""
    if args.datastore:
        from knnlm.retrieval.datastore import open_datastore

        ctx = found(open_datastore(args.datastore).meta, "context_len")
        if ctx:
            return int(ctx)
    return model_context(model)


def run(args, work: Path) -> dict:
    import faiss
    import torch

    from knnlm.lm.loading import load_lm

    log = stderr_logger()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = prepare_corpus(args, work)
    model, model_info = prepare_model(args, corpus, work)
    log(f"model ready: {model_info}")
    lm = load_lm(model, device="cpu")
    args.model_dir = model
    args.context_len = context_of(args, model)
    info = build(args, lm, corpus, work, log)
    result = measure(args, lm, corpus, work, info, log)
    info.pop("stores")
    out = {
        "benchmark": "tradeoff",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "png", "model_dir")},
        "model": model_info,
        "setup": info,
        **result,
        "targets": targets(result["rows"], info),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
    }
    if args.png:
        plot(result["rows"], args.png)
    return out


def main() -> None:
    import tempfile

    args = parse_args()
    quiet_libraries()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        emit(run(args, Path(args.workdir)), args.out)
        return
    with tempfile.TemporaryDirectory(prefix="bench-tradeoff-") as tmp:
        emit(run(args, Path(tmp)), args.out)


if __name__ == "__main__":
    main()
