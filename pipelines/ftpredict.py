"""fastText's supervised `predict` for a batch of documents, in numpy: the same scores, ~half the cost.

fastText scores a line as softmax(wo · mean(wi[ids])) where `ids` are the line's words that are in
the vocabulary (with their character n-grams when the model has them) followed by one hashed
bucket per word n-gram. Every id's row contributes linearly, so `wi · woᵀ` (the logits of each
row) is computed once at load and a document costs a lookup per word and a gather-sum of
L-label rows (L = 2 for a quality model), instead of fastText re-reading each document byte by
byte through a C++ stream, hashing every word and averaging `dim`-wide vectors.

The rules of fastText 0.9.2's `Dictionary::getLine` + `Model::predict` on `one_line(text)` are
kept exactly: words split on ' ', \\n, \\r, \\t, \\v, \\f, \\0 and where `str.split` splits
(one_line's rewrite); a token that starts with the label prefix is skipped
(no row, no n-gram); a literal `</s>` token counts and ends the line; out-of-vocabulary words add
only their character n-grams (none when maxn = 0) but still take part in word n-grams, hashed
with FNV-1a (signed bytes) and mixed as `h = h * 116049371 + h'` in 64 bits; the score of a label
is `exp(log(p + 1e-5))`, i.e. p + 1e-5; a line with no ids gets no prediction (score 0).
fastText sums in float32 in line order, this in float64: scores agree to ~1e-6 (tests compare
both on fuzzed text). Measured on 1.7 KB documents, one core: 43-47 µs per document for fastText's
predict, 22 batched (warm). Models this does not cover (hierarchical softmax, one-vs-all / negative
sampling with fastText's tabulated sigmoid, quantized) keep fastText's own predict.

Shapes: W = words of the batch, N = documents, L = labels, V = vocabulary rows cached.
"""

from __future__ import annotations

import numpy as np

from dsv3ray.runtable import RunTable, byte_runs, grown, keys, padded, text_groups
from pipelines import native

EOS = "</s>"
_MIX = np.uint64(116049371)
_SHORT = 64  # words up to this many bytes are hashed column-wise in numpy, longer ones in Python


def fnv1a_reference(word: bytes) -> int:
    """fastText's Dictionary::hash: 32-bit FNV-1a over a word's UTF-8 bytes read as signed chars."""
    h = 2166136261
    for b in word:
        h = ((h ^ (b | 0xFFFFFF00 if b >= 128 else b)) * 16777619) & 0xFFFFFFFF
    return h


def fnv1a_runs(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """fnv1a_reference of each word buf[starts:ends] of a uint8 buffer (read in place),
    sign-extended from int32 to 64 bits as fastText's n-gram mix reads it (`uint64_t h = int32
    hash`); returns uint64 [len(starts)]. In C where built (pipelines.native), else numpy below."""
    done = native.fnv1a_runs(buf, starts, ends)
    return done if done is not None else fnv1a_runs_numpy(buf, starts, ends)


def fnv1a_runs_numpy(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """fnv1a_runs in numpy: the definition the C version is tested against."""
    lens = ends - starts
    h = np.full(lens.size, 2166136261, dtype=np.uint32)
    short = np.flatnonzero(lens <= _SHORT)
    if short.size:
        # runs sorted longest first: at byte j the runs still going are a prefix of that order
        order = short[np.argsort(-lens[short], kind="stable")]
        at = starts[order]
        alive = np.bincount(lens[order], minlength=_SHORT + 1)[::-1].cumsum()[::-1]  # alive[j]: len >= j
        signed = buf.view(np.int8)  # (int8 -> uint32 sign-extends, as fastText's signed chars)
        hs = h[order]
        for j in range(int(lens[order[0]])):
            k = alive[j + 1]
            hs[:k] = (hs[:k] ^ signed[at[:k] + j].astype(np.uint32)) * np.uint32(16777619)
        h[order] = hs
    for i in np.flatnonzero(lens > _SHORT).tolist():
        h[i] = fnv1a_reference(buf[starts[i] : ends[i]].tobytes())
    return h.view(np.int32).astype(np.int64).view(np.uint64)


MAX_INPUT_MATRIX_BYTES = (
    1 << 30
)  # fastText's binding copies the input matrix out: larger models keep its predict


def batch_predictor(model, label: str):
    """A BatchPredictor for this fastText model, or None when its predict is not covered here."""
    a = model.f.getArgs()
    if model.is_quantized() or a.model.name != "supervised" or a.loss.name != "softmax":
        return None
    try:
        words = model.get_words(on_unicode_error="strict")
    except UnicodeDecodeError:
        return None
    if (len(words) + a.bucket) * a.dim * 4 > MAX_INPUT_MATRIX_BYTES:
        return None
    return BatchPredictor(model, words, label)


class BatchPredictor:
    """fastText's score of one label per document, a batch of documents at a time.

    A batch's texts are joined into one UTF-8 buffer; its words are the runs between separator
    bytes, looked up at once in a `dsv3ray.runtable.RunTable`. A word's entry (its ids' logits
    summed, how many ids, its FNV hash, whether it is a label token) is made the first time it is
    seen and kept; at most `max_entries` (then the table empties: bounded memory on any corpus).
    Words over MAX_WORD bytes are not kept (computed where they occur).
    """

    MAX_WORD = 256  # bytes
    GROUP_CHARS = 256 << 10  # texts looked up together (their per-word arrays stay in cache)

    def __init__(self, model, words: list[str], label: str, max_entries: int = 1 << 20):
        a = model.f.getArgs()
        self.label_id = model.get_labels().index(label)
        self.prefix, self.n, self.bucket = a.label, a.wordNgrams, np.uint64(a.bucket)
        self.model, self.subwords = model, a.maxn > 0
        self.nwords = len(words)
        # the vocabulary's ids by the words' bytes, looked up a batch at a time
        enc = [w.encode("utf-8") for w in words]
        self.vocab = RunTable(max(1, len(enc)))
        if enc:
            joined, starts, ends = byte_runs(enc)
            self.vocab.append(np.arange(len(enc)), enc, keys(padded(joined), starts, ends, 0))
        wi, wo = model.get_input_matrix(), model.get_output_matrix().astype(np.float64)
        L = wo.shape[0]
        # softmax of two = sigmoid of the margin, linear in the rows: one column
        proj = (wo[self.label_id] - wo[1 - self.label_id]) if L == 2 else wo.T  # [dim] or [dim, L]
        step = 1 << 16  # rows at a time in float64 (no float64 copy of the whole matrix)
        # einsum, not `@`: a BLAS product (~1 ms here) woke OpenBLAS's threads, which then spun
        # ~0.1 s on the other core while the prepare driver started its workers
        ein = "rd,d->r" if proj.ndim == 1 else "rd,dl->rl"
        self.row_logits = np.concatenate(
            [np.einsum(ein, wi[i : i + step].astype(np.float64), proj) for i in range(0, wi.shape[0], step)]
        )  # [R] or [R, L]
        del wi
        self.table = RunTable(min(max_entries, max(1 << 10, (256 << 20) // (8 * L))))  # <= 256 MB of logits
        self._clear()

    def __getstate__(self) -> dict:
        """Pickled without fastText's model and with an empty word table: a cleaning worker
        rebuilds the predictor from its arrays (vocabulary table, row logits: ~1.2 MB for the
        default model) instead of writing the model's .bin to a file and loading it, and computing
        those arrays again (~50 ms per worker per run). A model with character n-grams cannot
        travel so: its words' subwords are the model's to compute."""
        if self.subwords:
            raise TypeError("a predictor of a model with character n-grams needs the model: send its .bin")
        state = self.__dict__.copy()
        state["model"], state["table"] = None, self.table.max_entries
        del state["values_V"]
        state.pop("_vocab_c", None)  # (made again where it is used: the library is that machine's)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.table = RunTable(state["table"])
        self._clear()

    def _vocab_table(self):
        """The vocabulary's table for lookups: in C where the library is built (a CRunTable made
        from it once per process: long words need no Python dict lookup), else itself."""
        if getattr(self, "_vocab_c", None) is None:
            self._vocab_c = native.CRunTable.of(self.vocab) if native.library() is not None else self.vocab
        return self._vocab_c

    def _clear(self) -> None:
        self.table.clear()
        cap = 1 << 10  # grown by doubling (amortized: a batch's new words do not copy the table)
        # per entry: logits summed over its ids, number of ids, FNV hash, label token
        self.values_V = (
            np.zeros((cap,) + self.row_logits.shape[1:]),
            np.zeros(cap, np.int64),
            np.zeros(cap, np.uint64),
            np.zeros(cap, np.bool_),
        )

    def _store(self, first: int, values) -> None:
        """Entries first.. (just appended to the table) get `values`."""
        end = first + len(values[1])
        cap = self.values_V[1].size
        if end > cap:
            cap = max(end, 2 * cap)
            self.values_V = tuple(grown(a, cap) for a in self.values_V)
        for a, v in zip(self.values_V, values):
            a[first:end] = v

    def _values(self, raw: list[bytes]):
        """(logits, number of ids, hash, is a label token), one each per word given as bytes."""
        joined, starts, ends = byte_runs(raw)
        return self._values_at(joined, padded(joined), starts, ends)

    def _values_at(self, joined: bytes, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        """_values of the words joined[starts:ends] (buf: `padded(joined)`), read in place."""
        n = starts.size
        logits_M = np.zeros((n,) + self.row_logits.shape[1:])
        count_M = np.zeros(n, np.int64)
        # a label token: no row, no word n-gram (none where no word holds the prefix at all)
        skip_M = _starting_with(joined, buf, starts, ends, self.prefix.encode("utf-8"))
        if self.subwords:  # the word's id (if any) and its character n-grams' rows
            for i in np.flatnonzero(~skip_M).tolist():
                w = joined[starts[i] : ends[i]].decode("utf-8", "surrogatepass")
                ids = np.asarray(self.model.get_subwords(w)[1], np.int64)
                logits_M[i] = self.row_logits[ids].sum(0)
                count_M[i] = ids.size
        elif n:  # the word's id, looked up by its bytes
            table = self._vocab_table()  # (a CRunTable keys the runs itself: numpy's keys not needed)
            key = (
                (np.zeros(n, np.int64),)
                if isinstance(table, native.CRunTable)
                else keys(buf, starts, ends, 0)
            )
            wid = table.lookup(joined, starts, ends, key)
            found = np.flatnonzero((wid >= 0) & ~skip_M)
            logits_M[found] = self.row_logits[wid[found]]
            count_M[found] = 1
        return logits_M, count_M, fnv1a_runs(buf, starts, ends), skip_M

    def chunk_words(self, joined: bytes, chunk_start: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        """The words of each chunk (space-free runs of text: pipelines.chunkpass) starting at
        chunk_start (ascending) in `joined`, each ended by a space or the end, for scoring a text
        from its chunks' words: (usable: the chunk has no label token and no `</s>` (those change
        the line's words: such texts are scored by `scores`), words per chunk, (logits, number of
        ids, hash) of each word, chunks end to end). Words are read in place."""
        buf = padded(joined)
        starts, ends = _words(joined, buf)
        words_C = np.diff(np.searchsorted(starts, chunk_start), append=starts.size)
        logits, count, hash_, skip = self._values_at(joined, buf, starts, ends)
        eos = (ends - starts == len(_EOS_BYTES)) & _starting_with(joined, buf, starts, ends, _EOS_BYTES)
        usable = (
            np.bincount(
                np.repeat(np.arange(chunk_start.size), words_C)[skip | eos], minlength=chunk_start.size
            )
            == 0
        )
        return usable, words_C, (logits, count, hash_)

    def scores(self, texts: list[str], max_chars: int) -> np.ndarray:
        """fastText's score of the label per text, float32 [N] (0 where fastText predicts nothing)."""
        groups = text_groups(texts, self.GROUP_CHARS)
        return np.concatenate([self._scores(texts[i:j], max_chars) for i, j in groups])

    def _scores(self, texts: list[str], max_chars: int) -> np.ndarray:
        N = len(texts)
        parts = [t[:max_chars].encode("utf-8", "surrogatepass") for t in texts]
        joined = b" ".join(parts)
        buf = padded(joined)
        starts, ends = _words(joined, buf)
        text_start = np.zeros(N, np.int64)
        np.cumsum([len(p) + 1 for p in parts[:-1]], out=text_start[1:])
        doc_W = np.searchsorted(text_start, starts, side="right") - 1
        key = keys(buf, starts, ends, 0)
        eos = np.flatnonzero((key[0] == 2 * len(EOS)) & (key[1] == _EOS_KEY))
        if eos.size:  # fastText's line ends at a literal </s> token (which counts)
            first = np.full(N, doc_W.size, np.int64)
            np.minimum.at(first, doc_W[eos], eos)
            keep = np.arange(doc_W.size) <= first[doc_W]
            starts, ends, doc_W = starts[keep], ends[keep], doc_W[keep]
            key = tuple(k[keep] for k in key)
        code_W = self.table.lookup(joined, starts, ends, key)
        kept = ends - starts <= self.MAX_WORD
        missing = np.flatnonzero((code_W < 0) & kept)
        if missing.size:
            at, inverse, clash = self.table.distinct(joined, starts, ends, missing, key)
            if self.table.size + at.size <= self.table.max_entries:
                raw = [joined[starts[i] : ends[i]] for i in at.tolist()]
                numbers = self.table.append(at, raw, key)
                self._store(int(numbers[0]), self._values(raw))
                code_W[missing] = numbers[inverse]
                kept[missing[clash]] = False  # a hash clash in this batch: computed where it occurs
            elif self.table.size and at.size <= self.table.max_entries:
                self._clear()  # full: start again (every entry found above is gone)
                return self._scores(texts, max_chars)
            else:
                kept[missing] = False  # more new words than the table holds: computed where they occur
        code = np.where(kept, code_W, 0)  # (entry 0 read for the others: overwritten below)
        # (np.take: 2-D fancy indexing is ~8x slower)
        logits_W, count_W, hash_W, skip_W = (np.take(a, code, axis=0) for a in self.values_V)
        other = np.flatnonzero(~kept)
        if other.size:  # long words (and clashes): their values here, not kept
            vals = self._values([joined[starts[i] : ends[i]] for i in other.tolist()])
            for arr, v in zip((logits_W, count_W, hash_W, skip_W), vals):
                arr[other] = v
        if skip_W.any():
            keep = ~skip_W
            logits_W, count_W, hash_W, doc_W = logits_W[keep], count_W[keep], hash_W[keep], doc_W[keep]
        return self.combine(N, doc_W, logits_W, count_W, hash_W)

    def combine(self, N, doc_W, logits_W, count_W, hash_W) -> np.ndarray:
        """Scores of N documents from their words' values, in order (doc_W: each word's document,
        sorted): their rows, then the word n-grams'."""
        return self.probabilities(*self.sums(N, doc_W, logits_W, count_W, hash_W))

    def sums(self, N, doc_W, logits_W, count_W, hash_W) -> tuple[np.ndarray, np.ndarray]:
        """(each document's summed rows: its words', then its word n-grams', the number of ids):
        combine's sums (pipelines.native.quality_rows: the same in C, the same bits)."""
        sum_N = np.zeros((N,) + logits_W.shape[1:])
        _add_per_doc(sum_N, doc_W, logits_W)
        count_N = np.bincount(doc_W, weights=count_W, minlength=N)
        # word n-grams: h(i..i+k) = h(i..i+k-1) * 116049371 + h(i+k), inside one document
        W = doc_W.size
        mix = hash_W
        for k in range(1, self.n):
            m = W - k
            if m <= 0:
                break
            mix = mix[:m] * _MIX + hash_W[k:]
            same = doc_W[:m] == doc_W[k:]
            bucket_G = (mix[same] % self.bucket).astype(np.int64)
            _add_per_doc(sum_N, doc_W[:m][same], np.take(self.row_logits, self.nwords + bucket_G, axis=0))
            count_N += np.bincount(doc_W[:m][same], minlength=N)
        return sum_N, count_N

    def probabilities(self, sum_N: np.ndarray, count_N: np.ndarray) -> np.ndarray:
        """The label's probability per document from its sums (float32; 0 where it has no id)."""
        N = count_N.size
        out = np.zeros(N, np.float32)
        has = count_N > 0
        z = sum_N[has] / (count_N[has] if sum_N.ndim == 1 else count_N[has, None])
        if sum_N.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-z))
        else:
            z -= z.max(1, keepdims=True)
            e = np.exp(z)
            p = e[:, self.label_id] / e.sum(1)
        out[has] = p + 1e-5  # fastText reports exp(log(p + 1e-5))
        return out


# str.split's separators beyond ASCII (one_line rewrites them to spaces before fastText reads the line)
UNICODE_SPACES = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE2 = np.array(
    [int.from_bytes(c.encode(), "big") for c in UNICODE_SPACES if len(c.encode()) == 2], np.uint32
)
_SPACE3 = np.array(
    [int.from_bytes(c.encode(), "big") for c in UNICODE_SPACES if len(c.encode()) == 3], np.uint32
)
_EOS_BYTES = EOS.encode()
_EOS_KEY = np.uint64(int.from_bytes(_EOS_BYTES, "little"))


def _words(joined: bytes, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the words fastText reads in `one_line` of each text: runs between the
    bytes fastText splits at (space, \\t \\n \\v \\f \\r, \\0), \\x1c-\\x1f and the UTF-8 encodings of
    UNICODE_SPACES (str.split splits there, so one_line turns them into spaces)."""
    size = len(joined)
    c = buf[:size]
    sep = ((c - np.uint8(9)) < 5) | ((c - np.uint8(28)) < 5) | (c == 0)
    if not joined.isascii():
        lead = np.flatnonzero((c == 0xC2) | ((c - np.uint8(0xE1)) < 3))  # the spaces' first bytes
        if lead.size:
            b = [buf[lead + i].astype(np.uint32) for i in range(3)]
            two = lead[np.isin((b[0] << 8) | b[1], _SPACE2)]
            three = lead[np.isin((b[0] << 16) | (b[1] << 8) | b[2], _SPACE3)]
            for i in range(3):
                sep[three + i] = True
            sep[two] = sep[two + 1] = True
    is_word = np.zeros(size + 2, dtype=bool)
    is_word[1:-1] = ~sep
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])
    return edges[0::2], edges[1::2]


def _starting_with(joined: bytes, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, prefix: bytes):
    """Per run joined[starts:ends] (buf: `padded(joined)`): it starts with `prefix` (non-empty)."""
    out = np.zeros(starts.size, np.bool_)
    if prefix in joined:
        at = np.flatnonzero(ends - starts >= len(prefix))
        pb = np.frombuffer(prefix, np.uint8)
        out[at] = (buf[starts[at, None] + np.arange(len(prefix))] == pb).all(1)
    return out


def _add_per_doc(sum_N: np.ndarray, doc_G: np.ndarray, rows_G: np.ndarray):
    """sum_N[doc_G[g]] += rows_G[g]; doc_G is sorted (rows come in document order)."""
    if doc_G.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, doc_G[1:] != doc_G[:-1]])
    sum_N[doc_G[starts]] += np.add.reduceat(rows_G, starts, axis=0)
