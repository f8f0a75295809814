"""Named GPT-2 model sizes with their training defaults.

- ``tiny``  : 2 layers x d=64, context 64. For tests; trains in seconds.
- ``small`` : 4 layers x d=256, context 256, BPE 16k (7.3M parameters). The CPU default:
  one epoch over WikiText-2 (2.44M BPE tokens) is 596 steps of 16 x 256 tokens; measured at
  740 tokens/s on a heavily shared 2-core machine (under an hour; faster when the cores are
  free, ~1.5x faster again with ``precision="bfloat16"`` on CPUs with bf16 support).
- ``paper`` : the 16-layer WikiText-103 transformer of Khandelwal et al. (2020), following
  Baevski & Auli (2019): 16 layers, d=1024, 16 heads, FFN 4096, ReLU, context 3072, dropout
  0.3 / attention 0.1, 3 x 3072 tokens per batch (Chiang et al., Appendix D). Expressed as a
  GPT-2 config (pre-LN, learned positions, tied embeddings instead of adaptive inputs);
  vocabulary from the tokenizer. Its optimiser defaults (AdamW, linear schedule) are a
  single-GPU starting point, not the original fairseq recipe (NAG, lr 1, cosine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from knnlm.errors import KnnlmError


@dataclass(frozen=True)
class Preset:
    """A GPT-2 architecture plus the defaults for training it from scratch."""

    name: str
    description: str
    # architecture
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    activation: str
    dropout: float  # residual and embedding dropout
    attn_dropout: float
    # training defaults
    context_len: int
    tokenizer_vocab_size: int
    lr: float
    batch_size: int
    epochs: int
    warmup_ratio: float
    weight_decay: float

    def model_config(
        self, vocab_size: int, tokenizer=None, context_len: int | None = None
    ) -> GPT2Config:
        """The GPT2Config for ``vocab_size`` tokens; special ids come from ``tokenizer``."""
        n_positions = max(context_len or 0, self.context_len)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is not None and not 0 <= eos < vocab_size:
            raise KnnlmError(
                f"the tokenizer's eos id {eos} is outside the vocabulary ({vocab_size})"
            )
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        # Passed explicitly: GPT2Config defaults to GPT-2's own id 50256, wrong for other vocabularies.
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            activation_function=self.activation,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.attn_dropout,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else eos,
        )

    def to_json(self) -> dict:
        return asdict(self)


# The base of the table, written in full; every other preset (here and in the experiments'
# own tables) is derived from one by name and states only what differs.
_TINY = Preset(
    name="tiny",
    description="2 layers x d=64, 2 heads, context 64: tests and smoke runs",
    n_layer=2,
    n_embd=64,
    n_head=2,
    n_inner=256,
    activation="gelu_new",
    dropout=0.1,
    attn_dropout=0.1,
    context_len=64,
    tokenizer_vocab_size=512,
    lr=3e-3,
    batch_size=8,
    epochs=3,
    warmup_ratio=0.05,
    weight_decay=0.01,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _TINY,
        replace(
            _TINY,
            name="small",
            description="4 layers x d=256, 4 heads, context 256, BPE 16k: the CPU default",
            n_layer=4,
            n_embd=256,
            n_head=4,
            n_inner=1024,
            # No dropout: one pass over a few million tokens does not overfit.
            dropout=0.0,
            attn_dropout=0.0,
            context_len=256,
            tokenizer_vocab_size=16000,
            lr=1e-3,
            batch_size=16,
            epochs=1,
        ),
        replace(
            _TINY,
            name="paper",
            description=(
                "16 layers x d=1024, 16 heads, FFN 4096, context 3072: the WikiText-103 model "
                "of Khandelwal et al. (GPU)"
            ),
            n_layer=16,
            n_embd=1024,
            n_head=16,
            n_inner=4096,
            activation="relu",
            dropout=0.3,
            context_len=3072,
            tokenizer_vocab_size=50000,
            lr=2.5e-4,
            batch_size=3,
            epochs=20,
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KnnlmError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def derive(base: str, name: str, description: str, **changes: Any) -> Preset:
    """Preset ``base`` of the table under a new ``name``, with ``changes`` (only what differs)."""
    return replace(get_preset(base), name=name, description=description, **changes)


def build_model_from_preset(
    name: str,
    vocab_size: int | None = None,
    tokenizer=None,
    *,
    seed: int = 0,
    context_len: int | None = None,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of preset ``name`` (initialisation seeded by ``seed``).

    ``vocab_size`` defaults to ``len(tokenizer)``; ``context_len`` widens the position table
    beyond the preset's context when asked.
    """
    preset = get_preset(name)
    if vocab_size is None:
        if tokenizer is None:
            raise KnnlmError("build_model_from_preset needs a vocab_size or a tokenizer")
        vocab_size = len(tokenizer)
    if vocab_size < 2:
        raise KnnlmError(f"vocabulary size must be at least 2, got {vocab_size}")
    cfg = preset.model_config(vocab_size, tokenizer, context_len)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)
