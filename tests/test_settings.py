"""Every run's settings object: checked once where it is built, its mistakes named as the
caller spelled them (the flag from the CLI, the argument from Python), written whole and
rebuilt from what was written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from knnlm.errors import KnnlmError
from knnlm.evaluate import EvalSettings
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.experiments.projection.settings import ProjectionSettings
from knnlm.forward_pass import WindowSettings
from knnlm.lm.train_config import LM_TRAIN_FLAGS, LMTrainSettings
from knnlm.retrieval.datastore import META, Datastore, DatastoreSettings, build_datastore
from knnlm.retrieval.gate_train import GateSettings
from knnlm.retrieval.retriever import (
    KNN_ARGS,
    KNN_FLAGS,
    MIX_ARGS,
    MIX_FLAGS,
    KnnSettings,
    MixSettings,
)
from knnlm.retrieval.search.index_settings import INDEX_FLAGS, IndexSettings
from knnlm.settings import build, flag
from tiny import SMALL_CTX, quiet_datastore, run_cli

EVERY = [
    KnnSettings(k=16, nprobe=4, exclude_self="no", search="exact"),
    MixSettings(
        knn_weight=0.3,
        temperature=2.0,
        memory="runs/mem",
        memory_weight=0.4,
        gate="runs/g",
        retrieval_rate=0.5,
    ),  # fmt: skip
    WindowSettings(64, 32),
    EvalSettings("test", WindowSettings(64, 32), 4, "body", KnnSettings(k=8), MixSettings()),
    IndexSettings("ivfpq", nlist=8, nprobe=2, train_size=100),
    IndexSettings(factory="HNSW32"),
    GateSettings(
        kind="entropy",
        knn=KnnSettings(k=4),
        mix=MixSettings(temperature=3.0),
        window=WindowSettings(32, 16),
    ),  # fmt: skip
    LMTrainSettings("tiny", max_steps=3, lr=1e-3),
    DatastoreSettings("valid", WindowSettings(64, 32), 4, "block_input", "float32", "body", 7),
    ProjectionSettings("test", WindowSettings(64, 32), knn=KnnSettings(k=8), max_positions=10),
    MemoryTrainSettings(hidden=8, max_steps=3, micro_batch=2),
]


@pytest.mark.parametrize("settings", EVERY, ids=lambda s: type(s).__name__)
def test_settings_are_written_whole_and_rebuilt_from_json(settings):
    written = json.loads(json.dumps(settings.to_dict()))
    assert type(settings).from_dict(written) == settings
    assert written == dataclasses.asdict(settings)  # whole, nested objects included
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "names", "kw", "python", "cli"),
    [
        (MixSettings, (MIX_ARGS, MIX_FLAGS), {"temperature": 0}, "knn_temperature",
         "--knn-temperature"),
        (MixSettings, (MIX_ARGS, MIX_FLAGS), {"knn_weight": 2}, "knn_weight", "--knn-weight"),
        (KnnSettings, (KNN_ARGS, KNN_FLAGS), {"k": 0}, "k", "--k"),
        (KnnSettings, (KNN_ARGS, KNN_FLAGS), {"search": "nope"}, "search", "--search"),
        (MixSettings, (MIX_ARGS, MIX_FLAGS), {"retrieval_rate": 0.5}, "retrieval_rate needs gate",
         "--retrieval-rate needs --gate"),
        (MixSettings, (MIX_ARGS, MIX_FLAGS), {"gate": "g", "pointers": 4},
         "pointers and gate do not combine", "--pointers and --gate do not combine"),
        (WindowSettings, ({}, flag()), {"context_len": 8, "stride": 9}, "stride", "--stride"),
        (IndexSettings, ({"kind": "type"}, INDEX_FLAGS), {"factory": "HNSW32", "pca": 4},
         "pca cannot be combined with factory", "--pca cannot be combined with --factory"),
        (IndexSettings, ({"kind": "type"}, INDEX_FLAGS), {"kind": "hnsw"}, "type", "--type"),
        (IndexSettings, ({"kind": "type"}, INDEX_FLAGS), {"kind": "factory"},
         "factory must be given", "--factory must be given"),
        (GateSettings, ({}, flag()), {"hidden": 0}, "hidden", "--hidden"),
        (DatastoreSettings, ({}, flag()), {"key_type": "nope"}, "key_type", "--key-type"),
        (DatastoreSettings, ({}, flag()), {"batch_size": 0}, "batch_size", "--batch-size"),
        (LMTrainSettings, ({}, LM_TRAIN_FLAGS), {"lora": True}, "lora fine-tunes a pretrained "
         "model: give base_model", "--lora fine-tunes a pretrained model: give --model"),
    ],
)  # fmt: skip
def test_a_mistake_names_the_argument_in_python_and_the_flag_in_the_cli(
    cls, names, kw, python, cli
):
    for naming, expected in zip(names, (python, cli), strict=True):
        with pytest.raises(KnnlmError) as info:
            build(cls, naming, **kw)
        assert str(info.value).startswith(expected), str(info.value)


def test_one_eval_checks_its_settings_and_the_datastore_once(
    monkeypatch, capsys, lm, tiny_lm_dir, tiny_corpus, tmp_path
):
    import knnlm.api  # noqa: F401 - its settings classes' defaults are built on import, not counted

    ds = quiet_datastore(lm, tiny_corpus, tmp_path / "ds", context_len=SMALL_CTX)
    calls = {"settings": 0, "mix": 0, "compatible": 0}
    check, compatible = KnnSettings.__post_init__, Datastore.check_compatible
    check_mix = MixSettings.__post_init__

    def counted_check(self):
        calls["settings"] += 1
        check(self)

    def counted_mix(self):
        calls["mix"] += 1
        check_mix(self)

    def counted_compatible(self, *a, **kw):
        calls["compatible"] += 1
        return compatible(self, *a, **kw)

    monkeypatch.setattr(KnnSettings, "__post_init__", counted_check)
    monkeypatch.setattr(MixSettings, "__post_init__", counted_mix)
    monkeypatch.setattr(Datastore, "check_compatible", counted_compatible)
    code, _, err = run_cli(monkeypatch, capsys, "eval", "-m", tiny_lm_dir, "-c", tiny_corpus,
                           "-d", ds, "-k", 4, "--context-len", SMALL_CTX, "--knn-weight", 0.3,
                           "--json", tmp_path / "r.json", "-q")  # fmt: skip
    assert code == 0, err
    assert calls == {"settings": 1, "mix": 1, "compatible": 1}
    # The results file holds the settings whole: they rebuild to what the flags said.
    written = json.loads((tmp_path / "r.json").read_text())["settings"]["eval"]
    rebuilt = EvalSettings.from_dict(written)
    assert rebuilt.knn == KnnSettings(k=4)
    assert rebuilt.window == WindowSettings(SMALL_CTX, SMALL_CTX // 2)
    assert rebuilt.mix == MixSettings(knn_weight=0.3) and rebuilt.split == "valid"


def test_a_datastore_build_checks_its_settings_once_and_writes_them_whole(
    monkeypatch, capsys, tiny_lm_dir, tiny_corpus, tmp_path
):
    calls = {"n": 0}
    check = DatastoreSettings.__post_init__

    def counted(self):
        calls["n"] += 1
        check(self)

    monkeypatch.setattr(DatastoreSettings, "__post_init__", counted)
    code, _, err = run_cli(monkeypatch, capsys, "datastore", "build", "-m", tiny_lm_dir,
                           "-c", tiny_corpus, "-o", tmp_path / "ds", "--split", "valid",
                           "--context-len", SMALL_CTX, "--key-dtype", "float32", "-q")  # fmt: skip
    assert code == 0, err
    assert calls["n"] == 1
    meta = json.loads((tmp_path / "ds" / META).read_text())
    rebuilt = DatastoreSettings.from_dict(meta["settings"]["datastore"])
    assert rebuilt == DatastoreSettings("valid", WindowSettings(SMALL_CTX, SMALL_CTX // 2),
                                        key_dtype="float32")  # fmt: skip
    # The keys every reader reads stay where they were.
    assert (meta["split"], meta["context_len"], meta["stride"], meta["key_dtype"]) == (
        "valid", SMALL_CTX, SMALL_CTX // 2, "float32")  # fmt: skip


def test_a_datastore_written_before_its_settings_object_is_reused(lm, tiny_corpus, tmp_path):
    kw = dict(context_len=SMALL_CTX, progress=False)
    out = build_datastore(lm, str(tiny_corpus), "valid", tmp_path / "ds", **kw)
    meta = json.loads((out / META).read_text())
    old = {k: v for k, v in meta.items() if k != "settings"}  # as an older build wrote it
    (out / META).write_text(json.dumps(old))
    assert build_datastore(lm, str(tiny_corpus), "valid", out, **kw) == out
    assert json.loads((out / META).read_text()) == old  # reused, not rebuilt
    assert Datastore.load(out).n == meta["n"]
    with pytest.raises(KnnlmError, match="other settings"):  # a real difference still counts
        build_datastore(lm, str(tiny_corpus), "valid", out, **{**kw, "stride": 4})
