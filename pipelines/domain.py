"""Domain stage: offline document embeddings (hashed TF-IDF, no download), similarity to target
examples, and a k-means topic summary of what was kept and dropped.

Embedding: lowercased word unigrams hashed (crc32) into `dim` buckets, weight (1 + log tf) * idf,
projected to a small LSA space (see DomainFilter). A document's similarity = the largest cosine to
the target centroids (k-means of the target examples, k = min(8, #examples)); centroids rather
than every example keep the cost per document fixed however many examples are given.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from dsv3ray.runtable import text_groups

_WORD = re.compile(r"[^\W\d_]{2,}", re.UNICODE)  # words of letters only, 2+ chars
# the same words of lowercase ASCII text: every byte but a-z made a space, then split (~2.5x faster)
_ASCII_LETTERS = bytes(c if 97 <= c <= 122 else 32 for c in range(256))
MAX_EMBED_CHARS = 100_000
STOP = frozenset(
    "the of and to in is a that for it as with be on by this are or an not from at which if can you "
    "but all will has have was its also any one may should must used use such other".split()
)


def words_of(text: str) -> list[str]:
    """A text's words, in order: lowercase letters only, two or more, no stop word (the definition
    _word_runs computes for many texts at once)."""
    low = text[:MAX_EMBED_CHARS].lower()
    if low.isascii():
        runs = low.encode("ascii").translate(_ASCII_LETTERS).decode("ascii").split()
        return [w for w in runs if len(w) > 1 and w not in STOP]
    return [w for w in _WORD.findall(low) if w not in STOP]


def _bucket(word: str | bytes, dim: int) -> int:
    """A word's hashed bucket: crc32 of its UTF-8 bytes, mod dim."""
    if isinstance(word, str):
        word = word.encode("utf-8", "surrogatepass")
    return zlib.crc32(word) % dim


@dataclass
class _WordRuns:
    """The words of texts (words_of's, in order) as runs of one UTF-8 buffer: word w is
    buf[start[w]:end[w]], of text text[w] (ascending), its crc32 crc[w]."""

    buf: bytes
    start: np.ndarray
    end: np.ndarray
    crc: np.ndarray
    text: np.ndarray

    def buckets(self, dim: int) -> np.ndarray:
        """_bucket of each word."""
        return (self.crc % dim).astype(np.int64)

    def tf_cells(self, dim: int, bucket: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The non-zero cells of the texts' term frequencies: (cell = text * dim + bucket,
        ascending; its 1 + log(count), float32), one count over all (text, bucket) pairs."""
        bucket = self.buckets(dim) if bucket is None else bucket
        cell, count = np.unique(self.text * dim + bucket, return_counts=True)
        return cell, 1.0 + np.log(count.astype(np.float32))


def _crc32_runs(buf: bytes, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """zlib.crc32 of each run buf[start:end], uint32 (in C where it is built, else zlib's per run)."""
    from pipelines import native

    crc = native.crc32_runs(np.frombuffer(buf, np.uint8), start, end)
    if crc is None:
        crc = np.fromiter(
            (zlib.crc32(buf[i:j]) for i, j in zip(start.tolist(), end.tolist())),
            dtype=np.uint32,
            count=start.size,
        )
    return crc


def _stop_crcs() -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """STOP's words by crc32: (their crcs ascending, lengths, words)."""
    words = sorted((w.encode("ascii") for w in STOP), key=zlib.crc32)
    crc = np.array([zlib.crc32(w) for w in words], dtype=np.uint32)
    assert np.unique(crc).size == crc.size
    return crc, np.array([len(w) for w in words], dtype=np.int64), words


_STOP_CRC, _STOP_LEN, _STOP_WORDS = _stop_crcs()


def _word_runs(texts: list[str]) -> _WordRuns:
    """words_of of every text at once: each text lowercased and cut to its letters (ASCII: one
    bytes.translate; other texts: _WORD's words), joined by spaces into one buffer, cut at the
    spaces in numpy, each word's crc32 computed (its bucket); words of one byte and stop words
    dropped. The same words as words_of, with no Python object per word (~90k words for the
    topic summary's 1,000 documents). A stop word is found by its crc32 and length: words of up
    to 4 bytes with the same length and crc are the same (CRC-32 maps messages of up to 32 bits
    one to one); a longer one is compared byte for byte."""
    parts = []
    for t in texts:
        low = t[:MAX_EMBED_CHARS].lower()
        if low.isascii():
            parts.append(low.encode("ascii").translate(_ASCII_LETTERS))
        else:
            parts.append(" ".join(_WORD.findall(low)).encode("utf-8", "surrogatepass"))
    n = len(texts)
    lens = np.fromiter(map(len, parts), dtype=np.int64, count=n)
    first = np.zeros(n, dtype=np.int64)  # text i's first byte (one space between texts)
    np.cumsum(lens[:-1] + 1, out=first[1:])
    buf = b" ".join(parts)
    letter = np.zeros(len(buf) + 2, dtype=bool)  # (False before and after: words end inside)
    np.not_equal(np.frombuffer(buf, np.uint8), 32, out=letter[1:-1])
    edge = np.flatnonzero(letter[1:] != letter[:-1])
    start, end = edge[0::2], edge[1::2]
    crc = _crc32_runs(buf, start, end)
    length = end - start
    keep = length > 1  # (ASCII words of one letter; _WORD's words have two or more)
    k = np.minimum(np.searchsorted(_STOP_CRC, crc), _STOP_CRC.size - 1)
    stop = np.flatnonzero((_STOP_CRC[k] == crc) & (_STOP_LEN[k] == length))
    keep[stop[length[stop] <= 4]] = False
    for w in stop[length[stop] > 4].tolist():
        keep[w] = buf[start[w] : end[w]] != _STOP_WORDS[k[w]]
    start, end, crc = start[keep], end[keep], crc[keep]
    text = np.searchsorted(first, start, side="right") - 1
    return _WordRuns(buf, start, end, crc, text)


def _tf_cells(texts: list[str], dim: int):
    """_WordRuns.tf_cells of the texts, in groups of ~4M characters (they bound the buffers held
    at once)."""
    cells, values = [], []
    for i, j in text_groups(texts, 4 << 20):
        cell, value = _word_runs(texts[i:j]).tf_cells(dim)
        cells.append(cell + i * dim)
        values.append(value)
    if not cells:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(cells), np.concatenate(values)


def tf_vectors(texts: list[str], dim: int) -> np.ndarray:
    """(n, dim) float32 of 1 + log(count) per hashed word (0 where absent)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    cell, value = _tf_cells(texts, dim)
    out.reshape(-1)[cell] = value
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class SparseRows:
    """An (n, dim) matrix by its non-zero cells (row-major: `row` ascending), for the
    topic summary's hashed TF-IDF (~3% non-zero): k-means on it costs O(non-zeros * k) a step,
    not O(n * dim * k), and no dense (n, dim) array is built."""

    def __init__(self, row: np.ndarray, col: np.ndarray, value: np.ndarray, shape: tuple[int, int]):
        self.row, self.col, self.value, self.shape = row, col, value, shape

    def unit_rows(self) -> SparseRows:
        norm = np.sqrt(np.bincount(self.row, self.value**2, minlength=self.shape[0]))
        return SparseRows(self.row, self.col, self.value / np.maximum(norm, 1e-12)[self.row], self.shape)

    def dot(self, c_KD: np.ndarray) -> np.ndarray:
        """self @ c_KD.T, (n, k)."""
        from pipelines import native

        # (a row gather from a contiguous (dim, k) copy: a gather from c_KD.T, strided, cost ~4x)
        c_DK = np.ascontiguousarray(c_KD.T, dtype=np.float64)
        out = native.sparse_dot(self.row, self.col, self.value, c_DK, self.shape[0])  # (C: ~2x faster)
        return out if out is not None else self._dot_numpy(c_DK)

    def _dot_numpy(self, c_DK: np.ndarray) -> np.ndarray:
        out = np.zeros((self.shape[0], c_DK.shape[1]))
        if self.row.size:  # rows are sorted: one sum per run of a row's cells
            first = np.flatnonzero(np.r_[True, self.row[1:] != self.row[:-1]])
            prod_ZK = np.take(c_DK, self.col, axis=0)
            prod_ZK *= self.value[:, None]
            out[self.row[first]] = np.add.reduceat(prod_ZK, first, axis=0)
        return out

    def dense(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """The given rows, dense (len(rows), dim)."""
        out = np.zeros((len(rows), self.shape[1]), dtype=self.value.dtype)
        for i, r in enumerate(rows):
            a, b = np.searchsorted(self.row, [r, r + 1])
            out[i, self.col[a:b]] = self.value[a:b]
        return out

    def sum_by(self, group_N: np.ndarray, k: int) -> np.ndarray:
        """(k, dim): the sum of the rows of each group."""
        d = self.shape[1]
        flat = np.bincount(group_N[self.row] * d + self.col, self.value, minlength=k * d)
        return flat.reshape(k, d)


def kmeans(x_ND, k: int, seed: int = 0, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) with k-means++ seeding of unit rows: an (n, d) array or
    `SparseRows`. Returns (centroids_KD, assign_N)."""
    sparse = isinstance(x_ND, SparseRows)
    n = x_ND.shape[0]
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = [int(rng.integers(n))]
    for _ in range(1, k):
        c = x_ND.dense(centers) if sparse else x_ND[centers]
        d = 1.0 - (x_ND.dot(c) if sparse else x_ND @ c.T).max(axis=1)
        d = np.maximum(d, 0) ** 2
        centers.append(int(rng.choice(n, p=d / d.sum())) if d.sum() > 0 else int(rng.integers(n)))
    c_KD = x_ND.dense(centers) if sparse else x_ND[centers].copy()
    assign = np.zeros(n, dtype=np.int64)
    previous = None
    for _ in range(iters):
        assign = np.argmax(x_ND.dot(c_KD) if sparse else x_ND @ c_KD.T, axis=1)
        if previous is not None and np.array_equal(assign, previous):
            break  # converged: the centroids, hence every later step, would repeat
        previous = assign
        if sparse:
            sums_KD = x_ND.sum_by(assign, k)
        else:
            onehot_NK = np.zeros((n, k), dtype=x_ND.dtype)
            onehot_NK[np.arange(n), assign] = 1
            sums_KD = onehot_NK.T @ x_ND  # members' sums in one product (no per-cluster row copies)
        filled = np.bincount(assign, minlength=k) > 0  # an empty cluster keeps its centroid
        c_KD[filled] = sums_KD[filled]
        c_KD = _normalize(c_KD)
    return c_KD, assign


class DomainFilter:
    """Similarity of documents to a set of target-domain examples, in a small LSA space.

    Space: hashed TF-IDF (idf over targets + background) projected on the top `rank` singular
    directions of [targets; background]; the background (a sample of the stdlib docs corpus by
    default) gives the space directions for "not this topic". Embeddings are unit length in that
    space, and a document scores its largest cosine to the k-means centroids of the targets.
    Measured on the stdlib corpus (targets = 60 `email` docstrings): at 0.7, 23% of the other
    `email` docs pass and 2.4% of the rest; at 0.5, 67% and 17%. Built once on the driver;
    workers receive the arrays (a few hundred KB).
    """

    def __init__(
        self, examples: list[str], background: list[str], dim: int = 4096, rank: int = 32, seed: int = 0
    ):
        if not examples:
            raise ValueError("DomainFilter needs at least one target example")
        self.dim = dim
        tf = tf_vectors(list(examples) + list(background), dim)
        df = (tf > 0).sum(axis=0)
        self.idf_D = (np.log((1 + len(tf)) / (1 + df)) + 1.0).astype(np.float32)
        x_ND = _normalize(tf * self.idf_D).astype(np.float64)
        # top singular directions via the n x n Gram matrix (n << dim): V = X^T U / s
        evals, evecs = np.linalg.eigh(x_ND @ x_ND.T)
        order = np.argsort(evals)[::-1][: min(rank, len(evals))]
        s = np.sqrt(np.maximum(evals[order], 1e-12))
        self.basis_RD = ((x_ND.T @ evecs[:, order]) / s).T.astype(np.float32)
        targets = self.embed(examples)
        self.centroids_KD, _ = kmeans(targets, min(8, len(examples)), seed)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, rank) float32, unit length."""
        return _normalize(_normalize(tf_vectors(texts, self.dim) * self.idf_D) @ self.basis_RD.T)

    def similarity(self, texts: list[str]) -> np.ndarray:
        """(n,) float32: max cosine to the target centroids."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return (self.embed(texts) @ self.centroids_KD.T).max(axis=1).astype(np.float32)


def topic_summary(samples: list[tuple[str, bool, str]], k: int, seed: int = 0, top: int = 8) -> list[dict]:
    """Cluster a sample of (text, kept, reason) documents; per cluster: size, kept, dropped
    (by reason) and the top terms (highest summed TF-IDF within the cluster)."""
    if not samples:
        return []
    texts = [s[0] for s in samples]
    dim = 1 << 12
    words = _word_runs(texts)
    bucket = words.buckets(dim)
    cell, value = words.tf_cells(dim, bucket)
    row, col = cell // dim, cell % dim
    idf = np.log((1 + len(texts)) / (1 + np.bincount(col, minlength=dim))) + 1.0
    x = SparseRows(row, col, value * idf[col], (len(texts), dim)).unit_rows()
    _, assign = kmeans(x, k, seed)
    weight_JD = x.sum_by(assign, int(assign.max()) + 1)
    top_J = [np.argsort(-w)[:top] for w in weight_JD]
    # map the top buckets back to words seen in the sample (the most frequent word wins a bucket,
    # the first seen among equals): only the words of those buckets become Python strings
    at = np.flatnonzero(np.isin(bucket, np.concatenate(top_J)))
    counts = Counter(words.buf[i:j] for i, j in zip(words.start[at].tolist(), words.end[at].tolist()))
    best: dict[int, tuple[int, str]] = {}
    for w, c in counts.items():  # (first seen first)
        b = _bucket(w, dim)
        if c > best.get(b, (0, ""))[0]:
            best[b] = (c, w.decode("utf-8", "surrogatepass"))
    out = []
    for j in sorted(set(assign.tolist())):
        members = np.flatnonzero(assign == j)
        terms = [best[b][1] for b in top_J[j].tolist() if weight_JD[j, b] > 0 and b in best]
        dropped = Counter(samples[i][2] for i in members if not samples[i][1])
        out.append(
            {
                "cluster": int(j),
                "size": int(members.size),
                "kept": int(sum(samples[i][1] for i in members)),
                "dropped": dict(dropped),
                "top_terms": terms,
            }
        )
    return sorted(out, key=lambda c: -c["size"])
