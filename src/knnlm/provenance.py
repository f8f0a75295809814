"""Where a result came from: package versions, the source tree's git commit, the machine.

:func:`provenance` returns a small JSON-ready dict that ``knnlm reproduce`` stores in
``results.json`` (key ``provenance``) and the report shows as a table. It imports nothing
heavy: versions come from ``importlib.metadata``; the torch thread count and the device are
passed in by the caller that used them. No hostname or user name is recorded (privacy).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["provenance"]

# Distributions whose versions are recorded (None when not installed).
PACKAGES = ("knnlm", "torch", "transformers", "tokenizers", "numpy", "faiss", "safetensors",
            "datasets", "peft")  # fmt: skip
# faiss ships under several distribution names.
_ALIASES = {"faiss": ("faiss", "faiss-cpu", "faiss-gpu")}
GIT_TIMEOUT_S = 5.0


def _version(name: str) -> str | None:
    for dist in _ALIASES.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                           timeout=GIT_TIMEOUT_S, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):  # git missing, timed out
        return None
    return p.stdout if p.returncode == 0 else None


def git_state(directory: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ``directory`` (default: this
    package's folder); both None when it is not a checkout or git is missing."""
    d = Path(directory) if directory is not None else Path(__file__).resolve().parent
    head = _git(["rev-parse", "HEAD"], d)
    # The package's own folder inside some other repository (a venv in a project's
    # checkout) is not a checkout of this source: its files must be tracked there.
    tracked = _git(["ls-files", "--", "."], d) if directory is None else "yes"
    if not head or not head.strip() or not (tracked or "").strip():
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], d)
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(
    *,
    started: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    source_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The provenance of a run that started at ``started`` (UTC ISO time; default now) and
    ends now, with ``threads`` torch intra-op threads on ``device``. ``source_dir``: the
    folder whose git checkout is recorded (default: this package's folder)."""
    return {
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "git": git_state(source_dir),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
        "started_utc": started or utc_now(),
        "ended_utc": utc_now(),
    }
