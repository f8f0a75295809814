"""Train a byte-level BPE tokenizer (HF ``tokenizers``) and save it as a HF fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


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
