"""RunTable (dsv3ray/runtable.py) against a Python dict: strings that differ only in their first,
middle or last 8 bytes, in their length (around 8/9, 16/17, 24/25) or in their flag get distinct
entries, and every lookup returns the entry of exactly that string (its C version, CRunTable, too). Ragged rows gather as
Python slices would; SpaceChunks cuts texts at every space."""

import random

import numpy as np
import pytest

from dsv3ray.runtable import SHORT, Ragged, RunTable, SpaceChunks, grown, keys, padded, ranges


def _runs(words: list[bytes]):
    joined = b" ".join(words)
    starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).astype(np.int64)
    ends = starts + np.array([len(w) for w in words], dtype=np.int64)
    return joined, padded(joined), starts, ends


def _tables():
    """RunTable, and pipelines.native's C one where its library is built."""
    from pipelines import native

    return [RunTable] + ([native.CRunTable] if native.library() is not None else [])


@pytest.mark.parametrize("table_type", _tables())
@pytest.mark.parametrize("crowded", [False, True])
def test_runtable_matches_a_dict(crowded, table_type):
    rng = random.Random(0)
    base = [b"a" * n for n in range(1, 40)]
    words = set(base)
    for w in base:  # change one byte at every position: the same head, mid or tail but one
        for i in range(len(w)):
            words.add(w[:i] + b"b" + w[i + 1 :])
    words |= {bytes(rng.choice(b"ab\xc3\xa9") for _ in range(rng.randint(1, 30))) for _ in range(2000)}
    words = sorted(words)
    table = table_type(max_entries=1 << 14)
    if crowded:  # every key starts its probe in one of 64 slots: long probe chains, keys compared
        table._shift = np.uint64(64 - 6)
    reference: dict[tuple[bytes, int], int] = {}
    for rounds in range(3):
        batch = [rng.choice(words) for _ in range(3000)]
        flags = np.array([rng.random() < 0.3 for _ in batch])
        joined, buf, starts, ends = _runs(batch)
        key = keys(buf, starts, ends, flags)
        entry = table.lookup(joined, starts, ends, key)
        want = np.array([reference.get((w, int(f)), -1) for w, f in zip(batch, flags)])
        assert np.array_equal(entry, want), rounds
        missing = np.flatnonzero(entry < 0)
        if missing.size:
            at, inverse, clash = table.distinct(joined, starts, ends, missing, key)
            assert not clash.any()  # no 64-bit hash collision among these
            distinct = [(batch[i], int(flags[i])) for i in at]
            assert len(set(distinct)) == len(distinct)
            assert {(batch[i], int(flags[i])) for i in missing} == set(distinct)
            numbers = table.append(at, [batch[i] for i in at], key)
            reference.update(zip(distinct, numbers.tolist()))
            assert [distinct[j] for j in inverse] == [(batch[i], int(flags[i])) for i in missing]
    assert table.size == len(reference) and any(len(w) > SHORT for w, _ in reference)


def test_ragged_rows_and_space_chunks():
    rng = np.random.default_rng(0)
    r = Ragged((np.int32, np.float64), ((), (2,)))
    rows = []
    for _ in range(40):  # appends past the initial capacity, rows of 0..6 items
        sizes = rng.integers(0, 7, size=int(rng.integers(1, 300)))
        a = rng.integers(0, 1000, size=int(sizes.sum())).astype(np.int32)
        b = rng.random((int(sizes.sum()), 2))
        first = r.size
        r.append(first, sizes, [a, b])
        ends = np.cumsum(sizes)
        rows += [(a[e - k : e], b[e - k : e]) for k, e in zip(sizes, ends)]
    entries = rng.integers(0, r.size, size=5000)
    count, (a, b) = r.gather(entries)
    assert count.tolist() == [rows[e][0].size for e in entries]
    assert np.array_equal(a, np.concatenate([rows[e][0] for e in entries]))
    assert np.array_equal(b, np.concatenate([rows[e][1] for e in entries]))
    ones = np.flatnonzero([rows[e][0].size == 1 for e in range(r.size)])
    count, (a, _) = r.gather(ones)  # the one-item fast path
    assert np.array_equal(a, np.concatenate([rows[e][0] for e in ones]))
    assert ranges(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]

    texts = ["a bc", "", " x", "é  y", "long" * 80, "q"]
    ch = SpaceChunks(texts, max_chunk=256)
    chunks = [ch.joined[s:e].decode() for s, e in zip(ch.starts, ch.ends)]
    assert chunks == ["a", "bc", "", "", "x", "é", "", "y", "long" * 80, "q"]
    assert ch.doc.tolist() == [0, 0, 1, 2, 2, 3, 3, 3, 4, 5]
    assert ch.first.tolist() == [True, False, True, True, False, True, False, False, True, True]
    assert ch.bad_doc.tolist() == [False, True, True, True, True, False]
    assert SpaceChunks([], 256).starts.size == 0


def test_grown_keeps_the_rows_and_zeros_the_rest():
    a = np.arange(12, dtype=np.int32).reshape(6, 2)
    g = grown(a, 10)
    assert g.shape == (10, 2) and g.dtype == np.int32
    assert np.array_equal(g[:6], a) and not g[6:].any()
    assert np.array_equal(grown(np.arange(3), 2), [0, 1])
