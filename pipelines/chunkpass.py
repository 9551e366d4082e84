"""One lookup per space-separated chunk serves the tokenizer, fastText and MinHash.

Each of the three reads a document as a sequence of words and would split it, key its words and
look them up on its own (three splits, three key computations, two table lookups and a byte
classification per word). All three sequences are the concatenation of the document's
space-separated chunks' sequences: a space ends a fastText word (it is one of its separators), a
MinHash word (it is no letter, digit or underscore) and, where the tokenizer's chunk rule holds
(dsv3ray.tokenizer._ChunkCache), a pre-token. So a chunk's token ids, fastText words (summed row
logits, id count, n-gram hash) and MinHash word hashes are computed once, the first time the chunk
is seen, and kept; a document is its chunks' rows end to end. One split, one key and one lookup
per chunk serve the three stages, and each stage's result equals its own path's (tests compare).

A run of newlines cuts chunks as a space does (it ends fastText's and MinHash's words, and the
tokenizer's pre-tokens: the chunk after it is encoded with no space before it) and is an entry of
its own between them: the run's ids as the tokenizer encodes it between two chunks, no words
(`dsv3ray.tokenizer._ChunkCache.newline_ids`). Code, lists and wrapped lines would otherwise make
chunks such as "end.\\nNext" that recur far less than their words (real docstrings: 34% fewer
distinct chunks, 45% fewer of their bytes).

A text is covered by a stage when its chunks allow it; the others take the stage's own path:
- all stages: no empty chunk (a space at an end or next to another, a newline at an end or next
  to a space) and none over MAX_CHUNK bytes, no run of more newlines than the tokenizer's cache
  holds (dsv3ray.tokenizer._ChunkCache.MAX_NEWLINES);
- tokens: at most `token_chars` characters (longer texts are encoded in pieces), every chunk
  keeps the tokenizer's chunk rule, and no added token with a space in it;
- quality: at most the scorer's `max_chars` characters (its cut), no label token, no `</s>`;
- MinHash: at most `minhash_chars` characters (its cut).
Lowercasing a chunk for MinHash gives the chunk's part of the lowercased text: Python's only
context-dependent lowercase mapping (final sigma) looks past case-ignorable characters only, and a
space (or a newline) is none. Texts are looked up in groups of about GROUP_CHARS characters (their per-chunk
arrays stay in cache); a stage gathers only the texts it is asked for (what earlier stages kept).
Memory is bounded: at most `max_entries` chunks are kept, then the table empties.

A group's cut and probe run as one C pass where the C helpers are built (pipelines.native
chunk_scan: the same items, entries and table as the numpy path's SpaceChunks, distinct values and
RunTable probe, which tests compare); new chunks' rows are computed here in either case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dsv3ray.runtable import (
    SHORT,
    Ragged,
    SpaceChunks,
    add_newline_runs,
    byte_runs,
    grown,
    keys,
    padded,
    text_groups,
)
from pipelines import native

_NO_TOKENS_RUNS = 4  # runs of newlines served when tokens are not (1..4 newlines)


@dataclass
class _Group:
    lo: int  # its first text in the lookup
    n: int  # its texts
    entry: np.ndarray  # per chunk: its entry (-1: not covered)
    doc: np.ndarray  # per chunk: its text, counted from lo (sorted)
    bounds: np.ndarray  # text i's chunks: [bounds[i], bounds[i + 1])


@dataclass
class ChunkLookup:
    """The chunks of n texts, looked up; which texts each stage can take from them."""

    n: int
    groups: list[_Group]
    tokens: np.ndarray  # [n] bool: covered for tokens
    quality: np.ndarray
    minhash: np.ndarray


class ChunkPass:
    """The per-chunk table of a cleaning worker. `tok` (dsv3ray.tokenizer.Tokenizer), `scorer`
    (pipelines.ftpredict.BatchPredictor) and `minhash` (pipelines.dedup.MinHasher) may each be
    None (that stage is not served)."""

    MAX_CHUNK = 256  # bytes
    # characters per group: a bigger group repeats each distinct chunk more (the lookup measured
    # 22.5 µs per document at 256K characters, 19.1 at 1M, 18.0 at 4M); 1M bounds its arrays
    GROUP_CHARS = 1 << 20

    def __init__(
        self, tok=None, scorer=None, minhash=None, quality_chars: int = 0, minhash_chars: int = 0,
        token_chars: int = 1 << 62, max_entries: int = 1 << 18,
    ):  # fmt: skip
        self.tok = tok.chunk_cache if tok is not None else None  # None: the chunk rule does not apply
        self.scorer, self.minhash = scorer, minhash
        # each stage's cut: longer texts are not served for it
        self.quality_chars, self.minhash_chars, self.token_chars = quality_chars, minhash_chars, token_chars
        self.table = native.make_table(max_entries)  # (lookups and insertions in C where it is built)
        logits = scorer.row_logits.shape[1:] if scorer is not None else ()
        self.tok_ids = Ragged((np.int32,))
        self.ft_words = Ragged((np.float64, np.int64, np.uint64), (logits, (), ()))
        self.mh_words = Ragged((np.uint64,))
        # runs of newlines cut chunks too where the tokenizer's ids of a run are known (below)
        # (the tokenizer's cache knows their ids; a longer run: the text takes the stages' own paths)
        self.nl_ids = self.tok.nl_ids if self.tok is not None else [[]] * _NO_TOKENS_RUNS
        self.newlines = self.active and self.nl_ids is not None
        self._clear()

    def _clear(self) -> None:
        self.table.clear()
        for r in (self.tok_ids, self.ft_words, self.mh_words):
            r.clear()
        self.ok_E = np.zeros((1 << 12, 2), dtype=bool)  # per entry: [tokens rule, fastText usable]
        self.nl_entry = np.zeros(0, np.int64)  # (none: SpaceChunks does not cut at newlines then)
        if self.newlines:
            self._add_newline_runs()

    def _add_newline_runs(self) -> None:
        """Entries for runs of 1, 2, ... newlines between two chunks: the tokenizer's ids of the
        run there, no fastText or MinHash word (a newline only separates their words)."""
        self.nl_entry = add_newline_runs(self.table, self.tok_ids, self.nl_ids)
        m, first = self.nl_entry.size, int(self.nl_entry[0])
        self.ft_words.append(first, np.zeros(m, np.int64), [c[:0] for c in self.ft_words.cols])
        self.mh_words.append(first, np.zeros(m, np.int64), [np.zeros(0, np.uint64)])
        self.ok_E[self.nl_entry] = True

    @property
    def active(self) -> bool:
        return self.tok is not None or self.scorer is not None or self.minhash is not None

    @property
    def max_chars(self) -> int:
        """The longest text some stage takes from the chunks (longer ones need no lookup)."""
        cuts = [
            (self.tok, self.token_chars),
            (self.scorer, self.quality_chars),
            (self.minhash, self.minhash_chars),
        ]
        return max([c for stage, c in cuts if stage is not None], default=0)

    def lookup(self, texts: list[str], encoded: list[bytes] | None = None) -> ChunkLookup:
        """The chunks of `texts` (`encoded`: their UTF-8 bytes (surrogatepass) when known)."""
        n = len(texts)
        spans = [(i, j) for i, j in text_groups(texts, self.GROUP_CHARS) if j > i]
        for may_restart in (True, False):
            groups = []
            cover = np.ones((n, 3), dtype=bool)  # tokens, quality, minhash
            for i, j in spans:
                part = encoded[i:j] if encoded is not None else None
                # the table empties before a lookup's first group only: a later group's would take
                # the entries found for the groups before it (the lookup starts again, once, instead)
                g = self._lookup_group(texts[i:j], i, cover[i:j], part, not groups, may_restart)
                if g is None:
                    break
                groups.append(g)
            else:
                break
            self._clear()
        lens = np.fromiter(map(len, texts), np.int64, n)
        cover[:, 0] &= lens <= self.token_chars
        cover[:, 1] &= lens <= self.quality_chars
        cover[:, 2] &= lens <= self.minhash_chars
        return ChunkLookup(
            n, groups, cover[:, 0] & (self.tok is not None), cover[:, 1] & (self.scorer is not None),
            cover[:, 2] & (self.minhash is not None),
        )  # fmt: skip

    def _lookup_group(
        self, texts: list[str], lo: int, cover: np.ndarray, encoded: list[bytes] | None, may_clear: bool,
        may_restart: bool,
    ) -> _Group | None:  # fmt: skip
        """The group's chunks looked up (new ones added); None when the table is full and the
        lookup should start again on an empty one (may_restart, not may_clear)."""
        look = self._lookup_group_native if native.library() is not None else self._lookup_group_numpy
        g = look(texts, lo, cover, encoded, may_clear, may_restart)
        if isinstance(g, str) and g == "again":  # (the table was emptied for it: looked up once more)
            g = look(texts, lo, cover, encoded, False, False)
        return None if isinstance(g, str) else g  # ("restart")

    def _lookup_group_numpy(
        self, texts: list[str], lo: int, cover: np.ndarray, encoded: list[bytes] | None, may_clear: bool,
        may_restart: bool,
    ) -> _Group | str:  # fmt: skip
        ch = SpaceChunks(texts, self.MAX_CHUNK, encoded, newlines=self.newlines)
        n, doc = len(texts), ch.doc
        bad = ch.bad_doc.copy()
        # The group's distinct chunks, from Arrow's hash table (~25 ns a chunk): each chunk with
        # the byte before it is one value of a binary array over the joined bytes: a space, or a
        # newline where no space is before the chunk (a text's first, one after a run of
        # newlines) and tokens are served (its ids differ). The table is probed once per distinct
        # value (~10x fewer than chunks).
        led = np.frombuffer(b" " + ch.joined, np.uint8).copy()  # led[p] = the byte before joined[p]
        if self.tok is not None:
            led[ch.starts[ch.first]] = 10
        bounds = np.append(ch.starts, len(ch.joined) + 1)
        values = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), ch.starts.size, [None, pa.py_buffer(bounds), pa.py_buffer(led)]
        )
        enc = pc.dictionary_encode(values)
        dist = enc.dictionary
        d_bounds = np.frombuffer(dist.buffers()[1], np.int64)[dist.offset : dist.offset + len(dist) + 1]
        d_joined = dist.buffers()[2].to_pybytes()
        d_starts, d_ends = d_bounds[:-1] + 1, d_bounds[1:]
        d_first = np.frombuffer(d_joined, np.uint8)[d_bounds[:-1]] == 10
        d_key = keys(padded(d_joined), d_starts, d_ends, d_first.astype(np.int64))
        d_entry = self.table.lookup(d_joined, d_starts, d_ends, d_key)
        d_lens = d_ends - d_starts
        d_new = np.flatnonzero((d_entry < 0) & (d_lens > 0) & (d_lens <= self.MAX_CHUNK))
        d_new, then = self._room(d_new, may_clear, may_restart)
        if then is not None:  # (full: _lookup_group looks the group up again or restarts)
            return then
        if d_new.size:
            d_entry[d_new] = self._add(d_joined, d_starts[d_new], d_ends[d_new], d_first[d_new], d_key, d_new)
        idx = enc.indices.to_numpy()
        entry = d_entry[idx]
        bad[doc[entry < 0]] = True  # (only their texts' chunks may hold -1: they are not gathered)
        cover &= ~bad[:, None]
        # a chunk that breaks the tokens rule / has a label token or </s>: checked per distinct chunk
        ok_d = self.ok_E[np.maximum(d_entry, 0)]
        for col in (0, 1):
            if not ok_d[:, col].all():
                cover[:, col] &= np.bincount(doc[~ok_d[idx, col]], minlength=n) == 0
        if self.tok is not None:
            cover[:, 0] &= self.tok.spanning_ok(texts)
        entry, doc, too_long = ch.with_runs(entry, self.nl_entry)
        cover[too_long] = False  # (a longer run of newlines than the entries hold)
        return _Group(lo, n, entry, doc, np.searchsorted(doc, np.arange(n + 1)))

    def _lookup_group_native(
        self, texts: list[str], lo: int, cover: np.ndarray, encoded: list[bytes] | None, may_clear: bool,
        may_restart: bool,
    ) -> _Group | str:  # fmt: skip
        """_lookup_group with its cut and probe in one C pass (pipelines.native.chunk_scan): the
        same chunks, entries and coverage; the misses' rows are added as the numpy path adds them."""
        parts = encoded if encoded is not None else [t.encode("utf-8", "surrogatepass") for t in texts]
        joined, text_start, text_end = byte_runs(parts)
        entry, doc, bounds, bad, m_start, m_end, m_flag = native.chunk_scan(
            self.table, joined, text_start, text_end, self.newlines, self.tok is not None, self.MAX_CHUNK,
            self.nl_entry,
        )  # fmt: skip
        n = len(texts)
        found = np.full(m_start.size, -1, np.int64)
        if isinstance(self.table, native.CRunTable):  # (it keys its entries itself, long ones too)
            key = (2 * (m_end - m_start) + m_flag,)
        else:  # (a RunTable keeps chunks over SHORT bytes in dicts: C never finds them)
            key = keys(padded(joined), m_start, m_end, m_flag)
            long = np.flatnonzero(m_end - m_start > SHORT)
            if long.size:
                found[long] = self.table.lookup_long(joined, m_start[long], m_end[long], m_flag[long])
        new = np.flatnonzero(found < 0)
        new, then = self._room(new, may_clear, may_restart)
        if then is not None:  # (full: _lookup_group looks the group up again or restarts)
            return then
        if new.size:
            found[new] = self._add(joined, m_start[new], m_end[new], m_flag[new].astype(bool), key, new)
        miss = np.flatnonzero(entry < 0)
        entry[miss] = found[-2 - entry[miss]]
        bad[doc[miss[entry[miss] < 0]]] = True  # (only their texts' chunks may hold -1: not gathered)
        cover &= ~bad[:, None]
        # a chunk that breaks the tokens rule / has a label token or </s> (rare: checked when some
        # entry of the table does)
        for col in (0, 1):
            if not self.ok_E[: self.table.size, col].all():
                cover[:, col] &= np.bincount(doc[~self.ok_E[np.maximum(entry, 0), col]], minlength=n) == 0
        if self.tok is not None:
            cover[:, 0] &= self.tok.spanning_ok(texts)
        return _Group(lo, n, entry, doc, bounds)

    def _room(self, new: np.ndarray, may_clear: bool, may_restart: bool) -> tuple[np.ndarray, str | None]:
        """Whether a group's distinct new chunks fit: (the ones to add, None); when the table is
        full, (new, "again") after emptying it (may_clear: look the group up again) or (new,
        "restart") (the lookup starts again on an empty table); more than the table holds at all:
        (none, None), not served."""
        if self.table.size + new.size <= self.table.max_entries:
            return new, None
        if new.size <= self.table.max_entries and (may_clear or may_restart):
            if not may_clear:
                return new, "restart"
            self._clear()  # (every entry found before is gone)
            return new, "again"
        return new[:0], None

    def _add(
        self, d_joined: bytes, d_starts: np.ndarray, d_ends: np.ndarray, first: np.ndarray, key, at: np.ndarray
    ) -> np.ndarray:  # fmt: skip
        """Entries for distinct new chunks (d_joined[d_starts:d_ends], keys key[at]; first: a
        text's first chunk): every stage's rows computed now. Their bytes are copied into one
        buffer, a space before each (a separator for every stage), which each stage reads in
        place: no Python object per chunk."""
        lens = d_ends - d_starts
        size = lens + 1
        starts = np.cumsum(size) - lens  # (in `joined`)
        ends = starts + lens
        buf = np.full(int(size.sum()), 32, dtype=np.uint8)
        native.copy_runs(np.frombuffer(d_joined, np.uint8), d_starts, lens, buf, starts)
        joined = buf.tobytes()
        first_entry = self.table.size
        numbers = self.table.append(at, (joined, starts, ends), key)
        m = at.size
        ok = np.ones((m, 2), dtype=bool)
        if self.tok is not None:
            ok[:, 0], sizes, ids = self.tok.encode_runs(joined, starts, ends, first)
            self.tok_ids.append(first_entry, sizes, [ids])
        else:
            self.tok_ids.append(first_entry, np.zeros(m, np.int64), [np.zeros(0, np.int32)])
        if self.scorer is not None:
            ok[:, 1], words_C, values = self.scorer.chunk_words(joined, starts)
            self.ft_words.append(first_entry, words_C, list(values))
        else:
            self.ft_words.append(first_entry, np.zeros(m, np.int64), [c[:0] for c in self.ft_words.cols])
        if self.minhash is not None:
            w_W, words_C = self.minhash.words_runs(joined, starts, ends)
            self.mh_words.append(first_entry, words_C, [w_W])
        else:
            self.mh_words.append(first_entry, np.zeros(m, np.int64), [np.zeros(0, np.uint64)])
        if self.table.size > self.ok_E.shape[0]:
            self.ok_E = grown(self.ok_E, max(self.table.size, 2 * self.ok_E.shape[0]))
        self.ok_E[numbers] = ok
        return numbers

    @staticmethod
    def _wanted(lk: ChunkLookup, want: np.ndarray):
        """Per group with wanted texts: (its wanted texts (indices into the lookup), their chunks'
        entries end to end, text i's chunks: [bounds[i], bounds[i + 1]))."""
        for g in lk.groups:
            w = want[g.lo : g.lo + g.n]
            if not w.any():
                continue
            if w.all():  # (the first stage asks for every text)
                entries, bounds = g.entry, g.bounds
            else:
                entries = g.entry[w[g.doc]]
                bounds = np.concatenate(([0], np.cumsum(np.diff(g.bounds)[w])))
            yield g.lo + np.flatnonzero(w), entries, bounds

    def _rows(self, lk: ChunkLookup, want: np.ndarray, ragged: Ragged):
        """Per group with wanted texts: (its wanted texts (indices into the lookup), items per
        wanted text, each column's items in text order)."""
        for idx, entries, bounds in self._wanted(lk, want):
            count, cols = ragged.gather(entries)
            items = np.concatenate(([0], np.cumsum(count)))
            per_text = items[bounds[1:]] - items[bounds[:-1]]
            yield idx, per_text, cols

    def quality(self, lk: ChunkLookup, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fastText's score (float32 [n], NaN where not computed), computed): for wanted texts
        the lookup covers for quality."""
        want = want & lk.quality
        out = np.full(lk.n, np.nan, dtype=np.float32)
        if want.any() and native.library() is not None and self.scorer.row_logits.ndim == 1:
            for idx, entries, bounds in self._wanted(lk, want):  # (the sums in C, the same bits)
                out[idx] = self.scorer.probabilities(
                    *native.quality_rows(self.scorer, entries, bounds, self.ft_words)
                )
            return out, want
        return self._quality_numpy(lk, want, out), want

    def _quality_numpy(self, lk: ChunkLookup, want: np.ndarray, out: np.ndarray) -> np.ndarray:
        for idx, per_text, (logits, count, hash_) in self._rows(lk, want, self.ft_words):
            doc_W = np.repeat(np.arange(idx.size), per_text)
            out[idx] = self.scorer.combine(idx.size, doc_W, logits, count, hash_)
        return out

    def signatures(self, lk: ChunkLookup, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(MinHash signatures (uint32 [n, num_perm], zero where not computed), computed)."""
        want = want & lk.minhash
        out = np.zeros((lk.n, self.minhash.num_perm if self.minhash else 0), dtype=np.uint32)
        if want.any() and native.library() is not None:  # gathered, shingled and hashed in one C pass
            for idx, entries, bounds in self._wanted(lk, want):
                out[idx] = native.minhash_rows(self.minhash, entries, bounds, self.mh_words)
            return out, want
        return self._signatures_numpy(lk, want, out), want

    def _signatures_numpy(self, lk: ChunkLookup, want: np.ndarray, out: np.ndarray) -> np.ndarray:
        for idx, per_text, (w_W,) in self._rows(lk, want, self.mh_words):
            shingles = self.minhash.shingles_from_words(w_W, per_text)
            out[idx] = self.minhash.signatures_from_shingles_numpy(idx.size, *shingles)
        return out

    def tokens(self, lk: ChunkLookup, want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids end to end (int32), offsets [n + 1] (computed texts only hold ids), computed)."""
        want = want & lk.tokens
        parts, per_text_N = [], np.zeros(lk.n, np.int64)
        if native.library() is not None:  # (gathered in C, rows prefetched)
            for idx, entries, bounds in self._wanted(lk, want):
                per_text_N[idx], ids = native.rows_gather(entries, bounds, self.tok_ids)
                parts.append(ids)
        else:
            self._tokens_numpy(lk, want, parts, per_text_N)
        offsets = np.zeros(lk.n + 1, np.int64)
        np.cumsum(per_text_N, out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return flat, offsets, want

    def _tokens_numpy(self, lk: ChunkLookup, want: np.ndarray, parts: list, per_text_N: np.ndarray) -> None:
        for idx, per_text, (ids,) in self._rows(lk, want, self.tok_ids):
            parts.append(ids)
            per_text_N[idx] = per_text
