"""A small WikiText-2 slice shipped with the package: the natural text of ``--quick``.

See ``ATTRIBUTION.md`` beside this file for what the slice is, its authors and its licence
(CC BY-SA 3.0). :func:`extract` writes it as a corpus directory that every corpus reader of
the toolkit accepts (``train.txt``, ``valid.txt``, ``test.txt``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path

from knnlm.errors import KnnlmError

SPLITS = ("train", "valid", "test")
NAME = "WikiText-2 slice (embedded)"
SHA256 = {
    "train": "4367f19bd3f2f673c46554a46dad48a854cb5ac601901b4f342c8957bf49ef05",
    "valid": "4750294613025d061f921c75959131c12e9a7a982b076d1090185957daa52927",
    "test": "febd72130f3ac8181053059dab78b92f84ae07cfe259f0e71bc59c3482a8f995",
}
LICENSE = "CC BY-SA 3.0 (WikiText-2, Merity et al. 2016); see ATTRIBUTION.md"


def read_split(split: str) -> bytes:
    """The uncompressed bytes of one split, checked against its recorded sha256."""
    if split not in SPLITS:
        raise KnnlmError(f"the embedded slice has no split {split!r}; choose {', '.join(SPLITS)}")
    res = resources.files(__name__).joinpath(f"{split}.txt.gz")
    try:
        data = gzip.decompress(res.read_bytes())
    except (OSError, EOFError) as exc:
        raise KnnlmError(f"the embedded WikiText-2 {split} split is damaged: {exc}") from None
    if hashlib.sha256(data).hexdigest() != SHA256[split]:
        raise KnnlmError(f"the embedded WikiText-2 {split} split does not match its checksum")
    return data


def extract(dest: str | Path) -> Path:
    """Write ``train.txt``, ``valid.txt`` and ``test.txt`` into ``dest``; returns ``dest``.

    Each file goes through a temporary name and is renamed when complete.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        data = read_split(split)
        target = dest / f"{split}.txt"
        if target.is_file() and target.stat().st_size == len(data):
            if hashlib.sha256(target.read_bytes()).hexdigest() == SHA256[split]:
                continue
        tmp = dest / f".{split}.txt.partial"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    (dest / "ATTRIBUTION.md").write_bytes(
        resources.files(__name__).joinpath("ATTRIBUTION.md").read_bytes()
    )
    return dest
