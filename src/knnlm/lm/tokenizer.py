"""Tokenizers: train a byte-level BPE (HF ``tokenizers``) and save it as a HF fast tokenizer;
wrap any tokenizer in the :class:`~knnlm.data.names.TokenizerView` the Macondo generator reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from knnlm.data.names import TokenizerView
from knnlm.errors import KnnlmError
from knnlm.fileio import fingerprint
from knnlm.lm.loading import load_tokenizer, tokenizer_fingerprint

EOS = "<|endoftext|>"
TIKTOKEN_PREFIX = "tiktoken-"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 16000, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Byte-level BPE as in GPT-2; ``<|endoftext|>`` is BOS, EOS, UNK and PAD.

    Byte-level means every string is encodable, so no token is ever unknown.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, model_dir: str | Path) -> None:
    """Saved beside the model so ``AutoTokenizer.from_pretrained(model_dir)`` finds it."""
    tokenizer.save_pretrained(str(model_dir))


def _load_tiktoken(name: str) -> TokenizerView:
    encoding = name[len(TIKTOKEN_PREFIX) :]
    try:
        import tiktoken

        enc = tiktoken.get_encoding(encoding)
    except Exception as exc:  # no package, unknown encoding, or no network for the BPE file
        raise KnnlmError(
            f"cannot load tiktoken encoding {encoding!r} ({type(exc).__name__}); tiktoken "
            "downloads its BPE file on first use: run once with network access, set "
            "TIKTOKEN_CACHE_DIR to a cache that has it, or pass a local tokenizer directory"
        ) from None
    return _tiktoken_view(enc)


def _tiktoken_view(enc: Any) -> TokenizerView:
    """tiktoken has no unknown token: every byte string encodes."""
    info = {
        "name": f"{TIKTOKEN_PREFIX}{enc.name}",
        "kind": "tiktoken",
        "fingerprint": f"tiktoken:{enc.name}:{enc.n_vocab}",
    }
    return TokenizerView(enc.encode_ordinary_batch, None, info)


def tokenizer_view(tokenizer: Any) -> TokenizerView:
    """Accepts a HF tokenizer, a ``tokenizers.Tokenizer``, a tiktoken ``Encoding``, a local
    tokenizer/model directory, or ``"tiktoken-<encoding>"`` such as ``"tiktoken-gpt2"``."""
    if isinstance(tokenizer, (str, Path)):
        name = str(tokenizer)
        if name.startswith(TIKTOKEN_PREFIX):
            return _load_tiktoken(name)
        if not Path(name).expanduser().exists():
            raise KnnlmError(f"tokenizer {name!r} is neither a local directory nor tiktoken-<name>")
        tokenizer = load_tokenizer(name)
        tokenizer.name_or_path = name
    if hasattr(tokenizer, "encode_ordinary_batch"):  # tiktoken Encoding
        return _tiktoken_view(tokenizer)
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):  # tokenizers.Tokenizer
        raw = tokenizer
        unk = getattr(raw.model, "unk_token", None)
        return TokenizerView(
            lambda texts: [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)],
            raw.token_to_id(unk) if unk else None,
            {
                "name": None,
                "kind": "tokenizers",
                "fingerprint": fingerprint(raw.to_str().encode()),
            },
        )
    if callable(tokenizer) and hasattr(tokenizer, "get_vocab"):  # transformers tokenizer
        hf = tokenizer
        return TokenizerView(
            lambda texts: list(hf(texts, add_special_tokens=False)["input_ids"]),
            hf.unk_token_id,
            {
                "name": getattr(hf, "name_or_path", None) or None,
                "kind": "transformers",
                "fingerprint": tokenizer_fingerprint(hf),
            },
        )
    raise KnnlmError(f"unsupported tokenizer object of type {type(tokenizer).__name__}")
