"""C versions of the data pipeline's hot loops (`pipelines/native.c`: the cleaning workers', and
the driver's dedup decisions), built on first use.

Each C function gives bit for bit what its reference gives (a numpy function of `pipelines/`; for
the BPE, the tokenizers library); the reference stays the fallback, and tests compare the two. The library is compiled once per machine
and source (`$CC` or `cc`, -O2, no machine-specific flags: a cache shared by different machines
stays valid), cached under the dsv3ray cache directory keyed by the source's hash, written
atomically (workers starting together may all compile; one file wins), and loaded with ctypes.
Without a C compiler, or with DSV3RAY_NATIVE=0, the numpy paths run (a warning says why, once per
process). A cluster image can build it ahead: `python -m pipelines.native`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import threading
from pathlib import Path

import numpy as np

from dsv3ray.runtable import SHORT, RunTable, byte_runs, grown, keys, padded, ranges

SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off"]  # (no FMA: numpy's roundings)
_UNSET = object()
_lib = _UNSET
_lock = threading.Lock()
log = logging.getLogger(__name__)


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (numpy paths): built on the first call in a process."""
    global _lib
    if _lib is _UNSET:
        with _lock:
            if _lib is _UNSET:
                _lib = _load()
    return _lib


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DSV3RAY_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))  # (a cached file another machine's loader refuses: OSError)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("dsv3ray: the C helpers (%s) were not built (%s): the numpy paths run", SOURCE.name, e)
        return None
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [_CTYPES[a] for a in args], _CTYPES.get(result)
    return lib


# each C function's arguments and result: i int64, u uint64, b uint8, c int, p a pointer (an
# array's data), - none
_CTYPES = {
    "i": ctypes.c_int64,
    "u": ctypes.c_uint64,
    "b": ctypes.c_uint8,
    "c": ctypes.c_int,
    "p": ctypes.c_void_p,
}
_SIGNATURES = {
    "minhash_signatures": ("iiippupp", "c"),
    "fnv1a_runs": ("ipppp", "-"),
    "crc32_runs": ("ipppp", "-"),
    "count_u16": ("ipip", "-"),
    "bpe_pieces": ("pibppppupipp", "i"),
    "minhash_rows": ("ippppiuiupp", "c"),
    "quality_rows": ("ipppppppiuiupp", "c"),
    "dedup_codes": ("iiippccpipippp", "i"),
    "chunk_scan": ("pippcciippiipppppppppp", "i"),
    "runs_pieces": ("ppppipiipppppppp", "i"),
    "runtable_insert": ("piippi", "-"),
    "run_keys": ("ppppip", "-"),
    "run_lookup": ("ppppipiipppp", "-"),
    "minhash_words": ("pipiuuupp", "i"),
    "normalize_ascii": ("pibpp", "i"),
    "rows_gather_i32": ("ipppppp", "i"),
    "copy_runs": ("pppipp", "-"),
    "text_hashes": ("pppiuup", "-"),
    "seen_insert": ("pipi", "-"),
    "sparse_dot": ("ippppip", "c"),
}


def build() -> Path:
    """The compiled library's path, compiling it if this machine's cache has none yet."""
    from pipelines.quality import cache_dir

    cc = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / f"native-{platform.system().lower()}-{key}.so"
    if path.is_file():
        return path
    part = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        done = subprocess.run(
            [cc, *_FLAGS, "-o", str(part), str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"{cc} exited {done.returncode}: {done.stderr.strip()[-300:]}")
        os.replace(part, path)  # atomic: a process loading it never sees half a file
    finally:
        part.unlink(missing_ok=True)
    return path


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check_runs(name: str, size: int, starts: np.ndarray, ends: np.ndarray) -> None:
    """Runs [starts, ends) (int64 arrays) inside a buffer of `size` bytes: C reads them."""
    if starts.size and (starts.min() < 0 or ends.max() > size or (ends < starts).any()):
        raise IndexError(f"{name}: a run outside the buffer")


def minhash_signatures(
    n: int, num_perm: int, s_S: np.ndarray, d_S: np.ndarray, salt: np.uint64, borrow_T: np.ndarray
) -> np.ndarray | None:
    """pipelines.dedup.MinHasher.signatures_from_shingles in C: (n, num_perm) uint32, or None
    when the library is not available (the caller's numpy path then)."""
    lib = library()
    if lib is None:
        return None
    if borrow_T.shape != (num_perm - 1, num_perm):
        raise ValueError(
            f"minhash_signatures: borrow_T of shape {borrow_T.shape}, not {(num_perm - 1, num_perm)}"
        )
    if d_S.size and (d_S.min() < 0 or d_S.max() >= n):  # (C writes where d_S points)
        raise IndexError(f"minhash_signatures: a shingle's document outside 0..{n - 1}")
    s_S = np.ascontiguousarray(s_S, dtype=np.uint64)
    d_S = np.ascontiguousarray(d_S, dtype=np.int64)
    borrow_T = np.ascontiguousarray(borrow_T, dtype=np.int16)
    out = np.empty((n, num_perm), dtype=np.uint32)
    if lib.minhash_signatures(
        n, num_perm, s_S.size, _ptr(s_S), _ptr(d_S), int(salt), _ptr(borrow_T), _ptr(out)
    ):
        raise MemoryError(f"minhash_signatures: no scratch memory for {n} x {num_perm} bins")
    return out


def normalize_ascii(joined: bytes, sep: int) -> tuple[bytes, np.ndarray] | None:
    """pipelines.clean.normalize_batch's pass over texts joined by (and starting and ending with)
    `sep` (\r folded, ASCII control bytes deleted, clean._whitespace_runs; bytes >= 0x80 are
    characters like letters) in one C pass: (the result, each text's number of words after it
    (str.split's, where a text is ASCII)), or None when the library is not available."""
    lib = library()
    if lib is None:
        return None
    if sep < 128 or joined[:1] != bytes([sep]) or joined[-1:] != bytes([sep]):
        raise ValueError("normalize_ascii: texts must be joined by a non-ASCII byte, at both ends too")
    src = np.frombuffer(joined, dtype=np.uint8)
    out = np.empty(src.size + 8, dtype=np.uint8)
    words = np.empty(joined.count(sep) - 1, dtype=np.int64)
    size = lib.normalize_ascii(_ptr(src), src.size, sep, _ptr(out), _ptr(words))
    return out[:size].tobytes(), words


def _hash_runs(name: str, dtype, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """C function `name`'s hash of each run buf[starts:ends] (its arguments: m, buf, starts, ends,
    out of `dtype`), or None when the library is not available."""
    lib = library()
    if lib is None:
        return None
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    ends = np.ascontiguousarray(ends, dtype=np.int64)
    _check_runs(name, buf.size, starts, ends)
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    out = np.empty(starts.size, dtype=dtype)
    getattr(lib, name)(starts.size, _ptr(buf), _ptr(starts), _ptr(ends), _ptr(out))
    return out


def fnv1a_runs(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """pipelines.ftpredict.fnv1a_runs in C (a loop per word instead of one numpy pass per byte
    position), or None when the library is not available (the caller's numpy path then)."""
    return _hash_runs("fnv1a_runs", np.uint64, buf, starts, ends)


def count_u16(ids: np.ndarray, counts: np.ndarray) -> bool:
    """counts += np.bincount(ids, minlength=v)[:v] (v = counts.size; ids uint16, counts int64,
    both contiguous) in C; False (nothing counted) when the library is not available."""
    lib = library()
    if lib is None:
        return False
    if ids.dtype != np.uint16 or counts.dtype != np.int64 or not counts.flags.c_contiguous:
        raise TypeError("count_u16: uint16 ids and contiguous int64 counts")
    ids = np.ascontiguousarray(ids)
    lib.count_u16(ids.size, _ptr(ids), counts.size, _ptr(counts))
    return True


def crc32_runs(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """zlib.crc32 of each run buf[starts:ends] (pipelines.domain's word buckets) in C, uint32, or
    None when the library is not available (the caller's zlib loop then)."""
    return _hash_runs("crc32_runs", np.uint32, buf, starts, ends)


def minhash_words(joined: bytes, doc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """pipelines.dedup.MinHasher._words_at in C (one pass, no per-byte numpy arrays): (each
    word's hash, words per text), or None when the library is not available."""
    from pipelines.dedup import _K1, _K2, _P

    lib = library()
    if lib is None:
        return None
    src = np.frombuffer(joined, dtype=np.uint8)
    doc_start = np.ascontiguousarray(doc_start, dtype=np.int64)
    if doc_start.size and (np.diff(doc_start) < 0).any():
        raise ValueError("minhash_words: doc_start is not ascending")
    hashes, words_D = np.empty(src.size // 2 + 1, np.uint64), np.empty(doc_start.size, np.int64)
    words = lib.minhash_words(
        _ptr(src),
        src.size,
        _ptr(doc_start),
        doc_start.size,
        _P,
        int(_K1),
        int(_K2),
        _ptr(hashes),
        _ptr(words_D),
    )
    if words < 0:
        raise MemoryError("minhash_words: no scratch memory")
    return hashes[:words], words_D


def _texts_rows(
    name: str, entries: np.ndarray, bounds: np.ndarray, ragged
) -> tuple[np.ndarray, np.ndarray, int]:
    """(entries, bounds, texts) as the *_rows functions take them, checked: C reads the rows of
    `ragged` that they name."""
    entries = np.ascontiguousarray(entries, dtype=np.int64)
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    if bounds[0] != 0 or bounds[-1] != entries.size or (np.diff(bounds) < 0).any():
        raise ValueError(f"{name}: bounds are no ascending cut of the entries")
    if entries.size and (entries.min() < 0 or entries.max() >= ragged.size):
        raise IndexError(f"{name}: an entry outside 0..{ragged.size - 1}")
    return entries, bounds, bounds.size - 1


def text_hashes(encoded: list[bytes], k1: int, k2: int) -> np.ndarray | None:
    """pipelines.dedup.text_hashes in C (its definition there), or None without the library."""
    lib = library()
    if lib is None:
        return None
    n = len(encoded)
    lens = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    buf = np.frombuffer(b"".join([*encoded, bytes(8)]), dtype=np.uint8)  # (8 readable bytes past each)
    out = np.empty(n, dtype=np.int64)
    lib.text_hashes(_ptr(buf), _ptr(starts), _ptr(lens), n, k1, k2, _ptr(out))
    return out


def copy_runs(
    src: np.ndarray, src_start: np.ndarray, lens: np.ndarray, dst: np.ndarray, dst_start: np.ndarray
) -> None:
    """dst[ranges(dst_start, lens)] = src[ranges(src_start, lens)] (uint8 arrays): a memcpy per run
    in C where the library is built (no index array per byte), else that numpy line."""
    lib = library()
    if lib is None:
        dst[ranges(dst_start, lens)] = src[ranges(src_start, lens)]
        return
    src_start, lens, dst_start = (
        np.ascontiguousarray(a, dtype=np.int64) for a in (src_start, lens, dst_start)
    )
    if lens.size and (
        lens.min() < 0 or src_start.min() < 0 or dst_start.min() < 0
        or (src_start + lens).max() > src.size or (dst_start + lens).max() > dst.size
    ):  # fmt: skip
        raise IndexError("copy_runs: a run outside its array")  # (C reads and writes there)
    if (
        src.dtype != np.uint8
        or dst.dtype != np.uint8
        or not (src.flags.c_contiguous and dst.flags.c_contiguous)
    ):
        raise TypeError("copy_runs: contiguous uint8 arrays")
    lib.copy_runs(_ptr(src), _ptr(src_start), _ptr(lens), lens.size, _ptr(dst), _ptr(dst_start))


def rows_gather(entries: np.ndarray, bounds: np.ndarray, ragged) -> tuple[np.ndarray, np.ndarray] | None:
    """The int32 items of `ragged` (one column: a chunk's token ids) of texts whose chunks are
    entries[bounds[t]:bounds[t + 1]], in C: (items per text, the items end to end), as
    Ragged.gather and a per-text sum give them; None when the library is not available."""
    lib = library()
    if lib is None:
        return None
    entries, bounds, n = _texts_rows("rows_gather", entries, bounds, ragged)
    (items,) = ragged.cols
    if items.dtype != np.int32 or items.ndim != 1:
        raise TypeError("rows_gather: one int32 column")
    per_text = np.empty(n, np.int64)
    total = lib.rows_gather_i32(
        n, _ptr(bounds), _ptr(entries), _ptr(ragged.off), _ptr(items), _ptr(per_text), 0
    )
    out = np.empty(total, np.int32)
    lib.rows_gather_i32(
        n, _ptr(bounds), _ptr(entries), _ptr(ragged.off), _ptr(items), _ptr(per_text), _ptr(out)
    )
    return per_text, out


def minhash_rows(minhash, entries: np.ndarray, bounds: np.ndarray, ragged) -> np.ndarray | None:
    """pipelines.chunkpass.ChunkPass.signatures' numpy path for one group in C: the signatures
    (len(bounds) - 1 texts, uint32) of texts whose chunks are entries[bounds[t]:bounds[t + 1]],
    each chunk's words a row of `ragged` (its word hashes). None when the library is not available."""
    from pipelines.dedup import _P

    lib = library()
    if lib is None:
        return None
    entries, bounds, n = _texts_rows("minhash_rows", entries, bounds, ragged)
    (words,) = ragged.cols
    borrow_T = np.ascontiguousarray(minhash.borrow_T, dtype=np.int16)
    out = np.empty((n, minhash.num_perm), dtype=np.uint32)
    failed = lib.minhash_rows(
        n, _ptr(bounds), _ptr(entries), _ptr(ragged.off), _ptr(words), minhash.k, _P, minhash.num_perm,
        int(minhash.salt), _ptr(borrow_T), _ptr(out),
    )  # fmt: skip
    if failed:
        raise MemoryError("minhash_rows: no scratch memory")
    return out


def quality_rows(
    predictor, entries: np.ndarray, bounds: np.ndarray, ragged
) -> tuple[np.ndarray, np.ndarray] | None:
    """pipelines.ftpredict.BatchPredictor.sums for texts whose chunks are
    entries[bounds[t]:bounds[t + 1]] (each chunk's fastText words a row of `ragged`: logits,
    number of ids, hash), in C and bit for bit: (sum_N, count_N). None when the library is not
    available or the model has more than one logit column (numpy then)."""
    from pipelines.ftpredict import _MIX

    lib = library()
    if lib is None or predictor.row_logits.ndim != 1:
        return None
    entries, bounds, n = _texts_rows("quality_rows", entries, bounds, ragged)
    logits, count, hash_ = ragged.cols
    row_logits = np.ascontiguousarray(predictor.row_logits, dtype=np.float64)
    sums, counts = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
    failed = lib.quality_rows(
        n, _ptr(bounds), _ptr(entries), _ptr(ragged.off), _ptr(logits), _ptr(count), _ptr(hash_), _ptr(row_logits),
        predictor.nwords, int(predictor.bucket), predictor.n, int(_MIX), _ptr(sums), _ptr(counts),
    )  # fmt: skip
    if failed:
        raise MemoryError("quality_rows: no scratch memory")
    return sums, counts


def sparse_dot(
    row: np.ndarray, col: np.ndarray, value: np.ndarray, c_DK: np.ndarray, n: int
) -> np.ndarray | None:
    """pipelines.domain.SparseRows.dot's (n, k) products in C (the same bits), or None without the
    library. row ascending; c_DK: (dim, k)."""
    lib = library()
    if lib is None:
        return None
    row, col = (np.ascontiguousarray(a, dtype=np.int64) for a in (row, col))
    value = np.ascontiguousarray(value, dtype=np.float64)
    c_DK = np.ascontiguousarray(c_DK, dtype=np.float64)
    if row.size and (row.min() < 0 or row.max() >= n or col.min() < 0 or col.max() >= c_DK.shape[0]):
        raise IndexError("sparse_dot: a cell outside the matrices")  # (C reads and writes there)
    if row.size > 1 and (row[1:] < row[:-1]).any():
        raise ValueError("sparse_dot: rows must ascend")
    out = np.zeros((n, c_DK.shape[1]), dtype=np.float64)
    if lib.sparse_dot(row.size, _ptr(row), _ptr(col), _ptr(value), _ptr(c_DK), c_DK.shape[1], _ptr(out)):
        raise MemoryError("sparse_dot: no scratch memory")
    return out


def seen_insert(table: np.ndarray, keys: np.ndarray) -> bool:
    """pipelines.dedup.SeenSet.add_many(keys, _new=True)'s insertions into `table` (int64, a power of
    two long, room left) in C, one key after another; False (nothing done) without the library."""
    lib = library()
    if lib is None:
        return False
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if table.dtype != np.int64 or not table.flags.c_contiguous or table.size & (table.size - 1):
        raise TypeError("seen_insert: a contiguous int64 table of a power-of-two size")
    if (keys.size + np.count_nonzero(table)) * 2 > table.size:
        raise ValueError("seen_insert: no room")  # (C would probe forever in a full table)
    lib.seen_insert(_ptr(table), table.size - 1, _ptr(keys), keys.size)
    return True


def dedup_codes(dedup, h_N: np.ndarray, k_NB: np.ndarray) -> np.ndarray | None:
    """pipelines.dedup.Deduplicator.check_codes (keys already SeenSet._fix'ed, k_NB: (N, B)) in C,
    one document after another into the same tables (grown as the numpy path grows them); None
    when the library is not available."""
    lib = library()
    if lib is None:
        return None
    h_N = np.ascontiguousarray(h_N, dtype=np.int64)
    k_NB = np.ascontiguousarray(k_NB, dtype=np.int64)
    n, B = k_NB.shape
    out = np.empty(n, dtype=np.int8)
    counts, need = np.array([dedup.exact_seen.count, dedup.band_seen.count], np.int64), np.zeros(2, np.int64)
    sets = (dedup.exact_seen, dedup.band_seen)
    done = 0
    while True:
        et, bt = (t.table for t in sets)
        done = lib.dedup_codes(
            done, n, B, _ptr(h_N), _ptr(k_NB), int(dedup.exact), int(dedup.near and B > 0), _ptr(et), et.size - 1,
            _ptr(bt), bt.size - 1, _ptr(counts), _ptr(need), _ptr(out),
        )  # fmt: skip
        dedup.exact_seen.count, dedup.band_seen.count = int(counts[0]), int(counts[1])
        if done >= n:
            return out
        for t, extra in zip(sets, need.tolist()):  # (a document's keys did not fit: as add_many grows)
            while (t.count + extra) * 2 > t.table.size:
                t._grow()


def chunk_scan(
    table, joined: bytes, text_start: np.ndarray, text_end: np.ndarray, newlines: bool, mark_first: bool,
    max_chunk: int, nl_entry: np.ndarray,
) -> tuple[np.ndarray, ...] | None:  # fmt: skip
    """The chunks of texts joined[text_start[t]:text_end[t]] looked up in `table`
    (dsv3ray.runtable.RunTable) in one C pass (`chunk_scan` in native.c): (entry per item (-2 - k:
    distinct miss k), text per item, bounds [n + 1], bad [n] bool, the misses' starts, ends and key
    flags). None when the library is not available."""
    lib = library()
    if lib is None:
        return None
    n = text_start.size
    buf = padded(joined)
    text_start = np.ascontiguousarray(text_start, dtype=np.int64)
    text_end = np.ascontiguousarray(text_end, dtype=np.int64)
    _check_runs("chunk_scan", len(joined), text_start, text_end)
    nl_entry = np.ascontiguousarray(nl_entry, dtype=np.int64)
    cap = len(joined) + n + 1  # (an item takes a byte at least, or ends its text)
    entry, doc = np.empty(cap, np.int64), np.empty(cap, np.int64)
    bounds, bad = np.empty(n + 1, np.int64), np.empty(n, np.bool_)
    m_start, m_end, m_flag = (np.empty(cap, np.int64) for _ in range(3))
    misses = lib.chunk_scan(
        _ptr(buf), n, _ptr(text_start), _ptr(text_end), int(newlines), int(mark_first), max_chunk,
        nl_entry.size, _ptr(nl_entry), *_view(table), _ptr(entry), _ptr(doc), _ptr(bounds), _ptr(bad),
        _ptr(m_start), _ptr(m_end), _ptr(m_flag),
    )  # fmt: skip
    if misses < 0:
        raise MemoryError("chunk_scan: no scratch memory")
    items = int(bounds[n])
    return entry[:items], doc[:items], bounds, bad, m_start[:misses], m_end[:misses], m_flag[:misses]


def simple_runs(cache, joined: bytes, starts: np.ndarray, ends: np.ndarray, space: np.ndarray):
    """dsv3ray.tokenizer._ChunkCache._simple_runs_numpy with its copy, cut, probe and gather in C
    (`runs_pieces`, then `rows_gather_i32`): (ids per run, their ids end to end), the same; the
    new pieces are encoded and added by the cache as its numpy path adds them."""
    lib = library()
    starts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, ends))
    _check_runs("simple_runs", len(joined), starts, ends)
    space = np.ascontiguousarray(space, dtype=np.uint8)
    src = np.frombuffer(joined, np.uint8)
    size = int((space + ends - starts + 1).sum())
    raw = np.empty(size + 8, np.uint8)
    entry, pieces_R = np.empty(size, np.int64), np.empty(starts.size, np.int64)
    m_start, m_end = np.empty(size, np.int64), np.empty(size, np.int64)
    table = cache.piece_table
    if cache.piece_ids.size > table.size:  # (the last call kept pieces for itself)
        cache._clear_pieces()
    for clear in (False, True):
        if clear:  # full: every entry found above is gone
            cache._clear_pieces()
        misses = lib.runs_pieces(
            _ptr(src), _ptr(starts), _ptr(ends), _ptr(space), starts.size, *_view(table), _ptr(raw), _ptr(entry),
            _ptr(pieces_R), _ptr(m_start), _ptr(m_end),
        )  # fmt: skip
        if misses < 0:
            raise MemoryError("runs_pieces: no scratch memory")
        ms, me = m_start[:misses], m_end[:misses]
        raw_b = raw.tobytes()
        found = np.full(misses, -1, np.int64)
        if not isinstance(table, CRunTable):  # (a RunTable keeps pieces over SHORT bytes in dicts)
            long = np.flatnonzero(me - ms > SHORT)
            found[long] = table.lookup_long(raw_b, ms[long], me[long], np.zeros(long.size, np.int64))
        new = np.flatnonzero(found < 0)
        if table.size + new.size <= table.max_entries:
            break
    pieces = int(pieces_R.sum())
    entry = entry[:pieces]
    if new.size:
        key = keys(padded(raw_b), ms, me, 0) if not isinstance(table, CRunTable) else (2 * (me - ms),)
        found[new] = cache._new_pieces(raw_b, ms[new], me[new], key, new)
    miss = np.flatnonzero(entry < 0)
    entry[miss] = found[-2 - entry[miss]]
    bounds = np.zeros(starts.size + 1, np.int64)
    np.cumsum(pieces_R, out=bounds[1:])
    return rows_gather(entry, bounds, cache.piece_ids)


def _view(table) -> list[int]:
    """A RunTable as the C probes read it: slots, slot mask, shift, the entries' key rows, and a
    CRunTable's arena of long runs' bytes (0, 0 for a RunTable: it keeps them in dicts)."""
    slots, shift, keys = table.arrays()
    long = (_ptr(table._arena), _ptr(table._arena_off)) if isinstance(table, CRunTable) else (0, 0)
    return [_ptr(slots), slots.size - 1, shift, _ptr(keys), *long]


class CRunTable(RunTable):
    """A dsv3ray.runtable.RunTable whose lookups and insertions run in C, long runs included: a
    run of over 24 bytes is an entry too, keyed with a hash of all its bytes as `mid` and its bytes
    kept in an arena (a probe compares them: exact), where RunTable keeps it in a dict (a Python
    lookup per run). Its entries are numbered as RunTable numbers them (tests compare); its keys
    are computed here from the runs' bytes (only the flag is read from the `key` it is given).
    Made only where the library is built (`make_table`)."""

    def clear(self) -> None:
        super().clear()
        self._arena = np.zeros(1 << 12, dtype=np.uint8)  # long entries' bytes
        self._arena_used = 0
        self._arena_off = np.full(self._keys.shape[0], -1, dtype=np.int64)  # entry -> its bytes, -1: short

    def _reserve(self, entries: int) -> None:
        super()._reserve(entries)
        if self._arena_off.size < self._keys.shape[0]:
            self._arena_off = grown(self._arena_off, self._keys.shape[0])

    def lookup(self, joined: bytes, starts, ends, key) -> np.ndarray:
        return self._lookup(joined, starts, ends, np.asarray(key[0]) & 1)

    def lookup_long(self, joined: bytes, starts, ends, flags) -> np.ndarray:
        return self._lookup(joined, starts, ends, flags)

    def _lookup(self, joined: bytes, starts, ends, flags) -> np.ndarray:
        starts, ends, flags = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, ends, flags))
        _check_runs("CRunTable.lookup", len(joined), starts, ends)
        out = np.empty(starts.size, dtype=np.int64)
        buf = padded(joined)
        library().run_lookup(
            _ptr(buf), _ptr(starts), _ptr(ends), _ptr(flags), starts.size, *_view(self), _ptr(out)
        )
        return out

    def append(self, at, raw, key) -> np.ndarray:
        m = len(at)
        first = self.size
        self._reserve(first + m)
        joined, starts, ends = byte_runs(raw) if isinstance(raw, list) else raw
        starts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, ends))
        _check_runs("CRunTable.append", len(joined), starts, ends)
        flags = np.ascontiguousarray(np.asarray(key[0])[at] & 1, dtype=np.int64)
        numbers = np.arange(first, first + m)
        buf = padded(joined)
        rows = self._keys[first : first + m]  # (a view: C writes the new entries' key rows)
        library().run_keys(_ptr(buf), _ptr(starts), _ptr(ends), _ptr(flags), m, _ptr(rows))
        lens = ends - starts
        self._arena_off[first : first + m] = -1
        long = np.flatnonzero(lens > SHORT)
        if long.size:  # their bytes, end to end in the arena
            size = lens[long]
            need = self._arena_used + int(size.sum())
            if need > self._arena.size:
                self._arena = grown(self._arena, max(need, 2 * self._arena.size))
            at_arena = self._arena_used + np.cumsum(size) - size
            copy_runs(buf, starts[long], size, self._arena, at_arena)
            self._arena_off[numbers[long]] = at_arena
            self._arena_used = need
        self.size += m
        self._insert(numbers)
        return numbers

    def _insert(self, numbers: np.ndarray) -> None:
        numbers = np.ascontiguousarray(numbers, dtype=np.int64)
        if numbers.size and (numbers.min() < 0 or numbers.max() >= self.size):
            raise IndexError("runtable_insert: an entry outside the table")  # (C reads its key)
        slots, shift, keys = self.arrays()
        library().runtable_insert(_ptr(slots), slots.size - 1, shift, _ptr(keys), _ptr(numbers), numbers.size)

    @classmethod
    def of(cls, table: RunTable) -> CRunTable:
        """The same entries, numbered alike, in a CRunTable: each entry's bytes read back from its
        key (at most 24 bytes: bytes 0-8, 8-16 and the last 8 hold them) or from the table's dicts
        (longer ones)."""
        out = cls(table.max_entries)
        n = table.size
        if not n:
            return out
        lenf = table._lenf[:n]
        size = np.where(lenf >= 0, lenf >> 1, 0)
        for d in table._long:  # (long entries: lenf -1 in the table)
            for run, e in d.items():
                size[e] = len(run)
        short = lenf >= 0
        rows = (
            np.stack([table._head[:n], table._mid[:n], table._tail[:n]], axis=1).astype("<u8").view(np.uint8)
        )
        ends = np.cumsum(size)
        starts = ends - size
        buf = np.zeros(int(ends[-1]), np.uint8)
        e = np.repeat(np.flatnonzero(short), size[short])  # a short entry's bytes from its key row
        p = ranges(np.zeros(int(short.sum()), np.int64), size[short])  # (0.. its size - 1)
        split = np.where(size[e] <= 16, 8, 16)  # bytes before it: head (and mid); after: tail's last
        src = np.where(p < split, p, 16 + p - (size[e] - 8))
        buf[ranges(starts[short], size[short])] = rows.reshape(n, 24)[e, src]
        flags = np.where(short, lenf & 1, 0)
        for f, d in enumerate(table._long):
            for run, x in d.items():
                buf[starts[x] : ends[x]] = np.frombuffer(run, np.uint8)
                flags[x] = f
        out.append(np.arange(n), (buf.tobytes(), starts, ends), (2 * size + flags,))
        return out


def make_table(max_entries: int) -> RunTable:
    """A CRunTable where the library is built, else a RunTable."""
    return CRunTable(max_entries) if library() is not None else RunTable(max_entries)


def install(tok, tokenizer_json: str) -> None:
    """The C helpers in a dsv3ray.tokenizer.Tokenizer's chunk cache, where it has one and the
    library is built: its tables (CRunTable), the ASCII chunks' pieces cut, probed and gathered
    (simple_runs) and their BPE where it is exact (PieceBPE)."""
    cache = tok.chunk_cache
    if cache is not None and library() is not None:
        cache.simple_runs = simple_runs
        cache.piece_bpe = PieceBPE.of_json(tokenizer_json)
        cache.table = CRunTable(cache.table.max_entries)  # (lookups and insertions in C)
        cache.piece_table = CRunTable(cache.piece_table.max_entries)
        cache._clear()
        cache._clear_pieces()


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character map (what a ByteLevel pre-tokenizer turns each byte into)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


class PieceBPE:
    """The tokenizers library's BPE of byte-level pieces, in C (`bpe_pieces` in native.c: ~0.2 µs
    a piece against ~2 µs for a call of the library's `model.tokenize` and its Token objects), for
    `dsv3ray.tokenizer._ChunkCache.piece_bpe`. `of_json` builds one from a tokenizer's JSON when
    its model is one this reproduces exactly, else gives None (the library then)."""

    MAX_SYMBOLS = 4096  # a longer piece: the library (scratch per call)

    def __init__(self, lib, byte_id, keys, rank, merged):
        self.lib, self.byte_id, self.keys, self.rank, self.merged = lib, byte_id, keys, rank, merged
        self.mask = keys.size - 1
        # (scratch: symbols, pairs' ranks and tokens; one call at a time, as its cache)
        self.sym = np.empty(3 * self.MAX_SYMBOLS, dtype=np.int32)

    @classmethod
    def of_json(cls, tokenizer_json: str) -> PieceBPE | None:
        import json

        lib = library()
        if lib is None:
            return None
        spec = json.loads(tokenizer_json)
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if (
            model.get("type") != "BPE"
            or model.get("dropout")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or model.get("byte_fallback")
            or model.get("ignore_merges")
            or pre.get("type") != "ByteLevel"
        ):
            return None
        vocab: dict[str, int] = model["vocab"]
        byte_id = np.array([vocab.get(c, -1) for c in _byte_chars()], dtype=np.int32)
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        n = len(pairs)
        left = np.fromiter((vocab.get(a, -1) for a, _ in pairs), dtype=np.int64, count=n)
        right = np.fromiter((vocab.get(b, -1) for _, b in pairs), dtype=np.int64, count=n)
        new = np.fromiter((vocab.get(a + b, -1) for a, b in pairs), dtype=np.int64, count=n)
        if n and min(left.min(), right.min(), new.min()) < 0:
            return None  # (a merge the library would refuse to load)
        key = (left.astype(np.uint64) << np.uint64(32)) | right.astype(np.uint64)
        _, first = np.unique(key, return_index=True)  # (a repeated merge: the library keeps the first rank)
        key, r = key[first], first
        size = 1 << max(4, (4 * n).bit_length())  # load <= 1/4
        empty = np.iinfo(np.uint64).max
        keys = np.full(size, empty, dtype=np.uint64)
        rank = np.zeros(size, dtype=np.int32)
        merged = np.zeros(size, dtype=np.int32)
        with np.errstate(over="ignore"):  # (the home slot as merge_slot in native.c takes it)
            slot = ((key * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & np.uint64(size - 1)
        slot = slot.astype(np.int64)
        todo = np.arange(key.size)
        while todo.size:  # each walks to the first free slot; one winner per contested slot
            free = keys[slot[todo]] == empty
            keys[slot[todo[free]]] = key[todo[free]]
            placed = np.zeros(todo.size, dtype=bool)
            placed[free] = keys[slot[todo[free]]] == key[todo[free]]
            won = todo[placed]
            rank[slot[won]], merged[slot[won]] = r[won], new[r[won]]
            todo = todo[~placed]
            slot[todo] = (slot[todo] + 1) & (size - 1)
        return cls(lib, byte_id, keys, rank, merged)

    def __call__(self, joined: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens per piece, their ids end to end) of the pieces `joined` by 0xff, or None where
        this cannot (a piece over MAX_SYMBOLS bytes, a byte without a token): the library then."""
        src = np.frombuffer(joined, dtype=np.uint8)
        out_ids = np.empty(src.size, dtype=np.int32)
        out_sizes = np.empty(joined.count(b"\xff") + 1, dtype=np.int64)
        done = self.lib.bpe_pieces(
            _ptr(src), src.size, 0xFF, _ptr(self.byte_id), _ptr(self.keys), _ptr(self.rank), _ptr(self.merged),
            self.mask, _ptr(self.sym), self.MAX_SYMBOLS, _ptr(out_ids), _ptr(out_sizes),
        )  # fmt: skip
        if done < 0:
            return None
        return out_sizes, out_ids[: int(out_sizes.sum())]


if __name__ == "__main__":  # build ahead (a cluster image), and say where it went
    print(build())
