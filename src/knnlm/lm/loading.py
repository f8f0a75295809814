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
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from knnlm.errors import KnnlmError
from knnlm.fileio import file_sha256, write_json_atomic
from knnlm.lm.adapters import Adapter, apply_saved_surgery, check_split

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
    cache = _read_cache(cache_path)
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


# Config fields that say where a model came from or how it is stored, not what it computes
# (the tensors' bytes carry their dtype); the rest of the config is part of the fingerprint.
_CONFIG_BOOKKEEPING = ("dtype", "torch_dtype", "transformers_version", "architectures")
FINGERPRINT_VERSION = "knnlm-weights-v1"


def _config_json(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "{}"
    items = config.to_dict().items()
    kept = {k: v for k, v in items if not k.startswith("_") and k not in _CONFIG_BOOKKEEPING}
    return json.dumps(kept, sort_keys=True, default=str)


def _state_key(model: torch.nn.Module) -> tuple:
    """Cheap identity of the weights' current state: a tensor replaced or changed in place
    (an optimizer step bumps its version counter) changes it."""
    return tuple(
        (name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape))
        for name, t in model.state_dict().items()
    )


def content_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every tensor of ``model.state_dict()`` (all of its bytes, by name), with its
    dtype and shape, plus the config: the same for the same weights wherever they came from.

    Cached on the model object until a tensor changes. Example:
    ``content_fingerprint(model) == load_lm(saved_folder).fingerprint``.
    """
    key = _state_key(model)
    cached = getattr(model, "_knnlm_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    h.update(_config_json(model).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    value = "sha256:" + h.hexdigest()[:16]
    object.__setattr__(model, "_knnlm_fingerprint", (key, value))
    return value


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def model_fingerprint(model: torch.nn.Module, weights_dir: str | Path | None = None) -> str:
    """The model's :func:`content_fingerprint`; for a model just loaded from
    ``weights_dir`` it is kept in ``HASH_CACHE`` beside the weights, keyed by the weight
    files' sha256, the config file and the dtype, so large weights are hashed once."""
    folder = Path(weights_dir).expanduser() if weights_dir is not None else None
    if folder is None or not folder.is_dir():
        return content_fingerprint(model)
    digests = weight_hashes(folder)
    if not digests:
        return content_fingerprint(model)
    config = folder / "config.json"
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}:{dtype_name(model)}".encode())
    h.update(config.read_bytes() if config.is_file() else b"")
    for fname, digest in digests.items():
        h.update(f"{fname}:{digest}".encode())
    files_key = "fingerprint:" + h.hexdigest()
    cache_path = folder / HASH_CACHE
    found = _read_cache(cache_path).get(files_key)
    if isinstance(found, str):
        object.__setattr__(model, "_knnlm_fingerprint", (_state_key(model), found))
        return found
    value = content_fingerprint(model)
    if cache_path.is_file():  # weight_hashes keeps a cache only for large weights
        try:
            write_json_atomic(cache_path, {**_read_cache(cache_path), files_key: value})
        except OSError:
            pass  # a read-only model folder: hash again next time
    return value


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


def wrap_lm(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    name: str | None = None,
    weights_dir: str | Path | None = None,
) -> LoadedLM:
    """A model and tokenizer already in memory as a :class:`LoadedLM` (eval mode, no grads).

    ``name`` is what artifacts record to reload the model (default: the folder or hub name
    the model says it came from, else ``IN_MEMORY``); ``weights_dir``, the folder the model
    was just loaded from, lets its fingerprint be cached beside the weights.
    """
    apply_saved_surgery(model)
    model.eval()
    model.requires_grad_(False)
    adapter = Adapter(model)
    if adapter.registered:  # a registered family's split must reproduce the model's logits
        check_split(model)
    else:
        check_causal(model)
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=record_name(name or getattr(model, "name_or_path", "") or IN_MEMORY),
        fingerprint=model_fingerprint(model, weights_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


IN_MEMORY = "in-memory"  # the recorded name of a model with no folder or hub name


def record_name(name: str) -> str:
    """How artifacts record a model: a local folder as an absolute path (reloadable from any
    working directory), a hub name as it is; e.g. ``"/home/me/models/gpt2"``."""
    if name != IN_MEMORY and _is_local(name):
        return str(Path(name).expanduser().resolve())
    return name


def reload_name(name: str | None, what: str, how: str = "name the model") -> str:
    """The model name ``what`` recorded, to load it again; one clear line (ending in ``how``)
    when it was built from a model in memory with no folder or hub name."""
    if not name or name == IN_MEMORY:
        raise KnnlmError(
            f"{what} was built from a model in memory (no folder or hub name to reload it "
            f"from); {how}"
        )
    return name


def _hub_folder(name: str, model: torch.nn.Module) -> str | None:
    """The local snapshot folder of a hub model's revision (to cache its fingerprint)."""
    revision = getattr(model.config, "_commit_hash", None)
    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return str(Path(found).parent) if isinstance(found, str) else None


def _missing_folder(name: str) -> bool:
    """Whether ``name`` can only mean a local folder (and none is there)."""
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        return True
    parent = Path(name).expanduser().parent
    return "/" in name and parent != Path(".") and parent.is_dir()


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
    if not local and _missing_folder(name):
        raise KnnlmError(f"model folder {name!r} does not exist")
    hf_kwargs.setdefault("local_files_only", local)
    hf_kwargs["dtype"] = torch_dtype(dtype)  # transformers >= 5 (pyproject's floor)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, **hf_kwargs
        )
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = "" if local else " (no local folder of that name; from the hub)"
        raise KnnlmError(f"cannot load a causal LM from {name!r}{where}: {msg}") from None
    model.to(pick_device(device))
    if not Adapter(model).registered:  # refused before the tokenizer is even looked for
        check_causal(model.eval())
    tokenizer = load_tokenizer(name, trust_remote_code)
    weights_dir = name if local else _hub_folder(name, model)
    return wrap_lm(model, tokenizer, name, weights_dir)
