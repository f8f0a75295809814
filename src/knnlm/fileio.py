"""Atomic writes, the artifact rule, and preallocated .npy row writers.

Readers never see half a file: text goes to a temporary name beside the target and is renamed
over it. Large arrays are preallocated and filled with positioned writes, so memory does not
grow with their size.

The artifact rule (datastore, neighbour cache, MLP memory, trained model, reproduction output)
is implemented once here:

- every artifact folder carries its own metadata file with a marker ``"knnlm_artifact": KIND``;
  a folder is the toolkit's only if it holds that marker (or is one of its marked temporaries);
- ``claim_target`` runs before any expensive work: a target that exists and is not ours is
  refused with one line, and left untouched, whatever ``--overwrite`` says;
- a build writes into a sibling temporary (``temp_dir``), fsyncs it (``fsync_tree``) and
  ``swap_in`` puts it in place: an existing artifact is exchanged atomically with the new one
  (``renameat2(RENAME_EXCHANGE)``; two renames where the kernel lacks it) and only then deleted.
  A crash at any instant leaves the old artifact or the new one at the target, never a
  half-written one; ``recover`` puts an old artifact back if a crash fell between two renames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError
from knnlm.locking import waiting, writer_lock

ARTIFACT_KEY = "knnlm_artifact"
TEMP_MARKER = ".knnlm-temp.json"  # inside a temporary folder while it is being written


# -- fingerprints ----------------------------------------------------------------------


def sha256_hex(data: Any) -> str:
    """Full sha256 hex digest of ``data`` (bytes, or any buffer such as a contiguous array)."""
    return hashlib.sha256(data).hexdigest()


def short_sha256(data: Any) -> str:
    """The first 16 hex digits of sha256: enough to tell artifacts and settings apart."""
    return sha256_hex(data)[:16]


def fingerprint(data: Any) -> str:
    """``"sha256:"`` + :func:`short_sha256`, the form recorded in every artifact's metadata."""
    return "sha256:" + short_sha256(data)


def canonical_json(obj: Any) -> bytes:
    """The bytes a settings object is fingerprinted by: sorted keys, str() for non-JSON."""
    return json.dumps(obj, sort_keys=True, default=str).encode()


def file_sha256(path: str | Path) -> str:
    """Full sha256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -- single files ----------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Make renames and new names inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: Any, default: Any = float) -> None:
    """JSON (indented) through a temporary name; ``default`` converts non-JSON values."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# -- the artifact rule -----------------------------------------------------------------


def artifact_kind(path: str | Path, meta_name: str) -> str | None:
    """The marker in ``path/meta_name`` (a finished artifact), else None."""
    meta = read_json(Path(path) / meta_name)
    kind = meta.get(ARTIFACT_KEY) if meta else None
    return kind if isinstance(kind, str) else None


def _temp_kind(path: Path) -> str | None:
    meta = read_json(path / TEMP_MARKER)
    return meta.get(ARTIFACT_KEY) if meta else None


def is_ours(path: str | Path, kind: str, meta_name: str) -> bool:
    """True when ``path`` is a folder this toolkit wrote as ``kind`` (finished or temporary)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    return artifact_kind(path, meta_name) == kind or _temp_kind(path) == kind


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _abs(path: str | Path) -> Path:
    """Absolute and normalised, so "." and "dir/.." have a name and a parent."""
    return Path(os.path.abspath(path))


def aside_path(target: Path) -> Path:
    target = _abs(target)
    return target.with_name(f".{target.name}.knnlm-old")


def recover(target: str | Path, kind: str, meta_name: str) -> None:
    """Undo a swap cut short between its two renames (kernels without RENAME_EXCHANGE).

    Readers call it too: it acts only under the target's writer lock (waiting for a writer in
    the middle of its swap), so it never undoes a swap that is still going on.
    """
    target = _abs(target)
    old = aside_path(target)
    if target.exists() or not old.exists():
        return
    with waiting(), writer_lock(target, f"{kind.replace('_', ' ')} {target}"):
        if not target.exists() and is_ours(old, kind, meta_name):
            os.rename(old, target)
            fsync_dir(target.parent)


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and ctime: a freed inode number can come back for the next folder swapped in."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def read_stable(target: str | Path, read: Any, tries: int = 10) -> Any:
    """``read(target)`` with no swap of the target folder in between (retried when one fell).

    A swap replaces the folder by another one (another inode, or a reused one with a new ctime):
    a reader that opened some files of the old folder and some of the new one, or saw the old one
    deleted under it, reads again.
    """
    for attempt in range(tries):
        before = _identity(_abs(target))
        try:
            result = read(target)
        except (KnnlmError, OSError, ValueError):  # np.load opens a file by name three times
            if _identity(_abs(target)) == before or attempt == tries - 1:
                raise
            continue
        if _identity(_abs(target)) == before:
            return result
    return result


def claim_target(target: str | Path, kind: str, meta_name: str, *, what: str | None = None) -> str:
    """Check ``target`` before any work: "absent" (missing or an empty folder) or "ours".

    Anything else (a file, a link, a folder with the user's files, another kind of artifact)
    raises ``KnnlmError`` and is left as it is. So does a target another process is writing
    (its writer lock is taken for the check; see ``knnlm.locking``).
    """
    target = _abs(target)
    what = what or kind.replace("_", " ")
    with writer_lock(target, f"{what} {target}"):
        recover(target, kind, meta_name)
        return _claim_checks(target, kind, meta_name, what)


def _claim_checks(target: Path, kind: str, meta_name: str, what: str) -> str:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise KnnlmError(f"{target} exists and is not a {what} folder; choose another path")
    if not target.exists() or _is_empty_dir(target):
        return "absent"
    found = artifact_kind(target, meta_name)
    if found == kind:
        return "ours"
    if found is not None:
        raise KnnlmError(f"{target} holds a knnlm {found.replace('_', ' ')}, not a {what}")
    raise KnnlmError(
        f"{target} is a folder that knnlm did not create (no {meta_name} with a "
        f"{ARTIFACT_KEY} marker); it is left untouched: choose a new or empty folder"
    )


WORK_MARKER = ".knnlm-artifact.json"


def claim_work_dir(path: str | Path, kind: str) -> Path:
    """A folder a long command fills stage by stage and resumes (e.g. ``knnlm reproduce``).

    Created (or reused) with a marker file ``WORK_MARKER``; an existing folder without the
    marker that is not empty holds someone else's files and is refused, untouched. Call it
    before any work; what the command writes inside should go through the atomic writers.
    """
    path = Path(path)
    claim_target(path, kind, WORK_MARKER)
    path.mkdir(parents=True, exist_ok=True)
    if artifact_kind(path, WORK_MARKER) != kind:
        write_json_atomic(path / WORK_MARKER, {ARTIFACT_KEY: kind})
    return path


def temp_dir(
    target: str | Path, kind: str, meta_name: str, suffix: str = ".partial", fresh: bool = True
) -> Path:
    """The sibling temporary ``<target><suffix>``, marked as ours.

    ``fresh=True`` starts it empty (a stale one of ours is deleted); ``fresh=False`` keeps its
    content for resuming. A folder of that name that is not ours is refused.
    """
    target = _abs(target)
    tmp = target.with_name(target.name + suffix)
    if tmp.exists() or tmp.is_symlink():
        # A finished artifact of ours can sit there too: the old one after an exchange.
        if not (is_ours(tmp, kind, meta_name) or _is_empty_dir(tmp)):
            raise KnnlmError(
                f"{tmp} exists and was not created by knnlm; move it away to build {target}"
            )
        if fresh:
            shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if _temp_kind(tmp) != kind:
        write_json_atomic(tmp / TEMP_MARKER, {ARTIFACT_KEY: kind, "temporary": True})
    return tmp


def fsync_tree(path: str | Path) -> None:
    """fsync every file under ``path`` and every folder (so a rename of it is durable)."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name, use_errno=True) if name else False
        except OSError:
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: str | Path, target: str | Path, kind: str, meta_name: str) -> Path:
    """Put the finished temporary ``tmp`` at ``target``; a previous artifact is deleted after.

    ``tmp`` must already hold its metadata file with the marker. Its files are fsynced, its
    temporary marker removed, then it takes the target's place.
    """
    tmp, target = _abs(tmp), _abs(target)
    if artifact_kind(tmp, meta_name) != kind:
        raise RuntimeError(f"{tmp} is not a finished {kind} (no marker in {meta_name})")
    (tmp / TEMP_MARKER).unlink(missing_ok=True)
    fsync_tree(tmp)
    if _is_empty_dir(target):
        target.rmdir()
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return target
    if artifact_kind(target, meta_name) != kind:  # checked again: never replace a user's folder
        raise KnnlmError(f"{target} is not a knnlm {kind.replace('_', ' ')}; left untouched")
    if _exchange(tmp, target):
        fsync_dir(target.parent)
        shutil.rmtree(tmp)  # the old artifact, now under the temporary name
        return target
    old = aside_path(target)
    if old.exists():
        shutil.rmtree(old)  # ours: only swap_in creates it
    os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old)
    return target


def check_npy(path: Path, shape: tuple[int, ...], dtype: Any, what: str) -> None:
    """Refuse a missing, truncated or mis-shaped .npy before it is mapped."""
    if not path.is_file():
        raise KnnlmError(f"{what}: {path.name} is missing")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                got_shape, _, got_dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                got_shape, _, got_dtype = np.lib.format.read_array_header_2_0(fh)
            header = fh.tell()
    except (OSError, ValueError) as e:
        raise KnnlmError(f"{what}: {path.name} is not a readable .npy file ({e})") from None
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
        raise KnnlmError(
            f"{what}: {path.name} holds {np.dtype(got_dtype)} {tuple(got_shape)}, the metadata "
            f"says {np.dtype(dtype)} {tuple(shape)}"
        )
    want = header + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != want:
        raise KnnlmError(f"{what}: {path.name} has {size} bytes, expected {want} (truncated?)")


def read_meta(path: Path, what: str) -> dict:
    """A metadata JSON object, or one line saying why it cannot be read."""
    if not path.is_file():
        raise KnnlmError(f"{what}: {path.name} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KnnlmError(f"{what}: {path.name} is corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise KnnlmError(f"{what}: {path.name} is corrupt (not a JSON object)")
    return meta


# -- a full disk -----------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as the text FAISS and safetensors put in their own errors."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(m in str(exc) for m in ("No space left on device", "Disk quota exceeded"))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def disk_full_error(path: str | Path, need: int) -> KnnlmError:
    """One line: what was being written, the space it needs, and what is left as it was."""
    path = _abs(path)
    where = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(where).free
    return KnnlmError(
        f"disk full while writing {path} (it needs {_gib(need)}; {_gib(free)} free there); "
        "the previous artifact is left as it was: free some space and rerun"
    )


# -- .npy row writer -------------------------------------------------------------------


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
        self.path, self.bytes = Path(path), self.header + int(shape[0]) * self.row_bytes
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, first_row: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B")
        offset = self.header + first_row * self.row_bytes
        # One pwrite moves at most ~2 GiB on Linux (and may stop early anywhere): loop.
        while len(data):
            try:
                n = os.pwrite(self.fd, data, offset)
            except OSError as e:  # the file is sparse: a full disk shows up here
                if is_disk_full(e):
                    raise disk_full_error(self.path, self.bytes) from None
                raise
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            data, offset = data[n:], offset + n

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
