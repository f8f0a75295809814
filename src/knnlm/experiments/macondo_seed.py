"""One seed of the Macondo experiment (Section 4): generate, fine-tune, datastore, score.

The dataset is generated with the tokenizer of the model that is fine-tuned (so every child
is one token under it) and used both to fine-tune and to evaluate. After fine-tuning: a
datastore over the training sentences (one example each, as seen in fine-tuning), the MLP
memory trained on that datastore (Section 5 / Appendix D: 10 epochs), and per test example
log p(child | "[villager], is the parent of") under the LM, the kNN-LM and LM + MLP memory.
The LM's log-likelihood of the children of the *training* sentences is recorded too, to check
that it fitted what it was fine-tuned on.

Artifacts under ``seed_dir``: ``data/``, ``model/``, ``datastore/``, ``memory/``,
``results.json``. A seed whose ``results.json`` holds the same settings is not rerun; a
finished fine-tuning (``train_done.json``) is reused; an interrupted one resumes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.data.macondo import (
    MacondoDataset,
    generate_macondo,
    non_single_token_children,
    perfect_log_likelihood,
    write_macondo,
)
from knnlm.errors import KnnlmError
from knnlm.experiments.macondo_aggregate import group_means
from knnlm.experiments.macondo_settings import upgrade_settings
from knnlm.fileio import read_json, write_json_atomic
from knnlm.lm.adapters import position_limit
from knnlm.lm.tokenizer import tokenizer_view

SEED_RESULTS = "results.json"
TRAIN_DONE = "train_done.json"
TRAIN_STARTED = "train_started.json"


def _same(a: Any, b: Any) -> bool:
    """Settings equality after a JSON round trip (tuples vs lists, int vs float keys)."""
    return json.loads(json.dumps(a, default=float)) == json.loads(json.dumps(b, default=float))


def child_continuations(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The continuation string per record whose first token is the child's name token.

    The child's token is read off ``prompt + " " + child``; " child" is the natural
    continuation for byte-level BPE, while SentencePiece tokenizers add their own prefix space
    to a separately encoded "child".
    """
    prompts = [r["prompt"] for r in records]
    spaced = [" " + r["child"] for r in records]
    bare = [r["child"] for r in records]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    full, pre, a, b = (
        enc([p + s for p, s in zip(prompts, spaced, strict=True)]),
        enc(prompts),
        enc(spaced),
        enc(bare),
    )
    out = []
    for i, r in enumerate(records):
        k = len(pre[i])
        if full[i][:k] != pre[i] or len(full[i]) != k + 1:
            raise KnnlmError(
                f"the child's name {r['child']!r} is not one token after {r['prompt']!r} under "
                "this tokenizer"
            )
        want = full[i][k]
        if a[i][:1] == [want]:
            out.append(spaced[i])
        elif b[i][:1] == [want]:
            out.append(bare[i])
        else:
            raise KnnlmError(f"cannot encode the child {r['child']!r} as its own first token")
    return out


def _loaded(model: Any, tokenizer: Any, name: str, fingerprint: str) -> Any:
    """An in-memory model as a LoadedLM (used while training, between saves)."""
    from knnlm.lm.adapters import Adapter
    from knnlm.lm.loading import LoadedLM, tokenizer_fingerprint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return LoadedLM(
        model=base,
        tokenizer=tokenizer,
        adapter=Adapter(base),
        name=name,
        fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def _score(
    lm: Any,
    test: Sequence[Mapping[str, Any]],
    continuations: list[str],
    train_texts: list[str],
    datastore_dir: Path | None,
    settings: Mapping[str, Any],
    progress: bool,
) -> dict[str, np.ndarray]:
    """Per-example log p(child | prompt) for the LM and (with a datastore dir) the kNN-LM."""
    from knnlm.evaluate import continuation_log_probs
    from knnlm.retrieval.datastore import build_example_datastore
    from knnlm.retrieval.retriever import KnnSettings

    prompts = [r["prompt"] for r in test]
    if datastore_dir is None:
        return continuation_log_probs(lm, prompts, continuations)
    path = build_example_datastore(
        lm,
        train_texts,
        datastore_dir,
        key_type=settings["key_type"],
        key_dtype=settings["key_dtype"],
        batch_size=settings["batch_size_eval"],
        add_eos=True,
        progress=progress,
        overwrite=True,  # the seed folder's own datastore: rebuilt when the model changes
    )
    knn = KnnSettings(
        k=settings["k"],
        knn_weight=settings["knn_weight"],
        temperature=settings["temperature"],
        search=settings["search"],
    )
    return continuation_log_probs(
        lm, prompts, continuations, datastore=path, knn=knn, batch_size=settings["batch_size_eval"]
    )


def _memory_scores(
    lm: Any,
    test: Sequence[Mapping[str, Any]],
    continuations: list[str],
    datastore_dir: Path,
    memory_dir: Path,
    settings: Mapping[str, Any],
    seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Section 5 on Macondo: the MLP memory trained on this seed's datastore (keys -> values),
    then log((1 - w) p_lm + w p_mem) of each test child, w the kNN-LM's weight."""
    import torch

    from knnlm.evaluate import continuation_log_probs
    from knnlm.experiments.mlp_memory import train_memory
    from knnlm.retrieval.datastore import open_datastore
    from knnlm.retrieval.knn import interpolate
    from knnlm.retrieval.memory import load_memory, memory_storage
    from knnlm.scoring import score_examples

    m = settings["memory"]
    store = open_datastore(datastore_dir)
    tr = train_memory(
        store.keys, store.values, lm.adapter.output_embedding.detach(), memory_dir,
        hidden=m["hidden"], lr=m["lr"], batch_tokens=m["batch_tokens"], epochs=m["epochs"],
        seed=seed, progress=False, overwrite=True,
        datastore={"path": str(store.path), "n": store.n},
    )  # fmt: skip
    mem = load_memory(memory_dir, device=str(lm.device))
    # The scored token per example is the one continuation_log_probs scores (checked below).
    tok = lm.tokenizer
    examples, starts = [], []
    for r, c in zip(test, continuations, strict=True):
        p_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        full = tok(r["prompt"] + c, add_special_tokens=False)["input_ids"]
        examples.append(p_ids + [full[len(p_ids)]])
        starts.append(len(p_ids))
    lm_lp, mem_lp = [], []
    for batch in score_examples(
        lm.model, examples, batch_size=settings["batch_size_eval"],
        key_type=store.meta["key_type"], score_from=starts,
    ):  # fmt: skip
        lm_lp.append(batch.lm_log_prob.float().cpu())
        with torch.no_grad():
            mem_lp.append(mem.target_log_prob(batch.keys.float(), batch.targets).float().cpu())
    lm_all, mem_all = torch.cat(lm_lp), torch.cat(mem_lp)
    ref = continuation_log_probs(lm, [r["prompt"] for r in test], continuations)["lm"]
    if not np.allclose(lm_all.numpy(), ref, atol=1e-4):
        raise KnnlmError("the MLP-memory pass scored other tokens than the LM pass")
    mixed = interpolate(lm_all, mem_all, settings["knn_weight"]).numpy()
    info = {
        "raw_log_probs": mem_all.numpy(),  # popped by the caller (tuning on dev)
        "weight": settings["knn_weight"],
        "steps": tr.steps,
        "final_loss": tr.final_loss,
        "seconds": tr.seconds,
        "storage": memory_storage(memory_dir),
        **{k: m[k] for k in ("hidden", "epochs", "lr", "batch_tokens")},
    }
    return mixed, info


def _make_dataset(seed: int, tokenizer: Any, sizes: Mapping[str, Any]) -> MacondoDataset:
    given = {k: v for k, v in sizes.items() if v is not None}  # None: the generator's default
    try:
        view = None if tokenizer is None else tokenizer_view(tokenizer)
        return generate_macondo(seed=seed, tokenizer=view, **given)
    except TypeError as exc:  # an unknown size keyword
        raise KnnlmError(f"bad Macondo size settings {dict(sizes)}: {exc}") from None


def _label_scratch_tokenizer(ds: MacondoDataset, tokenizer: Any) -> None:
    info = tokenizer_view(tokenizer).info
    ds.meta["tokenizer"] = dict(info, name="byte-level BPE trained on this dataset's train split")


def _scratch_model_and_data(seed: int, settings: Mapping[str, Any], sizes: Mapping[str, Any]):
    """Dataset without a tokenizer, a BPE tokenizer trained on its training sentences, a
    randomly initialised model of the scratch preset."""
    from knnlm.lm.presets import build_model_from_preset
    from knnlm.lm.tokenizer import train_bpe_tokenizer

    ds = _make_dataset(seed, None, sizes)
    # min_frequency 2 with a vocabulary past saturation: every word seen twice is one token.
    tok = train_bpe_tokenizer(
        [r["text"] + "\n" for r in ds.train], settings["scratch_vocab_size"], min_frequency=2
    )
    bad = non_single_token_children(ds, tokenizer_view(tok))
    if bad:
        raise KnnlmError(
            f"{len(bad)} children's names (e.g. {bad[0]!r}) are not single tokens under the BPE "
            "tokenizer trained on Macondo; raise sentences_per_pair to at least 2"
        )
    _label_scratch_tokenizer(ds, tok)
    model = build_model_from_preset(settings["scratch_architecture"], tokenizer=tok, seed=seed)
    return ds, tok, model


def run_seed(
    seed: int,
    seed_dir: Path,
    settings: Mapping[str, Any],
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, fine-tune, build the datastore and score one seed; returns its results dict."""
    import torch

    from knnlm.evaluate import continuation_log_probs
    from knnlm.lm.loading import load_lm, pick_device
    from knnlm.lm.lora import apply_lora
    from knnlm.lm.train import model_from_pretrained, train
    from knnlm.lm.train_config import TrainConfig

    seed_settings = dict(settings, seed=seed)
    seed_settings.pop("seeds", None)
    cached = read_json(seed_dir / SEED_RESULTS)
    if cached is not None and _same(upgrade_settings(cached.get("settings")), seed_settings):
        return cached
    seed_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    sizes = settings["macondo"]
    model_dir = seed_dir / "model"
    train_key = _train_key(seed_settings)
    done = read_json(seed_dir / TRAIN_DONE)
    trained = (
        done is not None
        and _same(done.get("settings"), train_key)
        and (model_dir / "config.json").is_file()
    )
    model = None
    if trained:  # only the dataset is rebuilt (deterministic); the model is on disk
        from knnlm.lm.loading import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
        ds = _make_dataset(seed, None if settings["from_scratch"] else tokenizer, sizes)
        if settings["from_scratch"]:
            _label_scratch_tokenizer(ds, tokenizer)
    elif settings["from_scratch"]:
        ds, tokenizer, model = _scratch_model_and_data(seed, settings, sizes)
        model.to(pick_device(device))
    else:
        model, tokenizer = model_from_pretrained(settings["model"], device)
        ds = _make_dataset(seed, tokenizer, sizes)
    write_macondo(ds, seed_dir / "data")
    train_texts = [r["text"] for r in ds.train]
    test = ds.test
    ns = [int(r["n_children"]) for r in test]
    conts = child_continuations(tokenizer, test)
    times["data"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if trained:
        curve, train_info = done["curve"], done["train"]
    else:
        # A checkpoint left by a run with other settings cannot be resumed: start over.
        started = read_json(seed_dir / TRAIN_STARTED)
        if started is not None and not _same(started, train_key):
            shutil.rmtree(model_dir, ignore_errors=True)
        write_json_atomic(seed_dir / TRAIN_STARTED, train_key)
        if settings["lora"]:
            model = apply_lora(model)
        limit = position_limit(model)
        max_pos = limit[0] if limit else 256
        config = TrainConfig(
            lr=settings["lr"],
            batch_size=settings["batch_size"],
            epochs=settings["epochs"],
            max_steps=settings["max_steps"],
            warmup_ratio=settings["warmup_ratio"],
            weight_decay=settings["weight_decay"],
            seed=seed,
            context_len=min(int(max_pos), 256),
            checkpoint_every=settings["checkpoint_every"],
            eval_every=settings["eval_every"],
            precision=settings["precision"],
        )

        def on_eval(step: int, m: Any) -> dict:
            lm_now = _loaded(m, tokenizer, f"{model_dir}@step{step}", f"step-{step}")
            with tempfile.TemporaryDirectory(dir=seed_dir, prefix=".curve-") as tmp:
                scored = _score(
                    lm_now,
                    test,
                    conts,
                    train_texts,
                    Path(tmp) / "datastore" if settings["curve_knn"] else None,
                    settings,
                    progress=False,
                )
            return {key: group_means(v, ns) for key, v in scored.items()}

        curve = []
        if settings["eval_every"]:
            # Step 0: the model before fine-tuning (the callback covers the later steps).
            model.eval()
            with torch.no_grad():
                curve.append({"step": 0, **on_eval(0, model)})
            model.train()
        result = train(
            model,
            tokenizer,
            train_texts,
            config,
            model_dir,
            on_eval=on_eval if settings["eval_every"] else None,
            progress=progress,
        )
        curve += result.evals
        train_info = {
            "steps": result.steps,
            "epochs": result.epochs,
            "final_loss": result.final_loss,
            "loss_curve": result.loss_curve,
            "seconds": result.seconds,
        }
        write_json_atomic(
            seed_dir / TRAIN_DONE,
            {"settings": train_key, "curve": curve, "train": train_info},
        )
        del model, result
    times["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    from knnlm.lm.train import library_bars

    with library_bars(progress):
        lm = load_lm(str(model_dir), device=device)
    scored = _score(lm, test, conts, train_texts, seed_dir / "datastore", settings, progress)
    # How well the LM learned the training sentences themselves (with their desc clause).
    train_conts = child_continuations(lm.tokenizer, ds.train)
    train_lm = continuation_log_probs(
        lm, [r["prompt"] for r in ds.train], train_conts, batch_size=settings["batch_size_eval"]
    )["lm"]
    train_groups = group_means(train_lm, [int(r["n_children"]) for r in ds.train])
    times["score"] = time.perf_counter() - t2
    lm_lp, knn_lp = scored["lm"], scored["knnlm"]
    mem_lp, mem_info, mem_raw = None, None, None
    if settings.get("memory"):
        t3 = time.perf_counter()
        mem_lp, mem_info = _memory_scores(
            lm, test, conts, seed_dir / "datastore", seed_dir / "memory", settings, seed
        )
        mem_raw = mem_info.pop("raw_log_probs")
        times["memory"] = time.perf_counter() - t3
    keep, tuning = np.ones(len(test), dtype=bool), None
    if settings.get("tune"):
        t4 = time.perf_counter()
        knn_lp, mem_lp, keep, tuning = _tuned_scores(
            lm, test, conts, seed_dir / "datastore", lm_lp, mem_raw, settings, seed
        )
        times["tune"] = time.perf_counter() - t4
        if mem_info is not None:
            mem_info["weight"] = tuning["tuned"].get("memory_weight")
    # The verdict's groups: the parents not used to choose the settings.
    ns_kept = [n for n, k in zip(ns, keep, strict=True) if k]
    lm_groups, knn_groups = group_means(lm_lp[keep], ns_kept), group_means(knn_lp[keep], ns_kept)
    mem_groups = group_means(mem_lp[keep], ns_kept) if mem_lp is not None else {}
    groups = {
        n: {
            "lm": lm_groups[n],
            "knnlm": knn_groups[n],
            "mlp": mem_groups.get(n),
            "perfect": perfect_log_likelihood(int(n)),
            "count": ns_kept.count(int(n)),
        }
        for n in lm_groups
    }
    examples = [
        {
            "villager": r["villager"],
            "child": r["child"],
            "n_children": int(r["n_children"]),
            "prompt": r["prompt"],
            "continuation": c,
            "lm": float(a),
            "knnlm": float(b),
            "mlp": None if m is None else float(m),
            "split": "test" if k else "dev",
        }
        for r, c, a, b, m, k in zip(
            test,
            conts,
            lm_lp,
            knn_lp,
            [None] * len(test) if mem_lp is None else mem_lp,
            keep,
            strict=True,
        )
    ]
    times["total"] = time.perf_counter() - t0
    out = {
        "seed": seed,
        "settings": seed_settings,
        "dataset": ds.meta["counts"],
        "datastore_size": _datastore_n(seed_dir / "datastore"),
        "search": search_used(settings["search"], seed_dir / "datastore"),
        "groups": groups,
        "tuning": tuning,
        "train_groups_lm": train_groups,
        "memory": mem_info,
        "curve": curve,
        "train": train_info,
        "seconds": times,
        "examples": examples,
    }
    write_json_atomic(seed_dir / SEED_RESULTS, out)
    return out


def _tuned_scores(lm, test, conts, datastore, lm_lp, mem_raw, settings, seed):
    """k, T and weights chosen on a dev share of the parents (:mod:`macondo_tuning`):
    (kNN-LM and memory log-likelihoods at them, mask of the other parents, tuning record)."""
    from knnlm.experiments.macondo_tuning import dev_mask, knn_log_probs, tune

    grid = settings["tune"]
    dev = dev_mask(test, seed, grid["dev_share"])
    knn = knn_log_probs(lm, test, conts, datastore, grid["k"], grid["temperature"],
                        settings["batch_size_eval"], search=settings["search"])  # fmt: skip
    t = tune(lm_lp, knn, mem_raw, dev, grid)
    record = {key: t[key] for key in ("tuned", "sweep", "lm_dev") if key in t}
    if "memory_sweep" in t:
        record["memory_sweep"] = t["memory_sweep"]
    return t["knnlm"], t.get("mlp"), ~dev, record


# Settings that only affect scoring after fine-tuning; changing them reuses the trained model
# (unless curves are recorded during training, where they matter too).
_SCORING_ONLY = (
    "k",
    "knn_weight",
    "knn_weight_convention",
    "temperature",
    "key_type",
    "key_dtype",
    "search",
    "batch_size_eval",
    "memory",
    "tune",
)


def _train_key(seed_settings: Mapping[str, Any]) -> dict[str, Any]:
    if seed_settings.get("eval_every"):
        return dict(seed_settings)
    return {k: v for k, v in seed_settings.items() if k not in _SCORING_ONLY}


def search_used(search: str, datastore: Path) -> dict[str, str]:
    """The backend ``search`` asked for and the one that searched this datastore."""
    from knnlm.retrieval.backends import resolve_search

    return {"requested": search, "used": resolve_search(search, datastore)}


def _datastore_n(path: Path) -> int:
    meta = read_json(path / "meta.json") or {}
    return int(meta.get("n", 0))
