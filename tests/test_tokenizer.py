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
    fast = int(tok._chunks.encode_flat([normalize_text(d) for d in docs])[2].sum())  # ok: the fast path
    assert fast == len(docs)  # normalized text always takes the fast path
    assert 0.1 < tok._chunks.encode_flat(fuzz)[2].mean() < 0.9
    from dsv3ray.tokenizer import _ChunkCache

    small = Tokenizer(tok.hf)
    small._chunks = _ChunkCache(tok.hf, max_entries=50)  # bounded: empties when full, still exact
    for i in range(0, 200, 10):  # some batches fit, some empty the cache, some take the library
        assert [a.tolist() for a in small.encode_batch(docs[i : i + 10])] == library(docs[i : i + 10])
        assert len(small._chunks) <= 50
    assert [a.tolist() for a in small.encode_batch(docs[:200])] == library(docs[:200])
    from tokenizers import Tokenizer as HF

    cut = HF.from_str(tok.hf.to_str())
    cut.enable_truncation(max_length=5)
    assert Tokenizer(cut)._chunks is None  # whole-text options: the library path only
    assert [len(a) for a in Tokenizer(cut).encode_batch(docs[:3])] == [5, 5, 5]


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(normalizer={"type": "NFC"}),
        lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
        lambda s: s["pre_tokenizer"].update(use_regex=False),
        lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [s["pre_tokenizer"]]}),
        lambda s: s["model"].update(dropout=0.1),
        lambda s: s.update(
            post_processor={
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": True,
            }
        ),
        lambda s: s.update(
            padding={
                "strategy": "BatchLongest",
                "direction": "Right",
                "pad_to_multiple_of": None,
                "pad_id": 0,
                "pad_type_id": 0,
                "pad_token": "[PAD]",
            }
        ),
    ],
)
def test_the_chunk_rule_holds_only_for_a_plain_byte_level_bpe(change):
    """Each option that makes a text's ids differ from its chunks' (or whose effect was never
    checked against them) turns the chunk cache off: the library encodes."""
    import json

    from tokenizers import Tokenizer as HF

    tok = train_tokenizer(TEXTS, vocab_size=400)
    assert tok._chunks is not None
    spec = json.loads(tok.hf.to_str())
    change(spec)
    other = Tokenizer(HF.from_str(json.dumps(spec)))
    assert other._chunks is None
    if not spec["model"].get("dropout"):  # (dropout: a random encoding each call)
        assert [a.tolist() for a in other.encode_batch(TEXTS[:3])] == [
            e.ids for e in other.hf.encode_batch(TEXTS[:3])
        ]


def test_texts_with_a_chunk_over_max_chunk_encode_chunk_by_chunk_like_the_library():
    """A chunk over MAX_CHUNK bytes (code lines joined by newlines, a long URL, a table rule) is not
    cached; its text is encoded chunk by chunk for the call (`encode_uncached`), not by the
    library, unless the chunk rule fails, and the ids stay the library's."""
    import random

    from pipelines.corpus import stdlib_documents

    docs = [d["text"] for d, _ in zip(stdlib_documents(min_chars=50), range(600))]
    tok = train_tokenizer(docs[:300], vocab_size=2000)
    rng = random.Random(1)
    lines = [ln.strip() for d in docs for ln in d.splitlines() if ln.strip() and " " not in ln.strip()]
    long_parts = [
        "\n".join(rng.sample(lines, 40)),  # code without spaces, one chunk
        "https://example.com/" + "/".join(rng.choice(lines) for _ in range(60)),
        "+" * 300,
        "日本語のテキスト" * 40,  # non-ASCII: chunk by chunk through the library
        "x" * 200 + "\t" + "y" * 200,  # a tab inside: still one chunk
        "z" * 300 + EOS_TOKEN + "w",  # an added token inside a long chunk
    ]
    texts = []
    for _ in range(300):
        words = rng.sample(docs, 1)[0].split()[: rng.randint(0, 30)] + [rng.choice(long_parts)]
        rng.shuffle(words)
        texts.append(rng.choice([" ", " ", "  "]).join(words) + rng.choice(["", "", " ", "\n"]))
    want = [e.ids for e in tok.hf.encode_batch_fast(texts, add_special_tokens=False)]
    assert [a.tolist() for a in tok.encode_batch(texts)] == want
    by_chunks = tok._chunks.encode_uncached(texts)
    for got, ids in zip(by_chunks, want):
        assert got is None or got.tolist() == ids
    # the chunk path, not the library, unless a space doubles or ends a text, whitespace ends a
    # chunk (the text's last) or an added token is inside a chunk
    refused = ["  " in t or t != t.rstrip() or EOS_TOKEN in t for t in texts]
    assert 50 < refused.count(False) and [b is None for b in by_chunks] == refused


def test_ascii_chunks_encode_piece_by_piece_like_the_library():
    """New chunks of printable ASCII and newlines are cut into the pre-tokenizer's pieces by our
    pattern and each piece is encoded once: the ids equal the library's on fuzzed chunks full of
    contractions, digits, punctuation runs and newline runs, first in a text or not, with other
    chunks (the library's path) between them, including after the piece memory empties."""
    import random

    import numpy as np

    from dsv3ray.tokenizer import _ASCII_PRETOKEN, _ASCII_SPACE, _ChunkCache, _pretoken_starts

    docs = [d for d, _ in zip(_stdlib_texts(), range(300))]
    tok = train_tokenizer(docs, vocab_size=800)
    rng = random.Random(2)
    alphabet = ["'", "s", "t", "re", "ve", "m", "ll", "d", "S", "D", "\n", "\n\n", "0", "42", "_", ".", ",",
                "(", ")", "'''", "ab", "Zq", "-", "~", "`", "x"]  # fmt: skip
    chunks = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    chunks = [c for c in chunks if not c[0].isspace() and not c[-1].isspace()]  # the rule's chunks
    library_pieces = tok.hf.pre_tokenizer.pre_tokenize_str  # [(bytes mapped, span)]
    for c in chunks + [" " + c for c in chunks]:
        assert [m.span() for m in _ASCII_PRETOKEN.finditer(c)] == [span for _, span in library_pieces(c)]
    # our numpy cut = the pattern's, on texts with space runs and \x00 (the separator) too
    for _ in range(20_000):
        t = "".join(
            rng.choice(alphabet + [" ", "  ", " \n", "\x00", "r", "e", "v", "l"])
            for _ in range(rng.randint(0, 12))
        )
        starts = _pretoken_starts(np.frombuffer(t.encode(), dtype=np.uint8))
        assert starts.tolist() == [m.start() for m in _ASCII_PRETOKEN.finditer(t)], repr(t)
    # chunks of other text between them (the library's path): ids must still come out in chunk order
    chunks = [c + "é" if i % 7 == 0 else c + "\tz" if i % 11 == 0 else c for i, c in enumerate(chunks)]
    cache = _ChunkCache(tok.hf)
    ends = ["a", ".", "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1f", "\x08", "\x7f", "\x85", "é"]
    edges = [rng.choice(ends) + rng.choice(["", "b", EOS_TOKEN]) + rng.choice(ends) for _ in range(400)]
    edges += ["", "\u3000a", "a\u2029", "\udcff", "~\x7f", "a\nb", "\x00"]
    for batch in (edges, [e for e in edges if EOS_TOKEN not in e], ["x", "y\n"], [""]):
        safe, simple = cache._classes(batch)  # (in one pass where no eos occurs)
        assert safe.tolist() == [cache._safe(c) for c in batch]
        assert simple.tolist() == [c.isascii() and c.replace("\n", "").isprintable() for c in batch]
    assert _ASCII_SPACE.tolist() == [chr(c).isspace() for c in range(128)] + [False] * 128
    cache = _ChunkCache(tok.hf, max_pieces=40)  # forgets its pieces again and again
    first = np.array([rng.random() < 0.3 for _ in chunks])
    for lo in range(0, len(chunks), 250):
        part, f = chunks[lo : lo + 250], first[lo : lo + 250]
        safe, sizes, flat = cache.encode_chunks(part, f)
        assert safe.all() and sizes.sum() == flat.size and flat.dtype == np.int32
        got = np.split(flat, np.cumsum(sizes)[:-1])
        want = tok.hf.encode_batch_fast(
            [c if fi else " " + c for c, fi in zip(part, f)], add_special_tokens=False
        )
        assert [g.tolist() for g in got] == [w.ids for w in want]
        assert 0 < cache.piece_table.size <= 40
    for f in (np.zeros(250, bool), np.ones(250, bool)):  # one kind at a time, as the chunk pass asks
        safe, sizes, flat = cache.encode_chunks(chunks[:250], f)
        want = tok.hf.encode_batch_fast(
            [c if fi else " " + c for c, fi in zip(chunks, f)], add_special_tokens=False
        )
        assert [g.tolist() for g in np.split(flat, np.cumsum(sizes)[:-1])] == [w.ids for w in want]
    texts = [" ".join(rng.sample(chunks, 12)) for _ in range(300)]  # whole texts, through the cache
    assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_chunk_table_keys_are_exact_at_every_length():
    """Chunks that share their first and last bytes (and lengths 7-9, 15-17, 23-25, 30+: the key's word
    boundaries and the long-chunk dict), repeated within and across batches, as a text's first
    chunk or a later one, in a table small enough to probe and to empty: the library's ids."""
    import random

    docs = [d for d, _ in zip(_stdlib_texts(), range(300))]
    tok = train_tokenizer(docs, vocab_size=600)
    from dsv3ray.tokenizer import _ChunkCache

    rng = random.Random(1)
    stems = ["ab", "aé", "日本", "x" * 7]
    words = [
        rng.choice(stems) + "".join(rng.choice("abé.") for _ in range(n)) + rng.choice(stems)
        for n in [0, 1, 3, 4, 5, 6, 11, 12, 13, 14, 20, 30, 40] * 30
    ]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(600)]
    library = [e.ids for e in tok.hf.encode_batch_fast(texts, add_special_tokens=False)]
    for max_entries in (1 << 18, 700):
        tok._chunks = _ChunkCache(tok.hf, max_entries=max_entries)
        for i in range(0, len(texts), 50):
            flat, offsets = tok.encode_flat(texts[i : i + 50])
            got = [flat[offsets[j] : offsets[j + 1]].tolist() for j in range(len(offsets) - 1)]
            assert got == library[i : i + 50]
            assert len(tok._chunks) <= max_entries
        assert tok._chunks.encode_flat(texts[:50])[2].all()  # all on the fast path
    assert tok.encode_flat([])[1].tolist() == [0]
    tok._chunks = _ChunkCache(tok.hf)
    tok._chunks.GROUP_CHARS = 60  # many groups, texts longer than a group, empty texts at the edges
    mixed = ["", *texts[:40], "", " ", texts[0] * 5]
    flat, offsets = tok.encode_flat(mixed)
    assert [flat[offsets[j] : offsets[j + 1]].tolist() for j in range(len(mixed))] == [
        tok.encode(t) for t in mixed
    ]
    # runs of newlines cut chunks: "a" and "b" (no space before either) are cached, not "a\nb";
    # runs at an end, next to a space or over MAX_NEWLINES take the library
    tok._chunks = _ChunkCache(tok.hf)
    lines = ["a\nb", "a\n\nb x", "x\n\n\n\nab", "a\n", "\nb", "a \nb", "a\n b", "a\n\n\n\n\nb", "a.\n's\n1"]
    flat, offsets, ok = tok._chunks.encode_flat(lines)
    assert ok.tolist() == [True, True, True, False, False, False, False, False, True]
    assert [flat[offsets[j] : offsets[j + 1]].tolist() for j in range(len(lines)) if ok[j]] == [
        tok.encode(t) for t, good in zip(lines, ok) if good
    ]
    assert len(tok._chunks) == 8  # a, b, " x", x, ab, a., 's, 1 (first: no space before)
    assert [a.tolist() for a in tok.encode_batch(lines)] == [tok.encode(t) for t in lines]
    blob = "ab" * 200  # one 400-byte chunk: the library, not the cache
    tok._chunks = _ChunkCache(tok.hf)
    texts = [f"x {blob} y", "x y"]
    assert tok._chunks.encode_flat(texts)[2].tolist() == [False, True] and len(tok._chunks) == 2  # x, " y"
    assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


def _stdlib_texts():
    from pipelines.corpus import stdlib_documents

    for d in stdlib_documents(min_chars=50):
        yield d["text"]
