"""Atomic writes and preallocated .npy row writers, shared by every module that writes files.

Readers never see half a file: text goes to a temporary name beside the target and is renamed
over it. Large arrays are preallocated and filled with positioned writes, so memory does not
grow with their size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any, default: Any = float) -> None:
    """JSON (indented) through a temporary name; ``default`` converts non-JSON values."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class NpyRowWriter:
    """Positioned writes of rows into a preallocated .npy file (``create`` sizes it first)."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype, create: bool):
        if create:
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            del arr  # header written and file sized (sparse); no pages kept
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        self.header = int(mm.offset)  # bytes before the data
        del mm
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        self.dtype = np.dtype(dtype)
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, first_row: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        os.pwrite(self.fd, data, self.header + first_row * self.row_bytes)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
