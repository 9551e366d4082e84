"""The C helpers (pipelines/native.c) give bit for bit what their numpy definitions give, are
built once per machine and source, and step aside cleanly: no compiler or DSV3RAY_NATIVE=0 means
the numpy paths, with one warning."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DSV3RAY_CACHE", str(Path(tempfile.gettempdir()) / "dsv3ray-test-cache"))

from pipelines import native  # noqa: E402
from pipelines.dedup import MinHasher  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
needs_cc = pytest.mark.skipif(native.library() is None, reason="no C compiler: the numpy paths run")


@needs_cc
@pytest.mark.parametrize("num_perm", [1, 2, 7, 128, 2048])
def test_minhash_signatures_in_c_equal_numpy(num_perm):
    """Shingles sorted by document (as batches give them) and not, documents without a shingle,
    with one, with more than bins, a single bin, the largest table."""
    rng = np.random.default_rng(num_perm)
    mh = MinHasher(num_perm, seed=num_perm)
    sizes = rng.choice([0, 1, 2, 5, 40, 150, 3000], size=80)
    d_S = np.repeat(np.arange(sizes.size), sizes)
    s_S = rng.integers(0, 2**64, size=d_S.size, dtype=np.uint64)
    for d, s in ((d_S, s_S), (d_S[::-1].copy(), s_S), (np.zeros(0, np.int64), s_S[:0])):
        want = mh.signatures_from_shingles_numpy(sizes.size, s, d)
        got = native.minhash_signatures(sizes.size, num_perm, s, d, mh.salt, mh.borrow_T)
        assert got.dtype == np.uint32 and np.array_equal(got, want)
    assert (got == 0).all()  # no shingle at all: every bin 0, as numpy's cast of the empty mark
    with pytest.raises(IndexError):  # (C would write outside the output)
        native.minhash_signatures(3, num_perm, s_S[:1], np.array([3]), mh.salt, mh.borrow_T)


@needs_cc
def test_normalize_ascii_in_c_equals_numpy():
    """Fuzzed ASCII texts of spaces, tabs, newlines, \r (alone and before \n), control bytes and
    DEL (deleted: inside words and inside runs of whitespace), letters, joined by the separator as
    normalize_batch joins them: runs inside, at both ends, whole texts of whitespace or of control
    bytes, empty texts; against \r folding, bytes.translate and _whitespace_runs (numpy); and each
    text's words after it, str.split's."""
    import random

    from pipelines.clean import _ASCII_CONTROL, _whitespace_runs

    def numpy_(joined: bytes) -> bytes:
        joined = joined.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return _whitespace_runs(joined.translate(None, _ASCII_CONTROL), 0xFF)

    rng = random.Random(0)
    pool = list(" \t\nab.~!") + [
        "  ",
        "\n\n",
        " \n ",
        "\t\n\t",
        "\r",
        "\r\n",
        "\x00",
        "\x01",
        "\x0b",
        "\x1f",
        "\x7f",
    ]
    texts = [b"", b" ", b"\n", b"a", b" a ", b"a  b", b"\x01", b"a\x7fb", b"a \x7f b", b"\r\r\n"] + [
        "".join(rng.choice(pool) for _ in range(rng.randint(0, 25))).encode() for _ in range(20_000)
    ]
    for lo in (0, 3, 5000):
        joined = b"\xff" + b"\xff".join(texts[lo : lo + 8000]) + b"\xff"
        got, words = native.normalize_ascii(joined, 0xFF)
        assert got == numpy_(joined)
        assert words.tolist() == [len(t.split()) for t in got.split(b"\xff")[1:-1]]
    assert native.normalize_ascii(b"\xff\xff", 0xFF)[0] == b"\xff\xff"
    with pytest.raises(ValueError):  # (C counts texts between separators at both ends)
        native.normalize_ascii(b"a\xffb", 0xFF)


def _library_bpe(hf, joined: bytes):
    """The library's ids of pieces joined by 0xff (dsv3ray.tokenizer._ChunkCache._add_pieces)."""
    mapped = joined.decode("latin-1").replace(" ", "\u0120").replace("\n", "\u010a")
    tokens = [[t.id for t in hf.model.tokenize(p)] for p in mapped.split("\xff")]
    return [len(t) for t in tokens], [i for t in tokens for i in t]


@pytest.fixture(scope="module")
def tokenizers_():
    """Tokenizers trained here, small and large vocabularies, and one with its merges written the
    older way ("a b" strings)."""
    import json

    from tokenizers import Tokenizer as HF

    from dsv3ray.tokenizer import train_tokenizer
    from pipelines.corpus import stdlib_documents

    docs = [d["text"] for d, _ in zip(stdlib_documents(min_chars=200), range(600))]
    out = [train_tokenizer(docs, vocab_size=v).hf for v in (300, 4000)]
    spec = json.loads(out[1].to_str())
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return out + [HF.from_str(json.dumps(spec))], docs


@needs_cc
def test_piece_bpe_in_c_equals_the_library(tokenizers_):
    """Real text's pre-token pieces and fuzzed ones (runs of one byte, spaces, newlines, long
    pieces), through each tokenizer: the library's ids, piece by piece."""
    import random

    from dsv3ray.tokenizer import _pretoken_starts

    hfs, docs = tokenizers_
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    fuzz += [c * n for c in " \n=ab_" for n in (1, 2, 3, 7, 64, 300)] + ["ab" * 50, " the", "\n\n\n"]
    text = "\x00".join(d.encode("ascii", "ignore").decode() for d in docs[:300]).encode()
    text = bytes(b for b in text if b == 10 or b == 0 or 32 <= b < 127)
    cuts = np.append(_pretoken_starts(np.frombuffer(text, np.uint8)), len(text))
    real = {text[a:b] for a, b in zip(cuts[:-1], cuts[1:])} - {b"\x00"}
    for hf in hfs:
        bpe = native.PieceBPE.of_json(hf.to_str())
        for pieces in (sorted(real), [f.encode() for f in fuzz]):
            for lo in range(0, len(pieces), 500):
                joined = b"\xff".join(pieces[lo : lo + 500])
                sizes, ids = bpe(joined)
                assert (sizes.tolist(), ids.tolist()) == _library_bpe(hf, joined)
    assert bpe(b"x" * (native.PieceBPE.MAX_SYMBOLS + 1)) is None  # too long for its scratch: the library


@needs_cc
def test_piece_bpe_steps_aside_for_models_it_does_not_reproduce(tokenizers_):
    import json

    from tokenizers import Tokenizer as HF

    hf = tokenizers_[0][0]
    for change in (
        lambda m: m.update(dropout=0.1),
        lambda m: m.update(continuing_subword_prefix="##"),
        lambda m: m.update(end_of_word_suffix="</w>"),
        lambda m: m.update(byte_fallback=True),
        lambda m: m.update(ignore_merges=True),
    ):
        spec = json.loads(hf.to_str())
        change(spec["model"])
        assert native.PieceBPE.of_json(json.dumps(spec)) is None
    assert native.PieceBPE.of_json(hf.to_str()) is not None
    spec = json.loads(hf.to_str())
    spec["model"]["merges"].append(["q", "zzz-not-a-token"])  # (the library refuses it too)
    assert native.PieceBPE.of_json(json.dumps(spec)) is None
    # a merge repeated late: its first rank holds, as in the library
    spec = json.loads(hf.to_str())
    spec["model"]["merges"] += spec["model"]["merges"][:5]
    again = HF.from_str(json.dumps(spec))
    joined = b"\xff".join([b" the", b"tion", b"self", b" =", b"\n\n   ", b"abcabc", b"__init__"])
    sizes, ids = native.PieceBPE.of_json(again.to_str())(joined)
    assert (sizes.tolist(), ids.tolist()) == _library_bpe(again, joined)


@needs_cc
def test_a_tokenizer_with_the_c_helpers_encodes_as_the_library(tokenizers_):
    from dsv3ray.tokenizer import Tokenizer

    hfs, docs = tokenizers_
    tok = Tokenizer(hfs[1])
    native.install(tok, hfs[1].to_str())
    assert tok.chunk_cache.piece_bpe is not None and tok.chunk_cache.simple_runs is not None
    got = [a.tolist() for a in tok.encode_batch(docs)]
    assert got == [e.ids for e in hfs[1].encode_batch(docs, add_special_tokens=False)]


@needs_cc
def test_simple_runs_in_c_cut_as_the_pattern_and_equal_numpy(tokenizers_):
    """runs_pieces' cut of a run is _ASCII_PRETOKEN's (real text and fuzz: every printable ASCII
    byte, newlines, contractions at every place, runs of whitespace before letters and at the
    end); simple_runs (its cut, probe and gather in C, C's table) gives _simple_runs_numpy's ids
    and counts, piece table and piece ids, runs with a space before them or not, through a table
    that fills and empties (and a call with more new pieces than it holds)."""
    import random

    from dsv3ray.runtable import RunTable, byte_runs
    from dsv3ray.tokenizer import _ASCII_PRETOKEN, Tokenizer

    hfs, docs = tokenizers_
    rng = random.Random(2)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\n", " ", " ", "'s", "'re", "'ll", "'", "'d"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(2000)]
    fuzz += ["'", "'s", "  ", " \n a", "a  ", "x\n\n\n", "'d'", " 'll", "a'm", "A'S"]
    real = [d.encode("ascii", "ignore").decode() for d in docs[:200]]
    real = ["".join(c for c in d if c == "\n" or " " <= c < "\x7f") for d in real if d.strip()]
    cache = Tokenizer(hfs[0]).chunk_cache
    cache.piece_table = native.CRunTable(1 << 20)
    cache._clear_pieces()
    table = cache.piece_table
    for text in fuzz + real:
        raw = text.encode()
        size = len(raw) + 1
        entry, pieces, m_start, m_end = (np.empty(size, np.int64) for _ in range(4))
        out = np.empty(size + 8, np.uint8)
        src, run = np.frombuffer(raw, np.uint8), np.array([0, len(raw), 0], np.int64)  # (held: C reads them)
        native.library().runs_pieces(
            native._ptr(src), native._ptr(run[0:]), native._ptr(run[1:]), native._ptr(run[2:].view(np.uint8)), 1,
            *native._view(table), native._ptr(out), native._ptr(entry), native._ptr(pieces), native._ptr(m_start),
            native._ptr(m_end),
        )  # fmt: skip
        assert out[: len(raw)].tobytes() == raw and out[len(raw)] == 0
        assert pieces[0] == len([m for m in _ASCII_PRETOKEN.finditer(text)])
    safe = [t for t in fuzz + real if t.strip() == t and t]  # (what encode_runs hands over)
    for max_pieces, c_table in ((1 << 20, native.CRunTable), (300, native.CRunTable), (20, native.CRunTable),
                                (1 << 20, RunTable)):  # (a RunTable: its long pieces in dicts)  # fmt: skip
        c_cache, numpy_cache = (Tokenizer(hfs[1]).chunk_cache for _ in "ab")
        for cache, table_type in ((c_cache, c_table), (numpy_cache, RunTable)):
            cache.piece_table = table_type(max_pieces)
            cache._clear_pieces()
        c_cache.simple_runs = native.simple_runs
        for lo in range(0, len(safe), 150):
            part = [t.encode() for t in safe[lo : lo + 150]]
            joined, starts, ends = byte_runs(part)
            space = np.arange(len(part)) % 3 != 0
            got = native.simple_runs(c_cache, joined, starts, ends, space)
            want = numpy_cache._simple_runs_numpy(joined, starts, ends, space)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            assert c_cache.piece_table.size == numpy_cache.piece_table.size
            assert c_cache.piece_ids.size == numpy_cache.piece_ids.size


@needs_cc
def test_minhash_from_the_chunks_rows_in_c_equals_numpy(tokenizers_):
    """ChunkPass.signatures: gathered, shingled and hashed in one C pass, or through numpy's
    gather, shingles and signatures; every text or every third, shingles of 1..7 words (texts of
    fewer words than that: one shingle of them all; none: every bin 0)."""
    from pipelines.chunkpass import ChunkPass

    _, docs = tokenizers_
    texts = docs[:200] + ["", "a", "a b", "one two three four", "x " * 3000] + [d[:40] for d in docs[:60]]
    for k in (1, 3, 7):
        cp = ChunkPass(None, None, MinHasher(64, k, 0.8, k), minhash_chars=1 << 20)
        for lo in range(0, len(texts), 100):
            lk = cp.lookup(texts[lo : lo + 100])
            for every in (1, 3):
                want = np.arange(lk.n) % every == 0
                got, done = cp.signatures(lk, want)
                numpy_ = cp._signatures_numpy(lk, want & lk.minhash, np.zeros_like(got))
                assert done.any() and np.array_equal(got, numpy_)
    with pytest.raises(IndexError):  # (C would read rows that are not there)
        native.minhash_rows(cp.minhash, np.array([cp.mh_words.size]), np.array([0, 1]), cp.mh_words)
    with pytest.raises(ValueError):
        native.minhash_rows(cp.minhash, np.array([0]), np.array([0, 2]), cp.mh_words)


@needs_cc
@pytest.mark.parametrize("word_ngrams", [1, 2, 3])
def test_quality_sums_in_c_are_numpys_bits(tokenizers_, tmp_path, word_ngrams):
    """fastText's sums from the chunks' rows in C take numpy's float operations in numpy's order
    (np.add.reduceat: the first value plus the pairwise sum of the rest): the same bits for every
    text, and so the same scores; on real text, repeated words and texts of 0..2 words."""
    import fasttext

    from pipelines.chunkpass import ChunkPass
    from pipelines.quality import QualityScorer

    _, docs = tokenizers_
    lines = [f"__label__{'ab'[i % 2]} {' '.join(d.split()[i % 5 :])}" for i, d in enumerate(docs[:300])]
    (tmp_path / "t.txt").write_text("\n".join(" ".join(ln.split()) for ln in lines) + "\n", encoding="utf-8")
    model = fasttext.train_supervised(
        input=str(tmp_path / "t.txt"), epoch=2, thread=1, seed=0, verbose=0, dim=8, wordNgrams=word_ngrams, bucket=5000
    )  # fmt: skip
    model.save_model(str(tmp_path / "m.bin"))
    scorer = QualityScorer(tmp_path / "m.bin", label="__label__a")
    texts = (
        docs
        + ["", "word", "two words", "the the the the the the the the the the"]
        + [d[:60] for d in docs[:80]]
    )
    cp = ChunkPass(None, scorer.batch, None, quality_chars=1 << 20)
    for lo in range(0, len(texts), 128):
        lk = cp.lookup(texts[lo : lo + 128])
        want = lk.quality & (np.arange(lk.n) % 2 == 0 if lo % 256 else True)
        for idx, entries, bounds in cp._wanted(lk, want):
            got = native.quality_rows(scorer.batch, entries, bounds, cp.ft_words)
            (_, per_text, (logits, count, hash_)), *_ = [
                r for r in cp._rows(lk, want, cp.ft_words) if r[0][0] == idx[0]
            ]
            doc_W = np.repeat(np.arange(idx.size), per_text)
            want_sums = scorer.batch.sums(idx.size, doc_W, logits, count, hash_)
            assert np.array_equal(got[0].view(np.int64), want_sums[0].view(np.int64))  # (bits)
            assert np.array_equal(got[1], want_sums[1])
        scores, done = cp.quality(lk, want)
        assert np.array_equal(scores[done], cp._quality_numpy(lk, want, np.zeros(lk.n, np.float32))[done])


@needs_cc
@pytest.mark.parametrize("exact,near", [(True, True), (True, False), (False, True)])
def test_dedup_decisions_in_c_equal_numpy(exact, near):
    """Batches with exact and near duplicates inside and across them, keys repeated inside a
    document, key 0, tables small enough to grow mid-batch: the same codes, the same keys, counts
    and table sizes after every batch."""
    from pipelines.dedup import Deduplicator, SeenSet

    rng = np.random.default_rng(int(exact) * 2 + int(near))
    ours, ref = Deduplicator(exact, near), Deduplicator(exact, near)
    for d in (ours, ref):
        d.exact_seen, d.band_seen = SeenSet(16), SeenSet(16)
    pool_h = rng.integers(-(2**63), 2**63 - 1, 400)
    pool_k = rng.integers(-(2**63), 2**63 - 1, 900)
    dups = 0
    for batch in range(40):
        n, B = int(rng.integers(0, 60)), 6 if near else 0
        h = np.where(rng.random(n) < 0.3, rng.choice(pool_h, n), rng.integers(-(2**63), 2**63 - 1, n))
        k = np.where(
            rng.random((n, B)) < 0.1, rng.choice(pool_k, (n, B)), rng.integers(-(2**63), 2**63 - 1, (n, B))
        )
        k[rng.random((n, B)) < 0.02] = 0
        if n > 2 and B:
            k[1, 1] = k[1, 0]  # (a key twice in one document)
        h_N, k_NB = SeenSet._fix(h), SeenSet._fix(k).reshape(n, B)
        got = native.dedup_codes(ours, h_N, k_NB)
        want = ref._check_codes_numpy(h_N, k_NB)
        assert got.tolist() == want.tolist(), batch
        dups += int((got > 0).sum())
        for a, b in ((ours.exact_seen, ref.exact_seen), (ours.band_seen, ref.band_seen)):
            assert a.count == b.count and a.table.size == b.table.size
            assert np.array_equal(np.sort(a.table[a.table != 0]), np.sort(b.table[b.table != 0]))
    assert (not exact or ours.exact_seen.table.size > 16) and (not near or ours.band_seen.table.size > 16)
    assert dups > 50  # (duplicates, inside batches and across them)


@needs_cc
def test_the_library_is_built_once_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3RAY_CACHE", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.is_file() and path.suffix == ".so"
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime  # cached: not compiled again
    assert not list(tmp_path.glob("*.part"))


def _fresh_process(env: dict) -> subprocess.CompletedProcess:
    code = (
        "import numpy as np; from pipelines import native; from pipelines.dedup import MinHasher\n"
        "m = MinHasher(16, seed=1); s = np.arange(50, dtype=np.uint64); d = np.arange(50) // 10\n"
        "print(native.library() is None, m.signatures_from_shingles(5, s, d).sum() == "
        "m.signatures_from_shingles_numpy(5, s, d).sum())"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_a_compiler_the_numpy_paths_run(tmp_path):
    done = _fresh_process({"CC": "/nonexistent/cc", "DSV3RAY_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]
    assert "numpy paths run" in done.stderr and done.stderr.count("were not built") == 1
    done = _fresh_process({"CC": "/bin/false", "DSV3RAY_CACHE": str(tmp_path)})  # a compiler that fails
    assert done.stdout.split() == ["True", "True"] and "exited 1" in done.stderr
    bad = tmp_path / "cache"
    bad.mkdir()
    env = {"DSV3RAY_CACHE": str(bad)}
    assert _fresh_process(env).stdout.split() == ["False", "True"]  # built there
    for so in bad.glob("native-*.so"):
        so.write_bytes(b"not a shared library")  # (a cached file this machine cannot load)
    done = _fresh_process(env)
    assert done.stdout.split() == ["True", "True"] and "were not built" in done.stderr
    done = _fresh_process({"DSV3RAY_NATIVE": "0"})  # switched off
    assert done.stdout.split() == ["True", "True"] and done.stderr == ""


def _covered_entries(lk) -> list:
    """Per text: its chunks' entries where some stage is served from them, else None."""
    cover = lk.tokens | lk.quality | lk.minhash
    return [
        g.entry[g.bounds[t] : g.bounds[t + 1]].tolist() if cover[g.lo + t] else None
        for g in lk.groups
        for t in range(g.n)
    ]


@needs_cc
@pytest.mark.parametrize("stages", ["all", "minhash", "minhash, newlines in chunks"])
def test_chunk_lookup_in_c_equals_numpy(tokenizers_, stages):
    """ChunkPass's cut and probe in one C pass (chunk_scan) or in numpy (SpaceChunks, Arrow's
    distinct values, RunTable.lookup, with_runs): the same coverage per stage, the same entries per
    text and the same table, on real and fuzzed text (double and edge spaces, runs of 1-6
    newlines, chunks over 24 and over 256 bytes, non-ASCII), with the first-chunk flag and newline
    runs (tokens served) or without (MinHash only), runs of newlines cut chunks or not, in several
    groups a lookup, through a table that fills and empties (insertions in C, or numpy's)."""
    import random

    from dsv3ray.runtable import RunTable
    from dsv3ray.tokenizer import Tokenizer
    from pipelines.chunkpass import ChunkPass
    from pipelines.clean import normalize_text
    from pipelines.quality import MAX_PREDICT_CHARS, QualityScorer, default_quality_model

    hfs, docs = tokenizers_
    rng = random.Random(1)
    words = " ".join(docs[:100]).split()
    odd = ["é", "日本語", "w" * 24, "z" * 25, "q" * 40, "v" * 256, "u" * 257, "don't", "a\tb", "</s>"]
    seps = [" "] * 12 + ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
    bad = ["  ", "\n" * 6, " \n", "\n "]  # (a text with one is not served)

    def sep():
        return rng.choice(bad) if rng.random() < 0.005 else rng.choice(seps)

    fuzz = [
        "".join((rng.choice(odd) if rng.random() < 0.02 else rng.choice(words)) + sep()
                for _ in range(rng.randint(0, 60))).strip(" " if rng.random() < 0.9 else "")
        for _ in range(1200)
    ]  # fmt: skip
    texts = [normalize_text(d) for d in docs] + docs[:50] + fuzz
    texts += ["", " ", "a", "a b", "a\nb", "\na", "a\n", "x" * 2000]
    rng.shuffle(texts)
    minhash = MinHasher(64, 5, 0.8, 0)
    for max_entries in (1 << 18, 3000):
        tok = Tokenizer(hfs[1]) if stages == "all" else None
        scorer = QualityScorer(default_quality_model()).batch if stages == "all" else None
        c_path, numpy_path = (
            ChunkPass(tok, scorer, minhash, MAX_PREDICT_CHARS, 1 << 20, max_entries=max_entries) for _ in "ab"
        )
        numpy_path._lookup_group_native = numpy_path._lookup_group_numpy  # (the dispatch picks C otherwise)
        numpy_path.table = RunTable(max_entries)  # (numpy's insertions too)
        numpy_path._clear()
        assert isinstance(c_path.table, native.CRunTable)
        c_path.GROUP_CHARS = numpy_path.GROUP_CHARS = 40_000  # (several groups a lookup)
        if stages.endswith("chunks"):
            for cp in (c_path, numpy_path):
                cp.newlines = False
                cp._clear()
        for lo in range(0, len(texts), 500):
            c, n = (cp.lookup(texts[lo : lo + 500]) for cp in (c_path, numpy_path))
            for stage in ("tokens", "quality", "minhash"):
                assert np.array_equal(getattr(c, stage), getattr(n, stage)), stage
            assert c.minhash.mean() > (0.4 if max_entries > 3000 else 0.05)  # (a small table: a full one)
            assert _covered_entries(c) == _covered_entries(n)
            assert c_path.table.size == numpy_path.table.size
    with pytest.raises(IndexError):  # (C would read past the buffer)
        native.chunk_scan(c_path.table, b"ab", np.array([0]), np.array([3]), False, False, 256, np.zeros(0))


def test_every_c_function_has_its_signature():
    """Each function native.c exports is in native._SIGNATURES with one type per parameter (one
    called without its argtypes gets its pointers truncated: a crash, not an error)."""
    import re

    source = native.SOURCE.read_text()
    exported = re.findall(r"^(?:int|int64_t|void) (\w+)\(([^)]*)\)", source, flags=re.M)
    assert {name for name, _ in exported} == set(native._SIGNATURES)
    for name, params in exported:
        assert len(native._SIGNATURES[name][0]) == params.count(",") + 1, name


@needs_cc
def test_a_c_table_made_of_a_table_finds_its_entries():
    """CRunTable.of: every entry of a RunTable (runs of 1-40 bytes, both flags, long ones from its
    dicts) at the same number, nothing else found; then both grow alike."""
    import random

    from dsv3ray.runtable import RunTable, byte_runs, keys, padded

    rng = random.Random(3)
    words = sorted(
        {bytes(rng.choice(b"ab\xc3\xa9 ") for _ in range(rng.randint(1, 40))) for _ in range(3000)}
    )
    table = RunTable(1 << 13)
    flags = np.array([rng.random() < 0.3 for _ in words], np.int64)
    joined, starts, ends = byte_runs(words)
    key = keys(padded(joined), starts, ends, flags)
    table.append(np.arange(len(words)), words, key)
    c = native.CRunTable.of(table)
    assert c.size == table.size
    assert c.lookup(joined, starts, ends, key).tolist() == list(range(len(words)))
    other = keys(padded(joined), starts, ends, 1 - flags)  # (the other flag: absent unless added so)
    assert np.array_equal(c.lookup(joined, starts, ends, other), table.lookup(joined, starts, ends, other))
    more = [w + b"!" for w in words[:100]]
    j2, s2, e2 = byte_runs(more)
    k2 = keys(padded(j2), s2, e2, 0)
    assert np.array_equal(c.append(np.arange(100), more, k2), table.append(np.arange(100), more, k2))
    assert np.array_equal(c.lookup(j2, s2, e2, k2), table.lookup(j2, s2, e2, k2))
    assert native.CRunTable.of(RunTable(8)).size == 0


@needs_cc
def test_minhash_words_in_c_equal_numpy():
    """MinHasher._words_at in C: the same word hashes (words of 1-8, 9-16 and longer bytes: each
    hash form), and the same words per text, on fuzzed bytes (every byte value, A-Z to fold,
    bytes >= 0x80, runs of separators) and any cut into texts, and on real text."""
    import random

    rng = random.Random(0)
    m = MinHasher(64, 5, 0.8, 0)
    alphabet = list(b"aZ_9 .\n") + [0xC3, 0xA9, 0xFF, 0x80, 0x41, 0x5A, 0x60, 0x7B, 0x40, 0x2F, 0x3A]
    cases = []
    for _ in range(400):
        raw = bytes(
            rng.choice(alphabet) if rng.random() < 0.9 else rng.randint(0, 255)
            for _ in range(rng.randint(0, 400))
        )
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randint(0, 6))))
        cases.append((raw, np.array(cuts, np.int64)))
    text = " ".join(
        d["text"] for d, _ in zip(__import__("pipelines.corpus").corpus.stdlib_documents(), range(50))
    )
    raw = text.encode("utf-8", "surrogatepass")
    cases.append((raw, np.arange(0, len(raw), 997)))
    for raw, doc_start in cases:
        got, want = native.minhash_words(raw, doc_start), m._words_at_numpy(raw, doc_start)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), raw


@needs_cc
def test_token_rows_gathered_in_c_equal_numpy(tokenizers_):
    """ChunkPass.tokens: the chunks' token ids gathered per text in C, or by Ragged.gather: the
    same ids and counts, every text or every third."""
    from dsv3ray.tokenizer import Tokenizer
    from pipelines.chunkpass import ChunkPass

    hfs, docs = tokenizers_
    cp = ChunkPass(Tokenizer(hfs[1]))
    for lo in range(0, len(docs), 150):
        lk = cp.lookup(docs[lo : lo + 150])
        for every in (1, 3):
            want = (np.arange(lk.n) % every == 0) & lk.tokens
            flat, offsets, done = cp.tokens(lk, want)
            parts, per_text = [], np.zeros(lk.n, np.int64)
            cp._tokens_numpy(lk, want, parts, per_text)
            assert done.any() and np.array_equal(np.diff(offsets), per_text)
            assert np.array_equal(flat, np.concatenate(parts))
    with pytest.raises(IndexError):  # (C would read rows that are not there)
        native.rows_gather(np.array([cp.tok_ids.size]), np.array([0, 1]), cp.tok_ids)


@needs_cc
def test_copy_runs_in_c_equals_numpy():
    """copy_runs: runs of 0-300 bytes, anywhere in the source, to any places in the destination
    (the numpy line it replaces gives the same array); a run past either end is refused."""
    from dsv3ray.runtable import ranges

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 20_000, dtype=np.uint8)
    lens = rng.integers(0, 300, 60)
    src_start = rng.integers(0, src.size - 300, 60)
    dst_start = np.cumsum(lens + 3) - lens  # (apart, in order)
    got, want = (np.full(int(dst_start[-1] + lens[-1] + 5), 32, np.uint8) for _ in "ab")
    native.copy_runs(src, src_start, lens, got, dst_start)
    want[ranges(dst_start, lens)] = src[ranges(src_start, lens)]
    assert np.array_equal(got, want)
    with pytest.raises(IndexError):  # (C would write past the destination)
        native.copy_runs(src, np.array([0]), np.array([10]), got, np.array([got.size - 5]))


def test_text_hashes_in_c_equal_numpy_and_spread():
    """Texts of every length around the 8-byte words (the last word zero-padded: "a" and "a\\0"
    still differ by their length), non-ASCII bytes, none at all: C's bits are numpy's; 100k
    texts a byte or a length apart all differ, and their eval draws (hash mod 1e6) are uniform."""
    from pipelines.dedup import _text_hashes_numpy, text_hashes

    rng = np.random.default_rng(0)
    texts = [b"", b"a", b"a\0", b"\0", b"\0" * 8, b"abcdefgh", b"abcdefgh\0", "é naïve ✓".encode()]
    texts += [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in rng.integers(0, 40, 300)]
    texts += [rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()]
    want = _text_hashes_numpy(texts)
    assert want.dtype == np.int64 and np.array_equal(text_hashes(texts), want)
    assert np.array_equal(text_hashes(texts[3:4]), want[3:4]) and text_hashes([]).size == 0
    base = b"the same text, " * 20
    near = [base[:i] + bytes([base[i] ^ (1 << (i % 8))]) + base[i + 1 :] for i in range(len(base))]
    near += [base[:n] for n in range(len(base) + 1)] + [base + b"\0" * n for n in range(1, 9)]
    near += [f"document {i}".encode() for i in range(100_000)]
    h = text_hashes(near)
    assert np.unique(h).size == len(near)
    counts = np.bincount((h[-100_000:] % 1_000_000) // 100_000, minlength=10)
    assert counts.min() > 9_500 and counts.max() < 10_500  # (sd ~95)


@needs_cc
def test_a_seen_set_grown_in_c_holds_what_numpy_grows(monkeypatch):
    """SeenSet._grow's insertions in C: the same keys found (and no others), the same count and
    size as the numpy insertions give, through several doublings; a table without room refuses."""
    from pipelines.dedup import SeenSet

    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**63), 2**63 - 1, size=300_000, dtype=np.int64)
    keys[::1000] = 0  # (remapped to 1)
    sets = []
    for use_c in (True, False):
        if not use_c:
            monkeypatch.setattr(native, "seen_insert", lambda table, keys: False)
        sets.append(SeenSet(capacity=16))
        for i in range(0, keys.size, 7_000):
            sets[-1].add_many(keys[i : i + 7_000])
    monkeypatch.undo()
    c, ref = sets
    assert c.count == ref.count and c.table.size == ref.table.size
    assert np.array_equal(np.sort(c.table), np.sort(ref.table))
    assert c.contains_many(keys).all() and not c.contains_many(keys[1::1000] ^ 0x5555).any()
    with pytest.raises(ValueError, match="no room"):
        native.seen_insert(np.zeros(8, np.int64), np.arange(1, 6))


@needs_cc
def test_sparse_rows_dot_in_c_is_numpys_bits():
    """The topic summary's k-means products: rows without cells, of one cell, of hundreds (numpy's
    pairwise sums), one centroid or many, no cell at all: C's sums are numpy's, bit for bit."""
    from pipelines.domain import SparseRows

    rng = np.random.default_rng(0)
    per_row = rng.choice([0, 1, 2, 7, 9, 40, 300], size=120)
    row = np.repeat(np.arange(per_row.size), per_row)
    col = rng.integers(0, 512, size=row.size)
    value = rng.normal(size=row.size)
    for k in (1, 3, 8):
        c_KD = rng.normal(size=(k, 512))
        x = SparseRows(row, col, value, (per_row.size, 512))
        want = x._dot_numpy(np.ascontiguousarray(c_KD.T))
        assert np.array_equal(x.dot(c_KD), want)
    empty = SparseRows(row[:0], col[:0], value[:0], (4, 512))
    assert np.array_equal(empty.dot(c_KD), np.zeros((4, 8)))
    with pytest.raises(ValueError, match="ascend"):
        native.sparse_dot(row[::-1].copy(), col, value, np.ascontiguousarray(c_KD.T), per_row.size)


@needs_cc
def test_crc32_runs_is_zlibs():
    import zlib

    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 5000, dtype=np.uint8)
    starts = rng.integers(0, 4000, 300)
    ends = starts + rng.integers(0, 40, 300)
    got = native.crc32_runs(buf, starts, ends)
    assert got.dtype == np.uint32
    assert got.tolist() == [zlib.crc32(buf[a:b].tobytes()) for a, b in zip(starts, ends)]
    with pytest.raises(IndexError):
        native.crc32_runs(buf, np.array([4999]), np.array([5001]))


@needs_cc
def test_count_u16_is_bincount():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 65536, 20_000).astype(np.uint16)
    ids[:50] = 65535
    for v in (1, 300, 65536):
        counts = np.arange(v, dtype=np.int64)
        assert native.count_u16(ids[::2], counts)  # (a strided view: copied first)
        assert np.array_equal(counts, np.arange(v) + np.bincount(ids[::2], minlength=65536)[:v])
    with pytest.raises(TypeError):
        native.count_u16(ids.astype(np.int32), np.zeros(5, np.int64))
