"""The artifact rule, file integrity checks, and kill/resume of the real CLI.

Rule: artifacts are written into a sibling temporary and swapped in when complete; only
folders knnlm created (marker in their metadata) are replaced or deleted; anything else is
refused before any work, untouched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm import fileio
from knnlm.errors import KnnlmError
from knnlm.evaluate import evaluate
from knnlm.lm.loading import load_lm
from knnlm.neighbour_cache import load_cache
from knnlm.retrieval import datastore_build as dsmod
from knnlm.retrieval.datastore import build_datastore, build_example_datastore, open_datastore
from knnlm.retrieval.memory import load_memory
from knnlm.retrieval.retriever import KnnSettings
from tiny import train_mem

CTX, STRIDE = 24, 8
KW = dict(context_len=CTX, stride=STRIDE, batch_size=2, checkpoint_every=2, progress=False)


@pytest.fixture(scope="module")
def ds(lm, tiny_corpus, tmp_path_factory):
    return build_datastore(lm, str(tiny_corpus), "valid", tmp_path_factory.mktemp("d") / "ds", **KW)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "meta.json").write_text('{"mine": true}')  # same name as ours, no marker
    return _files(path)


# -- the rule --------------------------------------------------------------------------


def test_cache_into_users_folder_keeps_their_files(lm, tiny_corpus, ds, tmp_path):
    results = tmp_path / "results"
    before = _user_folder(results)
    with pytest.raises(KnnlmError, match="did not create"):
        evaluate(lm, str(tiny_corpus), "valid", context_len=CTX, datastore=ds, cache=results)
    assert _files(results) == before
    assert not (tmp_path / "results.partial").exists()


def test_cache_into_current_directory_is_refused(lm, tiny_corpus, ds, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KnnlmError):
        evaluate(lm, str(tiny_corpus), "valid", context_len=CTX, datastore=ds, cache=".")
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_cache_replaces_its_own_and_loads(lm, tiny_corpus, ds, tmp_path):
    kw = dict(context_len=CTX, datastore=ds, knn=KnnSettings(k=8), progress=False)
    evaluate(lm, str(tiny_corpus), "valid", cache=tmp_path / "c", **kw)
    first = _files(tmp_path / "c")
    evaluate(lm, str(tiny_corpus), "valid", cache=tmp_path / "c", **kw)  # ours: replaced
    assert _files(tmp_path / "c") == first
    c = load_cache(tmp_path / "c")
    assert c["ids"].shape == (c["meta"]["n"], 8)


def test_build_into_foreign_folder_refused_before_any_work(lm, tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = _user_folder(out)

    def no_work(*a, **k):
        raise AssertionError("tokenised the corpus before checking the target")

    monkeypatch.setattr(dsmod, "load_tokens", no_work)
    for overwrite in (False, True):
        with pytest.raises(KnnlmError, match="did not create"):
            build_datastore(lm, str(tiny_corpus), "valid", out, overwrite=overwrite, **KW)
    assert _files(out) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(KnnlmError, match="not a datastore folder"):
        build_datastore(lm, str(tiny_corpus), "valid", tmp_path / "file", **KW)


def test_foreign_partial_folder_is_not_deleted(lm, tiny_corpus, tmp_path):
    before = _user_folder(tmp_path / "out.partial")
    with pytest.raises(KnnlmError, match="not created by knnlm"):
        build_datastore(lm, str(tiny_corpus), "valid", tmp_path / "out", **KW)
    assert _files(tmp_path / "out.partial") == before


def test_overwrite_keeps_the_old_datastore_until_the_new_one_is_complete(
    lm, tiny_corpus, ds, tmp_path
):
    out = shutil.copytree(ds, tmp_path / "ds")
    old = _files(out)
    with pytest.raises(KnnlmError, match="other settings"):
        build_datastore(lm, str(tiny_corpus), "valid", out, **{**KW, "stride": 12})

    def boom(done):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_datastore(
            lm,
            str(tiny_corpus),
            "valid",
            out,
            overwrite=True,
            on_batch=boom,
            **{**KW, "stride": 12},
        )
    assert _files(out) == old  # the interrupted replacement left the old one whole
    build_datastore(lm, str(tiny_corpus), "valid", out, overwrite=True, **{**KW, "stride": 12})
    new = open_datastore(out)
    assert new.meta["stride"] == 12 and new.meta["n"] == open_datastore(ds).n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary left


def test_finished_build_cut_before_the_swap_is_not_redone(
    lm, tiny_corpus, ds, tmp_path, monkeypatch
):
    out = tmp_path / "ds"
    real_swap = dsmod.swap_in

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsmod, "swap_in", crash)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(lm, str(tiny_corpus), "valid", out, **KW)
    partial = tmp_path / "ds.partial"
    assert (partial / "meta.json").is_file() and not out.exists()
    monkeypatch.setattr(dsmod, "swap_in", real_swap)
    batches = []
    build_datastore(lm, str(tiny_corpus), "valid", out, on_batch=batches.append, **KW)
    assert batches == []  # nothing scored again: the finished rows were kept
    for f in ("keys.npy", "values.npy"):
        assert (out / f).read_bytes() == (ds / f).read_bytes()


def test_example_datastore_is_not_replaced_without_being_asked(lm, tmp_path):
    out = build_example_datastore(lm, ["a river", "the old house"], tmp_path / "ex", progress=False)
    before = _files(out)
    with pytest.raises(KnnlmError, match="other settings"):
        build_example_datastore(lm, ["a river", "a bridge"], out, progress=False)
    assert _files(out) == before
    build_example_datastore(lm, ["a river", "a bridge"], out, progress=False, overwrite=True)
    assert open_datastore(out).meta["examples"] == 2 and _files(out) != before


def test_swap_without_rename_exchange_and_recovery(tmp_path, monkeypatch):
    def artifact(path: Path, value: str) -> Path:
        path.mkdir()
        (path / "data").write_text(value)
        fileio.write_json_atomic(path / "meta.json", {fileio.ARTIFACT_KEY: "thing"})
        return path

    target = artifact(tmp_path / "t", "old")
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    fileio.swap_in(artifact(tmp_path / "new", "new"), target, "thing", "meta.json")
    assert (target / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    # A crash between the two renames: the old one is aside, nothing at the target.
    os.rename(target, fileio.aside_path(target))
    assert fileio.claim_target(target, "thing", "meta.json") == "ours"
    assert (target / "data").read_text() == "new"


def test_atomic_exchange_keeps_one_artifact_at_every_instant(tmp_path):
    if not fileio._exchange(tmp_path, tmp_path):  # renameat2 missing: nothing to check
        pytest.skip("no RENAME_EXCHANGE here")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert fileio._exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_claim_work_dir_for_resumable_output(tmp_path):
    out = fileio.claim_work_dir(tmp_path / "run", "reproduction")
    (out / "results.json").write_text("{}")
    assert fileio.claim_work_dir(out, "reproduction") == out  # ours: reused
    _user_folder(tmp_path / "mine")
    with pytest.raises(KnnlmError, match="did not create"):
        fileio.claim_work_dir(tmp_path / "mine", "reproduction")


def test_memory_into_foreign_folder_refused_before_training(tmp_path):
    before = _user_folder(tmp_path / "m")

    class NoKeys:  # any access would be work
        ndim = 2

        def __getattr__(self, name):
            raise AssertionError("touched the keys before checking the target")

    with pytest.raises(KnnlmError, match="did not create"):
        train_mem(NoKeys(), np.zeros(3, np.int64), torch.zeros(5, 4), tmp_path / "m")
    assert _files(tmp_path / "m") == before


def test_train_lm_into_foreign_folder_refused(tiny_corpus, tmp_path):
    from knnlm.lm.train import train_lm
    from knnlm.lm.train_config import LMTrainSettings

    before = _user_folder(tmp_path / "lm")
    with pytest.raises(KnnlmError, match="did not create"):
        train_lm(
            str(tiny_corpus), tmp_path / "lm", LMTrainSettings("tiny", max_steps=1), quiet=True
        )
    assert _files(tmp_path / "lm") == before


# -- integrity -------------------------------------------------------------------------


def test_pwrite_is_looped_until_every_byte_is_written(tmp_path, monkeypatch):
    rows = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    w = fileio.NpyRowWriter(tmp_path / "a.npy", (6, 7), np.float32, True)
    real, calls = os.pwrite, []

    def short(fd, data, offset):  # writes at most 5 bytes per call, as a kernel may
        calls.append(len(data))
        return real(fd, bytes(data[:5]), offset)

    monkeypatch.setattr(fileio.os, "pwrite", short)
    w.write(1, rows)
    monkeypatch.setattr(fileio.os, "pwrite", real)
    w.close()
    got = np.load(tmp_path / "a.npy")
    assert np.array_equal(got[1:], rows) and not got[0].any()
    assert len(calls) == -(-rows.nbytes // 5)


def test_keys_beyond_float16_are_refused_with_a_hint():
    ok = torch.full((2, 3), 60000.0)
    dsmod._check_keys_finite(ok, "block_input", "float16")
    big = torch.tensor([[1.0, 70000.0]])
    with pytest.raises(KnnlmError, match=r"block_input keys .*--key-dtype float32"):
        dsmod._check_keys_finite(big, "block_input", "float16")
    dsmod._check_keys_finite(big, "block_input", "float32")
    with pytest.raises(KnnlmError, match="non-finite"):
        dsmod._check_keys_finite(torch.tensor([[float("nan")]]), "ffn_input", "float32")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is corrupt"),
        (lambda d: (d / "values.npy").unlink(), "values.npy is missing"),
        (lambda d: os.truncate(d / "keys.npy", os.path.getsize(d / "keys.npy") - 64), "truncated"),
        (lambda d: np.save(d / "values.npy", np.zeros(3, np.int32)), "metadata says"),
    ],
)
def test_damaged_datastore_is_one_line(ds, tmp_path, damage, message):
    d = shutil.copytree(ds, tmp_path / "ds")
    damage(d)
    with pytest.raises(KnnlmError, match=message) as e:
        open_datastore(d)
    assert "\n" not in str(e.value)


def test_damaged_cache_and_memory_are_one_line(lm, tiny_corpus, ds, tmp_path):
    kw = dict(context_len=CTX, datastore=ds, knn=KnnSettings(k=4), progress=False)
    evaluate(lm, str(tiny_corpus), "valid", cache=tmp_path / "c", **kw)
    os.truncate(tmp_path / "c" / "ids.npy", 200)
    with pytest.raises(KnnlmError, match="ids.npy has 200 bytes"):
        load_cache(tmp_path / "c")
    d = open_datastore(ds)
    W = lm.adapter.output_embedding.detach()
    train_mem(d.keys, d.values, W, tmp_path / "m", hidden=8, max_steps=1, progress=False)
    f = tmp_path / "m" / "model.safetensors"
    os.truncate(f, os.path.getsize(f) - 10)
    with pytest.raises(KnnlmError, match="truncated"):
        load_memory(tmp_path / "m")


def test_fingerprint_covers_dtype_and_every_weight_byte(tiny_lm_dir, tmp_path, monkeypatch):
    from knnlm.lm import loading

    model_dir = shutil.copytree(tiny_lm_dir, tmp_path / "m")
    load_lm(str(model_dir))
    assert not (model_dir / loading.HASH_CACHE).exists()  # small weights: folder untouched
    monkeypatch.setattr(loading, "HASH_CACHE_MIN_BYTES", 0)
    fp32 = load_lm(str(model_dir)).fingerprint
    assert load_lm(str(model_dir), dtype="bfloat16").fingerprint != fp32
    assert (model_dir / loading.HASH_CACHE).is_file()
    hashed = []
    real = loading.file_sha256
    monkeypatch.setattr(loading, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert load_lm(str(model_dir)).fingerprint == fp32 and hashed == []  # cached
    # One byte in the middle of the weights (outside the first and last MiB when large).
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    st = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert load_lm(str(model_dir)).fingerprint != fp32 and len(hashed) == 1


# -- kill / resume of the real CLI -----------------------------------------------------


def _driver():
    path = Path(__file__).resolve().parents[1] / "scripts" / "fault_inject.py"
    spec = importlib.util.spec_from_file_location("fault_inject", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_inject"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def driver_setup(tmp_path_factory):
    fi = _driver()
    work = tmp_path_factory.mktemp("faults")
    fx = fi.make_fixtures(work, train_lines=300)
    base = work / "base_ds"
    fi.subprocess.run(
        fi.cli("datastore", "build", "-m", fx["model"], "-c", fx["corpus"], "-o", base)
        + ["--context-len", "32", "--stride", "16", "--batch-size", "2", "-q"],
        env=fi._env(),
        check=True,
        capture_output=True,
    )
    return fi, fi.commands(fx, base), work


def _kill_trials(driver_setup, name, trials):
    fi, cmds, work = driver_setup
    st = fi.run_command(cmds[name], work / "runs", trials, random.Random(0))
    assert st.failures == []
    assert st.identical == st.trials == trials
    return st


def test_kill_datastore_build_then_rerun(driver_setup):
    _kill_trials(driver_setup, "datastore build", 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["datastore build --overwrite", "datastore index", "eval --cache", "memory train", "train"],
)
def test_kill_other_commands_then_rerun(driver_setup, name):
    _kill_trials(driver_setup, name, 2)


def test_json_marker_is_in_every_artifact(lm, tiny_corpus, ds, tmp_path):
    meta = json.loads((ds / "meta.json").read_text())
    assert meta[fileio.ARTIFACT_KEY] == "datastore"


def test_datastore_of_another_dtype_is_refused(tiny_lm_dir, ds):
    bf16 = load_lm(str(tiny_lm_dir), dtype="bfloat16")
    with pytest.raises(KnnlmError, match="--dtype float32"):
        open_datastore(ds).check_compatible(bf16)


def test_memory_overwrite_keeps_the_old_until_the_new_is_complete(lm, ds, tmp_path):
    d = open_datastore(ds)
    W = lm.adapter.output_embedding.detach()
    kw = dict(hidden=8, batch_tokens=256, epochs=2, progress=False)
    train_mem(d.keys, d.values, W, tmp_path / "m", **kw)
    old = _files(tmp_path / "m")
    with pytest.raises(KnnlmError, match="other settings"):
        train_mem(d.keys, d.values, W, tmp_path / "m", lr=1e-3, **kw)

    def boom(model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mem(d.keys, d.values, W, tmp_path / "m", lr=1e-3, overwrite=True, eval_fn=boom, **kw)
    assert _files(tmp_path / "m") == old
    new = train_mem(d.keys, d.values, W, tmp_path / "m", lr=1e-3, overwrite=True, **kw)
    assert new.config["lr"] == 1e-3 and load_memory(tmp_path / "m").hidden == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_train_lm_reuses_refuses_and_overwrites_its_own_model(tiny_corpus, tmp_path):
    from knnlm.lm.train import train_lm
    from knnlm.lm.train_config import LMTrainSettings

    kw = dict(preset="tiny", batch_size=4, context_len=32, checkpoint_every=None)
    two, three = LMTrainSettings(max_steps=2, **kw), LMTrainSettings(max_steps=3, **kw)
    first = train_lm(str(tiny_corpus), tmp_path / "lm", two, quiet=True)
    assert not first.reused and first.out_dir == tmp_path / "lm"
    files = _files(tmp_path / "lm")
    assert train_lm(str(tiny_corpus), tmp_path / "lm", two, quiet=True).reused
    with pytest.raises(KnnlmError, match="--overwrite"):
        train_lm(str(tiny_corpus), tmp_path / "lm", three, quiet=True)
    assert _files(tmp_path / "lm") == files
    third = train_lm(str(tiny_corpus), tmp_path / "lm", three, overwrite=True, quiet=True)
    assert third.steps == 3 and _files(tmp_path / "lm") != files
    assert load_lm(str(tmp_path / "lm")).model is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]
