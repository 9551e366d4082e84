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


def test_chunk_cache_encodes_exactly_like_the_library():
    """The fast path (space-separated chunks, cached) gives the library's ids on real documents,
    normalized or not, and on fuzzed text full of the whitespace cases the rule must refuse."""
    import random

    from pipelines.clean import normalize_text
    from pipelines.corpus import stdlib_documents

    docs = [d["text"] for d, _ in zip(stdlib_documents(min_chars=50), range(1500))]
    tok = train_tokenizer(docs[:500], vocab_size=2000)
    assert tok._chunks is not None  # our byte-level BPE qualifies

    def library(texts):
        return [e.ids for e in tok.hf.encode_batch_fast(texts, add_special_tokens=False)]

    alphabet = list("  \t\n\r\x0b\x1c\x85\u00a0\u2003\u3000'sStrevld0129.,;:_-()abcxyzé日本🙂\u0301")
    alphabet += [EOS_TOKEN, "'ll", "'re", " <|endoftext|> "]
    rng = random.Random(0)
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(20_000)]
    for texts in (docs, [normalize_text(d) for d in docs], fuzz):
        assert [a.tolist() for a in tok.encode_batch(texts)] == library(texts)
    fast = sum(tok._chunks.encode(t) is not None for t in (normalize_text(d) for d in docs))
    assert fast == len(docs)  # normalized text always takes the fast path
    assert 0.1 < sum(tok._chunks.encode(t) is not None for t in fuzz) / len(fuzz) < 0.9
    small = Tokenizer(tok.hf)
    small._chunks.max_entries = 50  # the cache is cleared when full: still exact
    assert [a.tolist() for a in small.encode_batch(docs[:200])] == library(docs[:200])
    assert len(small._chunks.first) + len(small._chunks.rest) <= 50 + max(
        len(d.split(" ")) for d in docs[:200]
    )
    from tokenizers import Tokenizer as HF

    cut = HF.from_str(tok.hf.to_str())
    cut.enable_truncation(max_length=5)
    assert Tokenizer(cut)._chunks is None  # whole-text options: the library path only
    assert [len(a) for a in Tokenizer(cut).encode_batch(docs[:3])] == [5, 5, 5]
