"""Byte-level BPE tokenizer: training, round trip, eos, save/load, determinism."""

import pytest

from dsv3ray.errors import UserError
from dsv3ray.tokenizer import EOS_TOKEN, Tokenizer, train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Return the number of items in a container; raise ValueError if it is empty.",
    "Unicode: naïve café, 日本語のテキスト, emoji 🙂 and tabs\tand\nnewlines.",
] * 20


def test_train_roundtrip_and_eos(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=400)
    assert tok.vocab_size <= 400
    assert tok.hf.id_to_token(tok.eos_id) == EOS_TOKEN
    for text in TEXTS[:3] + ["bytes never seen: \x00\x7f ∑ 𝔘"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # byte-level: lossless, no unknown token
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode()) / 2  # merges learned
    arrs = tok.encode_batch(TEXTS[:2])
    assert [a.dtype.name for a in arrs] == ["int32", "int32"] and list(arrs[1]) == tok.encode(TEXTS[1])
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.eos_id == tok.eos_id
    assert train_tokenizer(TEXTS, vocab_size=400).encode(TEXTS[2]) == tok.encode(TEXTS[2])  # deterministic


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be loaded"):
        Tokenizer.load(tmp_path / "bad.json")
