"""Load a causal LM and its tokenizer by hub name or local path, and fingerprint them."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from knnlm.errors import KnnlmError
from knnlm.fileio import file_sha256, write_json_atomic
from knnlm.lm.adapters import Adapter, apply_saved_surgery

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU, unless the user names one (checked: one clear line)."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise KnnlmError(f"unknown --device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise KnnlmError(f"--device {device}: no such CUDA device on this machine")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads for the duration, then restore the old number
    (None or 0: leave torch's setting)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LoadedLM:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    name: str
    fingerprint: str
    tokenizer_fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def as_loaded(knn_lm: object, arg: str = "knn_lm") -> LoadedLM:
    """The :class:`LoadedLM` of a ``KnnLM`` (or a ``LoadedLM`` itself); one clear line for
    anything else, naming the Python argument ``arg``."""
    if isinstance(knn_lm, LoadedLM):
        return knn_lm
    inner = getattr(knn_lm, "lm", None)
    if isinstance(inner, LoadedLM):
        return inner
    raise KnnlmError(f"{arg} must be a knnlm.KnnLM, not {type(knn_lm).__name__}")


def dtype_name(model: torch.nn.Module) -> str:
    """The dtype the model computes in, as a string; e.g. ``"float32"``."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


HASH_CACHE = ".knnlm_weights_sha256.json"  # beside the weights, keyed by name, size, mtime
HASH_CACHE_MIN_BYTES = 256 << 20  # smaller weights hash in well under a second: no cache file


def weight_hashes(folder: Path) -> dict[str, str]:
    """Full sha256 of every weight file in ``folder``.

    Hashing multi-GB weights takes a while, so for weights of ``HASH_CACHE_MIN_BYTES`` or
    more the digests are kept in ``HASH_CACHE`` beside them and reused while a file's size and
    modification time are unchanged (smaller model folders are left untouched).
    """
    cache_path = folder / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    out, changed = {}, False
    for f in sorted(folder.iterdir()):
        if f.suffix not in {".safetensors", ".bin"} or not f.is_file():
            continue
        st = f.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        entry = cache.get(f.name)
        if not (
            isinstance(entry, dict)
            and entry.get("stamp") == stamp
            and isinstance(entry.get("sha256"), str)
        ):
            entry = {"stamp": stamp, "sha256": file_sha256(f)}
            cache[f.name], changed = entry, True
        out[f.name] = entry["sha256"]
    total = sum(int(e["stamp"].split(":")[0]) for k, e in cache.items() if k in out)
    if changed and total >= HASH_CACHE_MIN_BYTES:
        try:
            write_json_atomic(cache_path, cache)
        except OSError:
            pass  # a read-only model folder: hash again next time
    return out


def model_fingerprint(model: torch.nn.Module, name: str) -> str:
    """Identifies the weights and the dtype they are computed in.

    Local folders: config.json and the full sha256 of every weight file (cached, see
    ``weight_hashes``). Hub models: the revision. Either way the parameter dtype is part of
    it, so keys computed in bfloat16 are never mixed with float32 ones.
    """
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    h = hashlib.sha256(f"dtype:{dtype}".encode())
    revision = getattr(model.config, "_commit_hash", None)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for fname, digest in weight_hashes(path).items():
            h.update(f"{fname}:{digest}".encode())
        return "sha256:" + h.hexdigest()[:16]
    if revision:
        return f"{name}@{revision}:{dtype}"
    # An in-memory model: hash the parameters themselves (small models only reach here).
    for p in model.state_dict().values():
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return "sha256:" + h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return "sha256:" + h.hexdigest()[:16]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=_is_local(name)
        )
    except (OSError, ValueError) as exc:
        raise KnnlmError(f"cannot load a tokenizer from {name!r}: {exc}") from None
    return tok


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KnnlmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@torch.no_grad()
def check_causal(model: torch.nn.Module) -> None:
    """Refuse a model whose early positions see later tokens (e.g. BERT loaded as a "causal"
    LM without ``is_decoder``): its perplexity would be meaningless. One 4-token probe."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    a = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]], device=device)
    b = a.clone()
    b[0, -1] = 5 % vocab
    la, lb = model(input_ids=a).logits[0, :-1].float(), model(input_ids=b).logits[0, :-1].float()
    if not torch.allclose(la, lb, rtol=1e-5, atol=1e-5):  # causal: identical prefixes
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise KnnlmError(f"the {kind} model is not causal: its early positions see later tokens")


def wrap_lm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> LoadedLM:
    """A model and tokenizer already in memory as a :class:`LoadedLM` (eval mode, no grads)."""
    apply_saved_surgery(model)
    model.eval()
    model.requires_grad_(False)
    adapter = Adapter(model)
    if not adapter.registered:  # registered families are causal decoders by construction
        check_causal(model)
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name,
        fingerprint=model_fingerprint(model, name),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def load_lm(
    name: str,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    **hf_kwargs,
) -> LoadedLM:
    """Load model + tokenizer; the model is in eval mode with gradients disabled.

    Any causal LM loads (plain perplexity needs nothing more); what needs Eq. 1's split
    refuses an unregistered family when used. ``hf_kwargs`` go to ``from_pretrained``.
    """
    local = _is_local(name)
    if not local and (name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1):
        raise KnnlmError(f"model path {name!r} does not exist")
    hf_kwargs.setdefault("local_files_only", local)
    hf_kwargs["dtype"] = torch_dtype(dtype)  # transformers >= 5 (pyproject's floor)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, **hf_kwargs
        )
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KnnlmError(f"cannot load a causal LM from {name!r}: {msg}") from None
    model.to(pick_device(device))
    if not Adapter(model).registered:  # refused before the tokenizer is even looked for
        check_causal(model.eval())
    tokenizer = load_tokenizer(name, trust_remote_code)
    return wrap_lm(model, tokenizer, name)
