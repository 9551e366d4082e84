"""The per-document stages that run in parallel on Ray Data workers: normalize, length, the dedup
keys, quality (fastText, perplexity) and domain scores and their decisions, tokenizing. Pure
functions of one document, so any number of workers give the same result; the order-dependent
decision (dedup, which needs what came before) is taken on the driver (pipelines.prepare).

`Cleaner.clean_rows` takes the reader's rows (pipelines.readers.read_records) and returns a
pyarrow table; it lives in the reading actor of `dsv3ray prepare` (one per CPU; the fastText model
loads once per actor). Columns: source, line, status, reason, excerpt, text, words, text_hash,
band_keys, quality, perplexity, domain, seconds (of reading and each stage) and, when the tokenizer is known up
front, tokens / eval / pieces / truncated_tokens. Quality, MinHash and tokens are served from one
lookup of the texts' space-separated chunks (pipelines.chunkpass) where its rules allow, from each
stage's own path elsewhere, with the same results.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dsv3ray.runtable import ranges
from pipelines import native
from pipelines.dedup import MinHasher, text_hashes
from pipelines.readers import DROP, OK

# C0/C1 control characters except \t and \n (\r is folded into \n first)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_TRAILING = re.compile(r" *\n *")
_NEWLINES = re.compile(r"\n{3,}")

MAX_MINHASH_CHARS = 1_000_000
STAGES = ("normalize", "length", "chunks", "quality", "perplexity", "domain", "dedup_keys", "tokenize")
# a cleaned table's "seconds" column: per row, the seconds of TIMED (reading, then each stage)
TIMED = ("read", *STAGES)


def normalize_text(text: str) -> str:
    """NFC, no control characters, runs of spaces/tabs → one space, at most one blank line: one
    text through `normalize_batch` (the definition: `normalize_text_reference`)."""
    return normalize_batch([text])[0][0]


def normalize_text_reference(text: str) -> str:
    """Every rewrite, unconditionally: the definition `normalize_batch` is tested against."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _NEWLINES.sub("\n\n", text).strip()


_ASCII_CONTROL = bytes([*range(0, 9), *range(11, 32), 127])  # (\r is folded into \n first)


def _unicode_rules(text: str) -> str:
    """What normalization does to a text beyond ASCII's rules (\r folded first, as there): NFC,
    the non-ASCII control and zero-width characters deleted (with the ASCII ones: its regex does
    both), no-break and ideographic spaces made spaces. The rest (runs of whitespace, blank lines,
    the ends) is a rule on ASCII bytes, which a UTF-8 text's other characters never hold."""
    if "\r" in text:  # (before _CONTROL, which deletes a \r)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    if not text.replace("\n", " ").replace("\t", " ").isprintable():
        text = _CONTROL.sub("", text)
    if "\u00a0" in text or "\u3000" in text:
        text = text.replace("\u00a0", " ").replace("\u3000", " ")
    return text


def normalize_batch(texts: list[str]) -> tuple[list[str], list[bytes], np.ndarray]:
    """Each text normalized (`normalize_text_reference`'s result), its UTF-8 bytes (surrogatepass),
    and, where the C pass counted them, its number of words after it (str.split's; -1 elsewhere:
    texts beyond ASCII, whose other Unicode spaces split words too).

    All in a few passes over the batch's texts joined (the same results: tests compare them on
    fuzzed text): a text beyond ASCII first gets the rules ASCII needs none of (`_unicode_rules`:
    NFC, C1 and zero-width characters); after \r is folded and control characters are deleted
    (bytes.replace / translate), the rest of the rules is one on maximal runs of
    whitespace (`_whitespace_runs`), on the UTF-8 bytes of any text (a multi-byte character's
    bytes are all >= 0x80), then Unicode's other spaces stripped from the ends. Real text's
    indented lines cost 17 µs a 1 KB document this way, 25 one at a time; a text beyond ASCII
    took 33 µs (docstrings) one at a time, its regexes on the str."""
    n = len(texts)
    out = list(texts)
    words = np.full(n, -1, dtype=np.int64)
    if not n:
        return out, [], words
    wide = [i for i, t in enumerate(texts) if not t.isascii()]
    enc = [t.encode("ascii") if t.isascii() else b"" for t in texts]
    for i in wide:
        enc[i] = _unicode_rules(texts[i]).encode("utf-8", "surrogatepass")
    joined = b"\xff".join([b"", *enc, b""])  # (0xFF: in no UTF-8 text; one copy of the batch)
    done = native.normalize_ascii(joined, 0xFF)  # (in C where built: all of it in one pass)
    if done is not None:
        joined, words = done
    else:
        if b"\r" in joined:
            joined = joined.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        joined = _whitespace_runs(joined.translate(None, _ASCII_CONTROL), 0xFF)
    parts = joined.split(b"\xff")[1:-1]
    for i, e, b in zip(range(n), enc, parts):
        if b != e:  # (a clean ASCII text keeps its str)
            out[i] = b.decode("utf-8", "surrogatepass")
    for i in wide:
        text = parts[i].decode("utf-8", "surrogatepass")
        if text and (text[0].isspace() or text[-1].isspace()):  # (Unicode's others: \u2003, ..)
            text = text.strip()
            parts[i] = text.encode("utf-8", "surrogatepass")
        out[i] = text
    words[wide] = -1
    return out, parts, words


def _text_column(texts: list[str], encoded: list[bytes | None], keep: np.ndarray) -> pa.Array:
    """large_string: texts[i] where keep[i], else null; built from their UTF-8 (encoded[i] where
    the batch has it) joined, not from the str objects (pa.array: ~0.7 µs a 1 KB docstring, this
    ~0.2). The readers let no lone surrogate through: the bytes are valid UTF-8."""
    n = len(texts)
    utf8 = [
        (e if (e := encoded[i]) is not None else texts[i].encode("utf-8")) if keep[i] else b""
        for i in range(n)
    ]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, utf8), dtype=np.int64, count=n), out=offsets[1:])
    valid = np.packbits(np.asarray(keep, dtype=bool), bitorder="little")
    nulls = n - int(np.count_nonzero(keep))
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(b"".join(utf8)), pa.py_buffer(valid) if nulls else None, nulls
    )


def _whitespace_runs(joined: bytes, sep: int) -> bytes:
    """Texts joined by (and starting and ending with) byte `sep` (> 32), with no control character
    but tab and newline: each maximal run of whitespace (space, tab, newline) at either end of its
    text goes (strip), one with no newline becomes one space, one with k newlines becomes
    min(k, 2) newlines (the reference: spaces next to a newline go, 3+ newlines become 2). A
    single space between two other characters, most runs in text, is not looked at."""
    c = np.frombuffer(joined, dtype=np.uint8)
    ws = c <= 32  # (no byte below 32 but tab and newline is left)
    other = ~ws & (c != sep)
    odd = ws.copy()
    odd[1:-1] ^= (c[1:-1] == 32) & other[:-2] & other[2:]  # (a plain single space is whitespace)
    edges = np.flatnonzero(odd[1:] != odd[:-1]) + 1  # runs [starts, ends) (c's ends are sep)
    if not edges.size:
        return joined
    starts, ends = edges[0::2], edges[1::2]
    at_end = (c[starts - 1] == sep) | (c[ends] == sep)
    nl = np.flatnonzero(c == 10)  # (every newline is in a run)
    first_nl = np.searchsorted(nl, starts)
    count_nl = np.searchsorted(nl, ends) - first_nl
    spaced = (count_nl == 0) & ~at_end  # runs that become one space: their first byte stays
    keep = ~odd
    keep[starts[spaced]] = True
    nl_run = np.searchsorted(starts, nl, side="right") - 1
    rank = np.arange(nl.size) - first_nl[nl_run]
    keep[nl[(rank < 2) & ~at_end[nl_run]]] = True
    out = c[keep]
    if b"\t" in joined:  # a run's first byte may be a tab: a space (at its place in `out`)
        kept = np.where(spaced, 1, np.where(at_end, 0, np.minimum(count_nl, 2)))
        dropped_before = np.cumsum(ends - starts - kept) - (ends - starts - kept)
        out[starts[spaced] - dropped_before[spaced]] = 32
    return out.tobytes()


@dataclass
class CleanSettings:
    """What the workers need (a picklable subset of PrepareConfig plus model payloads)."""

    normalize: bool
    min_words: int
    max_chars: int
    oversize: str
    dedup_exact: bool
    dedup_near: bool
    minhash_perms: int
    shingle_words: int
    near_threshold: float
    seed: int
    # (payloads out of repr: Ray Data formatted a UDF's arguments when it planned a run, ~0.1 s of
    # start-up for the model's megabytes; a dataclass repr is still what a log or error shows)
    # fastText's model: QualityScorer.payload (its batched predictor, or its .bin contents)
    quality_model: object | None = field(default=None, repr=False)
    quality_label: str = "__label__good"
    quality_threshold: float = 0.5
    unigram_lm: object | None = field(default=None, repr=False)  # pipelines.quality.UnigramLM
    perplexity_threshold: float = float("inf")
    domain: object | None = field(default=None, repr=False)  # pipelines.domain.DomainFilter
    domain_threshold: float = 0.0
    # set = tokenize here too (the tokenizer is known before the run): one pass, no clean shards
    tokenizer_json: str | None = field(default=None, repr=False)
    max_doc_tokens: int = 2048
    eval_fraction: float = 0.0
    truncate_tokens: bool = False


class Cleaner:
    """Per-document stages and decisions, in the order that saves the most work: length, quality,
    perplexity, domain (each decided here: the scores and thresholds are per document), then the
    dedup keys and, when a tokenizer is given, the tokens of what is still kept. Dedup itself
    needs what came before and is decided on the driver. Rows that reached the score decisions
    keep their text (kept or not: the driver samples them for the topic summary)."""

    def __init__(self, settings: CleanSettings):
        self.s = settings
        self.minhash = MinHasher(
            settings.minhash_perms, settings.shingle_words, settings.near_threshold, settings.seed
        )
        self.scorer = None
        if settings.quality_model is not None:
            from pipelines.quality import load_scorer

            self.scorer = load_scorer(settings.quality_model, settings.quality_label)
        self.tok = None
        if settings.tokenizer_json is not None:
            from tokenizers import Tokenizer as HF

            from dsv3ray.tokenizer import Tokenizer, single_threaded

            single_threaded()
            self.tok = Tokenizer(HF.from_str(settings.tokenizer_json))
            native.install(self.tok, settings.tokenizer_json)  # (new pieces' cut, probe and BPE in C)
        from pipelines.chunkpass import ChunkPass
        from pipelines.quality import MAX_PREDICT_CHARS

        # one lookup per space-separated chunk serves tokens, fastText and MinHash (pipelines.chunkpass)
        self.chunks = ChunkPass(
            self.tok, self.scorer.batch if self.scorer is not None else None,
            self.minhash if settings.dedup_near else None, MAX_PREDICT_CHARS, MAX_MINHASH_CHARS,
            settings.max_chars,
        )  # fmt: skip

    def clean_rows(self, rows: list[tuple], read_seconds: float = 0.0) -> pa.Table:
        """Reader rows (source, line, status, reason, excerpt, text) → the cleaned table;
        `read_seconds`: the batch's reading time."""
        source, line, status, reason, excerpt, texts = (list(c) for c in zip(*rows)) if rows else [[]] * 6
        status = np.array(status, dtype=np.int8)
        s = self.s
        n = len(texts)
        timing = dict.fromkeys(TIMED, 0.0)
        timing["read"] = read_seconds

        t0 = time.perf_counter()
        valid = np.flatnonzero(status == OK)
        encoded: list[bytes | None] = [None] * n  # UTF-8 of final texts, for the chunk lookup
        words = np.full(n, -1, dtype=np.int64)  # (counted by normalize's C pass where it ran)
        if s.normalize:
            norm, parts, words[valid] = normalize_batch([texts[i] for i in valid])  # (parts: UTF-8)
            for j, i in enumerate(valid.tolist()):
                texts[i], encoded[i] = norm[j], parts[j]
        timing["normalize"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        words = np.minimum(words, s.min_words + 1)  # (str.split with maxsplit=min_words counts so far)
        for i in valid[words[valid] < 0].tolist():  # (capped: no 8M-word list for a 50 MB doc)
            words[i] = len(texts[i].split(maxsplit=s.min_words))
        for i in valid[words[valid] < s.min_words].tolist():
            status[i], reason[i] = DROP, ("empty" if words[i] == 0 else "too_short")
        if s.oversize == "drop":
            for i in valid.tolist():
                if status[i] == OK and len(texts[i]) > s.max_chars:
                    status[i], reason[i] = DROP, "too_long"
        decided = status == OK  # rows that reach the score decisions carry their text out
        timing["length"] = time.perf_counter() - t0

        # the chunks of what is still kept, looked up once for the stages below (pipelines.chunkpass)
        t0 = time.perf_counter()
        looked = np.flatnonzero(status == OK)
        lk = None
        if self.chunks.active and looked.size:
            # a text longer than every stage's cut is looked up as "" (served by no stage: each
            # takes its own path; no chunk arrays for a 50 MB document)
            cut = self.chunks.max_chars
            short = [i for i in looked.tolist() if len(texts[i]) <= cut]
            for i in short:
                if encoded[i] is None:
                    encoded[i] = texts[i].encode("utf-8", "surrogatepass")
            fits = np.zeros(n, dtype=bool)
            fits[short] = True
            lk = self.chunks.lookup(
                [texts[i] if fits[i] else "" for i in looked], [encoded[i] if fits[i] else b"" for i in looked]
            )  # fmt: skip
        at = np.full(n, -1, dtype=np.int64)  # row -> its place in the lookup
        at[looked] = np.arange(looked.size)
        timing["chunks"] = time.perf_counter() - t0

        def served(rows: np.ndarray, from_chunks, fallback):
            """from_chunks(lookup, wanted) -> (values, done) for the rows the lookup covers,
            fallback(rows) for the others; the values of `rows`, in order."""
            if lk is None:
                return fallback(rows)
            want = np.zeros(lk.n, dtype=bool)
            want[at[rows]] = True
            values, done = from_chunks(lk, want)
            out, rest = values[at[rows]], np.flatnonzero(~done[at[rows]])
            if rest.size:
                out[rest] = fallback(rows[rest])
            return out

        def score(stage: str, fn, keep) -> np.ndarray:
            """fn(rows still OK) → their scores; rows whose score fails keep() are dropped."""
            out = np.full(n, np.nan, dtype=np.float32)
            t0 = time.perf_counter()
            ok = np.flatnonzero(status == OK)
            if ok.size:
                out[ok] = fn(ok)
                for i in ok[~keep(out[ok])]:
                    status[i], reason[i] = DROP, DROP_REASONS[stage]
            timing[stage] = time.perf_counter() - t0
            return out

        def of_texts(fn):
            return lambda rows: fn([texts[i] for i in rows])

        quality = perplexity = domain = np.full(n, np.nan, dtype=np.float32)
        if self.scorer is not None:
            quality = score(
                "quality", lambda rows: served(rows, self.chunks.quality, of_texts(self.scorer.scores)),
                lambda q: q >= s.quality_threshold,
            )  # fmt: skip
        if s.unigram_lm is not None:
            perplexity = score(
                "perplexity", of_texts(lambda ts: [s.unigram_lm.perplexity(t) for t in ts]),
                lambda p: p <= s.perplexity_threshold,
            )  # fmt: skip
        if s.domain is not None:
            domain = score("domain", of_texts(s.domain.similarity), lambda d: d >= s.domain_threshold)

        ok = np.flatnonzero(status == OK)
        ok_texts = [texts[i] for i in ok]
        t0 = time.perf_counter()
        text_hash = np.zeros(n, dtype=np.int64)
        if ok.size:  # (of the UTF-8 the chunk lookup had, else encoded here)
            utf8 = [encoded[i] or texts[i].encode("utf-8", "surrogatepass") for i in ok.tolist()]
            text_hash[ok] = text_hashes(utf8)
        # near-dup keys (from the first MAX_MINHASH_CHARS: bounded time/memory on huge docs);
        # rows that are not OK carry an empty list
        keys_OB = np.zeros((ok.size, 0), dtype=np.int64)
        if s.dedup_near and ok.size:
            sigs = served(
                ok, self.chunks.signatures,
                of_texts(lambda ts: self.minhash.signatures([t[:MAX_MINHASH_CHARS] for t in ts])),
            )  # fmt: skip
            keys_OB = self.minhash.band_keys_batch(sigs)
        bands = _lists(n, ok, keys_OB.shape[1], keys_OB.reshape(-1), pa.int64())
        timing["dedup_keys"] = time.perf_counter() - t0

        cols = {
            "source": pa.array(source, pa.string()),
            "line": pa.array(line, pa.int64()),
            "status": pa.array(status, pa.int8()),
            "reason": pa.array(reason, pa.string()),
            "excerpt": pa.array(excerpt, pa.string()),
            # dropped before the decisions / quarantined rows carry no text (memory; the reason is kept)
            "text": _text_column(texts, encoded, decided),
            "words": pa.array(words),
            "text_hash": pa.array(text_hash),
            "band_keys": bands,
            "quality": pa.array(quality),
            "perplexity": pa.array(perplexity),
            "domain": pa.array(domain),
        }
        if self.tok is not None:
            from pipelines.pack import tokenize_documents

            t0 = time.perf_counter()
            tk = tokenize_documents(
                self.tok, ok_texts, text_hash[ok].tolist(), s.max_doc_tokens, s.eval_fraction,
                s.truncate_tokens, s.max_chars, encoded=self._token_ids(lk, at[ok], ok_texts),
            )  # fmt: skip
            sizes = np.diff(tk["tokens"].offsets.to_numpy())
            cols["tokens"] = _lists(n, ok, sizes, tk["tokens"].values, pa.int32())
            for key in ("eval", "pieces", "truncated_tokens"):
                full = np.zeros(n, dtype=np.bool_ if key == "eval" else np.int64)
                full[ok] = tk[key].to_numpy(zero_copy_only=False)
                cols[key] = pa.array(full)
            timing["tokenize"] = time.perf_counter() - t0
        # the batch's seconds of each of TIMED on its first row, zeros elsewhere (sums are exact,
        # however Ray Data cuts and joins the tables): one column for the driver to read, not 9
        seconds_RT = np.zeros((n, len(TIMED)))
        if n:
            seconds_RT[0] = [timing[k] for k in TIMED]
        cols["seconds"] = pa.FixedSizeListArray.from_arrays(pa.array(seconds_RT.reshape(-1)), len(TIMED))
        return pa.table(cols)

    def _token_ids(self, lk, at: np.ndarray, texts: list[str]):
        """The token ids of texts[i][:max_chars] (their places `at` in the lookup), as
        (flat, offsets): from the chunks where the lookup covers a text, the tokenizer's
        encode_flat for the others; None without a lookup."""
        if lk is None:
            return None
        want = np.zeros(lk.n, dtype=bool)
        want[at] = True
        flat, offsets, done = self.chunks.tokens(lk, want)
        start, count = offsets[at], offsets[at + 1] - offsets[at]
        rest = np.flatnonzero(~done[at])
        if rest.size:  # their ids after the chunks' ones
            r_flat, r_off = self.tok.encode_flat([texts[i][: self.s.max_chars] for i in rest.tolist()])
            start[rest], count[rest] = flat.size + r_off[:-1], np.diff(r_off)
            flat = np.concatenate([flat, r_flat])
            flat = flat[ranges(start, count)]
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(count, out=offsets[1:])
        return flat, offsets


DROP_REASONS = {"quality": "low_quality", "perplexity": "high_perplexity", "domain": "off_domain"}


def _lists(n: int, rows: np.ndarray, sizes, values, type_) -> pa.ListArray:
    """A list column of n rows: rows[j] holds sizes[j] of `values` (in order), others are empty."""
    lengths = np.zeros(n, dtype=np.int32)
    lengths[rows] = sizes
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_))
