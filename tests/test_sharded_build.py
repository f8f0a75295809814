"""A datastore built by 2 processes (torch.distributed, gloo) equals the single-process one."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from knnlm.lm.loading import load_lm
from knnlm.retrieval.datastore import build_datastore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model: str, corpus: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lm = load_lm(model)
        build_datastore(
            lm, corpus, "train", out, context_len=32, stride=16, batch_size=2, progress=False
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork-free spawn on Linux only")
def test_two_process_build_equals_single(tiny_lm_dir, tiny_corpus, tmp_path):
    single = build_datastore(
        load_lm(str(tiny_lm_dir)),
        str(tiny_corpus),
        "train",
        tmp_path / "single",
        context_len=32,
        stride=16,
        batch_size=2,
        progress=False,
    )
    sharded = tmp_path / "sharded"
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(tiny_lm_dir), str(tiny_corpus), str(sharded)),
        nprocs=2,
        start_method="spawn",
    )
    for f in ("keys.npy", "values.npy"):
        assert (Path(single) / f).read_bytes() == (sharded / f).read_bytes()
