"""The run's tokenizer: a byte-level BPE (Hugging Face `tokenizers`) with one end-of-text token.

Byte-level means every string encodes (no unknown token) and decode(encode(s)) == s. Trained from
an iterator of texts; saved as the standard `tokenizer.json`, which the prepared data directory
carries so training, evaluation and export all use the same one.

`encode_batch` / `encode_flat` have a fast path with the same result (`_ChunkCache`): the GPT-2
pre-tokenizer never lets a pre-token cross a single space that has non-space characters on both
sides, so such a text is the concatenation of its space-separated chunks' encodings (" " + chunk
after the first; runs of newlines cut too), and a chunk's token ids are cached (looked up for a
whole batch in numpy). Texts
with other whitespace next to a space take the library. Measured on 1.7 KB English documents, one
core, batches of 1,024: 22 µs/doc warm (45-50 while the cache fills) vs 370 µs for the library.
"""

from __future__ import annotations

import itertools
import operator
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3ray.errors import UserError
from dsv3ray.runtable import (
    Ragged,
    RunTable,
    SpaceChunks,
    add_newline_runs,
    byte_runs,
    keys,
    padded,
    ranges,
    text_groups,
)

EOS_TOKEN = "<|endoftext|>"
_TOKEN_ID = operator.attrgetter("id")
# The byte-level pre-tokenizer's split (GPT-2's pattern) on text of printable ASCII and "\n" only,
# where \p{L} is [A-Za-z], \p{N} is [0-9] and \s is [ \n]: the same pieces, in the same order of
# alternatives (both engines backtrack and take the first alternative that matches). "\x00" (not
# in that alphabet) is its own piece, so texts joined by it are split in one call. The cut is made
# by `_pretoken_starts` in numpy (2x faster, and no string per piece); this is its definition.
_SEP = "\x00"
_ASCII_PRETOKEN = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^ \nA-Za-z0-9\x00]+|[ \n]+(?![^ \n])|[ \n]+|\x00"
)

# byte classes for _pretoken_starts
_LETTER, _DIGIT, _OTHER, _SPACE, _NEWLINE, _ZERO = range(6)
_CLASS = np.full(256, _OTHER, dtype=np.uint8)
_CLASS[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)] = _LETTER
_CLASS[np.frombuffer(b"0123456789", np.uint8)] = _DIGIT
_CLASS[32], _CLASS[10], _CLASS[0] = _SPACE, _NEWLINE, _ZERO
_CONTRACTION_2 = np.zeros(256, dtype=bool)  # 's 't 'm 'd
_CONTRACTION_2[np.frombuffer(b"stmd", np.uint8)] = True


def _pretoken_starts(b: np.ndarray) -> np.ndarray:
    """Where each piece of _ASCII_PRETOKEN.findall starts, found in numpy passes over the text's
    bytes `b` (printable ASCII, newline and \x00 only; tests compare both on fuzzed text).

    A piece starts where the byte class (letter, digit, other, whitespace) changes, and at and
    after each \x00, except that: a run of whitespace (spaces and newlines) followed by another
    character leaves its last byte to a piece of its own (when the run has two or more), and a
    last space before a letter, digit or other character starts that one's piece (" ?X+"); an
    apostrophe that starts a piece (after a letter, digit, newline, \x00 or nothing: a space or
    an other character before it takes it into its piece) followed by s, t, m, d, re, ve or ll
    is a piece of its own, and the next piece starts after it."""
    n = b.size
    if not n:
        return np.zeros(0, dtype=np.int64)
    c = _CLASS[b]
    white = (c == _SPACE) | (c == _NEWLINE)
    start = np.empty(n, dtype=bool)
    start[0] = True
    start[1:] = (c[1:] != c[:-1]) & ~(white[1:] & white[:-1])
    zero = np.flatnonzero(c == _ZERO)
    start[zero] = True
    start[zero[zero + 1 < n] + 1] = True
    first = np.flatnonzero(white[1:] & ~white[:-1]) + 1  # whitespace runs [first, last], with more after
    if white[0]:
        first = np.concatenate(([0], first))
    last = np.flatnonzero(white[:-1] & ~white[1:])
    first = first[: last.size]
    start[last[last > first]] = True
    nxt = c[last + 1]
    attach = last[(b[last] == 32) & ((nxt == _LETTER) | (nxt == _DIGIT) | (nxt == _OTHER))]
    start[attach + 1] = False
    ap = np.flatnonzero(b == 39)
    if ap.size:
        prev = c[np.maximum(ap - 1, 0)]
        ok = (ap == 0) | (prev == _LETTER) | (prev == _DIGIT) | (prev == _NEWLINE) | (prev == _ZERO)
        n1 = np.where(ap + 1 < n, b[np.minimum(ap + 1, n - 1)], 0)
        n2 = np.where(ap + 2 < n, b[np.minimum(ap + 2, n - 1)], 0)
        three = (((n1 == 114) | (n1 == 118)) & (n2 == 101)) | ((n1 == 108) & (n2 == 108))  # re ve ll
        ok &= three | _CONTRACTION_2[n1]
        ap, size = ap[ok], np.where(three[ok], 3, 2)
        start[ap + 1] = False
        after = ap + size
        start[after[after < n]] = True
    return np.flatnonzero(start)


_ASCII_SPACE = np.zeros(256, dtype=bool)  # bytes < 0x80 where str.isspace holds
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def _per_run(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """How many bytes of each run [starts, ends) the byte mask holds."""
    c = np.concatenate(([0], np.cumsum(mask)))
    return c[ends] - c[starts]


class _ChunkCache:
    """Token ids of space-separated chunks, for tokenizers where that is exact; batch lookups in numpy.

    The rule. Exact for a byte-level BPE with the GPT-2 split regex and no normalizer (what
    `train_tokenizer` builds). Split a text at its spaces; if every chunk is non-empty and neither
    starts nor ends with whitespace (so every space has non-whitespace on both sides), no
    pre-token crosses a space (each pre-token after one starts with it) and the encoding is the
    concatenation of encode(chunk_0), encode(" " + chunk_1), ... . Only such chunks are cached,
    so a cache hit on every chunk proves the text qualifies. Added tokens (eos) are matched in
    the raw text first: a chunk containing one is not cached. A run of newlines between two
    chunks (non-whitespace on both sides) cuts too: it ends every pre-token, the chunk after it
    is encoded with no space before it, and the run's own ids there (`newline_ids`: its last
    newline is a pre-token of its own) are an entry of the table.

    The table. A batch's texts are joined into one UTF-8 buffer with a space between texts (UTF-8
    never has byte 0x20 inside a character, so the chunks are the byte runs between spaces) and
    all its chunks are looked up at once in a `dsv3ray.runtable.RunTable`, keyed by the chunk's
    bytes and whether it starts its text; entries' ids are kept in a `runtable.Ragged`. A
    text with a chunk over MAX_CHUNK bytes is not cached (the cache's bytes stay bounded): its
    chunks are encoded for that call only (`encode_uncached`).
    Chunks missing from the cache are checked against the rule and encoded once per batch, read in
    place, from their pre-token pieces where they are printable ASCII (`encode_runs`). At most
    `max_entries` chunks are kept: the cache empties when a batch's new chunks would pass that
    bound, and a batch whose new chunks alone pass it takes the library.
    """

    MAX_CHUNK = 256  # bytes: a text with a longer chunk (a blob, not words) is not cached
    MAX_NEWLINES = 4  # a longer run of newlines between two chunks: the library
    GROUP_CHARS = 256 << 10  # texts looked up together

    def __init__(self, hf: _HFTokenizer, max_entries: int = 1 << 18, max_pieces: int = 1 << 20):
        self.hf = hf
        added = [t.content for t in hf.get_added_tokens_decoder().values()]
        self.added_in_chunk = [t for t in added if " " not in t]
        self._added_re = (
            re.compile("|".join(map(re.escape, self.added_in_chunk))) if self.added_in_chunk else None
        )
        self._added_re_b = (  # the same, on UTF-8 bytes
            re.compile(b"|".join(re.escape(t.encode()) for t in self.added_in_chunk))
            if self.added_in_chunk
            else None
        )
        self.added_spanning = [t for t in added if " " in t]  # checked on the whole text
        # runs of newlines cut chunks too (SpaceChunks(newlines=True)) when their ids are known
        self.nl_ids = self.newline_ids(self.MAX_NEWLINES)
        self.table = RunTable(max_entries)
        self.ids = Ragged((np.int32,))
        # pre-token pieces (encode_runs): their entries, and each entry's ids (an entry past the
        # table's is a piece kept for one call only: more distinct new pieces than it holds)
        self.piece_table = RunTable(max_pieces)
        self.piece_ids = Ragged((np.int32,))
        # the BPE of new pieces by something faster that gives the library's ids (pipelines.native
        # installs its C one): called with the pieces joined by 0xff (byte-level, unmapped), it
        # gives (tokens per piece, their ids end to end), or None (the library then); None: the library
        self.piece_bpe = None
        # printable-ASCII chunks' ids from their pieces by something faster (pipelines.native
        # installs its C one): called as _simple_runs_numpy is, it gives the same; None: numpy
        self.simple_runs = None
        self._clear_pieces()
        self._clear()

    def _clear(self) -> None:
        """Empty, but for the entries of runs of 1..MAX_NEWLINES newlines between two chunks."""
        self.table.clear()
        self.ids.clear()
        self.nl_entry = np.zeros(0, np.int64)
        if self.nl_ids is not None:
            self.nl_entry = add_newline_runs(self.table, self.ids, self.nl_ids)

    def _clear_pieces(self) -> None:
        self.piece_table.clear()
        self.piece_ids.clear()
        sep = _SEP.encode()  # entry 0, no ids: it separates texts
        one = np.ones(1, dtype=np.int64)
        self.piece_table.append(one - 1, [sep], keys(padded(sep), one - 1, one, 0))
        self.piece_ids.append(0, one - 1, [np.zeros(0, dtype=np.int32)])

    def __len__(self) -> int:
        """Chunks cached."""
        return self.table.size - self.nl_entry.size

    @staticmethod
    def applies(hf: _HFTokenizer) -> bool:
        # (read from the tokenizer's own properties: its JSON, vocabulary and merges included,
        # took ~14 ms to write and parse in every cleaning worker of every run)
        pre, model = hf.pre_tokenizer, hf.model
        return (
            hf.normalizer is None
            and isinstance(pre, pre_tokenizers.ByteLevel)
            and pre.use_regex
            and not pre.add_prefix_space
            and isinstance(model, models.BPE)
            and not model.dropout
            and hf.post_processor is None
            and hf.truncation is None  # the library would cut or pad whole texts
            and hf.padding is None
        )

    def _safe(self, chunk: str) -> bool:
        """The rule for one chunk: the definition `_classes_runs` computes in numpy (tests compare)."""
        return (
            chunk != ""
            and not chunk[0].isspace()
            and not chunk[-1].isspace()
            and (self._added_re is None or self._added_re.search(chunk) is None)
        )

    def _classes(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(_safe, only printable ASCII and newlines: _ASCII_PRETOKEN's alphabet) per chunk."""
        joined, starts, ends = byte_runs([c.encode("utf-8", "surrogatepass") for c in chunks])
        return self._classes_runs(joined, starts, ends)

    def _classes_runs(
        self, joined: bytes, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """_classes of the UTF-8 runs joined[starts:ends], in numpy passes over the bytes: an edge
        character that is not ASCII (rare) is decoded and asked str.isspace; a run holding an added
        token (found in the bytes: UTF-8 has no match inside a character) is not safe."""
        b = np.frombuffer(joined, np.uint8)
        lens = ends - starts
        # printable ASCII (0x20-0x7e) or a newline, counted over each run (a byte >= 0x80 is neither)
        simple = _per_run(((b - np.uint8(0x20)) >= 0x5F) & (b != 10), starts, ends) == 0
        safe = lens > 0
        at = np.flatnonzero(safe)
        head, tail = b[starts[at]], b[ends[at] - 1]
        safe[at] = ~(_ASCII_SPACE[head] | _ASCII_SPACE[tail])
        for j in at[(head >= 0x80) | (tail >= 0x80)].tolist():
            c = joined[starts[j] : ends[j]].decode("utf-8", "surrogatepass")
            safe[j] = not (c[0].isspace() or c[-1].isspace())
        if self._added_re_b is not None:
            hits = np.array([m.span() for m in self._added_re_b.finditer(joined)], np.int64).reshape(-1, 2)
            if hits.size:  # (the runs need not be in buffer order)
                order = np.argsort(starts, kind="stable")
                run = np.searchsorted(starts[order], hits[:, 0], side="right") - 1
                inside = (run >= 0) & (hits[:, 1] <= ends[order][np.maximum(run, 0)])
                safe[order[run[inside]]] = False
        return safe, simple

    def newline_ids(self, most: int) -> list[list[int]] | None:
        """The ids of a run of 1, 2, ..., `most` newlines between two chunks (no space on either
        side), as the library encodes it there: the pre-tokenizer leaves a run's last newline to
        itself before a non-space, so the run is not encoded as it would be alone. None when an
        added token holds a newline or the ids depend on what follows (no such tokenizer here)."""
        if any("\n" in t for t in self.added_in_chunk + self.added_spanning):
            return None
        enc = self.hf.encode
        out = []
        for k in range(1, most + 1):
            found = set()
            for before, after in (("x", "a"), ("1", "0"), (".", "("), ("A", "'s")):
                full = enc(before + "\n" * k + after, add_special_tokens=False).ids
                head, tail = (
                    enc(before, add_special_tokens=False).ids,
                    enc(after, add_special_tokens=False).ids,
                )
                if full[: len(head)] != head or full[len(full) - len(tail) :] != tail:
                    return None
                found.add(tuple(full[len(head) : len(full) - len(tail)]))
            if len(found) != 1:
                return None
            out.append(list(found.pop()))
        return out

    def spanning_ok(self, texts: list[str]) -> np.ndarray:
        """Per text: it holds no added token with a space in it (those are matched on the whole text)."""
        ok = np.ones(len(texts), dtype=bool)
        if self.added_spanning:
            ok &= [not any(a in t for a in self.added_spanning) for t in texts]
        return ok

    def encode_uncached(self, texts: list[str]) -> list[np.ndarray | None]:
        """Each text's ids from its space-separated chunks (`encode_chunks`), nothing stored: for
        texts the cache refuses for a chunk over MAX_CHUNK bytes (code, tables, long URLs; the
        library would cost ~1 µs a character). None where the chunk rule does not hold: an empty
        chunk (a space at an end or next to another), an added token with a space, an unsafe chunk."""
        spanning = self.spanning_ok(texts)
        parts = [t.split(" ") if ok else [""] for t, ok in zip(texts, spanning.tolist())]
        per_text = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        chunks = list(itertools.chain.from_iterable(parts))
        first = np.zeros(len(chunks), dtype=bool)
        first[np.cumsum(per_text) - per_text] = True
        safe, sizes, flat = self.encode_chunks(chunks, first)
        owner = np.repeat(np.arange(len(texts)), per_text)
        good = np.bincount(owner, weights=~safe, minlength=len(texts)) == 0  # every chunk safe
        ends = np.cumsum(sizes)  # (unsafe chunks have no ids in flat)
        last = np.cumsum(per_text) - 1
        stop = ends[last]
        start = np.concatenate(([0], stop[:-1]))
        return [flat[a:b] if g else None for a, b, g in zip(start.tolist(), stop.tolist(), good.tolist())]

    def encode_chunks(
        self, chunks: list[str], first: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(safe: the rule holds for the chunk, token ids per chunk (0 for unsafe ones), the ids of
        each safe chunk (of " " + chunk unless first[j]) end to end (int32)): `encode_runs` of
        their UTF-8 bytes."""
        joined, starts, ends = byte_runs([c.encode("utf-8", "surrogatepass") for c in chunks])
        return self.encode_runs(joined, starts, ends, first)

    def encode_runs(
        self, joined: bytes, starts: np.ndarray, ends: np.ndarray, first: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode_chunks of the chunks joined[starts:ends] (UTF-8, surrogatepass), read in place.

        A chunk of printable ASCII and newlines is cut into the pre-tokenizer's pieces here
        (`_pretoken_starts`, all the batch's such chunks at once, their bytes copied into one
        buffer in numpy) and each distinct piece is encoded once (`_piece_entries`): new chunks
        are mostly new combinations of known pieces (real text: ~10% of chunks are new, ~1% of
        pieces), and the library's BPE costs ~7 µs a chunk. Other chunks take one library call."""
        n = starts.size
        safe, simple = self._classes_runs(joined, starts, ends)
        sel = np.flatnonzero(safe)
        simple = simple[sel]
        count = np.zeros(sel.size, dtype=np.int64)
        flat = np.zeros(0, dtype=np.int32)
        if simple.any():  # their pieces, the new ones encoded, then looked up
            at = sel[simple]
            space = ~first[at]  # " " before the chunk
            runs = self.simple_runs or type(self)._simple_runs_numpy
            count[simple], flat = runs(self, joined, starts[at], ends[at], space)
        rest = np.flatnonzero(~simple)
        if rest.size:  # the others: one library call
            others = [
                ("" if first[j] else " ") + joined[starts[j] : ends[j]].decode("utf-8", "surrogatepass")
                for j in sel[rest].tolist()
            ]
            encs = self.hf.encode_batch_fast(others, add_special_tokens=False)
            rest_ids = [e.ids for e in encs]
            count[rest] = np.fromiter(map(len, rest_ids), dtype=np.int64, count=rest.size)
            # ids in chunk order: the ASCII ones' ids are first in `flat`, the others' after
            start = np.zeros(sel.size, dtype=np.int64)
            start[simple] = np.concatenate(([0], np.cumsum(count[simple])[:-1])) if simple.any() else 0
            start[rest] = flat.size + np.concatenate(([0], np.cumsum(count[rest])[:-1]))
            flat = np.concatenate((flat, np.fromiter(itertools.chain.from_iterable(rest_ids), np.int32)))
            flat = flat[ranges(start, count)]
        sizes = np.zeros(n, dtype=np.int64)
        sizes[sel] = count
        return safe, sizes, flat

    def _simple_runs_numpy(
        self, joined: bytes, starts: np.ndarray, ends: np.ndarray, space: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids per run, their ids end to end) of printable-ASCII runs joined[starts:ends] (each
        encoded with a space before it where space[j]): their pieces (_SEP between runs, in one
        buffer), each looked up in the piece table (`_piece_entries`), the new ones encoded."""
        space = space.astype(np.int64)
        lens = ends - starts
        size = space + lens + 1  # (and _SEP after it)
        out_start = np.cumsum(size) - size
        out = np.zeros(int(size.sum()) - 1, dtype=np.uint8)  # (zero: _SEP)
        out[out_start[space == 1]] = 32
        out[ranges(out_start + space, lens)] = np.frombuffer(joined, np.uint8)[ranges(starts, lens)]
        entry = self._piece_entries(out.tobytes())
        count_P, (flat,) = self.piece_ids.gather(entry)
        return np.add.reduceat(count_P, np.concatenate(([0], np.flatnonzero(entry == 0) + 1))), flat

    def _piece_entries(self, raw: bytes) -> np.ndarray:
        """The entry (in `piece_ids`) of each pre-token piece of `raw` (printable ASCII, newlines
        and \x00), cut by `_pretoken_starts`; the call's distinct pieces (Arrow's hash table) are
        looked up in `piece_table`. A piece not seen before is BPE-encoded by the model alone, once
        (on its byte-mapped text: ~2x faster than an encode call)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self.piece_table
        if self.piece_ids.size > table.size:  # the last call kept pieces for itself
            self._clear_pieces()
        bounds = np.append(_pretoken_starts(np.frombuffer(raw, dtype=np.uint8)), len(raw))
        enc = pc.dictionary_encode(
            pa.LargeBinaryArray.from_buffers(
                pa.large_binary(), bounds.size - 1, [None, pa.py_buffer(bounds), pa.py_buffer(raw)]
            )
        )
        dist = enc.dictionary
        d_bounds = np.frombuffer(dist.buffers()[1], np.int64)[dist.offset : dist.offset + len(dist) + 1]
        d_raw = dist.buffers()[2].to_pybytes()
        starts, ends = d_bounds[:-1], d_bounds[1:]
        key = keys(padded(d_raw), starts, ends, 0)
        entry = table.lookup(d_raw, starts, ends, key)
        new = np.flatnonzero(entry < 0)
        if new.size:
            if table.size + new.size > table.max_entries:
                self._clear_pieces()  # full: every entry found above is gone
                entry = table.lookup(d_raw, starts, ends, key)
                new = np.flatnonzero(entry < 0)
            entry[new] = self._new_pieces(d_raw, starts[new], ends[new], key, new)
        return entry[enc.indices.to_numpy()]

    def _new_pieces(
        self, raw: bytes, starts: np.ndarray, ends: np.ndarray, key, at: np.ndarray
    ) -> np.ndarray:
        """Entries for distinct new pieces raw[starts:ends] (keys key[at]): in the table where it
        holds them (else kept for this call only), their ids BPE-encoded; their entry numbers."""
        table = self.piece_table
        first = self.piece_ids.size
        if first + at.size <= table.max_entries:
            table.append(at, (raw, starts, ends), key)
        lens = ends - starts  # the new pieces joined by 0xff (in no piece)
        size = lens + 1
        joined = np.full(int(size.sum()) - 1, 0xFF, dtype=np.uint8)
        joined[ranges(np.cumsum(size) - size, lens)] = np.frombuffer(raw, np.uint8)[ranges(starts, lens)]
        self._add_pieces(joined.tobytes())  # (past the table's entries when more: kept for this call)
        return np.arange(first, first + at.size)

    def _add_pieces(self, joined: bytes) -> None:
        """The next entries of `piece_ids`: the ids of the pieces `joined` by 0xff (at least one)."""
        done = self.piece_bpe(joined) if self.piece_bpe is not None else None
        if done is not None:
            self.piece_ids.append(self.piece_ids.size, done[0], [done[1]])
            return
        bpe = self.hf.model.tokenize
        # byte-mapped all at once (GPT-2's byte-to-character map moves only space and newline in
        # this alphabet: the other printable ASCII bytes map to themselves)
        mapped = joined.decode("latin-1").replace(" ", "\u0120").replace("\n", "\u010a")
        # the tokens of all pieces first, then their ids in one pass (a list of ids per piece
        # costs as much as the BPE itself: 2.96 vs 1.97 µs a piece on real text)
        tokens = list(map(bpe, mapped.split("\xff")))
        sizes = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        flat = np.fromiter(map(_TOKEN_ID, itertools.chain.from_iterable(tokens)), np.int32, int(sizes.sum()))
        self.piece_ids.append(self.piece_ids.size, sizes, [flat])

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids of the texts end to end (int32), offsets (n + 1), ok (n)): text i is
        ids[offsets[i] : offsets[i + 1]] where ok[i]; a text that is not ok has no ids here.
        Looked up in groups of about GROUP_CHARS characters: their per-chunk arrays stay in cache
        (measured 15-20% faster per document than groups of 1,024 1.7 KB documents)."""
        parts = [self._encode_group(texts[i:j]) for i, j in text_groups(texts, self.GROUP_CHARS)]
        if len(parts) == 1:
            return parts[0]
        flats, offs, oks = zip(*parts)
        starts = np.cumsum([0] + [f.size for f in flats[:-1]])
        offsets = np.concatenate([[0]] + [o[1:] + s for o, s in zip(offs, starts)])
        return np.concatenate(flats), offsets, np.concatenate(oks)

    def _encode_group(
        self, texts: list[str], _retry: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(texts)
        if not n:
            return np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64), np.ones(0, dtype=bool)
        ch = SpaceChunks(texts, self.MAX_CHUNK, newlines=self.nl_ids is not None)
        ok = self.spanning_ok(texts) & ~ch.bad_doc
        doc = ch.doc
        key = keys(ch.buf, ch.starts, ch.ends, ch.first)
        entry = self.table.lookup(ch.joined, ch.starts, ch.ends, key)
        missing = np.flatnonzero((entry < 0) & ok[doc])
        if missing.size:
            added = self._add(missing, ch, key)
            if added is None:  # the cache emptied: every entry found above is gone
                if _retry:
                    return self._encode_group(texts, _retry=False)
                ok[doc[missing]] = False  # new chunks alone exceed max_entries: the library
            else:
                entry[missing] = added
                ok[doc[missing[added < 0]]] = False
        entry, doc, too_long = ch.with_runs(entry, self.nl_entry)  # each run of newlines after its chunk
        ok[too_long] = False
        good = ok[doc]
        count, (ids,) = self.ids.gather(entry[good])
        per_text = np.bincount(doc[good], weights=count, minlength=n).astype(np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(per_text, out=offsets[1:])
        return ids, offsets, ok

    def _add(self, missing, ch: SpaceChunks, key) -> np.ndarray | None:
        """Encode and cache the distinct chunks at `missing`; their entries (-1 where a chunk
        breaks the rule or its key clashed), or None when the cache had to empty."""
        at, inverse, clash = self.table.distinct(ch.joined, ch.starts, ch.ends, missing, key)
        safe, sizes, flat = self.encode_runs(ch.joined, ch.starts[at], ch.ends[at], ch.first[at])
        if self.table.size + int(safe.sum()) > self.table.max_entries:
            self._clear()
            return None
        sel = np.flatnonzero(safe)
        new = np.full(at.size, -1, dtype=np.int64)
        first = self.table.size
        kept = at[sel]  # (their bytes read in place: only chunks too long for a key need them)
        new[sel] = self.table.append(kept, (ch.joined, ch.starts[kept], ch.ends[kept]), key)
        self.ids.append(first, sizes[sel], [flat])  # (unsafe chunks have no ids in flat)
        result = new[inverse]
        result[clash] = -1
        return result


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
        self._chunks = _ChunkCache(hf) if _ChunkCache.applies(hf) else None

    @property
    def chunk_cache(self) -> _ChunkCache | None:
        """The per-chunk cache behind encode_flat (None where its rule does not apply)."""
        return self._chunks

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One int32 array per text (no eos appended); equal to the library's encode_batch."""
        flat, offsets = self.encode_flat(texts)
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids end to end (int32) and their offsets (n + 1, int64): text i is
        flat[offsets[i] : offsets[i + 1]]; equal to the library's encode_batch."""
        n = len(texts)
        if self._chunks is not None:
            flat, offsets, ok = self._chunks.encode_flat(texts)
            if ok.all():
                return flat, offsets
        else:
            flat, offsets, ok = (
                np.zeros(0, dtype=np.int32),
                np.zeros(n + 1, dtype=np.int64),
                np.zeros(n, bool),
            )
        pieces = [flat[offsets[i] : offsets[i + 1]] for i in range(n)]
        slow = np.flatnonzero(~ok)
        if self._chunks is not None and slow.size:  # chunk by chunk where the rule holds
            for i, ids in zip(slow.tolist(), self._chunks.encode_uncached([texts[i] for i in slow])):
                if ids is not None:
                    pieces[i] = ids
                    ok[i] = True
            slow = np.flatnonzero(~ok)
        for i, e in zip(slow, self.hf.encode_batch_fast([texts[i] for i in slow], add_special_tokens=False)):
            pieces[i] = np.asarray(e.ids, dtype=np.int32)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([p.size for p in pieces], out=offsets[1:])
        return (np.concatenate(pieces) if pieces else flat), offsets

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


def single_threaded() -> None:
    """This process is one of one-worker-per-CPU: the library's own thread pool would only
    oversubscribe the cores (call before the first encode; the pool starts on first use)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


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
