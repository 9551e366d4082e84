"""Tokenize and pack: documents → token pieces (≤ max_doc_tokens) → rows of exactly seq_len + 1.

Each document is encoded and cut at the token level into pieces of at most `max_doc_tokens` tokens:
with `truncate_tokens` only the first piece is kept (the seed's rule, done on tokens instead of
characters), otherwise all pieces are kept, consecutive in the stream (eos follows only the last
piece). Documents go to eval or train by their text hash, so the split is deterministic and a
document never straddles splits.
The stream of each split is cut into non-overlapping rows of seq_len + 1 tokens (the model reads
[:-1], predicts [1:]); a final partial row is dropped and counted.
"""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsv3ray.tokenizer import Tokenizer

_EVAL_BUCKETS = 1_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """How prepared shards store token ids: uint16 while every id fits (vocab <= 65,536, half the
    bytes), else int32; little-endian either way."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def row_schema(row_len: int, dtype: np.dtype) -> pa.Schema:
    """A shard's schema: sample_id int64, input_ids = one row of row_len ids as fixed-size binary
    (row_len * itemsize bytes, the ids end to end). One value per row: a list column costs Parquet
    a repetition and a definition level per id (writing: 20 vs 7 ns an id, reading ~5x slower)."""
    return pa.schema(
        [("sample_id", pa.int64()), ("input_ids", pa.binary(row_len * dtype.itemsize))],
        metadata={b"dsv3ray.token_dtype": dtype.str.encode()},
    )


def rows_from_arrow(col: pa.Array | pa.ChunkedArray, row_len: int, dtype: str | None = None) -> np.ndarray:
    """(rows, row_len) token ids of an input_ids column, in the shards' dtype: fixed-size binary rows
    of `dtype` ids ("uint16"/"int32", meta.json's token_dtype; None: whichever makes row_len ids a
    row), read in place, or lists of ints (shards of earlier versions: int32)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    if pa.types.is_fixed_size_binary(col.type):
        width = col.type.byte_width
        if dtype is None:
            dtype = "uint16" if width == 2 * row_len else "int32"
        dt = np.dtype(dtype).newbyteorder("<")
        if dt not in (np.dtype("<u2"), np.dtype("<i4")):
            raise ValueError(f"token_dtype {dtype} is not uint16 or int32")
        if width != row_len * dt.itemsize:
            raise ValueError(f"rows have {width / dt.itemsize:g} tokens ({width} bytes of {dt.name})")
        parts = [
            np.frombuffer(c.buffers()[1], dtype=dt, count=len(c) * row_len, offset=c.offset * width)
            for c in chunks
            if len(c)
        ]
    elif pa.types.is_list(col.type):  # (what check_shards accepts besides binary rows)
        dt = np.dtype(np.int32)
        parts, widths = [], set()
        for c in chunks:
            if len(c):
                widths.update(np.diff(c.offsets.to_numpy()).tolist())
                parts.append(c.flatten().to_numpy(zero_copy_only=False))
        if widths - {row_len}:
            raise ValueError(f"rows have {', '.join(map(str, sorted(widths - {row_len})))} tokens")
    else:
        raise ValueError(f"input_ids is {col.type}, not fixed-size binary rows or lists of ids")
    flat = np.concatenate(parts) if parts else np.zeros(0, dt)
    return flat.astype(dt, copy=False).reshape(-1, row_len)


def eval_mask(text_hash_N: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Which documents go to eval, by their int64 text hash: hash mod 10^6 below the fraction
    (numpy's % on integers takes the divisor's sign, as Python's: negative hashes included)."""
    return (text_hash_N % _EVAL_BUCKETS) < eval_fraction * _EVAL_BUCKETS


def tokenize_documents(
    tok: Tokenizer,
    texts: list[str],
    hashes: list[int],
    max_doc_tokens: int,
    eval_fraction: float,
    truncate: bool,
    max_chars: int = 1 << 20,
    encoded: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, pa.Array]:
    """Documents → columns tokens (list<int32>, eos last), eval, pieces, truncated_tokens.
    `encoded`: the (flat, offsets) of tok.encode_flat([t[:max_chars] for t in texts]) when the
    caller has them."""
    if encoded is None:  # (t[:max_chars] is t when short)
        encoded = tok.encode_flat([t[:max_chars] for t in texts])
    flat, offsets = encoded
    big = [i for i, t in enumerate(texts) if len(t) > max_chars]
    if big:  # oversized documents: encoded in whitespace-aligned chunks
        docs = [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
        for i in big:
            docs[i] = np.concatenate(tok.encode_batch(chunk_text(texts[i], max_chars)))
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([d.size for d in docs], out=offsets[1:])
        flat = np.concatenate(docs) if docs else flat
    n = len(texts)
    sizes = np.diff(offsets)
    pieces = np.maximum(1, -(-sizes // max_doc_tokens))
    cut = np.maximum(0, sizes - max_doc_tokens) if truncate else np.zeros(n, dtype=np.int64)
    if cut.any():  # keep each document's first max_doc_tokens
        position = np.arange(flat.size) - np.repeat(offsets[:-1], sizes)
        flat = flat[position < max_doc_tokens]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes - cut, out=offsets[1:])
    tokens = np.insert(flat, offsets[1:], np.int32(tok.eos_id))  # eos after each document
    hashes_N = np.asarray(hashes, dtype=np.int64)
    return {
        "tokens": pa.ListArray.from_arrays(
            pa.array(offsets + np.arange(n + 1), pa.int32()), pa.array(tokens)
        ),
        "eval": pa.array(eval_mask(hashes_N, eval_fraction), pa.bool_()),
        "pieces": pa.array(pieces, pa.int64()),
        "truncated_tokens": pa.array(cut, pa.int64()),
    }


class Tokenize:
    """Pass 2's work: clean-text shards (text, text_hash) → (tokens list<int32>, eval bool, pieces)."""

    def __init__(
        self,
        tokenizer_json: str,
        max_doc_tokens: int,
        eval_fraction: float,
        truncate: bool,
        max_chars: int = 1 << 20,
    ):
        from tokenizers import Tokenizer as HF

        from dsv3ray.tokenizer import single_threaded

        single_threaded()  # one actor per CPU
        self.tok = Tokenizer(HF.from_str(tokenizer_json))
        from pipelines import native

        native.install(self.tok, tokenizer_json)  # (new pieces' cut, probe and BPE in C)
        self.max_doc_tokens = max_doc_tokens
        self.eval_fraction = eval_fraction
        self.truncate = truncate
        self.max_chars = max_chars

    def __call__(self, path: str):
        """A clean-text shard → one output table per 1024 documents, in order (read and tokenized
        in one Ray task per shard: pipelines.prepare)."""
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield self.tokenize(pa.Table.from_batches([batch]))

    def tokenize(self, table: pa.Table) -> pa.Table:
        return pa.table(
            tokenize_documents(
                self.tok, table.column("text").to_pylist(), table.column("text_hash").to_pylist(),
                self.max_doc_tokens, self.eval_fraction, self.truncate, self.max_chars,
            )
        )  # fmt: skip


_CUT = re.compile(r"(?<=[^\s]) (?=[^\s])")  # a single space between two non-spaces


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars, each cut just before a single space between two words, where
    the byte-level pre-tokenizer splits anyway (" word" starts a new pre-token): encoding the
    pieces gives the same tokens as encoding the whole."""
    out, start = [], 0
    while len(text) - start > max_chars:
        cut = -1
        for m in _CUT.finditer(text, start + 1, start + max_chars):
            cut = m.start()
        if cut <= start:
            cut = start + max_chars  # no word boundary in the window: cut anywhere
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


class ShardWriter:
    """Rows → DIR/split/part-NNNNN.parquet, `rows_per_shard` rows each; dense sample ids from 0;
    ids stored as `dtype` (see `token_dtype`, `row_schema`).

    A shard is written a row group (~GROUP_BYTES of ids) at a time, as its rows come: what is left
    to compress when the last rows arrive is at most one group, not the whole shard (8192 rows of
    513 ids: ~50-110 ms of zstd, bincount and copies at the end of every prepare run, after its
    workers had finished).
    vocab_size: count the tokens written per id (`counts_V`, for the unigram entropy).
    background: groups are checked, counted, compressed and written by one thread of their own, in
    order, at most QUEUED_BYTES of ids behind (zstd and the file write release the GIL): the
    caller's thread, the prepare driver's one order-dependent thread, hands over rows as they came
    instead of spending ~12 ms on 4 MB of them. `close()` waits for the writes and raises the
    first error of any (an id outside `dtype` included)."""

    GROUP_BYTES = 1 << 20
    QUEUED_BYTES = 16 << 20

    def __init__(
        self, out_dir: Path, rows_per_shard: int, dtype: np.dtype = np.dtype("<i4"), background: bool = False,
        vocab_size: int | None = None,
    ):  # fmt: skip
        self.dir = out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.dtype = np.dtype(dtype)
        self.buffer: list[np.ndarray] = []  # (rows, row length) blocks not handed to the writer yet
        self.buffered = 0
        self.in_shard = 0  # rows of the current shard already handed to the writer
        self.num_rows = 0  # rows of whole shards handed (all rows, after the last flush)
        self.shards = 0
        self.group_rows = 0  # rows of a row group (set by the first rows: GROUP_BYTES of them)
        self.counts_V = np.zeros(vocab_size, dtype=np.int64) if vocab_size else None  # (complete after close)
        self._open: tuple[Path, pq.ParquetWriter] | None = None  # the shard being written
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        self._background = background
        self._thread: threading.Thread | None = None

    def add(self, row: np.ndarray) -> None:
        self.add_rows(row[None])

    def rows_wanted(self, row_len: int) -> int:
        """The rows (of row_len ids) that end the current row group, or the shard, exactly: rows
        of `dtype` added in such calls reach the file as they are (no copy)."""
        self._set_group_rows(row_len)
        return min(self.group_rows, self.rows_per_shard - self.in_shard) - self.buffered

    def _set_group_rows(self, row_len: int) -> None:
        if not self.group_rows:  # (set by the first rows: GROUP_BYTES of them)
            self.group_rows = max(1, self.GROUP_BYTES // max(1, row_len * self.dtype.itemsize))

    def add_rows(self, rows_RL: np.ndarray) -> None:
        """Rows of equal length (R, L); shards are cut at exactly rows_per_shard rows."""
        if rows_RL.shape[0]:
            self._set_group_rows(rows_RL.shape[1])
        while rows_RL.shape[0]:
            take = min(self.rows_per_shard - self.in_shard - self.buffered, rows_RL.shape[0])
            self.buffer.append(rows_RL[:take])
            self.buffered += take
            rows_RL = rows_RL[take:]
            if self.in_shard + self.buffered >= self.rows_per_shard:
                self._hand(last=True)
            elif self.buffered >= self.group_rows:
                self._hand(last=False)

    def flush(self) -> None:
        """End the current shard here (its rows so far, if any)."""
        if self.buffered or self.in_shard:
            self._hand(last=True)

    def _hand(self, last: bool) -> None:
        """The buffered rows as the current shard's next row group (its last: the file ends)."""
        group = (
            self.dir / f"part-{self.shards:05d}.parquet",
            self.num_rows + self.in_shard,
            self.buffer,
            last,
        )
        if not self._background:
            self._write(*group)  # (an error leaves the counts as they were)
        else:
            self._check()
            if self._thread is None:
                row_bytes = max(1, self.buffer[0].shape[1] * self.dtype.itemsize) if self.buffer else 1
                self._queue = queue.Queue(max(2, self.QUEUED_BYTES // (self.group_rows * row_bytes)))
                self._thread = threading.Thread(target=self._drain, daemon=True, name="dsv3ray-shards")
                self._thread.start()
            self._queue.put(group)
        self.in_shard += self.buffered
        self.buffer, self.buffered = [], 0
        if last:
            self.shards += 1
            self.num_rows += self.in_shard
            self.in_shard = 0

    def close(self) -> None:
        """Wait for the queued writes (background); raises a write's error. Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while (group := self._queue.get()) is not None:
            if self._error is None:  # (after an error the rest is not written; close() raises it)
                try:
                    self._write(*group)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._error = e

    def _write(self, path: Path, first_id: int, blocks: list[np.ndarray], last: bool) -> None:
        try:
            if blocks:
                self._write_group(path, first_id, blocks[0] if len(blocks) == 1 else np.concatenate(blocks))
        except BaseException:
            if self._open is not None:  # (no incomplete shard left behind; the error is raised)
                self._open[1].close()
                self._open = None
                path.unlink(missing_ok=True)
            raise
        if last and self._open is not None:
            self._open[1].close()
            self._open = None

    def _write_group(self, path: Path, first_id: int, rows_NL: np.ndarray) -> None:
        if rows_NL.dtype != self.dtype and rows_NL.size:  # (ids of `dtype` are ids it holds)
            low, high = rows_NL.min(), rows_NL.max()
            if low < 0 or high > np.iinfo(self.dtype).max:
                raise ValueError(f"token ids outside {self.dtype.name}: {low}..{high}")
        n, length = rows_NL.shape
        data = np.ascontiguousarray(rows_NL, dtype=self.dtype)
        schema = row_schema(length, self.dtype)
        rows = pa.FixedSizeBinaryArray.from_buffers(
            schema.field("input_ids").type, n, [None, pa.py_buffer(data)]
        )
        table = pa.table([pa.array(np.arange(first_id, first_id + n, dtype=np.int64)), rows], schema=schema)
        if self._open is None or self._open[0] != path:
            # zstd, plain pages, no dictionary: measured on 1,575 rows of 513 real-text ids (uint16),
            # vs the int32 list column of earlier versions (byte-stream-split, zstd): writes 2.9x
            # faster, reads 5x faster, 6% smaller
            writer = pq.ParquetWriter(
                path, schema, compression="zstd", use_dictionary=False,
                column_encoding={"sample_id": "PLAIN", "input_ids": "PLAIN"},
            )  # fmt: skip
            self._open = (path, writer)
        self._open[1].write_table(table, row_group_size=n)
        if self.counts_V is not None:  # (counted once written: a failed group counts nothing)
            from pipelines import native

            ids = data.reshape(-1)
            if ids.dtype != np.uint16 or not native.count_u16(ids, self.counts_V):  # (C: ~8x faster)
                V = self.counts_V.size
                self.counts_V += np.bincount(ids, minlength=V)[:V]


class Packer:
    """Concatenates documents (each ending in eos) into rows of seq_len + 1 tokens.

    Ids are copied once: from the caller's arrays (slices of a batch's ids), converted to the
    writer's dtype, straight into the rows being filled, as many as the writer takes as one row
    group (`ShardWriter.rows_wanted`); a full buffer goes to the writer as it is. (Joining the
    documents first, then the rows, then the group, then converting: four copies of every id,
    ~0.1 s of the prepare driver's thread per 12M ids.)"""

    def __init__(self, seq_len: int, writer: ShardWriter):
        self.row_len = seq_len + 1
        self.writer = writer
        self.buf: np.ndarray | None = None  # the rows being filled, flat, in writer.dtype
        self.fill = 0  # ids in buf
        self.tokens = 0  # tokens handed to the writer in rows

    def add(self, tokens: np.ndarray) -> None:
        if tokens.size:
            self.add_parts([tokens], int(tokens.min()), int(tokens.max()))

    def add_parts(self, parts: list[np.ndarray], low: int, high: int) -> None:
        """Documents' ids end to end, given in pieces (any integer dtype); low, high: the least
        and the greatest of them (or bounds the caller knows: of the arrays they are slices of).
        Ids the writer's dtype cannot hold raise ValueError, and nothing is added. The ids that
        fit in the rows being filled are copied there by one np.concatenate (a batch's kept
        documents come in thousands of short runs: a call per run costs more than the copy)."""
        info = np.iinfo(self.writer.dtype)
        if low < info.min or high > info.max:
            raise ValueError(f"token ids outside {self.writer.dtype.name}: {low}..{high}")
        ends = np.cumsum([p.size for p in parts])  # part k: stream ids [ends[k] - size, ends[k])
        total, pos = (int(ends[-1]) if parts else 0), 0
        while pos < total:
            if self.buf is None:
                rows = self.writer.rows_wanted(self.row_len)
                self.buf, self.fill = np.empty(rows * self.row_len, self.writer.dtype), 0
            stop = min(total, pos + self.buf.size - self.fill)  # stream ids [pos, stop) fit
            first, last = np.searchsorted(ends, [pos, stop - 1], side="right").tolist()
            pieces = parts[first : last + 1]
            pieces[-1] = pieces[-1][: pieces[-1].size - (int(ends[last]) - stop)]
            pieces[0] = pieces[0][pos - (int(ends[first]) - parts[first].size) :]
            np.concatenate(pieces, out=self.buf[self.fill : self.fill + stop - pos], casting="unsafe")
            self.fill += stop - pos
            pos = stop
            if self.fill == self.buf.size:
                self._hand(self.buf)

    def _hand(self, ids: np.ndarray) -> None:
        self.writer.add_rows(ids.reshape(-1, self.row_len))
        self.tokens += ids.size
        self.buf, self.fill = None, 0

    def finish(self) -> int:
        """Write the last shard (and wait for the writer); returns the tokens of the dropped
        partial row."""
        dropped = self.fill % self.row_len
        if self.buf is not None:
            self._hand(self.buf[: self.fill - dropped])
        self.writer.flush()
        self.writer.close()
        return dropped


def unigram_entropy(counts_V: np.ndarray) -> float:
    """Nats per token of the unigram distribution of the packed training tokens."""
    total = counts_V.sum()
    if total == 0:
        return 0.0
    p = counts_V[counts_V > 0] / total
    return float(-(p * np.log(p)).sum())
