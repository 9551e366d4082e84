"""RunTable (dsv3ray/runtable.py) against a Python dict: strings that differ only in their first,
middle or last 8 bytes, in their length (around 8/9, 16/17, 24/25) or in their flag get distinct
entries, and every lookup returns the entry of exactly that string."""

import random

import numpy as np
import pytest

from dsv3ray.runtable import SHORT, RunTable, keys, padded


def _runs(words: list[bytes]):
    joined = b" ".join(words)
    starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).astype(np.int64)
    ends = starts + np.array([len(w) for w in words], dtype=np.int64)
    return joined, padded(joined), starts, ends


@pytest.mark.parametrize("crowded", [False, True])
def test_runtable_matches_a_dict(crowded):
    rng = random.Random(0)
    base = [b"a" * n for n in range(1, 40)]
    words = set(base)
    for w in base:  # change one byte at every position: the same head, mid or tail but one
        for i in range(len(w)):
            words.add(w[:i] + b"b" + w[i + 1 :])
    words |= {bytes(rng.choice(b"ab\xc3\xa9") for _ in range(rng.randint(1, 30))) for _ in range(2000)}
    words = sorted(words)
    table = RunTable(max_entries=1 << 14)
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
