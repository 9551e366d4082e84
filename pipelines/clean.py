"""The per-document stages that run in parallel on Ray Data workers: normalize, length, the dedup
keys, quality (fastText, perplexity) and domain scores. Pure functions of one document, so any
number of workers give the same result; the order-dependent decisions (dedup, which needs what
came before) are taken on the driver (pipelines.prepare).

`Cleaner` is a plain callable over pyarrow record tables (pipelines.readers.RECORD_SCHEMA); Ray
Data runs it as an actor pool (`map_batches(Cleaner, ...)`): the fastText model loads once per
actor. Output adds: words, text_hash, band_keys, quality, perplexity, domain and per-stage seconds.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.dedup import MinHasher, text_hash64
from pipelines.readers import DROP, OK

# C0/C1 control characters except \t and \n (\r is folded into \n first)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_TRAILING = re.compile(r" *\n *")
_NEWLINES = re.compile(r"\n{3,}")

MAX_MINHASH_CHARS = 1_000_000
STAGES = ("normalize", "length", "dedup_keys", "quality", "perplexity", "domain")


def normalize_text(text: str) -> str:
    """NFC, no control characters, runs of spaces/tabs → one space, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():  # ASCII is already NFC and has no C1/zero-width characters
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _NEWLINES.sub("\n\n", text).strip()


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
    quality_model: bytes | None = None  # fastText .bin contents
    quality_label: str = "__label__good"
    unigram_lm: object | None = None  # pipelines.quality.UnigramLM
    domain: object | None = None  # pipelines.domain.DomainFilter


OUT_FIELDS = [
    ("words", pa.int64()),
    ("text_hash", pa.int64()),
    ("band_keys", pa.list_(pa.int64())),
    ("quality", pa.float32()),
    ("perplexity", pa.float32()),
    ("domain", pa.float32()),
] + [(f"t_{s}", pa.float64()) for s in STAGES]


class Cleaner:
    def __init__(self, settings: CleanSettings):
        self.s = settings
        self.minhash = MinHasher(
            settings.minhash_perms, settings.shingle_words, settings.near_threshold, settings.seed
        )
        self.scorer = None
        if settings.quality_model is not None:
            from pipelines.quality import load_scorer_from_bytes

            self.scorer = load_scorer_from_bytes(settings.quality_model, settings.quality_label)

    def __call__(self, table: pa.Table) -> pa.Table:
        s = self.s
        n = table.num_rows
        status = table.column("status").to_numpy(zero_copy_only=False).astype(np.int8)
        reason = table.column("reason").to_pylist()
        texts = table.column("text").to_pylist()
        words = np.zeros(n, dtype=np.int64)
        timing = dict.fromkeys(STAGES, 0.0)

        t0 = time.perf_counter()
        if s.normalize:
            for i in range(n):
                if status[i] == OK:
                    texts[i] = normalize_text(texts[i])
        timing["normalize"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i in range(n):
            if status[i] != OK:
                continue
            words[i] = len(texts[i].split(maxsplit=s.min_words))  # capped: no 8M-word list for a 50 MB doc
            if words[i] < s.min_words:
                status[i], reason[i] = DROP, ("empty" if words[i] == 0 else "too_short")
            elif len(texts[i]) > s.max_chars and s.oversize == "drop":
                status[i], reason[i] = DROP, "too_long"
        timing["length"] = time.perf_counter() - t0

        ok = [i for i in range(n) if status[i] == OK]
        ok_texts = [texts[i] for i in ok]
        text_hash = np.zeros(n, dtype=np.int64)
        bands: list = [None] * n
        t0 = time.perf_counter()
        for i, t in zip(ok, ok_texts):
            text_hash[i] = text_hash64(t)
            if s.dedup_near:
                # near-dup keys from the first MAX_MINHASH_CHARS (bounded time/memory on huge docs)
                bands[i] = self.minhash.band_keys(self.minhash.signature(t[:MAX_MINHASH_CHARS])).tolist()
        timing["dedup_keys"] = time.perf_counter() - t0

        quality = np.full(n, np.nan, dtype=np.float32)
        t0 = time.perf_counter()
        if self.scorer is not None and ok:
            quality[ok] = self.scorer.scores(ok_texts)
        timing["quality"] = time.perf_counter() - t0

        ppl = np.full(n, np.nan, dtype=np.float32)
        t0 = time.perf_counter()
        if s.unigram_lm is not None and ok:
            ppl[ok] = [s.unigram_lm.perplexity(t) for t in ok_texts]
        timing["perplexity"] = time.perf_counter() - t0

        dom = np.full(n, np.nan, dtype=np.float32)
        t0 = time.perf_counter()
        if s.domain is not None and ok:
            dom[ok] = s.domain.similarity(ok_texts)
        timing["domain"] = time.perf_counter() - t0

        # dropped and quarantined rows carry no text downstream (memory; the reason is kept)
        texts = [t if st == OK else None for t, st in zip(texts, status)]
        cols = {
            "source": table.column("source"),
            "line": table.column("line"),
            "status": pa.array(status, pa.int8()),
            "reason": pa.array(reason, pa.string()),
            "excerpt": table.column("excerpt"),
            "t_read": table.column("t_read"),
            "text": pa.array(texts, pa.large_string()),
            "words": pa.array(words),
            "text_hash": pa.array(text_hash),
            "band_keys": pa.array(bands, pa.list_(pa.int64())),
            "quality": pa.array(quality),
            "perplexity": pa.array(ppl),
            "domain": pa.array(dom),
        }
        for stage in STAGES:  # the batch's seconds on its first row, zeros elsewhere: sums are exact
            col = np.zeros(n, dtype=np.float64)
            if n:
                col[0] = timing[stage]
            cols[f"t_{stage}"] = pa.array(col)
        return pa.table(cols)
