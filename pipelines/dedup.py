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

import numpy as np

from dsv3ray.runtable import MASKS as _MASKS  # low n bytes
from dsv3ray.runtable import text_groups

_P = 0x100000001B3  # odd
_K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd multipliers


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


_TEXT_K1 = 0x9E3779B97F4A7C15  # text_hashes: a word's position salt (times its index + 1)
_TEXT_K2 = 0xD6E8FEB86659FD93  # text_hashes: the length's


def text_hashes(encoded: list[bytes]) -> np.ndarray:
    """Each text's 64-bit hash (int64; exact dedup's key and the eval split's draw), the same in
    every process and on every machine (Python's hash() is salted per process): of its UTF-8
    bytes as 8-byte little-endian words w_i (i = 0, 1, ..; the last one zero-padded),
    mix64(sum_i mix64(w_i ^ (i + 1) * K1) ^ len * K2), sums mod 2^64. In C where built
    (pipelines.native: 0.36 µs a 1 KB text; blake2b took 1.9 with its Python calls), else
    this numpy: the same bits (tested)."""
    from pipelines import native

    out = native.text_hashes(encoded, _TEXT_K1, _TEXT_K2)
    return out if out is not None else _text_hashes_numpy(encoded)


def _text_hashes_numpy(encoded: list[bytes]) -> np.ndarray:
    n = len(encoded)
    lens = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    words = (lens + 7) // 8
    w = np.frombuffer(b"".join(e + bytes(-len(e) % 8) for e in encoded), dtype="<u8")
    first = np.zeros(n, dtype=np.int64)
    np.cumsum(words[:-1], out=first[1:])
    index = np.arange(w.size, dtype=np.int64) - np.repeat(first, words)  # each word's i in its text
    with np.errstate(over="ignore"):
        terms = _mix64(w ^ ((index + 1).astype(np.uint64) * np.uint64(_TEXT_K1)))
        acc = np.zeros(n, dtype=np.uint64)
        some = words > 0
        if some.any():  # (segments of the texts with words: the empty ones have none)
            acc[some] = np.add.reduceat(terms, first[some])
        return _mix64(acc ^ (lens.astype(np.uint64) * np.uint64(_TEXT_K2))).view(np.int64)


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


_SENTINEL = np.uint64(1 << 32)  # above every uint32 bin value: marks an empty bin


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (a bijection of uint64 with full avalanche), wrapping mod 2^64."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class MinHasher:
    """MinHash signatures of word k-shingles by one-permutation hashing with optimal densification.

    Each shingle is hashed once (uint64, mixed): its high bits pick one of `num_perm` bins, its low
    32 bits are the value, and a bin keeps its minimum (Li, Owen & Zhang 2012). An empty bin takes
    the value of the first non-empty bin in its own fixed random order of the bins (Shrivastava
    2017), so for any two documents P[sig_a[i] == sig_b[i]] = Jaccard(a, b), as with `num_perm`
    independent permutations, at O(shingles + num_perm) per document instead of their product.
    Documents are processed in batches: one numpy pass over their concatenated bytes.
    """

    MAX_PERM = 2048  # the densification table is num_perm² int16

    def __init__(self, num_perm: int = 128, shingle_words: int = 5, threshold: float = 0.8, seed: int = 0):
        if not 1 <= num_perm <= self.MAX_PERM:
            raise ValueError(f"num_perm must be in [1, {self.MAX_PERM}], got {num_perm}")
        rng = np.random.default_rng([seed, 0x5EED])
        self.salt = np.uint64(rng.integers(0, 2**63, dtype=np.uint64))
        # borrow_PP[i]: the order in which empty bin i looks for a non-empty bin (itself excluded)
        order = rng.random((num_perm, num_perm)).argsort(axis=1).astype(np.int16)
        borrow_PP = np.array([o[o != i] for i, o in enumerate(order)], dtype=np.int16).reshape(
            num_perm, num_perm - 1
        )
        # [t]: every bin's t-th choice (a densification round reads one row)
        self.borrow_T = np.ascontiguousarray(borrow_PP.T)
        self.k = shingle_words
        self.bands, self.rows = lsh_params(num_perm, threshold)
        self.num_perm = num_perm
        self._pow = np.ones(1, dtype=np.uint64)  # P^i, grown on demand

    def _powers_upto(self, n: int) -> np.ndarray:
        if self._pow.size < n:
            self._pow = _powers(_P, max(n, 2 * self._pow.size))
        return self._pow

    def shingles_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint64 shingle hashes (S,), owning document of each (S,) int64), in document order.

        Words = maximal runs of bytes that are ASCII letters/digits/underscore or non-ASCII (UTF-8
        multibyte), lowercased. A word of at most 16 bytes is hashed from (its length, its bytes
        as two little-endian uint64 words read in place); a longer one by its polynomial byte
        hash mod 2^64. A shingle combines k consecutive words of one document; a document with
        fewer than k words has one shingle of all its words, one with no word the single shingle 0.
        """
        w_W, words_D = self.words_batch(texts)
        return self.shingles_from_words(w_W, words_D)

    def words_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint64 hash of each word of the texts, in order (W,), words per text (N,))."""
        # ASCII letters are folded below (bytewise); str.lower only where there is more to fold
        parts = [(t if t.isascii() else t.lower()).encode("utf-8", "surrogatepass") for t in texts]
        doc_start = np.zeros(len(parts), dtype=np.int64)
        np.cumsum(
            np.fromiter(map(len, parts[:-1]), dtype=np.int64, count=max(len(parts) - 1, 0)) + 1,
            out=doc_start[1:],
        )
        return self._words_at(b"\n".join(parts), doc_start)  # "\n": no word spans two documents

    def words_runs(
        self, joined: bytes, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """words_batch of the texts joined[starts:ends] (UTF-8, surrogatepass; ascending, each
        followed by a byte that is no word byte, such as a space, or by the end), read in place
        but for those with a byte >= 0x80: str.lower of theirs takes their place."""
        if not joined.isascii():
            b = np.frombuffer(joined, dtype=np.uint8)
            high = np.concatenate(([0], np.cumsum(b >= 0x80)))
            at = np.flatnonzero(high[ends] > high[starts])
            lower = [
                joined[a:z].decode("utf-8", "surrogatepass").lower().encode("utf-8", "surrogatepass")
                for a, z in zip(starts[at].tolist(), ends[at].tolist())
            ]
            segments, prev = [], 0
            for a, z, low in zip(starts[at].tolist(), ends[at].tolist(), lower):
                segments += [joined[prev:a], low]
                prev = z
            segments.append(joined[prev:])
            joined = b"".join(segments)
            grow = np.zeros(starts.size, dtype=np.int64)  # bytes added by each run's lowercasing
            grow[at] = np.fromiter(map(len, lower), np.int64, at.size) - (ends[at] - starts[at])
            starts = starts + np.cumsum(grow) - grow
        return self._words_at(joined, starts)

    def _words_at(self, joined: bytes, doc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """words_batch's words of the texts starting at doc_start in `joined` (lowercase but for
        ASCII letters, each followed by a byte that is no word byte or by the end): in C where
        built (pipelines.native.minhash_words), else numpy."""
        from pipelines import native

        done = native.minhash_words(joined, doc_start)
        return done if done is not None else self._words_at_numpy(joined, doc_start)

    def _words_at_numpy(self, joined: bytes, doc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(joined)
        b = np.frombuffer(bytearray(joined + bytes(16)), dtype=np.uint8)  # 16: read past a word's end
        is_word = np.zeros(n + 2, dtype=bool)
        c = b[:n]
        c += ((c - np.uint8(0x41)) < 26).view(np.uint8) << 5  # A-Z -> a-z
        is_word[1:-1] = (
            (c >= 0x80) | ((c - np.uint8(0x61)) < 26) | ((c - np.uint8(0x30)) < 10) | (c == 0x5F)
        )  # compares, not a table gather: 3x faster
        edges = np.flatnonzero(is_word[1:] != is_word[:-1])
        starts, ends = edges[0::2], edges[1::2]
        w_W = self._word_hashes(b, starts, ends)
        words_D = np.diff(np.searchsorted(starts, doc_start), append=starts.size)
        return w_W, words_D

    def shingles_from_words(self, w_W: np.ndarray, words_D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """shingles_batch from the texts' word hashes (words_batch)."""
        doc_W = np.repeat(np.arange(words_D.size), words_D)
        k = self.k
        m = max(w_W.size - k + 1, 0)
        with np.errstate(over="ignore"):
            s_S = np.zeros(m, dtype=np.uint64)
            for j in range(k):  # polynomial combination of k consecutive word hashes, mod 2^64
                s_S = s_S * np.uint64(_P) + w_W[j : j + m]
        keep = doc_W[:m] == doc_W[k - 1 : k - 1 + m] if m else np.zeros(0, dtype=bool)
        s_S, d_S = s_S[keep], doc_W[:m][keep]
        short = np.flatnonzero(words_D < k)
        if short.size:  # documents with fewer than k words: one shingle of what they have
            first_D = np.concatenate([[0], np.cumsum(words_D)[:-1]])
            extra = np.zeros(short.size, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j, d in enumerate(short):
                    for w in w_W[first_D[d] : first_D[d] + words_D[d]]:
                        extra[j] = extra[j] * np.uint64(_P) + w
            s_S, d_S = np.concatenate([s_S, extra]), np.concatenate([d_S, short])
            order = np.argsort(d_S, kind="stable")
            s_S, d_S = s_S[order], d_S[order]
        return s_S, d_S

    def _word_hashes(self, b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """uint64 hash of each word b[starts:ends] (b padded with 16 bytes past the last word)."""
        lens = ends - starts
        words = np.ndarray((b.size - 7,), dtype="<u8", buffer=b, strides=(1,))  # unaligned reads
        with np.errstate(over="ignore"):
            h = ((lens.astype(np.uint64) * _K1) ^ (words[starts] & _MASKS[np.minimum(lens, 8)])) * _K2
            mid = np.flatnonzero(lens > 8)  # their second word
            w1 = words[starts[mid] + 8] & _MASKS[np.minimum(lens[mid] - 8, 8)]
            h[mid] = (h[mid] ^ w1) * _K1
            long = np.flatnonzero(lens > 16)
            if long.size:  # polynomial hash of their bytes: sum_j b_j P^j, one pass over them
                size_L = lens[long]
                first_L = np.cumsum(size_L) - size_L
                within = np.arange(int(size_L.sum())) - np.repeat(first_L, size_L)
                pw = self._powers_upto(int(size_L.max()))
                at = np.repeat(starts[long], size_L) + within
                poly_L = np.add.reduceat(b[at] * pw[within], first_L)
                h[long] = (poly_L ^ (size_L.astype(np.uint64) * _K2)) * _K1
        return h

    def shingles(self, text: str) -> np.ndarray:
        """The uint64 shingle hashes of one document."""
        return self.shingles_batch([text])[0]

    def signatures(self, texts: list[str], max_bytes: int = 128 << 10) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures, computed over groups of documents of at most
        ~max_bytes (bounded memory; 128 KiB groups stay in cache: ~1.5× faster than 1 MiB ones)."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        for i, j in text_groups(texts, max_bytes):
            if j > i:
                out[i:j] = self._signatures(texts[i:j])
        return out

    def _signatures(self, texts: list[str]) -> np.ndarray:
        return self.signatures_from_shingles(len(texts), *self.shingles_batch(texts))

    def signatures_from_shingles(self, n: int, s_S: np.ndarray, d_S: np.ndarray) -> np.ndarray:
        """(n, num_perm) uint32 signatures of n documents from their shingles (shingles_batch):
        in C where the helpers are built (pipelines.native: ~0.5 µs a document; the rounds of
        densification below cost ~4 µs a real docstring, most of its 128 bins empty), else numpy."""
        from pipelines import native

        out = native.minhash_signatures(n, self.num_perm, s_S, d_S, self.salt, self.borrow_T)
        return out if out is not None else self.signatures_from_shingles_numpy(n, s_S, d_S)

    def signatures_from_shingles_numpy(self, n: int, s_S: np.ndarray, d_S: np.ndarray) -> np.ndarray:
        """signatures_from_shingles in numpy: the definition the C version is tested against."""
        P = self.num_perm
        h_S = _mix64(s_S ^ self.salt)
        bin_S = ((h_S >> np.uint64(32)) * np.uint64(P)) >> np.uint64(32)  # uniform in [0, P)
        sig = np.full(n * P, _SENTINEL, dtype=np.uint64)
        np.minimum.at(sig, d_S * P + bin_S.astype(np.int64), h_S & np.uint64(0xFFFFFFFF))
        full = sig != _SENTINEL
        pos = np.flatnonzero(~full)  # the empty cells (document * P + bin)
        if pos.size and P > 1:  # optimal densification: first non-empty bin in bin i's own order
            i = pos % P
            base = pos - i
            for t in range(P - 1):  # round t: the t-th choice of the bins still unresolved
                src = base + self.borrow_T[t].take(i)
                ok = full[src]  # (a bin filled in an earlier round is no source: `full` is fixed)
                sig[pos[ok]] = sig[src[ok]]
                left = ~ok
                pos, i, base = pos[left], i[left], base[left]
                if not pos.size:  # every document has a non-empty bin: all resolve
                    break
        return sig.reshape(n, P).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 signature of one document."""
        return self.signatures([text])[0]

    def band_keys_batch(self, sig_DP: np.ndarray) -> np.ndarray:
        """(D, bands) int64: a hash of each band's rows, salted by the band index."""
        rows_DBR = sig_DP.reshape(sig_DP.shape[0], self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            h_DB = np.broadcast_to(
                np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15), rows_DBR.shape[:2]
            ).copy()
            for r in range(self.rows):
                h_DB = (h_DB ^ rows_DBR[:, :, r]) * np.uint64(0x100000001B3)
        return h_DB.view(np.int64)

    def band_keys(self, sig_P: np.ndarray) -> np.ndarray:
        """(bands,) int64 band keys of one signature."""
        return self.band_keys_batch(sig_P[None])[0]

    @staticmethod
    def jaccard(sig1: np.ndarray, sig2: np.ndarray) -> float:
        return float((sig1 == sig2).mean())


class SeenSet:
    """A set of int64 keys in one numpy array (linear probing, doubles past load 1/2).

    Batched: `contains_many` / `add_many` probe all keys of a batch at once (vectorized); the
    single-key `in` / `add` are the same table."""

    _EMPTY = np.int64(0)  # key 0 is remapped to 1 (a 2^-64 collision, harmless)

    def __init__(self, capacity: int = 1 << 16):
        size = 1 << max(4, int(capacity - 1).bit_length())
        self.table = np.zeros(size, dtype=np.int64)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    @staticmethod
    def _fix(keys) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        return np.where(keys == 0, np.int64(1), keys)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            h = keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return ((h >> np.uint64(20)) & np.uint64(self.table.size - 1)).astype(np.int64)

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, found) per key: the key's slot, or the first empty slot of its probe sequence."""
        slots = self._home(keys)
        found = np.zeros(keys.size, dtype=bool)
        active = np.arange(keys.size)
        mask = self.table.size - 1
        while active.size:
            v = self.table[slots[active]]
            hit = v == keys[active]
            found[active[hit]] = True
            active = active[~hit & (v != 0)]
            slots[active] = (slots[active] + 1) & mask
        return slots, found

    def contains_many(self, keys) -> np.ndarray:
        return self._probe(self._fix(keys))[1]

    def add_many(self, keys, _new: bool = False) -> None:
        """Insert keys (any order, repeats and present ones allowed; `_new`: distinct and absent)."""
        if not _new:
            keys = np.unique(self._fix(keys))
            keys = keys[~self._probe(keys)[1]]
        while (self.count + keys.size) * 2 > self.table.size:
            self._grow()
        self.count += keys.size  # distinct and absent: each takes a slot
        slots = self._home(keys)
        mask = self.table.size - 1
        while keys.size:  # every key walks to the first free slot; one winner per contested slot
            free = self.table[slots] == 0
            self.table[slots[free]] = keys[free]  # contested slot: one of the writes lands
            placed = np.zeros(keys.size, dtype=bool)
            placed[free] = self.table[slots[free]] == keys[free]
            keys, slots = keys[~placed], slots[~placed]
            taken = self.table[slots] != 0
            slots[taken] = (slots[taken] + 1) & mask

    def __contains__(self, key: int) -> bool:
        return bool(self.contains_many([int(key)])[0])

    def add(self, key: int) -> None:
        self.add_many([int(key)])

    def _grow(self) -> None:
        from pipelines import native

        old = self.table[self.table != 0]
        self.table = np.zeros(self.table.size * 2, dtype=np.int64)
        if native.seen_insert(self.table, old):  # (in C where built: ~2x faster)
            self.count = old.size
            return
        self.count = 0
        self.add_many(old, _new=True)


class Deduplicator:
    """The driver-side dedup decision, in input order. Keys: exact hashes and LSH band keys."""

    def __init__(self, exact: bool, near: bool):
        self.exact, self.near = exact, near
        self.exact_seen = SeenSet()
        # (a document adds `bands` keys here: started at 2^20 slots, 8 MB, the table is not
        # rehashed 4 times over its first ~30k documents, on the driver's one ordered thread)
        self.band_seen = SeenSet(1 << 20 if near else 16)

    REASONS = ("", "duplicate_exact", "near_duplicate")  # check_codes' codes 0, 1, 2

    def check_batch(self, text_hash_N, band_keys_NB) -> list[str]:
        """Per document, in order: '' if new (and remembered), else 'duplicate_exact' or
        'near_duplicate' (check_codes, named)."""
        return [self.REASONS[c] for c in self.check_codes(text_hash_N, band_keys_NB).tolist()]

    def check_codes(self, text_hash_N, band_keys_NB) -> np.ndarray:
        """Per document, in order (int8): 0 if new (and remembered), 1 for an exact duplicate, 2 for
        a near duplicate. The tables are probed once for the whole batch; documents of the same
        batch that share a key are compared through small Python sets, in order."""
        h_N = SeenSet._fix(text_hash_N).reshape(-1)
        k_NB = SeenSet._fix(band_keys_NB)
        k_NB = k_NB.reshape(h_N.size, k_NB.size // max(h_N.size, 1))
        from pipelines import native

        done = native.dedup_codes(self, h_N, k_NB)  # (in C where built: the rule, one document at a time)
        return done if done is not None else self._check_codes_numpy(h_N, k_NB)

    def _check_codes_numpy(self, h_N: np.ndarray, k_NB: np.ndarray) -> np.ndarray:
        """check_codes in numpy (the keys fixed and shaped): the reference of the C version."""
        seen_exact = self.exact_seen.contains_many(h_N) if self.exact else np.zeros(h_N.size, bool)
        seen_band = (
            self.band_seen.contains_many(k_NB.reshape(-1)).reshape(k_NB.shape).any(axis=1)
            if self.near and k_NB.size
            else np.zeros(h_N.size, bool)
        )
        # Only documents that share a key with another document of this batch depend on the
        # decisions before them: those go through the sequential rule (Python sets, in order); a
        # document whose keys are all unique in the batch is decided by the tables alone.
        N, B = k_NB.shape
        shared = np.zeros(N, dtype=bool)
        for on, cols in ((self.exact, h_N[:, None]), (self.near and B > 0, k_NB)):
            if on and N:  # (also a key repeated inside one document: in no set yet)
                flat = cols.reshape(-1)
                order = np.argsort(flat)
                same = flat[order[1:]] == flat[order[:-1]]  # neighbours once sorted: a repeated key
                repeated = np.zeros(flat.size, dtype=bool)
                repeated[order[1:][same]] = repeated[order[:-1][same]] = True
                shared |= repeated.reshape(cols.shape).any(axis=1)
        in_exact = self.exact & seen_exact
        in_band = self.near & seen_band
        out = np.where(in_exact, 1, np.where(in_band, 2, 0)).astype(np.int8)
        new_exact: set[int] = set()
        new_bands: set[int] = set()
        for i in np.flatnonzero(shared & ~in_exact).tolist():  # the rule, in order
            h, keys = int(h_N[i]), k_NB[i].tolist()
            if self.exact and h in new_exact:
                out[i] = 1
            elif in_band[i] or (self.near and not new_bands.isdisjoint(keys)):
                out[i] = 2
            else:
                out[i] = 0
                new_exact.add(h)
                new_bands.update(keys)
        fresh = np.flatnonzero(~shared & ~in_exact & ~in_band)  # unique in the batch and new
        # the new keys are distinct (fresh documents' keys are unique in the batch, so in no set)
        # and absent (a document is new only when none of its keys was in the table): inserted
        # without another probe
        if self.exact:
            keys = np.concatenate([h_N[fresh], np.fromiter(new_exact, np.int64, len(new_exact))])
            self.exact_seen.add_many(keys, _new=True)
        if self.near:
            keys = np.concatenate([k_NB[fresh].reshape(-1), np.fromiter(new_bands, np.int64, len(new_bands))])
            self.band_seen.add_many(keys, _new=True)
        return out

    def check(self, text_hash: int, band_keys) -> str:
        """One document: check_batch of one."""
        keys = np.asarray(band_keys if band_keys is not None else [], dtype=np.int64)
        return self.check_batch([text_hash], keys[None])[0]

    @property
    def nbytes(self) -> int:
        return self.exact_seen.nbytes + self.band_seen.nbytes
