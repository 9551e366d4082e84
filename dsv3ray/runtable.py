"""Entry numbers of short byte strings, looked up a whole batch at a time in numpy.

The words of a batch of texts are byte runs of one joined UTF-8 buffer (`starts`, `ends`). Their
lookups are what the tokenizer's chunk cache (dsv3ray.tokenizer) and the batched fastText predict
(pipelines.ftpredict) spend their time on; a Python dict costs ~60 ns per word for the str
objects and their hashes, this a few ns. The owner keeps its values per entry number.

A key is a byte string plus one flag bit (the tokenizer marks a text's first chunk). Strings of at
most SHORT = 24 bytes (99.4% of English words) are keyed exactly by (2 * length + flag, their bytes
0-8, 8-16 and their last 8), read as unaligned little-endian uint64 words, in an open-addressing
table (linear probing, load at most 1/2) of entry numbers; longer ones by their bytes in one dict
per flag (a dict lookup costs ~0.7 µs a word here, a table lookup a few ns). Lookups,
the distinct misses of a batch (a 1-D sort of a 64-bit hash of the key, checked against the key)
and insertions are whole-batch numpy operations.

`SpaceChunks` cuts a batch of texts into their space-separated chunks (the unit the tokenizer's
cache and pipelines.chunkpass key on); `Ragged` keeps an owner's variable-length values per entry
(a chunk's token ids, its words) and gathers a sequence of entries' values end to end.
"""

from __future__ import annotations

import numpy as np

MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)  # low n bytes
_K_LEN, _K_MIX = np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x9E3779B97F4A7C15)  # odd multipliers
SHORT = 24  # bytes: words 0-8, 8-16 and the last 8 cover the string


def text_groups(texts: list[str], max_chars: int) -> list[tuple[int, int]]:
    """Consecutive ranges [i, j) of texts holding about `max_chars` characters each (a longer text
    alone); at least one range, empty for no texts. Batch lookups go a group at a time: their
    per-word arrays stay in cache."""
    out, i = [], 0
    while i < len(texts) or not out:
        j, size = i, 0
        while j < len(texts) and (j == i or size + len(texts[j]) <= max_chars):
            size += len(texts[j])
            j += 1
        out.append((i, j))
        i = j
    return out


def byte_runs(parts: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(the parts joined with a space between them, each part's start and end in it)."""
    joined = b" ".join(parts)
    starts = np.zeros(len(parts), dtype=np.int64)
    np.cumsum([len(p) + 1 for p in parts[:-1]], out=starts[1:])
    return joined, starts, starts + np.fromiter(map(len, parts), np.int64, len(parts))


def _runs_to_spaces(joined: bytes, text_start, text_end):
    """(joined with one space for each run of newlines, the texts' starts and ends in it, where
    those spaces are (sorted), the length of the run each stands for). Newlines are sparse: work on
    their positions, one pass over the bytes."""
    nl = np.flatnonzero(np.frombuffer(joined, np.uint8) == 10)
    head = np.ones(nl.size, dtype=bool)
    head[1:] = np.diff(nl) != 1  # a run's first newline; the others are dropped
    run = nl[head]
    k = np.diff(np.append(np.flatnonzero(head), nl.size))
    if run.size == nl.size:  # single newlines only: nothing moves
        return joined.replace(b"\n", b" "), text_start, text_end, run, k
    dropped = nl[~head]
    out = np.delete(np.frombuffer(joined, np.uint8), dropped)
    run = run - np.searchsorted(dropped, run)
    out[run] = 32
    starts, ends = (p - np.searchsorted(dropped, p) for p in (text_start, text_end))
    return out.tobytes(), starts, ends, run, k


def add_newline_runs(table: RunTable, ids: Ragged, run_ids: list[list[int]]) -> np.ndarray:
    """Entries for runs of 1, 2, ... len(run_ids) newlines between two chunks (SpaceChunks
    newlines=True): keyed as the run's bytes with flag 1 (no chunk holds a newline then), with
    run_ids[k - 1] as a run of k's ids in `ids`; their entry numbers."""
    raw = [b"\n" * k for k in range(1, len(run_ids) + 1)]
    lens = np.arange(1, len(raw) + 1)
    ends = np.cumsum(lens)
    numbers = table.append(np.arange(len(raw)), raw, keys(padded(b"".join(raw)), ends - lens, ends, 1))
    flat = np.array([i for r in run_ids for i in r], np.int32)
    ids.append(int(numbers[0]), np.array([len(r) for r in run_ids], np.int64), [flat])
    return numbers


def padded(joined: bytes) -> np.ndarray:
    """The buffer as uint8 with 8 bytes of padding (a key word is read past the last byte)."""
    return np.frombuffer(joined + bytes(8), dtype=np.uint8)


def keys(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, flag) -> tuple[np.ndarray, ...]:
    """The key (lenf, head, mid, tail) of each run buf[starts:ends] of a `padded` buffer; flag: 0/1
    per run. lenf = 2 * length + flag; bytes past a short run are zeroed."""
    lens = ends - starts
    lenf = 2 * lens + flag
    words = np.ndarray((buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))  # unaligned
    head = words[starts] & MASKS[np.minimum(lens, 8)]
    tail = words[np.maximum(ends - 8, 0)]
    tail[lens <= 8] = 0
    mid = np.zeros(lens.size, np.uint64)
    over = np.flatnonzero(lens > 16)  # 9-16 bytes: head and tail (overlapping) cover them
    mid[over] = words[starts[over] + 8]
    return lenf, head, mid, tail


def _key_rows(rows: int, old: np.ndarray | None = None) -> np.ndarray:
    """(rows, 4) uint64 zeros (old's rows copied), the first row on a 64-byte boundary: every row
    (32 bytes) inside one cache line."""
    buf = np.zeros(rows * 4 + 8, dtype=np.uint64)
    skip = (-buf.ctypes.data % 64) // 8
    out = buf[skip : skip + rows * 4].reshape(rows, 4)
    if old is not None:
        out[: old.shape[0]] = old[:rows]
    return out


class RunTable:
    """Entry numbers 0..size-1 of distinct keys; at most `max_entries` of them."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        bits = max(4, (2 * max_entries - 1).bit_length())  # load <= 1/2
        self._shift = np.uint64(64 - bits)
        self._slots = np.full(1 << bits, -1, dtype=np.int32)
        self.clear()

    def clear(self) -> None:
        self._slots.fill(-1)
        cap = min(self.max_entries, 1 << 12)
        # entry e's key (lenf, head, mid, tail) in one 32-byte row: a probe that hits reads one
        # cache line, not four (lenf -1 for long entries: never matched by a probe)
        self._keys = _key_rows(cap)
        self._long: tuple[dict, dict] = ({}, {})  # [flag] string bytes -> entry
        self.size = 0

    # the keys' columns (views: writing them writes the rows)
    @property
    def _lenf(self) -> np.ndarray:
        return self._keys[:, 0].view(np.int64)

    @property
    def _head(self) -> np.ndarray:
        return self._keys[:, 1]

    @property
    def _mid(self) -> np.ndarray:
        return self._keys[:, 2]

    @property
    def _tail(self) -> np.ndarray:
        return self._keys[:, 3]

    def arrays(self) -> tuple:
        """(slots (int32), shift, keys): the table as a C probe reads it (entry e's key: the row
        keys[e] = lenf, head, mid, tail (uint64, lenf's bits); a key's first slot: _hash64 >>
        shift; linear probing)."""
        return self._slots, int(self._shift), self._keys

    @staticmethod
    def _hash64(lenf, head, mid, tail) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((((lenf.astype(np.uint64) * _K_LEN) ^ head) * _K_MIX ^ mid) * _K_LEN ^ tail) * _K_MIX

    def _hash_slots(self, key) -> np.ndarray:
        return (self._hash64(*key) >> self._shift).astype(np.int64)

    def _matches(self, e, key, at=slice(None)) -> np.ndarray:
        lenf, head, mid, tail = key
        return (
            (self._head[e] == head[at])
            & (self._tail[e] == tail[at])
            & (self._mid[e] == mid[at])
            & (self._lenf[e] == lenf[at])
        )

    def lookup(self, joined: bytes, starts, ends, key) -> np.ndarray:
        """Entry number of each run (key: from `keys`), -1 where absent."""
        lenf = key[0]
        entry = self._probe(key)
        long = np.flatnonzero(lenf > 2 * SHORT + 1)  # never in the table (their length): the dicts
        if long.size:
            entry[long] = self.lookup_long(joined, starts[long], ends[long], lenf[long] & 1)
        return entry

    def lookup_long(self, joined: bytes, starts, ends, flags) -> list[int]:
        """Entry number of each run over SHORT bytes (kept in a dict per flag, not the table), -1
        where absent."""
        return [
            self._long[f].get(joined[a:b], -1)
            for a, b, f in zip(starts.tolist(), ends.tolist(), flags.tolist())
        ]

    def _probe(self, key) -> np.ndarray:
        pos = self._hash_slots(key)
        entry = self._slots[pos].astype(np.int64)  # round one over every key, without indirection
        hit = self._matches(entry, key)
        hit &= entry >= 0  # (entry -1 read the last entry: its comparison is discarded here)
        entry[~hit] = -1
        active = np.flatnonzero(~hit & (self._slots[pos] >= 0))
        mask = self._slots.size - 1
        pos[active] = (pos[active] + 1) & mask
        while active.size:
            e = self._slots[pos[active]]
            used = e >= 0
            active, e = active[used], e[used]
            hit = self._matches(e, key, active)
            entry[active[hit]] = e[hit]
            active = active[~hit]
            pos[active] = (pos[active] + 1) & mask
        return entry

    @classmethod
    def distinct(cls, joined: bytes, starts, ends, missing, key) -> tuple[np.ndarray, ...]:
        """The distinct strings among the runs at `missing`: (at: one run of each, inverse: which
        of them each missing run is, clash: runs whose key differs from their group's — a 64-bit
        hash collision; the caller does not serve those from this batch)."""
        m_key = [k[missing] for k in key]
        hv = cls._hash64(*m_key)
        long = np.flatnonzero(m_key[0] > 2 * SHORT + 1)
        if long.size:  # grouped by their bytes (and flag): the first occurrence's position, tagged
            first: dict = {}
            for j, a, b, f in zip(
                long.tolist(),
                starts[missing[long]].tolist(),
                ends[missing[long]].tolist(),
                (m_key[0][long] & 1).tolist(),
            ):
                hv[j] = first.setdefault((joined[a:b], f), j) | (1 << 63)
        _, pick, inverse = np.unique(hv, return_index=True, return_inverse=True)
        at = missing[pick]
        rep = at[inverse]
        clash = np.zeros(missing.size, dtype=bool)
        for m, k in zip(m_key, key):
            clash |= m != k[rep]
        return at, inverse, clash

    def append(self, at, raw, key) -> np.ndarray:
        """New entries for the distinct, absent runs at `at` (their bytes `raw`: a list, or
        (joined, starts, ends) where run j is joined[starts[j]:ends[j]]); their numbers."""
        m = len(at)
        first = self.size
        self._reserve(first + m)
        numbers = np.arange(first, first + m)
        lenf, head, mid, tail = key
        short = lenf[at] <= 2 * SHORT + 1
        self._lenf[numbers] = np.where(short, lenf[at], -1)
        self._head[numbers] = head[at]
        self._mid[numbers] = mid[at]
        self._tail[numbers] = tail[at]
        for j in np.flatnonzero(~short).tolist():  # (only these need the bytes)
            run = raw[j] if isinstance(raw, list) else raw[0][raw[1][j] : raw[2][j]]
            self._long[int(lenf[at[j]]) & 1][run] = first + j
        self.size += m
        self._insert(numbers[short])
        return numbers

    def _reserve(self, entries: int) -> None:
        """Room for `entries` entries' keys (grown by doubling, to max_entries at most)."""
        assert entries <= self.max_entries
        if entries > self._keys.shape[0]:
            self._keys = _key_rows(min(self.max_entries, max(entries, 2 * self._keys.shape[0])), self._keys)

    def _insert(self, numbers: np.ndarray) -> None:
        pos = self._hash_slots([a[numbers] for a in (self._lenf, self._head, self._mid, self._tail)])
        mask = self._slots.size - 1
        while numbers.size:  # each walks to the first free slot; one winner per contested slot
            free = self._slots[pos] < 0
            self._slots[pos[free]] = numbers[free]
            placed = np.zeros(numbers.size, dtype=bool)
            placed[free] = self._slots[pos[free]] == numbers[free]
            numbers, pos = numbers[~placed], pos[~placed]
            pos = (pos + 1) & mask


class Ragged:
    """Per entry, a row of variable length in each of several parallel arrays (e.g. a chunk's
    token ids); rows are appended in entry order and a sequence of entries' rows is gathered end
    to end in one numpy pass. `shapes[i]` is column i's per-item shape (() for scalars)."""

    def __init__(self, dtypes: tuple, shapes: tuple | None = None):
        self.dtypes = dtypes
        self.shapes = shapes or ((),) * len(dtypes)
        self.clear()

    def clear(self) -> None:
        self.off = np.zeros(1 << 12, dtype=np.int64)  # entry j's items: [off[j], off[j + 1])
        self.cols = [np.zeros((1 << 14,) + s, dtype=d) for d, s in zip(self.dtypes, self.shapes)]
        self.size = 0

    def append(self, first: int, sizes: np.ndarray, items: list[np.ndarray]) -> None:
        """Rows of entries first, first + 1, ... (`first` = the entries so far): sizes[j] items
        of each column in `items` (all rows end to end)."""
        assert first == self.size
        end = first + sizes.size
        if end + 1 > self.off.size:
            self.off = grown(self.off, max(end + 1, 2 * self.off.size))
        base = self.off[first]
        need = base + int(sizes.sum())
        if need > self.cols[0].shape[0]:
            cap = max(need, 2 * self.cols[0].shape[0])
            self.cols = [grown(c, cap) for c in self.cols]
        for c, v in zip(self.cols, items):
            c[base:need] = v
        np.cumsum(sizes, out=self.off[first + 1 : end + 1])
        self.off[first + 1 : end + 1] += base
        self.size = end

    def gather(self, entries: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(items per entry given, each column's rows of those entries end to end)."""
        start = self.off[entries]
        count = self.off[entries + 1] - start
        if (count == 1).all():  # one item each (common: a chunk's one word): no index arithmetic
            return count, [np.take(c, start, axis=0) for c in self.cols]
        src = ranges(start, count)
        return count, [np.take(c, src, axis=0) for c in self.cols]


def grown(a: np.ndarray, rows: int) -> np.ndarray:
    """`a` with room for `rows` rows (axis 0): its rows copied, zeros after them. (np.resize fills
    the new rows with copies of the old ones: ~7x the time of a 4 MB table's doubling.)"""
    out = np.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    keep = min(rows, a.shape[0])
    out[:keep] = a[:keep]
    return out


def ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The indices start[0] .. start[0] + count[0] - 1, then start[1] .. and so on, end to end."""
    ends = np.cumsum(count)
    total = int(ends[-1]) if ends.size else 0
    return np.arange(total) + np.repeat(start - (ends - count), count)


class SpaceChunks:
    """A batch's texts joined into one UTF-8 buffer with a space between texts, cut at every space
    (UTF-8 never has byte 0x20 inside a character, so the chunks are the byte runs between
    spaces). starts/ends: each chunk's bytes in `joined`; doc: its text; first: it starts its
    text; text_start: each text's first byte; bad_doc: texts with an empty chunk (a space at an
    end or next to another) or one over `max_chunk` bytes. `encoded`: the texts' UTF-8 bytes
    (surrogatepass), when the caller has them.

    newlines: a run of newlines cuts chunks too (a newline ends every stage's words and the
    tokenizer's pre-tokens): `joined` then has one space in place of each run, `nl_after[i]` is
    the length of the run after chunk i (0: a space or the text's end follows it) and `first`
    also marks a chunk right after a run (no space before it). Text joined by newlines (code,
    lists, wrapped lines) otherwise makes chunks such as "end.\\nNext" that recur far less than
    their words."""

    def __init__(
        self, texts: list[str], max_chunk: int, encoded: list[bytes] | None = None, newlines: bool = False
    ):
        n = len(texts)
        parts = encoded if encoded is not None else [t.encode("utf-8", "surrogatepass") for t in texts]
        self.joined, self.text_start, text_end = byte_runs(parts)  # text_end: the joining space, or the end
        runs = None
        if newlines and b"\n" in self.joined:
            self.joined, self.text_start, text_end, *runs = _runs_to_spaces(
                self.joined, self.text_start, text_end
            )
        self.buf = padded(self.joined)
        size = len(self.joined)
        spaces = np.flatnonzero(self.buf[:size] == 32)
        self.starts = np.concatenate(([0], spaces + 1)) if n else spaces  # (no text: no chunk)
        self.ends = np.concatenate((spaces, [size])) if n else spaces
        per_doc = np.searchsorted(spaces, text_end) - np.searchsorted(spaces, self.text_start) + 1
        self.doc = np.repeat(np.arange(n), per_doc)
        self.first = self.starts == self.text_start[self.doc]
        self.nl_after = np.zeros(self.starts.size, np.int64)
        if runs is not None:  # the chunks that a run's space ends
            at, k = runs
            i = np.searchsorted(self.ends, at)
            self.nl_after[i] = k
            self.first[i + 1] = True
        lens = self.ends - self.starts
        self.bad_doc = np.zeros(n, dtype=bool)
        self.bad_doc[self.doc[(lens == 0) | (lens > max_chunk)]] = True

    def with_runs(
        self, entry: np.ndarray, run_entry: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the chunks' entries with each run of newlines' entry after its chunk: run_entry[k - 1]
        for a run of k, their texts, the texts with a run longer than run_entry holds)."""
        nl = np.flatnonzero(self.nl_after)
        if not nl.size:
            return entry, self.doc, np.zeros(0, np.int64)
        k = self.nl_after[nl]
        at = np.arange(entry.size) + np.concatenate(([0], np.cumsum(self.nl_after[:-1] > 0)))
        full = np.empty(entry.size + nl.size, np.int64)
        doc = np.empty(full.size, self.doc.dtype)
        full[at], doc[at] = entry, self.doc
        full[at[nl] + 1] = run_entry[np.minimum(k, run_entry.size) - 1]
        doc[at[nl] + 1] = self.doc[nl]
        return full, doc, self.doc[nl[k > run_entry.size]]
