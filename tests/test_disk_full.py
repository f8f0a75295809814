"""A full disk mid-build, mid-index and mid-save: one line (what was being written, the space it
needs), exit 2, and the previous artifact left exactly as it was. ENOSPC is injected where the
bytes go: ``os.pwrite`` of the .npy row writer, ``faiss.write_index``, safetensors' ``save_file``."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

import pytest

from knnlm.cli import main


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(monkeypatch, capfd, *args) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["knnlm", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def built(tmp_path, tiny_lm_dir, tiny_corpus, monkeypatch, capfd):
    """A datastore with a flat index, and an MLP memory of it: the artifacts to keep intact."""
    common = ["--model", tiny_lm_dir, "--corpus", tiny_corpus, "--context-len", 32, "-q"]
    assert cli(monkeypatch, capfd, "datastore", "build", *common, "--split", "valid",
               "--out", tmp_path / "ds")[0] == 0  # fmt: skip
    assert cli(monkeypatch, capfd, "datastore", "index", tmp_path / "ds", "-q")[0] == 0
    assert cli(monkeypatch, capfd, "memory", "train", "--model", tiny_lm_dir, "--datastore",
               tmp_path / "ds", "--out", tmp_path / "mem", "--hidden", 8, "--max-steps", 2,
               "--batch-tokens", 64, "-q")[0] == 0  # fmt: skip
    return common


def check(code: int, lines: list[str], before: dict, root: Path, name: str) -> None:
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("Error: disk full while writing") and name in lines[0], lines
    assert "it needs" in lines[0] and "free there" in lines[0], lines
    assert tree(root) == before


def test_datastore_build(built, tmp_path, monkeypatch, capfd):
    before = tree(tmp_path / "ds")
    real = os.pwrite

    def full(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("keys.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    code, lines = cli(monkeypatch, capfd, "datastore", "build", *built, "--split", "valid",
                      "--out", tmp_path / "ds", "--stride", 8, "--overwrite")  # fmt: skip
    check(code, lines, before, tmp_path / "ds", "keys.npy")


def test_index_build(built, tmp_path, monkeypatch, capfd):
    import faiss

    before = tree(tmp_path / "ds")

    def full(index, path):
        Path(path).write_bytes(b"half")  # what a write cut short leaves
        raise RuntimeError(f"write error in {path}: 4 != 100 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full)
    code, lines = cli(
        monkeypatch, capfd, "datastore", "index", tmp_path / "ds", "--metric", "ip", "-q"
    )
    check(code, lines, before, tmp_path / "ds", "index.faiss")


def test_memory_save(built, tiny_lm_dir, tmp_path, monkeypatch, capfd):
    from knnlm.retrieval import memory

    before = tree(tmp_path / "mem")

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(memory, "save_file", full)
    code, lines = cli(monkeypatch, capfd, "memory", "train", "--model", tiny_lm_dir,
                      "--datastore", tmp_path / "ds", "--out", tmp_path / "mem", "--hidden", 16,
                      "--max-steps", 2, "--batch-tokens", 64, "--overwrite", "-q")  # fmt: skip
    check(code, lines, before, tmp_path / "mem", "model.safetensors")
