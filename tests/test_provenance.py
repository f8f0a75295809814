"""knnlm.provenance against independent sources: importlib.metadata, git run here, os."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest

import knnlm
from knnlm import provenance as prov
from knnlm.experiments.results_schema import check_results
from results_contract import PROVENANCE_PACKAGES, make_results

PKG_DIR = Path(knnlm.__file__).resolve().parent


def _dist_version(name: str) -> str | None:
    for dist in {"faiss": ("faiss", "faiss-cpu", "faiss-gpu")}.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return None


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=PKG_DIR, capture_output=True, text=True,
                          timeout=10, check=False)  # fmt: skip


def test_fields_match_independent_sources():
    p = prov.provenance(started="2026-01-01T00:00:00+00:00", threads=3, device="cpu")
    assert set(p["packages"]) == set(PROVENANCE_PACKAGES)
    for name in PROVENANCE_PACKAGES:
        assert p["packages"][name] == _dist_version(name), name
    for name in ("knnlm", "torch", "transformers", "tokenizers", "numpy", "safetensors"):
        assert p["packages"][name], f"{name} is a dependency, so it has a version"
    assert p["python"] == platform.python_version()
    assert p["cpu_count"] == os.cpu_count()
    assert p["torch_threads"] == 3 and p["device"] == "cpu"
    assert p["started_utc"] == "2026-01-01T00:00:00+00:00"
    ended = datetime.fromisoformat(p["ended_utc"])
    assert ended.utcoffset().total_seconds() == 0  # UTC
    assert p["cpu_model"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.split(":")[0].strip() == "model name"]  # fmt: skip
        if names:
            assert p["cpu_model"] == names[0]
    # Privacy: no host or user name anywhere in it.
    text = json.dumps(p)
    assert platform.node() not in text.split('"')
    assert "hostname" not in text
    r = make_results() | {"provenance": json.loads(text)}  # JSON-ready, and the contract holds
    check_results(r)


def test_git_commit_of_this_checkout():
    head = _git("rev-parse", "HEAD")
    if shutil.which("git") is None or head.returncode != 0:
        pytest.skip("the package does not run from a git checkout here")
    g = prov.provenance()["git"]
    assert g["commit"] == head.stdout.strip()
    status = _git("status", "--porcelain", "--untracked-files=no").stdout
    assert g["dirty"] is bool(status.strip())


def test_not_a_checkout_gives_none(tmp_path):
    if _git_toplevel(tmp_path):
        pytest.skip("the temporary folder lies inside a git checkout")
    assert prov.git_state(tmp_path) == {"commit": None, "dirty": None}
    assert prov.provenance(source_dir=tmp_path)["git"] == {"commit": None, "dirty": None}


def test_git_missing_gives_none(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git on the PATH
    assert prov.git_state(PKG_DIR) == {"commit": None, "dirty": None}


def test_package_untracked_in_a_surrounding_repository_gives_none(tmp_path, monkeypatch):
    # An installed copy inside some other project's checkout (a venv there) records no commit.
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")  # fmt: skip
    (tmp_path / "project.txt").write_text("theirs")
    for args in (["init", "-q"], ["add", "project.txt"], ["commit", "-q", "-m", "theirs"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert prov.git_state(tmp_path)["commit"]  # that repository has a commit
    pkg = tmp_path / "venv" / "knnlm"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(prov, "__file__", str(pkg / "provenance.py"))
    assert prov.git_state() == {"commit": None, "dirty": None}


def test_dirty_tree_is_reported(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")  # fmt: skip

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True,
                              capture_output=True, text=True).stdout  # fmt: skip

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD").strip()
    assert prov.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("b")
    assert prov.git_state(tmp_path) == {"commit": head, "dirty": True}


def _git_toplevel(d: Path) -> bool:
    try:
        p = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=d, capture_output=True,
                           timeout=10, check=False)  # fmt: skip
    except OSError:
        return False
    return p.returncode == 0
