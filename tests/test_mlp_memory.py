"""The MLP memory of Section 5 / Appendix D: model maths, streaming training, files."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from knnlm.errors import KnnlmError
from knnlm.retrieval.memory import MemoryMLP, load_memory, memory_bytes, memory_storage
from tiny import train_mem

D, V = 16, 20


def _manual_logits(model: MemoryMLP, z: np.ndarray) -> np.ndarray:
    """W (z + LN(MLP(z))) in float64 numpy, from the raw parameters."""
    p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    h = z @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))  # exact GELU
    m = h @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    mu, var = m.mean(-1, keepdims=True), m.var(-1, keepdims=True)
    ln = (m - mu) / np.sqrt(var + 1e-5) * p["ln.weight"] + p["ln.bias"]
    return (z + ln) @ p["output.weight"].T


def test_forward_matches_manual_computation():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 6, generator=g)
    model = MemoryMLP.from_output_embedding(W, hidden=10)
    with torch.no_grad():  # make the LayerNorm affine parameters matter
        model.ln.weight.copy_(torch.rand(6, generator=g) + 0.5)
        model.ln.bias.copy_(torch.randn(6, generator=g))
    assert torch.equal(model.output.weight, W)
    W.add_(1.0)  # W is a copy, not a view of the LM's embedding
    assert not torch.equal(model.output.weight, W)
    assert not model.output.weight.requires_grad

    z = torch.randn(5, 6, generator=g)
    want = _manual_logits(model, z.double().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(model(z).double().numpy(), want, rtol=1e-5, atol=1e-5)
        want_lp = want - np.log(np.exp(want).sum(-1, keepdims=True))
        np.testing.assert_allclose(model.log_probs(z).double().numpy(), want_lp, atol=1e-5)
        targets = torch.tensor([0, 6, 3, 3, 1])
        got = model.target_log_prob(z, targets, chunk=2).double().numpy()
        np.testing.assert_allclose(got, want_lp[np.arange(5), targets.numpy()], atol=1e-5)
        # float16 keys (the datastore's default dtype) are accepted
        assert model(z.half()).dtype == torch.float32
    with pytest.raises(KnnlmError):
        model(torch.randn(2, 5))


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """2000 float16 keys whose values come from a fixed random linear classifier over V classes."""
    d = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, D)).astype(np.float16)
    clf = rng.standard_normal((D, V))
    values = (keys.astype(np.float64) @ clf).argmax(1).astype(np.int32)
    np.save(d / "keys.npy", keys)
    np.save(d / "values.npy", values)
    W = torch.from_numpy(rng.standard_normal((V, D)).astype(np.float32))
    return np.load(d / "keys.npy", mmap_mode="r"), np.load(d / "values.npy", mmap_mode="r"), W


FAST = dict(hidden=64, lr=1e-2, batch_tokens=200, progress=False, device="cpu")


def test_training_streams_memmap_and_loss_goes_down(toy_store, tmp_path):
    keys, values, W = toy_store
    assert isinstance(keys, np.memmap)
    res = train_mem(keys, values, W, tmp_path / "m", epochs=6, **FAST)
    assert res.steps == 60 and len(res.losses) == 60 and res.n_train == 2000
    first, last = np.mean(res.losses[:5]), np.mean(res.losses[-5:])
    assert last < 0.5 * first
    assert last < 0.6 * math.log(V)  # well below the uniform guess
    # frozen W: saved and in memory, still the LM's embedding
    assert torch.equal(res.model.output.weight.detach(), W)
    assert torch.equal(load_file(str(tmp_path / "m" / "model.safetensors"))["output.weight"], W)
    assert (tmp_path / "m" / "loss_curve.json").is_file()


def test_trainable_output_changes(toy_store, tmp_path):
    keys, values, W = toy_store
    res = train_mem(keys, values, W, tmp_path / "m", max_steps=3, train_output=True, **FAST)
    assert res.steps == 3
    assert not torch.allclose(res.model.output.weight.detach(), W)


class CountingKeys:
    """A memmap stand-in that records every row index array it is asked for."""

    def __init__(self, arr):
        self.arr, self.calls = arr, []
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, idx):
        self.calls.append(np.array(idx, copy=True))
        return self.arr[idx]


def test_batches_gather_only_their_rows(toy_store, tmp_path):
    keys, values, W = toy_store
    counting = CountingKeys(keys)
    train_mem(counting, values, W, tmp_path / "m", epochs=2, **{**FAST, "batch_tokens": 300})
    sizes = [len(c) for c in counting.calls]
    assert sizes == ([300] * 6 + [200]) * 2  # never more than one batch of rows
    assert all(np.all(np.diff(c) > 0) for c in counting.calls)  # sorted, no repeats
    for e in range(2):  # each epoch visits every row exactly once
        seen = np.concatenate(counting.calls[7 * e : 7 * (e + 1)])
        assert np.array_equal(np.sort(seen), np.arange(2000))
    assert not np.array_equal(counting.calls[0], counting.calls[7])  # reshuffled per epoch


def test_micro_batches_give_the_same_update(toy_store, tmp_path):
    keys, values, W = toy_store
    a = train_mem(keys, values, W, tmp_path / "a", max_steps=3, **FAST)
    b = train_mem(keys, values, W, tmp_path / "b", max_steps=3, micro_batch=64, **FAST)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


def test_save_load_round_trip_and_sizes(toy_store, tmp_path):
    keys, values, W = toy_store
    out = tmp_path / "m"
    res = train_mem(keys, values, W, out, max_steps=2, **FAST)
    loaded = load_memory(out, device="cpu")
    z = torch.from_numpy(np.asarray(keys[:50], dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(loaded(z), res.model(z))
    files = os.path.getsize(out / "model.safetensors") + os.path.getsize(out / "config.json")
    assert memory_bytes(out) == files
    hidden = FAST["hidden"]
    own = 4 * (D * hidden + hidden + hidden * D + D + 2 * D)  # MLP + LayerNorm, float32
    assert memory_storage(out) == {
        "memory_bytes": files,
        "memory_bytes_without_shared_W": own,
        "output_bytes": 4 * V * D,
    }
    res_t = train_mem(keys, values, W, tmp_path / "t", max_steps=1, train_output=True, **FAST)
    st = memory_storage(res_t.out_dir)
    assert st["memory_bytes_without_shared_W"] == own + 4 * V * D  # a trained W is the memory's own

    for fn in (load_memory, memory_bytes, memory_storage):
        with pytest.raises(KnnlmError, match="no memory model"):
            fn(tmp_path / "missing")


def test_resume_continues_exactly(toy_store, tmp_path):
    keys, values, W = toy_store
    run = {**FAST, "epochs": 2}  # 10 steps per epoch: the resumed run crosses an epoch
    straight = train_mem(keys, values, W, tmp_path / "s", max_steps=14, **run)
    first = train_mem(keys, values, W, tmp_path / "r", max_steps=6, **run)
    assert first.steps == 6 and first.config["complete"]
    again = train_mem(keys, values, W, tmp_path / "r", max_steps=14, **run)
    assert again.resumed_from == 6 and again.steps == 14
    assert again.losses[:6] == first.losses
    for x, y in zip(
        straight.model.state_dict().values(), again.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(KnnlmError, match="other settings"):
        train_mem(keys, values, W, tmp_path / "r", max_steps=20, **{**run, "lr": 1e-3})
    with pytest.raises(KnnlmError, match="already trained"):
        train_mem(keys, values, W, tmp_path / "r", max_steps=3, **run)
    fresh = train_mem(keys, values, W, tmp_path / "r", max_steps=3, resume=False, **run)
    assert fresh.resumed_from == 0 and fresh.steps == 3


def test_bad_inputs(toy_store, tmp_path):
    keys, values, W = toy_store
    with pytest.raises(KnnlmError, match="vocabulary"):
        train_mem(keys, values, W[:5], tmp_path / "m", **FAST)
    with pytest.raises(KnnlmError, match="dimension"):
        train_mem(keys, values, W[:, :8], tmp_path / "m", **FAST)
    with pytest.raises(KnnlmError, match="values"):
        train_mem(keys, values[:10], W, tmp_path / "m", **FAST)
    with pytest.raises(KnnlmError, match="empty"):
        train_mem(keys[:0], values[:0], W, tmp_path / "m", **FAST)


def test_held_out_loss_stopping_rule():
    from knnlm.experiments.mlp_memory.train import stopped_improving

    assert not stopped_improving([5.0])  # one check: nothing to compare
    assert not stopped_improving([5.0, 4.9])
    assert stopped_improving([5.0, 4.99995])  # under 1e-4 nats better: stopped
    assert stopped_improving([5.0, 5.2])  # worse
    assert not stopped_improving([5.0, 4.5, 4.4])
