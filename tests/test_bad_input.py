"""Bad input, one table: every user mistake gives exit 2, one line, no traceback, no file written,
nothing of the user's touched.

Each row names a command line (placeholders filled from a workspace holding a copy of a real
datastore + flat index, neighbour cache and MLP memory, and a folder of the user's own files),
and optionally a mutation of the workspace made before the run (a corrupt or missing file).
The whole workspace, the corpus and the model folder are snapshotted (paths and content hashes)
before and after the run and must be identical.

Usage errors (unknown option / command, bad value) run as a subprocess of ``python -m knnlm``
and print click's usual "Usage / Try --help / Error" text; the others run the CLI in-process
(importing torch and transformers per row would make the table slow) with the same entry point.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from knnlm.cli import main

# ---------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` -> sha256 of its bytes ("dir" for folders)."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in filenames:
                p = os.path.join(dirpath, f)
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(
        [f"written: {p}" for p in after.keys() - before.keys()]
        + [f"removed: {p}" for p in before.keys() - after.keys()]
        + [f"changed: {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    )


def run_inprocess(monkeypatch, capfd, args: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["knnlm", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


def run_subprocess(args: list[str], cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", COLUMNS="100")
    p = subprocess.run(
        [sys.executable, "-m", "knnlm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------- artifacts (built once)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_lm_dir, tiny_corpus):
    """A real datastore (+ flat index), neighbour cache and MLP memory of the tiny model."""
    root = tmp_path_factory.mktemp("bad_input_artifacts")
    mp = pytest.MonkeyPatch()

    def cli(*args):
        mp.setattr(sys, "argv", ["knnlm", *map(str, args)])
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, f"setup command failed: {args}"

    common = ["--model", tiny_lm_dir, "--corpus", tiny_corpus, "--context-len", 32, "--quiet"]
    try:
        cli("datastore", "build", *common, "--split", "valid", "--out", root / "ds")
        cli("datastore", "index", root / "ds", "--type", "flat", "--quiet")
        cli("eval", *common, "--split", "test", "--datastore", root / "ds", "--k", 4,
            "--cache", root / "cache")  # fmt: skip
        cli("memory", "train", "--model", tiny_lm_dir, "--datastore", root / "ds",
            "--out", root / "mem", "--hidden", 8, "--max-steps", 2, "--batch-tokens", 64,
            "--quiet")  # fmt: skip
    finally:
        mp.undo()
    return root


@dataclass
class Env:
    ws: Path  # the workspace: artifacts copied here, the user's folder, new outputs
    model: Path
    corpus: Path

    def fill(self, args: list[str]) -> list[str]:
        names = {
            "{ws}": self.ws,
            "{model}": self.model,
            "{corpus}": self.corpus,
            "{ds}": self.ws / "ds",
            "{cache}": self.ws / "cache",
            "{mem}": self.ws / "mem",
            "{mine}": self.ws / "mine",
        }
        out = []
        for a in args:
            for k, v in names.items():
                a = a.replace(k, str(v))
            out.append(a)
        return out


# ---------------------------------------------------------------- mutations


def write(rel: str, data: bytes) -> Callable[[Env], None]:
    return lambda env: (env.ws / rel).write_bytes(data)


def truncate(rel: str, keep: float = 0.5) -> Callable[[Env], None]:
    def f(env: Env) -> None:
        p = env.ws / rel
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])

    return f


def remove(rel: str) -> Callable[[Env], None]:
    return lambda env: (env.ws / rel).unlink()


def edit_json(rel: str, **changes) -> Callable[[Env], None]:
    import json

    def f(env: Env) -> None:
        p = env.ws / rel
        meta = json.loads(p.read_text())
        meta.update(changes)
        p.write_text(json.dumps(meta))

    return f


def no_index(env: Env) -> None:
    """A datastore without an index (searching it logs a notice: still one error line)."""
    (env.ws / "ds" / "index.faiss").unlink()
    (env.ws / "ds" / "index.json").unlink()


def values_out_of_vocab(env: Env) -> None:
    """Overwrite the datastore's values in place with an id no tokenizer here has."""
    import numpy as np

    values = np.load(env.ws / "ds" / "values.npy", mmap_mode="r+")
    values[:] = 10**6
    values.flush()


def corpus_dir(content: bytes) -> Callable[[Env], None]:
    def f(env: Env) -> None:
        (env.ws / "badcorpus").mkdir()
        (env.ws / "badcorpus" / "valid.txt").write_bytes(content)

    return f


# ---------------------------------------------------------------- the table

EVAL = ["eval", "--model", "{model}", "--corpus", "{corpus}", "--split", "valid",
        "--context-len", "32", "--quiet"]  # fmt: skip
EVAL_DS = [*EVAL, "--datastore", "{ds}", "--k", "4"]
BUILD = ["datastore", "build", "--model", "{model}", "--corpus", "{corpus}", "--split", "valid",
         "--context-len", "32", "--quiet"]  # fmt: skip
PROJECT = ["project", "--model", "{model}", "--corpus", "{corpus}", "--datastore", "{ds}",
           "--context-len", "32", "--k", "4", "--max-positions", "3", "--quiet"]  # fmt: skip
HURDLE = ["hurdle", "--quick", "--seeds", "1", "--steps", "2", "--eval-every", "1", "--quiet"]
GATE = ["gate", "train", "--model", "{model}", "--datastore", "{ds}", "--corpus", "{corpus}",
        "--split", "valid", "--context-len", "32", "--k", "4", "--quiet"]  # fmt: skip
GEN = ["generate", "--model", "{model}", "--prompt", "the village", "--max-new-tokens", "3"]


@dataclass
class Row:
    id: str
    args: list[str]
    mutate: Callable[[Env], None] | None = None
    usage: bool = False  # a click usage error: click's "Usage / Try / Error" text
    proc: bool = False  # run ``python -m knnlm`` (always for usage errors)
    expect: str = ""  # a word the message must contain (case-insensitive)
    xfail: str | None = None  # reason, while the check it needs is not in yet


# fmt: off
ROWS = [
    # paths
    Row("missing_model", ["eval", "--model", "{ws}/nope", *EVAL[3:]], expect="nope"),
    Row("missing_corpus", [*EVAL[:3], "--corpus", "{ws}/nope", *EVAL[5:]], expect="nope"),
    Row("missing_datastore", [*EVAL, "--datastore", "{ws}/nods"], expect="nods", proc=True),
    Row("missing_datastore_index", ["datastore", "index", "{ws}/nods", "--quiet"], expect="nods"),
    Row("missing_cache", ["sweep", "{ws}/nocache", "--quiet"], expect="nocache"),
    Row("missing_memory", [*EVAL, "--memory", "{ws}/nomem"], expect="nomem"),
    Row("missing_split", [*EVAL[:5], "--split", "dev", *EVAL[7:]], expect="dev"),
    # corrupt or missing files, shapes that disagree with the metadata
    Row("ds_meta_corrupt", EVAL_DS, write("ds/meta.json", b'{"format_version": 1, "n": '),
        expect="meta.json"),
    Row("ds_meta_wrong_n", EVAL_DS, edit_json("ds/meta.json", n=12345), expect="ds"),
    Row("ds_keys_truncated", EVAL_DS, truncate("ds/keys.npy"), expect="keys.npy"),
    Row("ds_values_missing", EVAL_DS, remove("ds/values.npy"), expect="values.npy"),
    Row("ds_values_truncated", EVAL_DS, truncate("ds/values.npy", 0.9), expect="values.npy"),
    Row("index_faiss_corrupt", EVAL_DS, write("ds/index.faiss", b"not a faiss index" * 10),
        expect="index"),
    Row("index_faiss_truncated", EVAL_DS, truncate("ds/index.faiss"), expect="index"),
    Row("index_json_corrupt", EVAL_DS, write("ds/index.json", b"{oops"), expect="index"),
    Row("index_json_wrong_n", EVAL_DS, edit_json("ds/index.json", ntotal=7, n=7), expect="index"),
    Row("memory_weights_truncated", [*EVAL, "--memory", "{mem}"],
        truncate("mem/model.safetensors"), expect="model.safetensors"),
    Row("memory_config_corrupt", [*EVAL, "--memory", "{mem}"], write("mem/config.json", b"[1,"),
        expect="config.json"),
    Row("cache_ids_truncated", ["sweep", "{cache}", "--quiet"], truncate("cache/ids.npy"),
        expect="ids.npy"),
    Row("cache_meta_corrupt", ["sweep", "{cache}", "--quiet"], write("cache/meta.json", b"{"),
        expect="meta.json"),
    Row("cache_values_missing", ["sweep", "{cache}", "--quiet"], remove("cache/values.npy"),
        expect="values.npy"),
    Row("corpus_non_utf8", [*EVAL[:3], "--corpus", "{ws}/badcorpus", *EVAL[5:]],
        corpus_dir(b"caf\xe9 au lait\n"), expect="UTF-8"),
    Row("corpus_empty", [*EVAL[:3], "--corpus", "{ws}/badcorpus", *EVAL[5:]],
        corpus_dir(b"  \n\n"), expect="empty"),
    # ranges
    Row("k_zero", [*EVAL_DS, "--k", "0"], expect="--k"),
    Row("weight_above_one", [*EVAL_DS, "--knn-weight", "1.5"], expect="--knn-weight"),
    Row("weight_negative", [*EVAL_DS, "--knn-weight", "-0.1"], expect="--knn-weight"),
    Row("temperature_zero", [*EVAL_DS, "--knn-temperature", "0"], expect="--knn-temperature"),
    Row("memory_weight_above_one", [*EVAL, "--memory", "{mem}", "--memory-weight", "1.5"],
        expect="--memory-weight"),
    Row("stride_zero", [*EVAL, "--stride", "0"], expect="--stride"),
    Row("stride_negative", [*EVAL, "--stride", "-3"], expect="--stride"),
    Row("stride_over_context", [*EVAL, "--stride", "33"], expect="--stride"),
    Row("context_over_positions", [*EVAL, "--context-len", "256"], expect="128 positions"),
    Row("build_context_over_positions", [*BUILD, "--context-len", "256", "--out", "{ws}/new"],
        expect="128 positions"),
    Row("build_stride_zero", [*BUILD, "--stride", "0", "--out", "{ws}/new"], expect="--stride"),
    Row("project_context_over_positions", [*PROJECT, "--context-len", "256"],
        expect="128 positions"),
    Row("project_stride_zero", [*PROJECT, "--stride", "0"], expect="--stride"),
    Row("project_k_zero", [*PROJECT, "--k", "0"], expect="k"),
    Row("project_ds_meta_corrupt", PROJECT, write("ds/meta.json", b'{"format_version": 1, "n": '),
        expect="meta.json"),
    Row("train_context_over_positions",
        ["train", "--model", "{model}", "--corpus", "{corpus}", "--out", "{ws}/tr",
         "--context-len", "256", "--quiet"], expect="128 positions"),
    Row("memory_train_missing_datastore",
        ["memory", "train", "--model", "{model}", "--datastore", "{ws}/nods", "--out", "{ws}/m",
         "--hidden", "8", "--quiet"], expect="nods"),
    Row("generate_over_positions", [*GEN[:-1], "500"], expect="128 positions"),
    Row("eval_values_out_of_vocab", EVAL_DS, values_out_of_vocab, expect="vocabulary"),
    Row("generate_values_out_of_vocab", [*GEN, "--datastore", "{ds}", "--k", "4"],
        values_out_of_vocab, expect="vocabulary"),
    Row("generate_k_zero", [*GEN, "--datastore", "{ds}", "--k", "0"], expect="--k"),
    Row("generate_missing_datastore", [*GEN, "--datastore", "{ws}/nope"], expect="nope"),
    Row("generate_empty_prompt", ["generate", "--model", "{model}", "--prompt", ""],
        expect="prompt"),
    Row("exclude_self_bad_mode", [*EVAL_DS, "--exclude-self", "maybe"], usage=True,
        expect="exclude-self"),
    Row("search_bad_backend", [*EVAL_DS, "--search", "brute"], usage=True, expect="--search"),
    Row("exclude_self_yes_other_text",
        [*EVAL_DS[:5], "--split", "test", *EVAL_DS[7:], "--exclude-self", "yes"],
        expect="exclude-self"),
    Row("exclude_self_yes_other_text_no_index",
        [*EVAL_DS[:5], "--split", "test", *EVAL_DS[7:], "--exclude-self", "yes"], no_index,
        expect="exclude-self"),
    Row("sweep_weight_above_one", ["sweep", "{cache}", "--knn-weights", "0.5,1.5", "--quiet"],
        expect="weight"),
    Row("sweep_k_above_cached", ["sweep", "{cache}", "--ks", "1,99", "--quiet"], expect="k"),
    Row("index_bad_type", ["datastore", "index", "{ds}", "--type", "hnsw", "--quiet"],
        usage=True, expect="hnsw"),
    Row("index_check_missing_corpus", ["datastore", "index", "{ds}", "--type", "flat",
        "--corpus", "{ws}/nocorpus", "--quiet"], expect="nocorpus"),  # fmt: skip
    Row("batch_size_zero", [*EVAL, "--batch-size", "0"], expect="--batch-size"),
    Row("build_batch_size_zero", [*BUILD, "--batch-size", "0", "--out", "{ws}/new"],
        expect="--batch-size"),
    Row("device_unknown", [*EVAL, "--device", "gpu0"], expect="--device"),
    Row("device_absent", [*EVAL, "--device", "cuda:99"], expect="--device"),
    Row("sweep_weights_not_numbers", ["sweep", "{cache}", "--knn-weights", "0.1,abc", "--quiet"],
        expect="--knn-weights"),
    Row("cache_without_datastore", [*EVAL, "--cache", "{ws}/newcache"], expect="--datastore"),
    # fast kNN-LM: gate, pruning, PCA
    Row("gate_missing", [*EVAL_DS, "--gate", "{ws}/nogate"], expect="nogate"),
    Row("retrieval_rate_above_one", [*EVAL_DS, "--gate", "{ws}/g", "--retrieval-rate", "1.5"],
        expect="--retrieval-rate"),
    Row("retrieval_rate_without_gate", [*EVAL_DS, "--retrieval-rate", "0.5"], expect="--gate"),
    Row("gate_weight_unknown", [*EVAL_DS, "--gate-weight", "mine"], usage=True,
        expect="--gate-weight"),
    Row("gate_train_on_datastore_text", [*GATE, "--out", "{ws}/g"], expect="held-out"),
    Row("gate_train_out_user_folder", [*GATE, "--out", "{mine}"], expect="mine"),
    Row("prune_out_user_folder", ["datastore", "prune", "{ds}", "--out", "{mine}", "--quiet"],
        expect="mine"),
    Row("prune_missing_datastore", ["datastore", "prune", "{ws}/nods", "--out", "{ws}/p",
                                    "--quiet"], expect="nods"),
    Row("index_pca_above_dim", ["datastore", "index", "{ds}", "--pca", "999", "--quiet"],
        expect="--pca"),
    # found by the CLI fuzz (tests/test_cli_fuzz.py)
    Row("json_name_too_long", [*EVAL, "--json", "{ws}/" + "x" * 3000], expect="too long"),
    Row("out_name_too_long", [*BUILD, "--out", "{ws}/" + "x" * 3000], expect="too long"),
    Row("macondo_sentences_fill_memory", ["macondo", "generate", "--out", "{ws}/mg",
        "--sentences-per-pair", "999999999999", "--quiet"], expect="sentences"),
    Row("macondo_children_fill_memory", ["macondo", "generate", "--out", "{ws}/mg",
        "--max-children", "999999999999", "--quiet"], expect="parents"),
    Row("macondo_tokenizer_not_a_tokenizer", ["macondo", "generate", "--out", "{ws}/mg",
        "--tokenizer", "{ds}", "--quiet"], expect="cannot load a tokenizer"),
    # usage errors: click's text, always through a subprocess
    Row("unknown_option", [*EVAL, "--bogus"], usage=True, expect="No such option"),
    Row("unknown_command", ["evall"], usage=True, expect="No such command"),
    Row("unknown_subcommand", ["datastore", "bulid"], usage=True, expect="No such command"),
    Row("bad_choice", ["train", "--preset", "gigantic", "--out", "{ws}/t"], usage=True,
        expect="gigantic"),
    Row("bad_int", [*EVAL_DS, "--k", "many"], usage=True, expect="--k"),
    Row("missing_required", ["eval", "--corpus", "{corpus}"], usage=True, expect="--model"),
    # folders and files that are not ours
    Row("build_out_user_folder", [*BUILD, "--out", "{mine}"], expect="mine", proc=True),
    Row("build_out_user_file", [*BUILD, "--out", "{mine}/notes.txt"], expect="notes.txt"),
    Row("build_overwrite_user_folder", [*BUILD, "--out", "{mine}", "--overwrite"],
        expect="mine"),
    Row("eval_cache_user_folder", [*EVAL_DS, "--cache", "{mine}"], expect="mine"),
    Row("eval_cache_user_folder_no_index", [*EVAL_DS, "--cache", "{mine}"], no_index,
        expect="mine"),
    Row("json_is_user_folder", [*EVAL, "--json", "{mine}"], expect="folder"),
    Row("png_is_user_folder", ["sweep", "{cache}", "--png", "{mine}", "--quiet"],
        expect="folder"),
    Row("eval_cache_is_datastore", [*EVAL_DS, "--cache", "{ds}"], expect="ds"),
    Row("memory_out_user_folder",
        ["memory", "train", "--model", "{model}", "--datastore", "{ds}", "--out", "{mine}",
         "--hidden", "8", "--max-steps", "1", "--quiet"], expect="mine"),
    Row("index_on_user_folder", ["datastore", "index", "{mine}", "--quiet"], expect="mine"),
    Row("hurdle_out_user_folder", [*HURDLE, "--out", "{mine}"], expect="mine"),
    Row("hurdle_missing_corpus", [*HURDLE, "--out", "{ws}/h", "--corpus", "{ws}/nope"],
        expect="nope"),
    Row("macondo_run_out_user_folder",
        ["macondo", "run", "--out", "{mine}", "--quick", "--seeds", "1", "--epochs", "1",
         "--quiet"], expect="mine"),
    Row("reproduce_out_user_folder", ["reproduce", "--quick", "--out", "{mine}", "--quiet"],
        expect="mine"),
    Row("reproduce_bad_width_study",
        ["reproduce", "--quick", "--out", "{ws}/r", "--width-study", "64,wide", "--quiet"],
        expect="--width-study"),
    Row("reproduce_zero_width",
        ["reproduce", "--quick", "--out", "{ws}/r", "--width-study", "0", "--quiet"],
        expect="positive widths"),
]
# fmt: on


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(r, id=r.id, marks=pytest.mark.xfail(strict=True, reason=r.xfail))
        if r.xfail
        else pytest.param(r, id=r.id)
        for r in ROWS
    ],
)
def test_bad_input(row: Row, artifacts, tiny_lm_dir, tiny_corpus, tmp_path, monkeypatch, capfd):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("ds", "cache", "mem"):
        shutil.copytree(artifacts / name, ws / name)
    mine = ws / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("my own notes\n")
    (mine / "data" / "table.csv").write_text("a,b\n1,2\n")
    env = Env(ws=ws, model=Path(tiny_lm_dir), corpus=Path(tiny_corpus))
    if row.mutate is not None:
        row.mutate(env)
    args = env.fill(row.args)
    monkeypatch.chdir(ws)
    before = snapshot(ws, env.model, env.corpus)

    if row.usage or row.proc:
        code, out, err = run_subprocess(args, ws)
    else:
        code, out, err = run_inprocess(monkeypatch, capfd, args)

    assert "Traceback" not in err, err
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if row.usage:
        # click's usual text: "Usage: ...", "Try '... --help' for help.", "Error: ..."
        assert lines[0].startswith("Usage: ") and lines[1].startswith("Try '"), err
        assert len(lines) == 3 and lines[2].startswith("Error: "), err
    else:
        assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert row.expect.lower() in lines[-1].lower(), lines[-1]
    assert diff(before, snapshot(ws, env.model, env.corpus)) == []


def test_knn_log_probs_refuses_out_of_vocabulary_values():
    """A value outside the vocabulary is refused, not clamped onto the last token."""
    import torch

    from knnlm.errors import KnnlmError
    from knnlm.retrieval.combiner import knn_log_probs

    dists = torch.tensor([[0.0, 1.0, 2.0]])
    ok = knn_log_probs(dists, torch.tensor([[0, 1, -1]]), torch.tensor([[4, 2, 99]]), 5)
    w = torch.softmax(torch.tensor([0.0, -1.0]), 0)  # the -1 id is masked, its value ignored
    assert torch.allclose(ok.exp()[0], torch.tensor([0, 0, w[1], 0, w[0]]))
    with pytest.raises(KnnlmError, match="outside the vocabulary of 5"):
        knn_log_probs(dists, torch.tensor([[0, 1, 2]]), torch.tensor([[4, 5, 1]]), 5)
    with pytest.raises(KnnlmError, match="outside the vocabulary"):
        knn_log_probs(dists, torch.tensor([[0, 1, 2]]), torch.tensor([[4, -2, 1]]), 5)


# Refused before the model is even loaded: nothing is spent on a command that cannot succeed.
BEFORE_MODEL = ["missing_datastore", "ds_meta_corrupt", "ds_keys_truncated", "ds_values_missing",
                "k_zero", "weight_above_one", "temperature_zero",
                "cache_without_datastore", "build_out_user_folder", "build_out_user_file",
                "eval_cache_user_folder", "eval_cache_is_datastore", "project_k_zero",
                "project_ds_meta_corrupt", "memory_train_missing_datastore",
                "generate_k_zero", "generate_missing_datastore", "generate_empty_prompt"]  # fmt: skip


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in BEFORE_MODEL], ids=lambda r: r.id)
def test_refused_before_the_model_loads(
    row: Row, artifacts, tiny_lm_dir, tiny_corpus, tmp_path, monkeypatch, capfd
):
    import knnlm.lm.loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the mistake was refused")

    monkeypatch.setattr(knnlm.lm.loading, "load_lm", no_load)
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("ds", "cache", "mem"):
        shutil.copytree(artifacts / name, ws / name)
    mine = ws / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes\n")
    env = Env(ws=ws, model=Path(tiny_lm_dir), corpus=Path(tiny_corpus))
    if row.mutate is not None:
        row.mutate(env)
    monkeypatch.chdir(ws)
    code, _, err = run_inprocess(monkeypatch, capfd, env.fill(row.args))
    assert code == 2 and err.strip().startswith("Error: "), (code, err)
