"""Exact and near-duplicate detection: 64-bit text hashes, MinHash signatures, LSH band keys.

Workers compute per document (parallel, stateless): the exact hash of the normalized text and the
LSH band keys of its MinHash signature. The driver holds the one global state, a `SeenSet`: an
open-addressing table of 64-bit keys in a numpy array (8 bytes per slot, load ≤ 1/2). Per kept
document it stores 1 + bands keys (≈ 16 * 17 = 272 bytes at the default 128 permutations / 16
bands), whatever the document's length, and nothing per dropped document: memory grows with the
number of *unique* documents only, never with their size, and no text is held. The first document
in input order (sorted files, line order) survives; a later one whose exact hash or any band key
was seen is a duplicate. LSH candidates are not re-verified against stored signatures (that would
cost 4 bytes * permutations per document); the band/row split puts the S-curve's midpoint at the
configured threshold, see `lsh_params`.
"""

from __future__ import annotations

import hashlib

import numpy as np

_P = 0x100000001B3  # odd: invertible mod 2^64
_PINV = pow(_P, -1, 1 << 64)
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True  # bytes of multibyte UTF-8 characters


def _powers(base: int, n: int) -> np.ndarray:
    """[base^0, ..., base^(n-1)] mod 2^64 (uint64), by repeated doubling of a prefix."""
    out = np.empty(max(n, 1), dtype=np.uint64)
    out[0] = 1
    filled = 1
    with np.errstate(over="ignore"):
        step = np.uint64(base)
        while filled < n:
            take = min(filled, n - filled)
            out[filled : filled + take] = out[:take] * step
            filled += take
            step = step * step if filled == take * 2 else step
    return out[:n]


def text_hash64(text: str) -> int:
    """Stable across processes (Python's hash() is salted per process): blake2b, 8 bytes, signed."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True
    )


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands * rows == num_perm and (1/bands)^(1/rows) closest to threshold."""
    best = None
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        err = abs((1.0 / bands) ** (1.0 / rows) - threshold)
        if best is None or err < best[0]:
            best = (err, bands, rows)
    return best[1], best[2]


class MinHasher:
    """MinHash over word k-shingles with multiply-shift hashing (uint64, wraps mod 2^64)."""

    def __init__(self, num_perm: int = 128, shingle_words: int = 5, threshold: float = 0.8, seed: int = 0):
        rng = np.random.default_rng([seed, 0x5EED])
        self.a_P = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b_P = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.k = shingle_words
        self.bands, self.rows = lsh_params(num_perm, threshold)
        self.num_perm = num_perm

    def shingles(self, text: str) -> np.ndarray:
        """uint64 hashes of the word k-grams (lowercased), (S,), computed without a Python loop.

        Words = maximal runs of bytes that are ASCII letters/digits/underscore or non-ASCII (UTF-8
        multibyte). A word's hash is its polynomial byte hash mod 2^64, read off prefix sums:
        with C[i] = sum_{j<i} b_j P^-j (P odd, so invertible mod 2^64),
        hash(b[s:e]) = P^(e-1) * (C[e] - C[s]).
        """
        b = np.frombuffer(text.lower().encode("utf-8", "surrogatepass"), dtype=np.uint8)
        is_word = _WORD_BYTE[b]
        if not is_word.any():
            return np.zeros(1, dtype=np.uint64)
        edges = np.flatnonzero(np.diff(np.concatenate([[False], is_word, [False]]).astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]
        n = b.size
        with np.errstate(over="ignore"):
            pinv_pow = _powers(_PINV, n)
            c = np.zeros(n + 1, dtype=np.uint64)
            np.cumsum(b.astype(np.uint64) * pinv_pow, out=c[1:])
            w_W = _powers(_P, n)[ends - 1] * (c[ends] - c[starts])
            k = min(self.k, w_W.size)
            s_S = np.zeros(w_W.size - k + 1, dtype=np.uint64)
            for j in range(k):  # polynomial combination of the k word hashes, wrapping mod 2^64
                s_S = s_S * np.uint64(0x100000001B3) + w_W[j : w_W.size - k + 1 + j]
        return s_S

    def signature(self, text: str, chunk: int = 1 << 15) -> np.ndarray:
        """(num_perm,) uint32: min over shingles of the top 32 bits of a*s + b. Chunked: bounded memory."""
        s_S = self.shingles(text)
        sig_P = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, s_S.size, chunk):
                h_CP = s_S[i : i + chunk, None] * self.a_P[None, :] + self.b_P[None, :]
                np.minimum(sig_P, h_CP.min(axis=0), out=sig_P)
        return (sig_P >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, sig_P: np.ndarray) -> np.ndarray:
        """(bands,) int64: a hash of each band's rows, salted by the band index."""
        rows_BR = sig_P.reshape(self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            h_B = np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            for r in range(self.rows):
                h_B = (h_B ^ rows_BR[:, r]) * np.uint64(0x100000001B3)
        return h_B.view(np.int64)

    @staticmethod
    def jaccard(sig1: np.ndarray, sig2: np.ndarray) -> float:
        return float((sig1 == sig2).mean())


class SeenSet:
    """A set of int64 keys in one numpy array (linear probing, doubles past load 1/2)."""

    _EMPTY = np.int64(0)  # key 0 is remapped to 1 (a 2^-64 collision, harmless)

    def __init__(self, capacity: int = 1 << 16):
        size = 1 << max(4, int(capacity - 1).bit_length())
        self.table = np.zeros(size, dtype=np.int64)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _slot(self, key: int) -> tuple[int, bool]:
        mask = self.table.size - 1
        i = ((key * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 20 & mask
        table = self.table
        while True:
            v = table[i]
            if v == 0:
                return i, False
            if v == key:
                return i, True
            i = (i + 1) & mask

    def __contains__(self, key: int) -> bool:
        return self._slot(int(key) or 1)[1]

    def add(self, key: int) -> None:
        key = int(key) or 1
        i, found = self._slot(key)
        if found:
            return
        self.table[i] = key
        self.count += 1
        if self.count * 2 > self.table.size:
            self._grow()

    def _grow(self) -> None:
        old = self.table[self.table != 0]
        self.table = np.zeros(self.table.size * 2, dtype=np.int64)
        self.count = 0
        for key in old.tolist():
            self.add(key)


class Deduplicator:
    """The driver-side dedup decision, in input order. Keys: exact hashes and LSH band keys."""

    def __init__(self, exact: bool, near: bool):
        self.exact, self.near = exact, near
        self.exact_seen = SeenSet()
        self.band_seen = SeenSet()

    def check(self, text_hash: int, band_keys) -> str:
        """'' if new (and remember it), else 'duplicate_exact' or 'near_duplicate'."""
        if self.exact and text_hash in self.exact_seen:
            return "duplicate_exact"
        if self.near and band_keys is not None and any(k in self.band_seen for k in band_keys):
            return "near_duplicate"
        if self.exact:
            self.exact_seen.add(text_hash)
        if self.near and band_keys is not None:
            for k in band_keys:
                self.band_seen.add(k)
        return ""

    @property
    def nbytes(self) -> int:
        return self.exact_seen.nbytes + self.band_seen.nbytes
