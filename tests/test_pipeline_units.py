"""Per-stage tests of the cleaning pipeline, without Ray: readers, normalize, dedup, quality,
perplexity, domain, packing, the quality CLI and the config checks."""

import gzip
import io
import json
import os
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# the default quality model is trained once and cached here (reproducible recipe, keyed by version)
os.environ.setdefault("DSV3RAY_CACHE", str(Path(tempfile.gettempdir()) / "dsv3ray-test-cache"))

from dsv3ray.config import section_from_dict  # noqa: E402
from dsv3ray.errors import ConfigError, UserError  # noqa: E402
from dsv3ray.runtable import byte_runs  # noqa: E402
from pipelines.clean import Cleaner, CleanSettings, normalize_text, normalize_text_reference  # noqa: E402
from pipelines.corpus import stdlib_documents, write_demo_corpus  # noqa: E402
from pipelines.dedup import Deduplicator, MinHasher, SeenSet, lsh_params  # noqa: E402
from pipelines.domain import DomainFilter, topic_summary  # noqa: E402
from pipelines.pack import (  # noqa: E402
    Packer,
    ShardWriter,
    eval_mask,
    rows_from_arrow,
    token_dtype,
    unigram_entropy,
)
from pipelines.prepare import PrepareConfig  # noqa: E402
from pipelines.quality import (  # noqa: E402
    QualityScorer,
    UnigramLM,
    cli_quality_train,
    default_quality_model,
    synth_junk,
)
from pipelines.readers import DROP, OK, QUARANTINE, expand_inputs, plan_work, read_records  # noqa: E402


@pytest.fixture(scope="module")
def all_docs():
    return list(stdlib_documents(min_chars=200))  # one walk of the stdlib for the module


@pytest.fixture(scope="module")
def docs(all_docs):
    return [d["text"] for d in all_docs if len(d["text"]) >= 300][:400]


def reasons(path, max_bytes=1 << 20):
    return [(r[1], r[2], r[3]) for r in read_records(path, max_bytes)]


def test_readers_every_bad_input_gets_an_outcome(tmp_path):
    good = "hello world " * 5
    lines = [
        json.dumps({"id": 1, "text": good}),
        '{"text": "unterminated',
        json.dumps({"id": 2}),
        json.dumps({"text": 42}),
        json.dumps([1, 2]),
        "",
        "[" * 100_000 + "]" * 100_000,  # deeply nested
        json.dumps({"text": "x" * 5000}),  # over the 4 KB limit below
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "bad_utf8.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    got = reasons(tmp_path / "a.jsonl", max_bytes=4096)
    assert [g[2] for g in got] == [
        "",
        "malformed_json",
        "missing_text",
        "text_not_string",
        "not_an_object",
        "blank_line",
        "record_too_large",  # the nested line is 200 KB: quarantined before parsing
        "record_too_large",
    ]
    assert [g[0] for g in got] == list(range(1, 9))  # line numbers
    assert reasons(tmp_path / "a.jsonl", max_bytes=1 << 20)[6][2] == "json_too_deep"
    assert reasons(tmp_path / "bad_utf8.jsonl") == [(1, QUARANTINE, "invalid_utf8")]

    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(2000)))
    raw = (tmp_path / "t.jsonl.gz").read_bytes()
    (tmp_path / "trunc.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    got = reasons(tmp_path / "trunc.jsonl.gz")
    assert got[-1][2] == "truncated_or_corrupt_gzip" and all(g[1] == OK for g in got[:-1]) and len(got) > 10
    assert len(reasons(tmp_path / "t.jsonl.gz")) == 2000

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "doc.txt").write_text(good)
    (tmp_path / "arr.json").write_text(json.dumps([{"text": good}, {"text": None}, 3]))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"text": [good, None]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"body": [good]}), tmp_path / "notext.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    os.symlink(tmp_path / "gone", tmp_path / "dangling.jsonl")
    assert reasons(tmp_path / "empty.txt") == []
    assert reasons(tmp_path / "blob.dat") == [(1, QUARANTINE, "binary_file")]
    assert reasons(tmp_path / "doc.txt") == [(1, OK, "")]
    assert [g[2] for g in reasons(tmp_path / "arr.json")] == ["", "missing_text", "not_an_object"]
    assert reasons(tmp_path / "broken.parquet")[0][2] == "unreadable_file"
    assert [g[2] for g in reasons(tmp_path / "p.parquet")] == ["", "missing_text"]
    assert [g[2] for g in reasons(tmp_path / "notext.parquet")] == ["missing_text"]
    assert [g[2] for g in reasons(tmp_path / "ints.parquet")] == ["text_not_string"] * 2
    for kind, column in (  # every Arrow string type is text
        ("large", pa.array([good, None], pa.large_string())),
        ("view", pa.array([good, None], pa.string_view())),
        ("dict", pa.array([good, None]).dictionary_encode()),  # a pandas categorical
    ):
        pq.write_table(pa.table({"text": column}), tmp_path / f"{kind}.pq")
        assert [(g[2], g[5]) for g in read_records(tmp_path / f"{kind}.pq", 1 << 20)] == [
            (OK, good), (QUARANTINE, None),
        ], kind  # fmt: skip
        (tmp_path / f"{kind}.pq").unlink()
    pq.write_table(pa.table({"text": pa.array([b"bytes"], pa.binary())}), tmp_path / "bin.pq")
    assert reasons(tmp_path / "bin.pq")[0][2] == "text_not_string"
    (tmp_path / "bin.pq").unlink()
    assert reasons(tmp_path / "dangling.jsonl")[0][2] == "unreadable_file"

    files = expand_inputs([str(tmp_path)])
    assert files == sorted(files) and len(files) == 13
    assert expand_inputs([str(tmp_path / "*.parquet")])[0].name == "broken.parquet"
    with pytest.raises(UserError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_readers_fifo_links_and_loops(tmp_path):
    """A FIFO (whose read would block forever) is quarantined as one record, linked directories are
    followed, a link loop ends, and a file reached by two paths is read once."""
    good = json.dumps({"text": "word " * 40}) + "\n"
    data, shards = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    shards.mkdir()
    (data / "a.jsonl").write_text(good)
    (shards / "b.jsonl").write_text(good)
    os.mkfifo(data / "pipe.jsonl")
    os.symlink(shards, data / "linked")  # shards linked in from another disk
    os.symlink(data, data / "linked" / "back")  # a loop: elsewhere/back -> data
    os.symlink(data / "a.jsonl", data / "same.jsonl")  # one file, two paths
    assert reasons(data / "pipe.jsonl") == [(0, QUARANTINE, "not_a_regular_file")]
    files = expand_inputs([str(data)])
    assert [f.relative_to(data).as_posix() for f in files] == ["a.jsonl", "pipe.jsonl", "linked/b.jsonl"]
    assert expand_inputs([str(data / "a.jsonl"), str(data / "same.jsonl")]) == [data / "a.jsonl"]
    # text files with a byte-order mark: UTF-16 (either byte order, any suffix) is decoded, a UTF-8
    # mark is not part of the text; a UTF-16 file that does not decode is said to be that
    doc = "caf\u00e9 " * 40
    (data / "le.txt").write_bytes(doc.encode("utf-16"))
    (data / "be.dat").write_bytes(b"\xfe\xff" + doc.encode("utf-16-be"))
    (data / "sig.txt").write_bytes(doc.encode("utf-8-sig"))
    (data / "odd.txt").write_bytes(b"\xff\xfe" + b"\x00\xd8\x41\x00")  # a lone high surrogate
    for name in ("le.txt", "be.dat", "sig.txt"):
        assert [r[2:] for r in read_records(data / name, 1 << 20)] == [(OK, "", "", doc)], name
    assert reasons(data / "odd.txt") == [(1, QUARANTINE, "invalid_utf16")]


def test_readers_compressed_inputs(tmp_path):
    """LM corpora ship compressed: gzip, zstd (.jsonl.zst), bz2 and xz are read by their first
    bytes, whatever the suffix; a truncated stream keeps the records before the cut and ends with
    one quarantined row naming its codec."""
    import bz2
    import lzma

    docs = [f"document {i} " + "word " * 40 for i in range(50)]
    body = ("\n".join(json.dumps({"text": t}) for t in docs) + "\n").encode()
    rng = random.Random(0)  # ~600 KB that does not compress to nothing
    noisy = "".join(
        json.dumps({"text": " ".join(f"{rng.getrandbits(24):x}" for _ in range(60))}) + "\n"
        for _ in range(1500)
    ).encode()

    def zstd(data: bytes) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        return sink.getvalue().to_pybytes()

    # (bz2 at level 1: 100 KB blocks, so half the file holds whole blocks)
    packers = {"gz": gzip.compress, "zst": zstd, "bz2": lambda d: bz2.compress(d, 1), "xz": lzma.compress}
    codec = {"gz": "gzip", "zst": "zstd", "bz2": "bz2", "xz": "xz"}
    for ext, pack in packers.items():
        (tmp_path / f"c.jsonl.{ext}").write_bytes(pack(body))
        assert [r[5] for r in read_records(tmp_path / f"c.jsonl.{ext}", 1 << 20)] == docs, ext
        (tmp_path / f"c.txt.{ext}").write_bytes(pack(docs[0].encode()))  # text, by the inner suffix
        assert [r[5] for r in read_records(tmp_path / f"c.txt.{ext}", 1 << 20)] == [docs[0]], ext
        big = pack(noisy)  # a cut half way lands after many whole lines (of several zstd blocks)
        (tmp_path / f"cut.jsonl.{ext}").write_bytes(big[: len(big) // 2])
        got = reasons(tmp_path / f"cut.jsonl.{ext}")
        assert got[-1][1:] == (QUARANTINE, f"truncated_or_corrupt_{codec[ext]}"), ext
        assert all(g[1] == OK for g in got[:-1]) and got[-1][0] == len(got) and len(got) > 10, ext
    (tmp_path / "noext").write_bytes(zstd(body))  # no suffix: the magic bytes decide, then the content
    assert len(list(read_records(tmp_path / "noext", 1 << 20))) == len(docs)
    items = plan_work([tmp_path / "c.jsonl.zst"], split_bytes=64)  # never cut a compressed file
    assert items == [{"path": str(tmp_path / "c.jsonl.zst"), "start": 0, "end": -1}]


def test_readers_text_key(tmp_path):
    """The text under another key (The Stack's "content"): every JSON form and parquet read it;
    the "text" of those files is then no text of theirs."""
    doc = "word " * 40
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"content": doc, "text": 3}) + "\n" + json.dumps({"text": doc}) + "\n"
    )
    (tmp_path / "b.json").write_text(json.dumps([{"content": doc}]))
    (tmp_path / "c.json").write_text(json.dumps({"content": doc}, indent=2))
    pq.write_table(pa.table({"content": [doc]}), tmp_path / "d.parquet")
    got = {f: [(r[2], r[3]) for r in read_records(tmp_path / f, 1 << 20, text_key="content")] for f in "a.jsonl b.json c.json d.parquet".split()}  # fmt: skip
    assert got == {
        "a.jsonl": [(OK, ""), (QUARANTINE, "missing_text")], "b.json": [(OK, "")], "c.json": [(OK, "")],
        "d.parquet": [(OK, "")],
    }  # fmt: skip
    assert [r[2] for r in read_records(tmp_path / "d.parquet", 1 << 20)] == [QUARANTINE]  # default "text"
    with pytest.raises(ConfigError, match="prepare.text_key"):
        PrepareConfig(text_key="")


def test_readers_pretty_printed_json(tmp_path):
    """A .json file of pretty-printed objects (json.dumps(obj, indent=2), once or one after
    another) was one malformed record per line: each object is now a record, numbered by the line
    it starts on; where one breaks, the rest of the file is one quarantined record."""
    text = "word " * 40
    one = json.dumps({"id": 1, "text": text}, indent=2)
    (tmp_path / "one.json").write_text(one + "\n")
    assert [(r[1], r[2], r[3], r[5]) for r in read_records(tmp_path / "one.json", 1 << 20)] == [
        (1, OK, "", text)
    ]
    objs = [{"text": text}, {"title": "no text"}, {"text": text + "again"}]
    body = "\n".join(json.dumps(o, indent=2) for o in objs)  # each object is 3 lines
    (tmp_path / "many.json").write_text(body + '\n\n{\n  "text": "cut off')
    assert reasons(tmp_path / "many.json") == [
        (1, OK, ""), (4, QUARANTINE, "missing_text"), (7, OK, ""), (11, QUARANTINE, "malformed_json"),
    ]  # fmt: skip


def test_normalize():
    assert normalize_text("e\u0301t\u00e9\x00\x07  a\t\tb \r\n\n\n\nc  ") == "\u00e9t\u00e9 a b\n\nc"
    # the fast path (rewrites only where a C-level test says they change something) = every rewrite
    alphabet = list(
        " \t\n\r abZ.,\x00\x07\x0b\x1f\x7f\x85\x9f\u00a0\u3000\u200b\u2028\u2029\ufeff\u0301e\u00e9\u2003🙂"
    )
    rng = random.Random(0)
    for _ in range(20_000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert normalize_text(t) == normalize_text_reference(t), repr(t)
    spacy = [" ", " ", "  ", "\n", "\n", "a", "b", "\r", "\t", "\x00"]  # runs of spaces around newlines
    for _ in range(20_000):
        t = "".join(rng.choice(spacy) for _ in range(rng.randint(0, 30)))
        assert normalize_text(t) == normalize_text_reference(t), repr(t)


def test_minhash_lsh_and_seen_set(docs):
    mh = MinHasher(num_perm=128, shingle_words=5, threshold=0.8)
    assert lsh_params(128, 0.8) == (mh.bands, mh.rows) and mh.bands * mh.rows == 128
    a = docs[0] + " " + docs[1]
    words = a.split()
    near = " ".join(words[:-3] + ["changed", "tail", "words"])  # ~ 97% shingle overlap
    sa, sn, so = mh.signature(a), mh.signature(near), mh.signature(docs[2])
    assert mh.jaccard(sa, sn) > 0.85 and mh.jaccard(sa, so) < 0.1
    assert np.array_equal(sa, MinHasher(128, 5, 0.8).signature(a))  # stable across instances
    big = ("lorem ipsum dolor " * 200_000).strip()  # 600k words: chunked, bounded memory
    assert mh.signature(big).shape == (128,)

    # words: runs of letters/digits/_ or non-ASCII, case-folded (ASCII bytewise, the rest by str.lower)
    assert np.array_equal(
        mh.shingles("Hello, WORLD! foo_bar 42 ÉCOLE naïve (x)"),
        mh.shingles("hello world foo_bar 42 école NAÏVE x"),
    )
    assert np.array_equal(
        mh.shingles("Hello, WORLD! Zz ab-cd @ef"), mh.shingles("hello world zz ab cd ef")
    )  # ASCII
    assert not np.array_equal(mh.shingles("a b c d e"), mh.shingles("a b c d f"))
    # each distinct word its own hash: lengths across the 8/16-byte key words and the long path
    rng = random.Random(2)
    vocab = sorted({"".join(rng.choice("ab_é") for _ in range(rng.randint(1, 40))) for _ in range(3000)})
    one = MinHasher(16, shingle_words=1)
    shingles = one.shingles(" ".join(vocab))
    assert len(shingles) == len(vocab) == len(set(shingles.tolist()))
    assert np.array_equal(shingles, np.concatenate([one.shingles(w) for w in vocab]))
    # read in place from one buffer (the chunk pass's new chunks, a space before each; only the
    # non-ASCII ones lowercased anew, some changing length): the same
    texts = [
        " ".join(rng.sample(vocab, 3)) + rng.choice(["", " ΣΑΣ", " İ", " \udcff", " ABC"]) for _ in range(500)
    ]
    enc = [t.encode("utf-8", "surrogatepass") for t in texts]
    joined, starts, ends = byte_runs(enc)
    for got, want in zip(mh.words_runs(b" " + joined, starts + 1, ends + 1), mh.words_batch(texts)):
        assert np.array_equal(got, want)

    s = SeenSet(capacity=16)
    keys = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=5000)
    for k in keys[:2500]:
        s.add(int(k))
    assert all(int(k) in s for k in keys[:2500]) and not any(int(k) in s for k in keys[2500:])
    assert s.count == 2500 and s.table.size >= 5000  # grew, load <= 1/2
    # batched probes/inserts (vectorized linear probing) = a Python set, with colliding small keys
    rng = np.random.default_rng(1)
    s, ref = SeenSet(capacity=16), set()
    for _ in range(100):
        add = rng.integers(-40, 40, size=rng.integers(0, 30))
        query = rng.integers(-50, 50, size=40)
        assert s.contains_many(query).tolist() == [(int(q) or 1) in ref for q in query]
        s.add_many(add)
        ref |= {int(k) or 1 for k in add}
        assert s.count == len(ref) and s.count * 2 <= s.table.size
    d = Deduplicator(exact=True, near=True)
    ka, kn, ko = (mh.band_keys(x).tolist() for x in (sa, sn, so))
    assert [d.check(1, ka), d.check(1, ko), d.check(2, kn), d.check(3, ko)] == [
        "",
        "duplicate_exact",
        "near_duplicate",
        "",
    ]


def test_minhash_estimates_jaccard_and_batches(docs):
    # one-permutation hashing + optimal densification: P[sig_a[i] == sig_b[i]] = Jaccard, also
    # for short documents with many empty bins; the mean over seeds must sit on the true value
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    for n, shared in ((300, 200), (12, 9)):  # ~300 shingles for 128 bins; 8 shingles: bins mostly empty
        a = [vocab[j] for j in rng.integers(0, 5000, n)]
        b = a[:shared] + [vocab[j] for j in rng.integers(0, 5000, n - shared)]
        sa, sb = (set(MinHasher(128, 5).shingles(" ".join(x)).tolist()) for x in (a, b))
        true = len(sa & sb) / len(sa | sb)
        est = [MinHasher(128, 5, 0.8, seed).signatures([" ".join(a), " ".join(b)]) for seed in range(200)]
        assert np.mean([MinHasher.jaccard(x, y) for x, y in est]) == pytest.approx(true, abs=0.02)
    mh = MinHasher(64, 5, 0.8)
    texts = docs[:50] + ["", "one two", "!!! ???", "Ünïcödé wörds " * 10]
    batch = mh.signatures(texts)
    assert all(np.array_equal(batch[i], mh.signature(t)) for i, t in enumerate(texts))
    assert np.array_equal(mh.signatures(texts, max_bytes=500), batch)  # grouping does not matter
    keys = mh.band_keys_batch(batch)
    assert keys.shape == (len(texts), mh.bands) and np.array_equal(keys[3], mh.band_keys(batch[3]))


def test_minhash_signatures_equal_the_definition():
    """One hash per shingle, its bin's minimum; an empty bin copies the first originally non-empty
    bin of its own order (a bin filled before it is no source): the loop over bins, per document."""
    from pipelines.dedup import _SENTINEL, _mix64

    rng = np.random.default_rng(5)
    for P in (1, 2, 16, 128):
        mh = MinHasher(P, seed=int(P))
        order = mh.borrow_T.T  # [bin]: its choices in order
        sizes = rng.choice([1, 2, 5, 40, 150, 600], size=60)
        d_S = np.repeat(np.arange(sizes.size), sizes)
        s_S = rng.integers(0, 2**63, size=d_S.size, dtype=np.uint64)
        got = mh.signatures_from_shingles(sizes.size, s_S, d_S)  # (in C where built)
        assert np.array_equal(got, mh.signatures_from_shingles_numpy(sizes.size, s_S, d_S))
        h_S = _mix64(s_S ^ mh.salt)
        for d in range(sizes.size):
            sig = [int(_SENTINEL)] * P
            for h in h_S[d_S == d].tolist():
                b = ((h >> 32) * P) >> 32
                sig[b] = min(sig[b], h & 0xFFFFFFFF)
            full = [v != int(_SENTINEL) for v in sig]
            want = [
                v if full[i] else sig[next(j for j in order[i].tolist() if full[j])]
                for i, v in enumerate(sig)
            ]
            assert got[d].tolist() == want


@pytest.mark.parametrize("exact,near", [(True, True), (True, False), (False, True)])
def test_dedup_batches_equal_one_by_one(exact, near):
    def reference(hashes, keys):  # the rule, one document at a time, with Python sets
        seen, bands, out = set(), set(), []
        for h, ks in zip(hashes, keys):
            h, ks = h or 1, [k or 1 for k in ks]
            if exact and h in seen:
                out.append("duplicate_exact")
            elif near and any(k in bands for k in ks):
                out.append("near_duplicate")
            else:
                out.append("")
                seen.add(h)
                bands.update(ks)
        return out, seen, bands

    rng = np.random.default_rng(0)
    d, hashes, keys, got = Deduplicator(exact=exact, near=near), [], [], []
    for i in range(120):
        n = int(rng.integers(0, 40))
        if i % 2:  # small key ranges: many duplicates inside a batch and across batches
            h, k = rng.integers(0, 80, size=n), rng.integers(0, 500, size=(n, 4))
        else:  # mostly unique keys, a few repeated from earlier batches or within this one
            h, k = rng.integers(0, 1 << 40, size=n), rng.integers(0, 1 << 40, size=(n, 4))
            for j in np.flatnonzero(rng.random(n) < 0.2):
                src = int(rng.integers(0, len(hashes) + j)) if hashes or j else None
                if src is not None:
                    old_h, old_k = (
                        (hashes[src], keys[src])
                        if src < len(hashes)
                        else (h[src - len(hashes)], k[src - len(hashes)])
                    )
                    if rng.random() < 0.5:
                        h[j] = old_h
                    k[j, int(rng.integers(0, 4))] = old_k[int(rng.integers(0, 4))]
        got += d.check_batch(h, k)
        hashes += h.tolist()
        keys += k.tolist()
    want, seen, bands = reference(hashes, keys)
    assert got == want
    # the tables hold exactly the kept documents' keys, each once (repeats inside a document too)
    assert d.exact_seen.count == (len(seen) if exact else 0) and d.band_seen.count == (
        len(bands) if near else 0
    )
    assert {""} | ({"duplicate_exact"} if exact else set()) | ({"near_duplicate"} if near else set()) == set(
        got
    )
    one = Deduplicator(exact=True, near=True)  # a one-document batch repeating a key
    assert one.check_batch([5], [[7, 7, 8, 9]]) == [""] and one.band_seen.count == 3
    assert Deduplicator(exact=True, near=False).check_batch([5, 5, 6], np.zeros((3, 0))) == [
        "",
        "duplicate_exact",
        "",
    ]


def test_one_line_is_the_whitespace_regex():
    import re

    from pipelines.quality import one_line

    alphabet = list(" \t\n\r\x0b\x0c\x1c\x1f\x85\u00a0\u2003\u3000\u200b ab.é日")
    rng = random.Random(3)
    for _ in range(20_000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert one_line(t) == re.sub(r"\s+", " ", t).strip(), repr(t)


def test_quality_default_model_and_perplexity(docs):
    path = default_quality_model()
    assert default_quality_model() == path  # cached
    q = QualityScorer(path)
    rng = random.Random(1)
    words = " ".join(docs).split()
    junk = [synth_junk(rng, words, k) for k in (1, 2, 4) for _ in range(20)]
    good = q.scores(docs[-60:])
    bad = q.scores(junk)
    assert np.mean(np.array(good) > 0.5) > 0.9 and np.mean(np.array(bad) > 0.5) < 0.1
    lm = UnigramLM.fit(docs[:300])
    assert lm.perplexity(docs[350]) < lm.perplexity(junk[-1]) / 5
    with pytest.raises(UserError, match="no label"):
        QualityScorer(path, label="__label__nope")


def test_cli_quality_train(tmp_path, docs):
    rng = random.Random(0)
    words = " ".join(docs).split()
    lines = [f"__label__hq {' '.join(d.split())}" for d in docs[:100]]
    lines += [f"__label__lq {synth_junk(rng, words, 2)}" for _ in range(100)]
    (tmp_path / "lab.txt").write_text("\n".join(lines))
    run = SimpleNamespace(prepare=PrepareConfig())
    args = SimpleNamespace(input=str(tmp_path / "lab.txt"), output=str(tmp_path / "m.bin"))
    assert cli_quality_train(run, args) == 0
    assert QualityScorer(tmp_path / "m.bin", "__label__hq").scores([docs[200]])[0] > 0.5
    (tmp_path / "one.txt").write_text("__label__a text\n")
    with pytest.raises(UserError, match="two labels"):
        cli_quality_train(
            run, SimpleNamespace(input=str(tmp_path / "one.txt"), output=str(tmp_path / "x.bin"))
        )


def test_domain_filter_and_topics(all_docs):
    email = [d["text"] for d in all_docs if d["id"].startswith("email/")]
    other = [d["text"] for d in all_docs if not d["id"].startswith(("email/", "pydoc"))]
    f = DomainFilter(email[:40], other[:300])
    s_in, s_out = f.similarity(email[40:100]), f.similarity(other[300:500])
    assert s_in.mean() > s_out.mean() + 0.15
    assert (s_in >= 0.7).mean() > 2 * (s_out >= 0.7).mean()  # the seed's threshold separates
    topics = topic_summary(
        [(t, i % 3 > 0, "low_quality") for i, t in enumerate(email[:30] + other[:90])], k=4
    )
    assert sum(c["size"] for c in topics) == 120 and all(c["top_terms"] for c in topics)
    assert sum(c["kept"] + sum(c["dropped"].values()) for c in topics) == 120
    assert topics == _topics_dense(
        [(t, i % 3 > 0, "low_quality") for i, t in enumerate(email[:30] + other[:90])], 4
    )


def _topics_dense(samples, k, seed=0, top=8):
    """topic_summary on dense (n, dim) TF-IDF rows, each bucket's words counted: its reference."""
    from collections import Counter

    from pipelines.domain import _bucket, _normalize, kmeans, words_of

    dim = 1 << 12
    words = [words_of(t) for t, _, _ in samples]
    tf = np.zeros((len(samples), dim), dtype=np.float32)
    for i, ws in enumerate(words):
        for b, c in Counter(_bucket(w, dim) for w in ws).items():
            tf[i, b] = 1.0 + np.log(np.float32(c))
    x = _normalize(tf * (np.log((1 + len(samples)) / (1 + (tf > 0).sum(axis=0))) + 1.0))
    _, assign = kmeans(x, k, seed)
    counts = Counter(w for ws in words for w in ws)
    vocab = {}
    for w in counts:
        vocab.setdefault(_bucket(w, dim), Counter())[w] = counts[w]
    out = []
    for j in sorted(set(assign.tolist())):
        members = np.flatnonzero(assign == j)
        weight = x[members].sum(axis=0)
        terms = [
            vocab[b].most_common(1)[0][0] for b in np.argsort(-weight)[:top] if weight[b] > 0 and b in vocab
        ]
        dropped = Counter(samples[i][2] for i in members if not samples[i][1])
        kept = int(sum(samples[i][1] for i in members))
        out.append(
            {
                "cluster": j,
                "size": int(members.size),
                "kept": kept,
                "dropped": dict(dropped),
                "top_terms": terms,
            }
        )
    return sorted(out, key=lambda c: -c["size"])


def test_topic_reservoir_is_uniform_and_batch_independent():
    from pipelines.prepare import _Reservoir

    n, size = 2000, 50
    words = [f"doc {i}" for i in range(n)]
    texts = pa.chunked_array([pa.array(words[:700]), pa.array(words[700:])])  # (a block's chunks)
    kept, reason = np.ones(n, dtype=bool), [""] * n

    def sample(seed, cuts):
        r = _Reservoir(size, seed)
        for a, b in zip([0, *cuts], [*cuts, n]):
            r.offer(texts, np.arange(a, b), kept, reason)
        return [int(t.split()[1]) for t, _, _ in r.items]

    assert sample(7, [10, 30, 1000]) == sample(7, [1500]) and len(sample(7, [])) == size
    # a row at a time is Algorithm R itself: a batch's slots replaced twice hold the later row
    assert sample(3, []) == sample(3, list(range(1, n)))
    hits = np.bincount(np.concatenate([sample(seed, [100, 700]) for seed in range(400)]), minlength=n)
    # each row is in the sample with probability size / n = 2.5%: 10 per 400 runs, early and late alike
    assert abs(hits[: n // 2].mean() - 10) < 0.6 and abs(hits[n // 2 :].mean() - 10) < 0.6


def test_kmeans_equals_the_per_cluster_loop():
    """Centroid sums as one product, an empty cluster keeping its centroid, and the stop once
    assignments repeat: the same result as summing each cluster's rows for every iteration."""
    from pipelines.domain import SparseRows, _normalize, kmeans

    def reference(x, k, seed, iters=20):
        rng = np.random.default_rng(seed)
        centers = [int(rng.integers(len(x)))]
        for _ in range(1, k):
            d = np.maximum(1.0 - (x @ x[centers].T).max(axis=1), 0) ** 2
            centers.append(
                int(rng.choice(len(x), p=d / d.sum())) if d.sum() > 0 else int(rng.integers(len(x)))
            )
        c = x[centers].copy()
        for _ in range(iters):
            assign = np.argmax(x @ c.T, axis=1)
            for j in range(k):
                if (assign == j).any():
                    c[j] = x[assign == j].sum(axis=0)
            c = _normalize(c)
        return c, assign

    rng = np.random.default_rng(0)
    for n, k in ((200, 5), (30, 12), (7, 7)):  # many clusters for few points: some stay empty
        x = _normalize(np.abs(rng.normal(size=(n, 16))) ** 3 * (rng.random((n, 16)) < 0.3))
        c, assign = kmeans(x, k, seed=3)
        c_ref, assign_ref = reference(x, k, seed=3)
        assert np.array_equal(assign, assign_ref)
        np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)
        # the same matrix by its non-zero cells (rows of zeros included): the same clustering
        row, col = np.nonzero(x)
        c_sp, assign_sp = kmeans(SparseRows(row, col, x[row, col], x.shape), k, seed=3)
        assert np.array_equal(assign_sp, assign_ref)
        np.testing.assert_allclose(c_sp, c_ref, rtol=1e-5, atol=1e-6)


def test_cleaner_stages(docs):
    s = CleanSettings(
        normalize=True, min_words=32, max_chars=2000, oversize="drop", dedup_exact=True, dedup_near=True,
        minhash_perms=64, shingle_words=5, near_threshold=0.8, seed=0,
    )  # fmt: skip
    long = docs[0] * (2000 // len(docs[0]) + 1)
    rows = [
        ("f", 1, OK, "", "", docs[0]),
        ("f", 2, OK, "", "", "too few words here"),
        ("f", 3, OK, "", "", long),
        ("f", 4, QUARANTINE, "malformed_json", "{", None),
        ("f", 5, OK, "", "", "\x00\x01   "),
    ]
    out = Cleaner(s).clean_rows(rows, read_seconds=0.25).to_pydict()
    assert out["source"] == ["f"] * 5 and out["line"] == [1, 2, 3, 4, 5] and out["excerpt"][3] == "{"
    from pipelines.clean import TIMED

    seconds = dict(zip(TIMED, np.array(out["seconds"]).T))  # (rows, TIMED) -> per stage
    assert seconds["read"].tolist() == [0.25, 0, 0, 0, 0]
    assert out["status"] == [OK, DROP, DROP, QUARANTINE, DROP]
    assert out["reason"] == ["", "too_short", "too_long", "malformed_json", "empty"]
    assert out["text"][1:] == [None] * 4 and len(out["band_keys"][0]) == MinHasher(64, 5, 0.8).bands
    assert seconds["normalize"][0] > 0 and seconds["normalize"][1:].tolist() == [0.0] * 4  # (on row 0)
    assert np.isnan(out["quality"]).all()  # stage off: no score

    # decisions on the worker: quality below threshold dropped (text kept for the topic sample, no
    # dedup keys, no tokens); with a tokenizer, kept rows carry their tokens + eos
    from dsv3ray.tokenizer import train_tokenizer

    tok = train_tokenizer(docs[:50], vocab_size=400)
    junk = " ".join(["zzz qqq"] * 40)
    s2 = CleanSettings(
        normalize=True, min_words=32, max_chars=10**6, oversize="split", dedup_exact=True, dedup_near=True,
        minhash_perms=64, shingle_words=5, near_threshold=0.8, seed=0,
        quality_model=default_quality_model().read_bytes(), quality_threshold=0.5,
        tokenizer_json=tok.hf.to_str(), max_doc_tokens=4096, eval_fraction=0.0,
    )  # fmt: skip
    rows = [("f", 1, OK, "", "", docs[1]), ("f", 2, OK, "", "", junk), ("f", 3, OK, "", "", "short")]
    out = Cleaner(s2).clean_rows(rows).to_pydict()
    assert out["reason"] == ["", "low_quality", "too_short"] and out["status"] == [OK, DROP, DROP]
    assert out["quality"][0] >= 0.5 > out["quality"][1] and np.isnan(out["quality"][2])
    assert out["text"][:2] == [normalize_text(docs[1]), junk] and out["text"][2] is None
    assert out["tokens"][0] == tok.encode(normalize_text(docs[1])) + [tok.eos_id]
    assert out["tokens"][1:] == [[], []] and out["band_keys"][1:] == [[], []]
    assert out["pieces"] == [-(-(len(out["tokens"][0]) - 1) // 4096), 0, 0] and out["eval"] == [False] * 3


def test_shard_rows_uint16_int32_and_lists_of_earlier_versions(tmp_path):
    """Ids are stored in the narrowest dtype the vocabulary allows and read back exactly, from
    any slice of a column; list<int32> shards (earlier versions) still read; bad widths fail."""
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.int32
    rng = np.random.default_rng(0)
    for vocab in (50, 65_536, 129_280):
        rows = rng.integers(0, vocab, size=(10, 5)).astype(np.int32)
        w = ShardWriter(tmp_path / str(vocab), rows_per_shard=4, dtype=token_dtype(vocab))
        w.add_rows(rows)
        w.flush()
        t = pq.read_table(tmp_path / str(vocab))
        assert (
            t.num_rows == 10
            and w.shards == 3
            and t.schema.metadata[b"dsv3ray.token_dtype"] in (b"<u2", b"<i4")
        )
        got = rows_from_arrow(t.column("input_ids"), 5)  # a chunked column (one chunk per shard)
        assert got.dtype == token_dtype(vocab) and np.array_equal(got, rows)
        assert np.array_equal(rows_from_arrow(t.column("input_ids").combine_chunks()[3:7], 5), rows[3:7])
    with pytest.raises(ValueError, match="outside uint16"):
        w = ShardWriter(tmp_path / "over", 4, token_dtype(100))
        w.add_rows(np.array([[1, 70_000]], np.int32))
        w.flush()
    assert w.shards == 0 and w.num_rows == 0  # (nothing counted that was not written)
    old = pa.array([[1, 2, 3], [4, 5, 6]], pa.list_(pa.int32()))
    assert np.array_equal(rows_from_arrow(old[1:], 3), [[4, 5, 6]])
    with pytest.raises(ValueError, match="rows have 3 tokens"):
        rows_from_arrow(old, 4)
    with pytest.raises(ValueError, match="rows have 1.5 tokens"):
        rows_from_arrow(pa.array([b"123456"], pa.binary(6)), 4)
    with pytest.raises(ValueError, match="rows have 3 tokens"):  # told the dtype: never misread
        rows_from_arrow(pa.array([b"123456"], pa.binary(6)), 6, "uint16")
    assert rows_from_arrow(pa.array([b"\x01\x00\x02\x00"], pa.binary(4)), 1, "int32").tolist() == [[131073]]


def test_shard_writer_in_the_background_writes_the_same_shards_and_reports_errors(tmp_path):
    """The prepare driver's writer thread (background=True) writes byte for byte the shards the
    caller's thread would; a write that fails raises in the caller, at close() or the next flush."""
    rows = np.random.default_rng(0).integers(0, 1000, size=(50, 9))
    for background in (False, True):
        w = ShardWriter(tmp_path / str(background), 7, token_dtype(1000), background, vocab_size=1000)
        for k in range(0, 50, 6):
            w.add_rows(rows[k : k + 6])
        w.flush()
        w.close()
        assert w.num_rows == 50 and w.shards == 8
        assert np.array_equal(w.counts_V, np.bincount(rows.reshape(-1), minlength=1000))
    sync, bg = (sorted((tmp_path / d).iterdir()) for d in ("False", "True"))
    assert [f.name for f in sync] == [f.name for f in bg]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(sync, bg))
    w = ShardWriter(tmp_path / "over", 4, token_dtype(100), background=True)
    w.add_rows(np.array([[1, 70_000]], np.int32))
    w.flush()
    with pytest.raises(ValueError, match="outside uint16"):  # (checked in the writer's thread)
        w.close()
    w = ShardWriter(tmp_path / "gone", 2, background=True)
    (tmp_path / "gone").rmdir()  # every write fails
    w.add_rows(np.zeros((2, 3), np.int64))
    with pytest.raises(OSError):
        w.close()
    with pytest.raises(OSError):
        w.close()  # (still: the shard was not written)


def test_shard_writer_writes_a_shard_a_row_group_at_a_time(tmp_path, monkeypatch):
    """Rows reach the file as they come, a row group once GROUP_BYTES of them are buffered (what is
    left at the end of a run is at most one group): the same rows, sample ids and counts as one
    group per shard, shards cut at exactly rows_per_shard rows, a flush ends a shard mid-group; an
    id outside the dtype in a later group raises (the groups before it counted, not it)."""
    monkeypatch.setattr(ShardWriter, "GROUP_BYTES", 5 * 9 * 2)  # 5 rows of 9 uint16 ids
    rows = np.random.default_rng(1).integers(0, 1000, size=(61, 9))
    for background in (False, True):
        w = ShardWriter(tmp_path / str(background), 12, token_dtype(1000), background, vocab_size=1000)
        for k in range(0, 40, 7):
            w.add_rows(rows[k : min(k + 7, 40)])
        w.flush()  # (a shard of 4 rows: 40 = 3 * 12 + 4)
        w.add_rows(rows[40:])
        w.flush()
        w.close()
        assert w.num_rows == 61 and w.shards == 6
        assert np.array_equal(w.counts_V, np.bincount(rows.reshape(-1), minlength=1000))
        files = sorted((tmp_path / str(background)).iterdir())
        assert [pq.read_metadata(f).num_rows for f in files] == [12, 12, 12, 4, 12, 9]
        assert [pq.read_metadata(f).num_row_groups for f in files] == [2, 2, 2, 1, 1, 1]
        t = pq.read_table(files)
        assert t.column("sample_id").to_pylist() == list(range(61))
        assert np.array_equal(rows_from_arrow(t.column("input_ids"), 9), rows)
    sync, bg = (sorted((tmp_path / d).iterdir()) for d in ("False", "True"))
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(sync, bg))
    for background in (False, True):
        w = ShardWriter(tmp_path / f"over{background}", 12, token_dtype(100), background, vocab_size=100)
        w.add_rows(np.ones((5, 9), np.int64))  # (a group)
        bad = np.ones((6, 9), np.int64)
        bad[2, 3] = 70_000
        with pytest.raises(ValueError, match="outside uint16"):
            w.add_rows(bad)
            w.flush()
            w.close()
        assert w.counts_V.sum() == 5 * 9  # (the first group only)
        assert not list((tmp_path / f"over{background}").iterdir())  # (no incomplete shard)


def test_packer_rows_and_entropy(tmp_path):
    w = ShardWriter(tmp_path / "train", rows_per_shard=3, vocab_size=50)
    p = Packer(seq_len=7, writer=w)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=n).astype(np.int32) for n in (3, 20, 1, 9, 30)]
    for d in docs:
        p.add(np.concatenate([d, [0]]).astype(np.int32))
    total = sum(d.size + 1 for d in docs)
    tail = p.finish()
    assert tail == total % 8 and w.num_rows == total // 8 and w.shards == -(-w.num_rows // 3)
    table = pq.read_table(tmp_path / "train")
    assert table.column("sample_id").to_pylist() == list(range(w.num_rows))
    flat = np.concatenate([np.concatenate([d, [0]]) for d in docs])
    rows = rows_from_arrow(table.column("input_ids"), 8)
    assert rows.dtype == np.int32 and np.array_equal(rows.reshape(-1), flat[: 8 * w.num_rows])
    assert np.array_equal(w.counts_V, np.bincount(rows.reshape(-1), minlength=50))  # the written tokens
    ids_chunk = pq.ParquetFile(tmp_path / "train" / "part-00000.parquet").metadata.row_group(0).column(1)
    assert ids_chunk.compression == "ZSTD"
    assert unigram_entropy(np.array([5, 5, 0])) == pytest.approx(np.log(2))
    hashes = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, size=100_000).tolist()
    mask = eval_mask(np.array(hashes), 0.1)
    assert mask.sum() == pytest.approx(10_000, rel=0.05)
    assert mask.tolist() == [_is_eval(h, 0.1) for h in hashes]


def test_packer_copies_pieces_into_whole_row_groups(tmp_path, monkeypatch):
    """Ids given in any pieces (any integer dtype) fill the rows the writer takes as one row group
    or the rest of a shard, which reach the file uncopied: the same shards as rows written
    directly; an id the dtype cannot hold raises in the caller, with nothing of its piece added."""
    monkeypatch.setattr(ShardWriter, "GROUP_BYTES", 5 * 9 * 2)  # 5 rows of 9 uint16 ids
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 1000, size=61 * 9 + 4)
    cuts = np.sort(rng.choice(ids.size, 40, replace=False))
    pieces = [p.astype(rng.choice([np.int32, np.int64, np.uint16])) for p in np.split(ids, cuts)]
    w = ShardWriter(tmp_path / "packed", 12, token_dtype(1000), vocab_size=1000)
    p = Packer(seq_len=8, writer=w)
    handed = []
    add_rows = w.add_rows
    monkeypatch.setattr(w, "add_rows", lambda rows: (handed.append(rows), add_rows(rows)))
    for k in range(0, len(pieces), 3):
        p.add_parts(pieces[k : k + 3], 0, 999)
    assert p.finish() == 4 and p.tokens == 61 * 9
    assert [r.shape[0] for r in handed] == [5, 5, 2] * 5 + [1]  # (the last: what was left)
    assert all(r.dtype == np.uint16 for r in handed)
    direct = ShardWriter(tmp_path / "direct", 12, token_dtype(1000), vocab_size=1000)
    for row in ids[: 61 * 9].reshape(61, 9):  # (a row at a time: the writer forms the groups)
        direct.add(row)
    direct.flush()
    packed, want = (sorted((tmp_path / d).iterdir()) for d in ("packed", "direct"))
    assert [f.read_bytes() for f in packed] == [f.read_bytes() for f in want]
    assert np.array_equal(w.counts_V, direct.counts_V)
    p = Packer(seq_len=8, writer=ShardWriter(tmp_path / "over", 12, token_dtype(1000)))
    p.add(np.arange(5))
    with pytest.raises(ValueError, match="outside uint16"):
        p.add_parts([np.arange(3), np.array([1, 70_000])], 0, 70_000)
    with pytest.raises(ValueError, match="outside uint16"):
        p.add(np.array([-1, 2]))
    assert p.fill == 5  # (nothing of the calls that raised)
    p.add_parts([np.zeros(0, np.int32), np.arange(4), np.zeros(0, np.int64)], 0, 3)
    p.add_parts([], 0, 0)
    assert p.fill == 9


def test_packing_reads_a_blocks_chunks_as_the_combined_column(tmp_path):
    """A block of several tables (a chunked tokens column, chunks sliced) packs as the same
    table combined: the same shards, documents, pieces and truncated tokens."""
    from types import SimpleNamespace

    from pipelines.prepare import PrepareConfig, _Packing

    rng = np.random.default_rng(3)
    n = 200
    tokens = [np.append(rng.integers(1, 1000, rng.integers(0, 40)), 0).astype(np.int32) for _ in range(n)]
    table = pa.table({
        "tokens": pa.array(tokens, pa.list_(pa.int32())), "eval": rng.random(n) < 0.2,
        "pieces": np.ones(n, np.int64), "truncated_tokens": rng.integers(0, 3, n),
    })  # fmt: skip
    chunked = pa.concat_tables([table.slice(0, 70), table.slice(70, 1), table.slice(71)])
    kept = rng.random(n) < 0.7
    cfg = PrepareConfig(seq_len=15, rows_per_shard=20)
    out = {}
    for name, t in (("combined", table.combine_chunks()), ("chunked", chunked)):
        packing = _Packing(cfg, SimpleNamespace(vocab_size=1000), tmp_path / name)
        packing.add(t.slice(0, 120), kept[:120])
        packing.add(t.slice(120), kept[120:])
        tails = {split: p.finish() for split, p in packing.packers.items()}
        files = sorted((tmp_path / name).rglob("*.parquet"))
        out[name] = (
            tails,
            dict(packing.docs),
            packing.pieces,
            packing.truncated,
            [f.read_bytes() for f in files],
        )
    assert len(chunked.column("tokens").chunks) >= 3 and out["chunked"] == out["combined"]
    train = np.concatenate(
        [t for t, k, e in zip(tokens, kept, table.column("eval").to_pylist()) if k and not e]
    )
    assert out["combined"][0]["train"] == train.size % 16


def _is_eval(text_hash: int, eval_fraction: float) -> bool:
    """The eval rule for one document, in Python integers (the reference for eval_mask)."""
    return (text_hash % 1_000_000) < eval_fraction * 1_000_000


@pytest.mark.parametrize("truncate", [False, True])
def test_tokenize_documents_matches_one_document_at_a_time(docs, truncate):
    """The batch (flat ids, vectorized truncation and eos) equals the rule applied per document."""
    from dsv3ray.tokenizer import train_tokenizer
    from pipelines.pack import tokenize_documents

    tok = train_tokenizer(docs[:50], vocab_size=500)
    texts = [docs[0], "", "a", " two  spaces ", docs[1] * 3, docs[2], "x" * 200]
    hashes = [-(2**62), 3, 999_999, -5, 2**40 + 7, 0, 123_456]
    out = tokenize_documents(tok, texts, hashes, 40, 0.3, truncate, max_chars=250)
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        kept = ids[:40] if truncate else ids
        assert out["tokens"][i].as_py() == kept + [tok.eos_id], i
        assert out["pieces"][i].as_py() == max(1, -(-len(ids) // 40))
        assert out["truncated_tokens"][i].as_py() == len(ids) - len(kept)
        assert out["eval"][i].as_py() == _is_eval(hashes[i], 0.3)


def test_prepare_config_checks():
    with pytest.raises(ConfigError, match="prepare.oversize"):
        section_from_dict(PrepareConfig, {"oversize": "shrink"}, "prepare")
    with pytest.raises(ConfigError, match="prepare.near_threshold"):
        section_from_dict(PrepareConfig, {"near_threshold": 1.5}, "prepare")
    with pytest.raises(ConfigError, match="prepare.nope"):
        section_from_dict(PrepareConfig, {"nope": 1}, "prepare")


def test_demo_corpus_is_deterministic(tmp_path):
    a = write_demo_corpus(tmp_path / "a.jsonl", max_bytes=200_000)
    b = write_demo_corpus(tmp_path / "b.jsonl", max_bytes=200_000)
    assert a == b and a["bytes"] >= 200_000
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "text"} and len(first["text"].split()) > 5


def test_oversized_documents_encode_in_chunks_identically(docs):
    from dsv3ray.tokenizer import train_tokenizer
    from pipelines.pack import Tokenize, chunk_text

    tok = train_tokenizer(docs[:50], vocab_size=500)
    big = "  ".join(docs[:60])
    giant = big + " " + "x" * 3000  # one giant "word": cut inside it, nothing lost
    assert "".join(chunk_text(giant, 1000)) == giant and max(map(len, chunk_text(giant, 1000))) <= 1000
    table = pa.table({"text": [big], "text_hash": [1]})
    chunked = Tokenize(tok.hf.to_str(), 2048, 0.1, False, max_chars=1000).tokenize(table)
    whole = Tokenize(tok.hf.to_str(), 2048, 0.1, False, max_chars=10**9).tokenize(table)
    x = chunked.column("tokens")[0].as_py()
    assert x[-1] == tok.eos_id
    assert x == whole.column("tokens")[0].as_py()  # chunk cuts at spaces: the same tokens
    assert chunked.column("pieces")[0].as_py() == -(-(len(x) - 1) // 2048)
    cut = Tokenize(tok.hf.to_str(), 100, 0.1, True).tokenize(table)
    assert (
        len(cut.column("tokens")[0].as_py()) == 101
        and cut.column("truncated_tokens")[0].as_py() == len(x) - 101
    )


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_jsonl_lines_read_in_blocks_as_one_by_one(tmp_path, monkeypatch, block):
    """_line_blocks (a plain file read a block at a time) gives what reading it line by line with
    _readline_bounded gives: the same lines, oversized ones (inside a block, cut by its end,
    longer than a block, the file's last) with the same excerpt, blank lines, no final newline;
    whole files and byte ranges (a range: the lines that start before its end)."""
    import pipelines.readers as readers

    monkeypatch.setattr(readers, "_LINE_BLOCK", block)
    rng = random.Random(block)
    for trial in range(60):
        max_bytes = rng.choice([5, 20, 60, 1000])
        edge = [b"y" * max_bytes, b"y" * (max_bytes + 1)]  # (at the limit: kept; one over: not)
        parts = [
            rng.choice([b"", b" ", b'{"text": "ab"}', "{\"text\": \"é\" }".encode(), b"x" * rng.randint(0, 90), b"{bad", *edge])
            for _ in range(rng.randint(0, 30))
        ]  # fmt: skip
        data = b"\n".join(parts) + (b"\n" if rng.random() < 0.5 else b"")
        path = tmp_path / f"t{trial}.jsonl"
        path.write_bytes(data)

        def shown(lines):
            return [("over", x.head) if isinstance(x, readers._Oversized) else x for x in lines]

        def one_by_one(f, end, max_bytes):  # (the reader before blocks: a line at a time before end)
            out = []
            while end < 0 or f.tell() < end:
                raw, oversized = readers._readline_bounded(f, max_bytes)
                if not raw:
                    break
                out.append(("over", raw) if oversized else raw)
            return out

        cuts = sorted({0, len(data), *(rng.randint(0, len(data)) for _ in range(3))})
        for start, end in [(0, -1)] + list(zip(cuts[:-1], cuts[1:])):
            if start and data[start - 1 : start] != b"\n":
                continue  # (ranges start at a line's start: plan_work's cut)
            with open(path, "rb") as f:
                f.seek(start)
                got = [x for lines in readers._line_blocks(f, max_bytes, end) for x in shown(lines)]
            with open(path, "rb") as f:
                f.seek(start)
                want = one_by_one(f, end, max_bytes)
            assert got == want, (data, max_bytes, start, end)


def test_big_jsonl_is_read_in_ranges_with_exact_line_numbers(tmp_path):
    from pipelines.readers import plan_work

    p = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"doc {i} " * (i % 50 + 1)}) if i % 97 else "{bad" for i in range(5000)]
    lines[1234] = json.dumps({"text": "y" * 300_000})  # a huge line across a cut point
    p.write_text("\n".join(lines) + "\n")
    from pipelines.readers import SplitLines

    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines[:3]) + "\n")
    items = plan_work([small, p, tmp_path / "missing.jsonl"], split_bytes=50_000)
    assert len(items) > 10 and items[-1]["path"].endswith("missing.jsonl")
    ranges = [it for it in items if it["path"] == str(p)]
    assert [a["end"] for a in ranges[:-1]] == [b["start"] for b in ranges[1:]] and ranges[-1]["end"] == -1
    data = p.read_bytes()
    assert all(data[it["start"] - 1] == ord("\n") for it in ranges[1:])  # cut at line starts
    got = [r for it in items for r in read_records(it["path"], 1 << 20, it["start"], it["end"])]
    want = [r for f in (small, p, tmp_path / "missing.jsonl") for r in read_records(f, 1 << 20)]
    assert [r[:1] + r[2:] for r in got] == [r[:1] + r[2:] for r in want]  # the same rows, in order
    # the driver's line numbers (the ranges' readers number from 1), over tables of any cut
    numbering, lines_got = SplitLines(items), []
    for a in range(0, len(got), 777):
        part = got[a : a + 777]
        table = pa.table({"source": [r[0] for r in part], "line": [r[1] for r in part]})
        lines_got += numbering.of(table).tolist()
    assert lines_got == [r[1] for r in want]
    assert sum(r[3] == "malformed_json" for r in got) == 52 + 1 and lines_got[3 + 97] == 98  # (+ small.jsonl)
    # the last range reads to the end of the file: it is never taken for a JSON array or stream
    tail = tmp_path / "tail.jsonl"
    tail.write_text(json.dumps({"text": "a"}) + "\n[1, 2]\n" + json.dumps({"text": "b"}) + "\n")
    cut = len(json.dumps({"text": "a"})) + 1
    assert [(r[1], r[3], r[5]) for r in read_records(tail, 1 << 20, cut, -1)] == [
        (1, "not_an_object", None),
        (2, "", "b"),
    ]


def test_row_runs_equal_pyarrow_filter():
    """The packer's row selection (numpy) against pyarrow's filter + flatten, sliced arrays included."""
    from pipelines.prepare import _row_runs

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 30))
        arr = pa.array(
            [rng.integers(0, 100, rng.integers(0, 6)).astype(np.int32) for _ in range(n)],
            pa.list_(pa.int32()),
        )
        a, b = sorted(rng.integers(0, n + 1, 2).tolist())
        arr = arr.slice(a, b - a) if b > a else arr
        mask = rng.random(len(arr)) < 0.6
        mask[0] |= rng.random() < 0.3  # sometimes every row
        if mask.any():
            want = arr.filter(pa.array(mask)).flatten().to_numpy(zero_copy_only=False)
            runs = _row_runs(arr.offsets.to_numpy(), arr.values.to_numpy(), mask)
            assert np.array_equal(np.concatenate(runs), want)
            checked += 1
    assert checked > 200


def test_jsonl_lines_parse_as_with_json_alone():
    """orjson first, Python's json for whatever orjson refuses: every line gets the outcome the
    json-only path gives (text, quarantine reason and excerpt)."""
    from pipelines.readers import _parse_json_record, _parse_json_record_json

    lines = [
        b'{"text": "hello world"}', b'{"id": 3, "text": "caf\\u00e9 \xc3\xa9"}', b'{"text": "a", "text": "b"}',
        b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "tab\there"}', b'{"text": "x"} trailing', b'{"text": "\\u0000"}',
        b'{"text": "x", "n": NaN}', b'{"text": "x", "n": 1e500}', b'{"text": "x", "n": 123456789012345678901234567890}',
        b'{"text": "\\ud800"}', b'{"text": "\xc3\xa9\\udc00"}', b'{"text": "\\ud83d\\ude00"}', b'{"text": "bad \xff utf8"}', b'[1, 2]', b'"just a string"',
        b'{"no_text": 1}', b'{"text": null}', b'{"text": 5}', b'{"text": "' + b"\xe6\x97\xa5" * 300 + b'"}',
        b"[" * 1100 + b"]" * 1100, b'{"a": ' * 1050 + b"1" + b"}" * 1050, b'{"text": "ok"}\r\n', b"{", b"",
    ]  # fmt: skip
    rng = random.Random(5)
    alphabet = [
        b'{"text": "',
        b'"}',
        b"\\",
        b"u",
        b"d8",
        b"00",
        b"\xc3",
        b"\xa9",
        b"a",
        b" ",
        b",",
        b":",
        b"1",
        b"e9",
    ]
    lines += [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    outcomes = set()
    for i, raw in enumerate(lines):
        want = _parse_json_record_json(raw, "f", i)
        assert _parse_json_record(raw, "f", i) == want, raw[:80]
        outcomes.add(want[3])
    assert {
        "",
        "malformed_json",
        "invalid_utf8",
        "json_too_deep",
        "not_an_object",
        "missing_text",
    } <= outcomes


def test_normalize_batch_equals_normalize_text():
    """The batch path (every text in one pass over the batch joined, the ones beyond ASCII after
    their Unicode rules) gives normalize_text's result on fuzzed ASCII and mixed text: runs of
    spaces, tabs and newlines inside and at the ends, \r, control characters (C0, C1, zero-width),
    Unicode's other spaces at the ends, combining marks, lone surrogates, empty and all-whitespace
    texts; its UTF-8; and, where its C pass counted them (ASCII texts), str.split's words."""
    from pipelines import native
    from pipelines.clean import normalize_batch

    ascii_ = list(" \t\n\r\x0b\x0c\x1c\x1f\x00\x07\x7f abZ.,") + ["  ", "\n\n", " \n "]
    other = [
        "é",
        "\u00a0",
        "\u3000",
        "\u2003",
        "\x85",
        "\u200b",
        "e\u0301",
        "\udcff",
        "\u2028",
        "\ufeff",
        "🙂",
    ]
    rng = random.Random(0)
    texts = ["", " ", "\n", "a", "a b", "a  b", "a\tb", "a \t b", "a\nb", "a \nb", "a\n b", "a\n\n\nb", " a",
             "a ", "\x1fa", "\r\n\r\na\r\r\rb\r", "é", " é ", "\u2003a \u2003", "a\u00a0\u00a0b", "\u2003 \n x",
             "x \u2003 ", "é\r\n\r\n\r\nb", "\u3000", "\u200b", " \u200b a"]  # fmt: skip
    for _ in range(30_000):
        pool = ascii_ if rng.random() < 0.7 else ascii_ + other
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 30))))
    for lo in (0, 7, 1000):
        batch = texts[lo : lo + 9000]
        out, parts, words = normalize_batch(batch)
        assert out == [normalize_text_reference(t) for t in batch]
        assert parts == [o.encode("utf-8", "surrogatepass") for o in out]
        counted = words >= 0  # (where the C pass ran: the ASCII texts) str.split's words
        assert [len(o.split()) for o, c in zip(out, counted) if c] == words[counted].tolist()
        assert counted.sum() == sum(t.isascii() for t in batch) or native.library() is None
    out, parts, words = normalize_batch([])
    assert (out, parts, words.size) == ([], [], 0)


def test_tf_vectors_counts_each_texts_buckets():
    """1 + log(count) of each hashed word per text, 0 elsewhere: texts without words, repeated
    words, words sharing a bucket (a small dim)."""
    from pipelines.domain import _bucket, tf_vectors, words_of

    texts = ["", "alpha beta alpha gamma alpha", "the of and", "Beta beta BETA delta", "x" * 50 + " y z w v"]
    texts += [("alpha " * (i % 5 + 1) + "beta gamma ") * 4_000 for i in range(60)]  # > one 4M group
    for dim in (7, 4096):
        want = np.zeros((len(texts), dim), dtype=np.float32)
        for i, t in enumerate(texts):
            counts = {}
            for w in words_of(t):
                counts[_bucket(w, dim)] = counts.get(_bucket(w, dim), 0) + 1
            for b, c in counts.items():
                want[i, b] = 1.0 + np.log(np.float32(c))
        assert np.array_equal(tf_vectors(texts, dim), want)
    assert tf_vectors([], 16).shape == (0, 16)


def test_words_of_lowercase_ascii_text_as_the_unicode_pattern_finds_them():
    """ASCII text's words by runs of a-z (every other byte a space, then split): the same words as
    the Unicode pattern finds (letters only: no digits, no underscore, two or more; a Kelvin sign
    lowers to an ASCII k)."""
    import re

    from pipelines.domain import MAX_EMBED_CHARS, STOP, words_of

    unicode_words = re.compile(r"[^\W\d_]{2,}", re.UNICODE)
    rng = random.Random(0)
    alphabet = "abcXYZ019_ -.\n\té\u212a"
    texts = ["", "The cat_sat on 2 mats", "K\u212aelvin", "\u212a" * 3, "naïve café x2y"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(80))) for _ in range(500)]
    texts += ["".join(rng.choice(alphabet[:13]) for _ in range(rng.randrange(80))) for _ in range(500)]
    for t in texts:
        want = [w for w in unicode_words.findall(t[:MAX_EMBED_CHARS].lower()) if w not in STOP]
        assert words_of(t) == want, t


@pytest.mark.parametrize("native_on", [True, False])
def test_word_runs_are_words_of_each_text(native_on, monkeypatch):
    """_word_runs (all texts in one buffer, cut and stop-filtered in numpy) finds each text's
    words_of, in order, with their texts and crc32s: stop words and one-letter words gone,
    non-ASCII texts, words that share a stop word's length, empty texts; crc32 in C and by zlib."""
    import zlib

    from pipelines import domain, native

    if not native_on:
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler")
    rng = random.Random(1)
    stop = sorted(domain.STOP)
    pool = stop + ["thy", "ofs", "whicz", "shoulder", "tha", "été", "naïve", "x", "ab"]
    texts = ["", "   ", "The cat sat ON the mat, which should go.", "naïve café which été", "a b c"]
    texts += [" ".join(rng.choice(pool) for _ in range(rng.randrange(30))) for _ in range(300)]
    texts += ["".join(rng.choice("abc XYZé.\n") for _ in range(rng.randrange(60))) for _ in range(300)]
    runs = domain._word_runs(texts)
    got = [runs.buf[i:j].decode("utf-8") for i, j in zip(runs.start.tolist(), runs.end.tolist())]
    want = [w for t in texts for w in domain.words_of(t)]
    assert got == want
    assert runs.text.tolist() == [i for i, t in enumerate(texts) for _ in domain.words_of(t)]
    assert runs.crc.tolist() == [zlib.crc32(w.encode("utf-8")) for w in want]
    assert domain._word_runs([]).start.size == 0


def test_a_worker_keeps_one_runs_object_and_drops_it_when_idle(monkeypatch):
    """A worker process's tasks of one run share what the first one built (the cleaner, its
    caches warm); a task of another run replaces it; IDLE_S after the last task ended (none
    running) it is dropped, so an idle worker of a long-lived cluster holds nothing. What a build
    leaves alive is out of the collector's full passes (frozen) until then."""
    import gc
    import time

    from pipelines.prepare import _Kept

    monkeypatch.setattr(_Kept, "IDLE_S", 0.2)
    kept, built = _Kept(), []

    def build(name):
        built.append(name)
        return {"run": name}

    with kept.use("a", lambda: build("a")) as first:
        with kept.use("a", lambda: build("a")) as again:  # (a second task of the run meanwhile)
            assert again is first
    with kept.use("a", lambda: build("a")) as later:
        assert later is first and built == ["a"]
    with kept.use("b", lambda: build("b")) as other:
        assert other == {"run": "b"} and built == ["a", "b"]
        assert gc.get_freeze_count() > 0
        time.sleep(0.5)  # a running task is never reaped
        assert kept.value is other
    deadline = time.time() + 5
    while kept.value is not None and time.time() < deadline:
        time.sleep(0.02)
    assert kept.value is None and kept.key is None
    with kept.lock:  # (the reaper's drop done)
        assert gc.get_freeze_count() == 0  # (unfrozen when dropped)
    with kept.use("b", lambda: build("b")):  # (built again when the run goes on after a pause)
        assert built == ["a", "b", "b"]
    gc.unfreeze()  # (this test's process: as it was)


def test_group_work_packs_small_files_in_order(tmp_path):
    """Consecutive small whole files share a task until their bytes reach the target (or the file
    cap); a big file and each cut range are tasks of their own; nothing is lost or reordered."""
    from pipelines.readers import group_work, plan_work

    line = json.dumps({"text": "words " * 40}) + "\n"  # 253 bytes
    files = []
    for i in range(10):
        (tmp_path / f"s{i}.jsonl").write_text(line)
        files.append(tmp_path / f"s{i}.jsonl")
    (tmp_path / "big.jsonl").write_text(line * 20)  # 5 KB: cut into ranges of ~1 KB
    (tmp_path / "whole.txt").write_text("x" * 1500)  # a whole file over the target
    order = [*files[:5], tmp_path / "big.jsonl", tmp_path / "whole.txt", *files[5:], tmp_path / "gone.jsonl"]
    items = plan_work(order, split_bytes=1024)
    tasks = group_work(items, target_bytes=1024)
    assert [p for t in tasks for p in t["parts"]] == items  # all of them, in order
    sizes = [len(t["parts"]) for t in tasks]
    ranges = sum(1 for it in items if it["path"].endswith("big.jsonl"))
    # 5 x 253 B reach 1 KB; the missing file (0 B here, its reader reports it) starts the next task
    assert ranges == 4 and sizes == [5] + [1] * ranges + [1] + [5, 1]
    assert [len(t["parts"]) for t in group_work(items[:5], 1 << 20, max_files=2)] == [2, 2, 1]


def test_prepare_never_deletes_what_it_did_not_write(tmp_path):
    """--output's train/ eval/ ... are replaced by a run: never when an input lies there, nor when
    they are a dataset's own splits (no earlier prepare marked the directory); a crashed run's
    leftovers (its quarantine file) are replaced. All before Ray starts or anything is deleted."""
    from pipelines.prepare import prepare

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "eval").mkdir()
    raw = data / "train" / "part.jsonl"
    raw.write_text(json.dumps({"text": "word " * 40}) + "\n")
    (data / "eval" / "part.jsonl").write_text(json.dumps({"text": "word " * 40}) + "\n")
    with pytest.raises(UserError, match="is in train/ of the output"):
        prepare([str(data / "train")], data)
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"text": "word " * 40}) + "\n")
    with pytest.raises(UserError, match="holds train/, eval/ that no earlier prepare wrote"):
        prepare([str(tmp_path / "elsewhere.jsonl")], data)
    assert raw.exists() and (data / "eval" / "part.jsonl").exists()
    with pytest.raises(UserError, match="is in meta.json"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "meta.json").write_text("{}")
        prepare([str(tmp_path / "out" / "meta.json")], tmp_path / "out")
    from pipelines.prepare import _check_output

    (data / "quarantine").mkdir()
    (data / "quarantine" / "records.jsonl").write_text("")  # a run that crashed here: ours to replace
    _check_output(data, [tmp_path / "elsewhere.jsonl"])


def test_expand_inputs_leaves_out_the_output_dir(tmp_path):
    """prepare --input data --output data/prepared, run twice: the first run's shards, reports and
    quarantine are no input of the second (walks and globs prune the output directory); a file
    named outright is still read."""
    data = tmp_path / "data"
    (data / "prepared" / "train").mkdir(parents=True)
    (data / "a.jsonl").write_text(json.dumps({"text": "word " * 40}) + "\n")
    (data / "prepared" / "report.json").write_text("{}")
    (data / "prepared" / "train" / "part-00000.parquet").write_bytes(b"PAR1")
    skip = data / "prepared"
    assert expand_inputs([str(data)], skip=skip) == [data / "a.jsonl"]
    assert expand_inputs([str(data / "*")], skip=skip) == [data / "a.jsonl"]
    assert expand_inputs([str(data / "**" / "*.json*")], skip=skip) == [data / "a.jsonl"]
    assert expand_inputs([str(skip / "report.json")], skip=skip) == [skip / "report.json"]
    assert len(expand_inputs([str(data)])) == 3  # (without skip: everything)


def test_json_arrays_and_values_stream(tmp_path, monkeypatch):
    """A JSON array (or values one after another) is read a chunk at a time: a file many times
    max_record_bytes loses nothing (it was one record_too_large for the whole file), whatever the
    chunk boundaries cut (here every 7 bytes: mid-string, mid-number, mid-escape); one value over
    the limit, a broken value, bad UTF-8 or a never-closed array end the file with one row."""
    import pipelines.readers as readers

    monkeypatch.setattr(readers._JsonStream, "CHUNK", 7)
    docs = [f'doc {i} caf\u00e9 " quote ' + "w" * (i % 50) for i in range(800)]
    arr = "[\n" + ",\n".join(json.dumps({"text": t, "n": 10**12 + i}) for i, t in enumerate(docs)) + "\n]\n"
    (tmp_path / "big.json").write_text(arr)  # ~60 KB, max_record_bytes 4 KB below
    got = list(read_records(tmp_path / "big.json", 4096))
    assert [(r[1], r[2], r[5]) for r in got] == [(i + 1, OK, t) for i, t in enumerate(docs)]
    (tmp_path / "line.json").write_text(json.dumps([{"text": t} for t in docs]))  # one 40 KB line
    assert [r[5] for r in read_records(tmp_path / "line.json", 4096)] == docs
    pretty = "\n".join(json.dumps({"text": t}, indent=2) for t in docs[:50])  # values, no array
    (tmp_path / "pretty.json").write_text(pretty)
    assert [(r[1], r[5]) for r in read_records(tmp_path / "pretty.json", 4096)] == [
        (1 + 3 * i, t) for i, t in enumerate(docs[:50])
    ]

    def rows(name: str, text: str | bytes, limit: int = 4096):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return [(r[1], r[3]) for r in read_records(path, limit)]

    ok = json.dumps({"text": "word " * 10})
    assert rows("huge.json", f"[{ok}, {json.dumps({'text': 'x' * 5000})}, {ok}]") == [
        (1, ""),
        (2, "record_too_large"),
    ]
    assert rows("bad.json", f'[{ok}, {{"text": oops}}, {ok}]') == [(1, ""), (2, "malformed_json")]
    assert rows("open.json", f"[{ok}, {ok}") == [(1, ""), (2, ""), (3, "malformed_json")]
    assert rows("after.json", f"[{ok}] [{ok}]") == [(1, ""), (2, "malformed_json")]
    assert rows("empty.json", "[ ]") == []
    assert rows("utf8.json", f"[{ok},".encode() + b'{"text": "\xff"}]') == [(1, ""), (2, "invalid_utf8")]
    # numbers and values one after another, cut by the chunks: nothing decodes short
    js = readers._JsonStream(io.BytesIO(b"12345678 \n 23456789 [1, 2]"), 1 << 10)
    assert [js.peek() and js.value()[:2] for _ in range(3)] == [(1, 12345678), (2, 23456789), (2, [1, 2])]


def test_readers_csv_and_tsv(tmp_path):
    """CSV / TSV with a header: the text column's cell of each row is a record (quoted newlines
    and delimiters inside), compressed too; a missing column, bad UTF-8, an empty or too large
    cell each get their own outcome (a CSV was one document before: the whole file as text)."""
    import csv

    doc = "word " * 40
    rows = [[1, doc], [2, 'two lines,\nwith a comma and a "quote"'], [3, ""], [4, "x" * 5000]]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(rows)
    got = [(r[1], r[3], r[5]) for r in read_records(tmp_path / "a.csv", 4096)]
    assert got == [(1, "", doc), (2, "", rows[1][1]), (3, "", ""), (4, "record_too_large", None)]
    (tmp_path / "b.tsv.gz").write_bytes(gzip.compress(f"id\tcontent\n1\t{doc}\n".encode()))
    assert [(r[3], r[5]) for r in read_records(tmp_path / "b.tsv.gz", 4096, text_key="content")] == [
        ("", doc)
    ]
    assert reasons(tmp_path / "b.tsv.gz") == [(1, QUARANTINE, "missing_text")]  # no "text" column
    (tmp_path / "c.csv").write_bytes(b"text\nfine\n\xff\xfe bad\nfine again\n")
    assert [g[2] for g in reasons(tmp_path / "c.csv")] == ["", "invalid_utf8", ""]


def test_readers_arrow_ipc(tmp_path):
    """Arrow IPC inputs: the stream format (Hugging Face `save_to_disk` writes data-*.arrow so)
    and the file format (Feather), whatever the suffix; rows as parquet's."""
    import pyarrow.feather as feather

    doc = "word " * 40
    table = pa.table({"id": [1, 2, 3], "text": [doc, None, doc + "again"]})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
    feather.write_feather(table, tmp_path / "t.feather")
    (tmp_path / "noext").write_bytes((tmp_path / "t.feather").read_bytes())
    for name in ("data-00000-of-00001.arrow", "t.feather", "noext"):
        got = [(r[1], r[3], r[5]) for r in read_records(tmp_path / name, 1 << 20)]
        assert got == [(1, "", doc), (2, "missing_text", None), (3, "", doc + "again")], name
    got = [(r[3], r[5]) for r in read_records(tmp_path / "t.feather", 1 << 20, text_key="id")]
    assert {g[0] for g in got} == {"text_not_string"}
    no_column = [(r[1], r[2], r[3]) for r in read_records(tmp_path / "t.feather", 1 << 20, text_key="body")]
    assert no_column == [(1, QUARANTINE, "missing_text")]
    (tmp_path / "bad.arrow").write_bytes(b"\xff\xff\xff\xff garbage")
    assert reasons(tmp_path / "bad.arrow")[0][2] == "unreadable_file"


def test_text_column_from_utf8_equals_pyarrows():
    """The cleaned tables' text column built from the batch's UTF-8 (where it has it) equals
    pa.array of the str objects: nulls where not kept, non-ASCII text, empty text, no rows."""
    from pipelines.clean import _text_column

    texts = ["a b", "é ✓ naïve", "", "kept", "dropped", "x" * 5000]
    encoded = [b"a b", None, b"", None, None, ("x" * 5000).encode()]
    for keep in ([True] * 6, [True, True, True, True, False, True], [False] * 6):
        got = _text_column(texts, encoded, np.array(keep))
        got.validate(full=True)
        assert got.equals(pa.array([t if k else None for t, k in zip(texts, keep)], pa.large_string()))
    assert _text_column([], [], np.zeros(0, bool)).equals(pa.array([], pa.large_string()))
