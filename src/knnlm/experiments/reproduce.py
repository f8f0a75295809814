"""``knnlm reproduce``: every analysis of the paper, end to end, with a report.

The pipeline composes the library; it re-implements nothing. Stages run in order, each
writing its artifacts under ``out/artifacts/<stage>/`` and its result to
``out/stages/<stage>.json`` together with a fingerprint of its settings and of the stages it
depends on. A stage whose result file exists with the same fingerprint is skipped, so an
interrupted run resumes where it stopped and a changed setting reruns only what it affects.

Scales:

- ``quick`` (the embedded default): no external data. Macondo is generated, a BPE tokenizer
  and a small GPT-2 are trained from scratch on its training sentences (the "natural text"
  of this scale), and every analysis runs on that model.
- ``corpus``: the natural-text part on a user corpus (e.g. WikiText-2): the ``small`` LM,
  datastore, Tables 1-4; that LM is then fine-tuned on Macondo (Section 4).
- ``paper``: the paper's settings for GPU users (WikiText-103 through HF datasets, the
  16-layer transformer, GPT-2 XL fine-tuning on Macondo, k=1024, weight 0.25, 5 seeds).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from knnlm.errors import KnnlmError
from knnlm.fileio import write_json_atomic
from knnlm.lm.loading import load_lm

FORMAT_VERSION = 1


@dataclass
class ReproduceConfig:
    """Every setting of a reproduction; the defaults are the ``quick`` scale."""

    scale: str = "quick"  # quick | corpus | paper
    corpus: str | None = None  # natural-text corpus (scale corpus / paper)
    model: str | None = None  # a pretrained LM to analyse instead of training one
    lm_preset: str = "small"  # architecture when training from scratch
    lm_epochs: int | None = None
    lm_max_steps: int | None = None
    context_len: int = 256
    stride: int | None = 128
    k: int = 1024
    knn_weight: float = 0.25
    temperature: float = 1.0
    sweep_weights: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8]
    )
    sweep_temperatures: list[float] = field(default_factory=lambda: [0.5, 1, 2, 3, 5, 10, 20])
    index: str | None = None  # None: exact search; flat | ivfpq
    index_nlist: int | None = None  # None: the index module's default (~4 sqrt(N))
    index_train_size: int | None = None
    nprobe: int | None = None
    projection_positions: int = 1000
    projection_max_steps: int = 500
    memory_hidden: int = 4096
    memory_epochs: int = 2
    memory_lr: float = 1e-5
    memory_batch_tokens: int = 9216
    memory_max_steps: int | None = None
    macondo_seeds: int = 3
    macondo_preset: str | None = None
    macondo_epochs: int | None = None
    macondo_sizes: dict[str, Any] = field(default_factory=dict)
    macondo_eval_every: int | None = None
    hurdle_seeds: int = 3
    hurdle_steps: int | None = None
    hurdle_eval_every: int | None = None
    hurdle_sizes: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def for_scale(cls, scale: str, **overrides: Any) -> ReproduceConfig:
        if scale == "quick":
            base = cls(
                scale="quick",
                lm_preset="tiny",
                lm_epochs=8,
                context_len=64,
                stride=32,
                k=256,
                projection_positions=300,
                memory_hidden=1024,
                memory_epochs=10,  # the paper's Macondo setting (App. D)
                memory_lr=1e-3,
                memory_batch_tokens=1024,
                macondo_seeds=3,
                macondo_epochs=3,  # the LM already read these sentences as its corpus
                hurdle_seeds=3,
            )
        elif scale == "corpus":
            # Sized for a 2-core CPU on a WikiText-2-sized corpus: IVF-PQ with exact
            # re-ranking, k=256, and a capped MLP-memory training run.
            base = cls(
                scale="corpus",
                lm_preset="small",
                context_len=256,
                stride=256,
                k=256,
                index="ivfpq",
                index_nlist=4096,
                index_train_size=200_000,
                nprobe=16,
                projection_positions=1000,
                memory_hidden=1024,
                memory_epochs=1,
                memory_lr=1e-3,
                memory_batch_tokens=4096,
                memory_max_steps=300,
                macondo_seeds=3,
                macondo_epochs=3,
                hurdle_seeds=2,
            )
        elif scale == "paper":
            base = cls(
                scale="paper",
                corpus="hf:wikitext:wikitext-103-raw-v1",
                lm_preset="paper",
                context_len=3072,
                stride=1536,
                k=1024,
                index="ivfpq",
                projection_positions=10000,
                memory_hidden=4096,
                memory_epochs=2,  # the paper's WikiText setting (App. D)
                memory_lr=1e-5,
                memory_batch_tokens=9216,
                macondo_seeds=5,
                macondo_preset="paper-gpt2",
                hurdle_seeds=5,
            )
        else:
            raise KnnlmError(f"unknown scale {scale!r}; choose quick, corpus or paper")
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        if base.scale in ("corpus", "paper") and not base.corpus:
            raise KnnlmError("the natural-text part needs --corpus DIR (or an hf: dataset spec)")
        return base


def fingerprint(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    seconds: float
    cached: bool
    result: dict


class Pipeline:
    """Runs named stages with caching by fingerprint; keeps wall time per stage."""

    def __init__(self, out: Path, on_stage: Callable[[str, int, int], None] | None = None):
        self.out = out
        self.records: dict[str, StageRecord] = {}
        self.fingerprints: dict[str, str] = {}
        self.on_stage = on_stage
        self.total = 0
        self.index = 0

    def artifacts(self, name: str) -> Path:
        path = self.out / "artifacts" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, name: str, settings: dict, deps: list[str], fn: Callable[[Path], dict]) -> dict:
        self.index += 1
        if self.on_stage:
            self.on_stage(name, self.index, self.total)
        fp = fingerprint(
            {
                "format": FORMAT_VERSION,
                "settings": settings,
                "deps": [self.fingerprints[d] for d in deps],
            }
        )
        self.fingerprints[name] = fp
        record_file = self.out / "stages" / f"{name}.json"
        if record_file.is_file():
            saved = json.loads(record_file.read_text())
            if saved.get("fingerprint") == fp:
                rec = StageRecord(name, saved["seconds"], True, saved["result"])
                self.records[name] = rec
                return rec.result
        t0 = time.perf_counter()
        result = fn(self.artifacts(name))
        seconds = time.perf_counter() - t0
        write_json_atomic(record_file, {"fingerprint": fp, "seconds": seconds, "result": result})
        self.records[name] = StageRecord(name, seconds, False, result)
        return result


# ---------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------
def stage_macondo_corpus(cfg: ReproduceConfig, art: Path) -> dict:
    """Macondo (seed cfg.seed) as a text corpus, and a BPE tokenizer under which the children
    of every Macondo seed used later are single tokens."""
    from knnlm.data.macondo import generate_macondo, non_single_token_children, write_macondo
    from knnlm.lm.tokenizer import save_tokenizer, train_bpe_tokenizer

    sizes = {k: v for k, v in cfg.macondo_sizes.items() if v is not None}
    datasets = [
        generate_macondo(seed=cfg.seed + s, **sizes) for s in range(max(cfg.macondo_seeds, 1))
    ]
    texts = [r["text"] + "\n" for ds in datasets for r in ds.train]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=16000, min_frequency=2)
    bad = non_single_token_children(datasets[0], tokenizer)
    if bad:
        raise KnnlmError(f"Macondo children are not single tokens under its BPE: {bad[:3]}")
    ds = datasets[0]
    corpus = art / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "train.txt").write_text("".join(r["text"] + "\n" for r in ds.train))
    # The held-out split of this corpus is the Macondo test set: statements without the
    # over-specifying clause.
    test_text = "".join(r["text"] + "\n" for r in ds.test)
    (corpus / "valid.txt").write_text(test_text)
    (corpus / "test.txt").write_text(test_text)
    write_macondo(ds, art / "macondo")
    save_tokenizer(tokenizer, art / "tokenizer")
    return {
        "corpus": str(corpus),
        "tokenizer": str(art / "tokenizer"),
        "train_sentences": len(ds.train),
        "test_sentences": len(ds.test),
        "vocab_size": len(tokenizer),
    }


def stage_lm(cfg: ReproduceConfig, corpus: str, tokenizer_dir: str | None, art: Path) -> dict:
    """Train the LM from scratch on the corpus's train split (or take the given model)."""
    if cfg.model is not None:
        return {"model": cfg.model, "trained": False}
    from transformers import AutoTokenizer

    from knnlm.data.corpus import read_split, tokenize_text
    from knnlm.lm.presets import get_preset
    from knnlm.lm.train import TrainConfig, model_from_preset, train, train_lm

    if tokenizer_dir is None:
        res = train_lm(
            corpus,
            art / "model",
            preset=cfg.lm_preset,
            epochs=cfg.lm_epochs,
            max_steps=cfg.lm_max_steps,
            seed=cfg.seed,
            context_len=cfg.context_len,
            quiet=True,
        )
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        preset = get_preset(cfg.lm_preset)
        ids = tokenize_text(tok, read_split(corpus, "train"))
        model = model_from_preset(cfg.lm_preset, tok, seed=cfg.seed, context_len=cfg.context_len)
        res = train(
            model,
            tok,
            ids,
            TrainConfig(
                lr=preset.lr,
                batch_size=preset.batch_size,
                epochs=cfg.lm_epochs or preset.epochs,
                max_steps=cfg.lm_max_steps,
                warmup_ratio=preset.warmup_ratio,
                weight_decay=preset.weight_decay,
                seed=cfg.seed,
                context_len=cfg.context_len,
                checkpoint_every=None,
            ),
            art / "model",
            progress=False,
        )
    return {
        "model": str(art / "model"),
        "trained": True,
        "preset": cfg.lm_preset,
        "steps": res.steps,
        "final_loss": res.final_loss,
        "seconds": res.seconds,
        "tokens_per_second": res.tokens_per_second,
    }


def stage_datastore(cfg: ReproduceConfig, model: str, corpus: str, art: Path) -> dict:
    from knnlm.retrieval.datastore import build_datastore, open_datastore

    lm = load_lm(model)
    path = build_datastore(
        lm,
        corpus,
        "train",
        art / "ds",
        context_len=cfg.context_len,
        stride=cfg.stride,
        progress=False,
    )
    out = {"datastore": str(path)}
    if cfg.index:
        from knnlm.retrieval.index_build import build_index

        t0 = time.perf_counter()
        build_index(
            path,
            kind=cfg.index,
            nlist=cfg.index_nlist,
            train_size=cfg.index_train_size,
            nprobe=cfg.nprobe or 32,
            seed=cfg.seed,
            progress=False,
        )
        out["index_seconds"] = time.perf_counter() - t0
    ds = open_datastore(path)
    out.update(n=ds.n, dim=ds.dim, key_type=ds.meta["key_type"], bytes=ds.storage_bytes())
    return out


def _knn(cfg: ReproduceConfig, temperature: float | None = None, weight: float | None = None):
    from knnlm.evaluate import KnnSettings

    return KnnSettings(
        nprobe=cfg.nprobe,
        k=cfg.k,
        knn_weight=cfg.knn_weight if weight is None else weight,
        temperature=cfg.temperature if temperature is None else temperature,
    )


def stage_knnlm(cfg: ReproduceConfig, model: str, corpus: str, ds: str, art: Path) -> dict:
    """LM vs kNN-LM on the valid split, and the weight x temperature sweep from cache."""
    from knnlm.evaluate import evaluate
    from knnlm.report.figures import plot_sweep_heatmap
    from knnlm.sweep import sweep

    lm = load_lm(model)
    res = evaluate(
        lm,
        corpus,
        "valid",
        context_len=cfg.context_len,
        stride=cfg.stride,
        datastore=ds,
        knn=_knn(cfg),
        cache=art / "cache",
        progress=False,
    )
    grid = sweep(
        art / "cache",
        cfg.sweep_weights,
        [float(t) for t in cfg.sweep_temperatures],
        progress=False,
    )
    # Best temperature at the configured weight, and the best (weight, temperature) overall.
    ppl = grid["perplexity"][-1]
    wi = min(
        range(len(cfg.sweep_weights)), key=lambda i: abs(cfg.sweep_weights[i] - cfg.knn_weight)
    )
    ti = min(range(len(grid["temperatures"])), key=lambda j: ppl[wi][j])
    plot_sweep_heatmap(
        grid["weights"],
        grid["temperatures"],
        ppl,
        art / "sweep.png",
        title=f"kNN-LM valid perplexity (k={cfg.k})",
        lm_ppl=grid["lm"]["perplexity"],
    )
    return {
        "tokens": res["tokens"],
        "lm": res["lm"],
        "knnlm": res["knnlm"],
        "settings": res["settings"],
        "best_temperature": {
            "knn_weight": grid["weights"][wi],
            "temperature": grid["temperatures"][ti],
            "perplexity": ppl[wi][ti],
        },
        "best": grid["best"],
        "sweep": {k: grid[k] for k in ("weights", "temperatures", "ks")} | {"perplexity": ppl},
        "figure": str(art / "sweep.png"),
        "timing": res["timing"],
    }


def stage_projection(
    cfg: ReproduceConfig, model: str, corpus: str, ds: str, art: Path, *, lr_study: bool
) -> dict:
    """Section 3: Eq. 2 at lr 0.1 with early stop (Tables 1, 3), or lr 1e-3, 100 steps (Table 4)."""
    from knnlm.experiments.projection import run_projection
    from knnlm.report.figures import plot_kl_hist, plot_kl_steps

    lm = load_lm(model)
    res = run_projection(
        lm,
        corpus,
        ds,
        "valid",
        context_len=cfg.context_len,
        stride=cfg.stride,
        knn=_knn(cfg),
        max_positions=cfg.projection_positions
        if not lr_study
        else min(cfg.projection_positions, 300),
        seed=cfg.seed,
        lr=1e-3 if lr_study else 0.1,
        max_steps=cfg.projection_max_steps,
        fixed_steps=100 if lr_study else None,
        progress=False,
    )
    if lr_study:
        fig = plot_kl_steps(
            res["proj_f"]["kl_curve"], res["proj_fg"]["kl_curve"], art / "kl_steps.png", lr=1e-3
        )
    else:
        fig = plot_kl_hist(res["proj_f"]["kl"], res["proj_fg"]["kl"], art / "kl_hist.png")
    res["figure"] = str(fig)
    return res


def stage_memory(
    cfg: ReproduceConfig, model: str, corpus: str, ds: str, knn_res: dict, art: Path
) -> dict:
    """Section 5: the MLP memory trained on the datastore, interpolated like p_knn.

    The kNN-LM row of Table 2 is the ``knnlm`` stage's result (same split, settings and
    tokens), so the datastore is not searched a second time.
    """
    from knnlm.evaluate import evaluate, storage_report
    from knnlm.experiments.mlp_memory import memory_storage, train_memory
    from knnlm.retrieval.datastore import open_datastore

    lm = load_lm(model)
    store = open_datastore(ds)
    tr = train_memory(
        store.keys,
        store.values,
        lm.adapter.output_embedding.detach(),
        art / "memory",
        hidden=cfg.memory_hidden,
        lr=cfg.memory_lr,
        batch_tokens=cfg.memory_batch_tokens,
        epochs=cfg.memory_epochs,
        max_steps=cfg.memory_max_steps,
        seed=cfg.seed,
        progress=False,
        datastore={"path": str(store.path), "n": store.n},
    )
    res = evaluate(
        lm,
        corpus,
        "valid",
        context_len=cfg.context_len,
        stride=cfg.stride,
        memory=art / "memory",
        memory_weight=cfg.knn_weight,
        key_type=store.meta["key_type"],
        progress=False,
    )
    return {
        "tokens": res["tokens"],
        "lm": res["lm"],
        "knnlm": knn_res["knnlm"],
        "mlp": res["mlp"],
        "storage": storage_report(store, memory_storage(art / "memory")),
        "train": {"steps": tr.steps, "final_loss": tr.final_loss, "seconds": tr.seconds},
        "settings": knn_res["settings"]
        | res["settings"]
        | {
            "hidden": cfg.memory_hidden,
            "epochs": cfg.memory_epochs,
            "lr": cfg.memory_lr,
            "batch_tokens": cfg.memory_batch_tokens,
        },
    }


def stage_macondo(cfg: ReproduceConfig, model: str | None, art: Path) -> dict:
    """Section 4: fine-tune on Macondo, per-n log-likelihood of the children (Table 5)."""
    from knnlm.experiments.overspec import run_macondo

    res = run_macondo(
        art,
        model=model,
        seeds=[cfg.seed + s for s in range(cfg.macondo_seeds)],
        preset=cfg.macondo_preset,
        k=cfg.k,
        knn_weight=cfg.knn_weight,
        temperature=cfg.temperature,
        epochs=cfg.macondo_epochs,
        eval_every=cfg.macondo_eval_every,
        macondo_kwargs=cfg.macondo_sizes or None,
        progress=False,
    )
    out = {k: res[k] for k in ("groups", "reproduced", "settings", "seconds") if k in res}
    out["figure1"] = str(art / res["files"]["figure1"])
    out["table5"] = str(art / res["files"]["table"])
    if "figure3" in res.get("files", {}):
        out["figure3"] = str(art / res["files"]["figure3"])
        out["curves"] = res.get("curves")
    return out


def stage_hurdle(cfg: ReproduceConfig, corpus: str | None, art: Path) -> dict:
    """Appendix E: with vs without the last MLP, Macondo log-likelihood and corpus loss."""
    from knnlm.experiments.hurdle import run_hurdle

    res = run_hurdle(
        art,
        seeds=[cfg.seed + s for s in range(cfg.hurdle_seeds)],
        steps=cfg.hurdle_steps,
        eval_every=cfg.hurdle_eval_every,
        corpus=corpus,
        quick=cfg.scale != "paper",
        progress=False,
        **{k: v for k, v in cfg.hurdle_sizes.items() if v is not None},
    )
    res = dict(res)
    res["figure4"] = str(art / "figure4.png")
    if (art / "figure5.png").is_file():
        res["figure5"] = str(art / "figure5.png")
    return res


# ---------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------
def reproduce(
    cfg: ReproduceConfig,
    out: str | Path,
    progress: bool = True,
) -> dict:
    """Run every stage (or reuse cached ones) and write the report. Returns results.json."""
    from knnlm.report.paper import write_paper_report

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise KnnlmError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    display = _StageDisplay(progress)
    pipe = Pipeline(out, on_stage=display.update)
    pipe.total = 9 + (cfg.scale == "quick")
    s = asdict(cfg)
    try:
        if cfg.scale == "quick":
            data = pipe.run(
                "corpus",
                {k: s[k] for k in ("seed", "macondo_seeds", "macondo_sizes")},
                [],
                lambda art: stage_macondo_corpus(cfg, art),
            )
            corpus, tok_dir, deps = data["corpus"], data["tokenizer"], ["corpus"]
        else:
            corpus, tok_dir, deps = cfg.corpus, None, []
        lm_keys = ("model", "lm_preset", "lm_epochs", "lm_max_steps", "context_len", "seed")
        lm_res = pipe.run(
            "lm",
            {k: s[k] for k in lm_keys} | {"corpus": corpus},
            deps,
            lambda art: stage_lm(cfg, corpus, tok_dir, art),
        )
        model = lm_res["model"]
        ds_keys = ("context_len", "stride", "index", "index_nlist", "index_train_size")
        ds_res = pipe.run(
            "datastore",
            {k: s[k] for k in ds_keys},
            ["lm"],
            lambda art: stage_datastore(cfg, model, corpus, art),
        )
        ds = ds_res["datastore"]
        knn_keys = ("k", "knn_weight", "temperature", "nprobe", "sweep_weights",
                    "sweep_temperatures")  # fmt: skip
        knn_res = pipe.run(
            "knnlm",
            {k: s[k] for k in knn_keys},
            ["datastore"],
            lambda art: stage_knnlm(cfg, model, corpus, ds, art),
        )
        proj_keys = ("k", "knn_weight", "temperature", "nprobe", "projection_positions",
                     "projection_max_steps", "seed")  # fmt: skip
        proj = pipe.run(
            "projection",
            {k: s[k] for k in proj_keys},
            ["datastore"],
            lambda art: stage_projection(cfg, model, corpus, ds, art, lr_study=False),
        )
        proj_lr = pipe.run(
            "projection_lr",
            {k: s[k] for k in proj_keys},
            ["datastore"],
            lambda art: stage_projection(cfg, model, corpus, ds, art, lr_study=True),
        )
        mem_keys = ("memory_hidden", "memory_epochs", "memory_lr", "memory_batch_tokens",
                    "memory_max_steps", "k", "knn_weight", "temperature", "nprobe", "seed")  # fmt: skip
        memory = pipe.run(
            "memory",
            {k: s[k] for k in mem_keys},
            ["datastore", "knnlm"],
            lambda art: stage_memory(cfg, model, corpus, ds, knn_res, art),
        )
        mac_keys = ("macondo_seeds", "macondo_preset", "macondo_epochs", "macondo_sizes",
                    "macondo_eval_every", "k", "knn_weight", "temperature", "seed")  # fmt: skip
        # Section 4 fine-tunes the LM of this run on Macondo (the paper fine-tunes GPT-2).
        mac_model = model if cfg.scale != "paper" else cfg.model
        macondo = pipe.run(
            "macondo",
            {k: s[k] for k in mac_keys} | {"model": mac_model},
            ["lm"] if mac_model == model else [],
            lambda art: stage_macondo(cfg, mac_model, art),
        )
        hurdle_keys = ("hurdle_seeds", "hurdle_steps", "hurdle_eval_every", "hurdle_sizes",
                       "seed")  # fmt: skip
        hurdle_corpus = None if cfg.scale == "quick" else corpus
        hurdle = pipe.run(
            "hurdle",
            {k: s[k] for k in hurdle_keys} | {"corpus": hurdle_corpus},
            [],
            lambda art: stage_hurdle(cfg, hurdle_corpus, art),
        )
        display.update("report", pipe.total, pipe.total)
        results = {
            "config": s,
            "lm": lm_res,
            "datastore": ds_res,
            "knnlm": knn_res,
            "projection": {"lr_0.1": proj, "lr_0.001": proj_lr},
            "macondo": macondo,
            "memory": memory,
            "hurdle": hurdle,
            "stages": {
                name: {"seconds": r.seconds, "cached": r.cached} for name, r in pipe.records.items()
            },
        }
        results["wall_seconds"] = time.perf_counter() - t_start
        write_paper_report(out, results)
    finally:
        display.close()
    return json.loads((out / "results.json").read_text())


class _StageDisplay:
    """One overall progress display: which stage is running, out of how many."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]reproduce[/bold] {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("starting", total=1)

    def update(self, name: str, index: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task, description=f"stage: {name}", completed=index - 1, total=total
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=self.progress.tasks[0].total)
            self.progress.stop()
