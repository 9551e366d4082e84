"""The run's tokenizer: a byte-level BPE (Hugging Face `tokenizers`) with one end-of-text token.

Byte-level means every string encodes (no unknown token) and decode(encode(s)) == s. Trained from
an iterator of texts; saved as the standard `tokenizer.json`, which the prepared data directory
carries so training, evaluation and export all use the same one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3ray.errors import UserError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper: encode/decode, batched encode to int32 arrays, eos id, save/load."""

    def __init__(self, hf: _HFTokenizer):
        self.hf = hf
        eos = hf.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UserError(
                f"tokenizer has no {EOS_TOKEN} token: train it with dsv3ray (prepare) or add the token"
            )
        self.eos_id = eos

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One int32 array per text (no eos appended)."""
        encs = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if not p.is_file():
            raise UserError(
                f"tokenizer file {p} does not exist: pass a tokenizer.json (e.g. from a prepared dir)"
            )
        try:
            return cls(_HFTokenizer.from_file(str(p)))
        except Exception as e:  # the library raises plain Exception subclasses for bad JSON
            raise UserError(
                f"tokenizer file {p} cannot be loaded ({e}): pass a tokenizers JSON file"
            ) from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (256 bytes + merges + eos)."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + eos + 1 merge), got {vocab_size}")
    hf = _HFTokenizer(models.BPE())
    # no prefix space: the decoded text is exactly the input text
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    return Tokenizer(hf)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t
