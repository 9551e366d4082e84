"""`dsv3ray prepare`: raw text → cleaned, tokenized, packed parquet shards (the data contract).

Stages, in order, each switchable in [prepare]:
  read/validate → normalize → length → dedup (exact + MinHash LSH) → quality (fastText, perplexity)
  → domain similarity → tokenize + pack (train / eval by document hash).
Every input record (a JSON line, a parquet row, a text file) ends in exactly one of: kept, dropped
(reason) or quarantined (reason, written to DIR/quarantine/), so
`input_records == kept + sum(dropped) + quarantined` holds on every run (see report.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3ray.errors import ConfigError

OVERSIZE_RULES = ("drop", "split")


@dataclass
class PrepareConfig:
    """Section [prepare]. Defaults run every stage that needs no user-supplied data."""

    seq_len: int = 256  # packed rows hold seq_len + 1 tokens
    vocab_size: int = 8192
    tokenizer: str | None = None  # path to an existing tokenizer.json; None = train one on the kept text
    tokenizer_train_chars: int = 50_000_000  # text budget for training the tokenizer
    eval_fraction: float = 0.02  # documents whose hash falls in this fraction go to eval
    max_doc_tokens: int = 2048  # longer documents are split at the token level
    batch_size: int = 512  # documents per Ray Data batch
    num_workers: int = 0  # cleaning actors; 0 = one per CPU of the Ray cluster minus one (at least 1)
    rows_per_shard: int = 8192  # packed rows per output parquet shard
    seed: int = 0
    # 1. validate
    max_record_bytes: int = 64 * 1024 * 1024  # a longer JSON line / text file is quarantined unread
    # 2. normalize
    normalize: bool = True  # unicode NFC, control characters removed, whitespace collapsed
    # 3. length
    min_words: int = 32
    max_chars: int = 1_000_000
    oversize: str = "split"  # "split": keep, cut into max_doc_tokens pieces at tokenization; "drop"
    # 4. dedup
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8  # estimated Jaccard of word 5-gram shingles
    minhash_perms: int = 128
    shingle_words: int = 5
    # 5. quality
    quality: bool = True
    quality_model: str | None = None  # fastText .bin; None = the project's default model (trained, cached)
    quality_threshold: float = 0.5  # P(good) below this is dropped
    perplexity: bool = False
    perplexity_reference: str | None = None  # text/jsonl to fit the unigram LM; None = stdlib docs corpus
    perplexity_threshold: float = 5000.0
    # 6. domain
    domain_examples: str | None = None  # jsonl/txt of target-domain examples; None = stage off
    domain_threshold: float = 0.7
    domain_clusters: int = 8

    def __post_init__(self):
        positive = {
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "max_doc_tokens": self.max_doc_tokens,
            "batch_size": self.batch_size,
            "rows_per_shard": self.rows_per_shard,
            "max_record_bytes": self.max_record_bytes,
            "max_chars": self.max_chars,
            "minhash_perms": self.minhash_perms,
            "shingle_words": self.shingle_words,
            "tokenizer_train_chars": self.tokenizer_train_chars,
            "domain_clusters": self.domain_clusters,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"prepare.{key}", value, "must be a positive integer")
        if self.vocab_size < 300:
            raise ConfigError(
                "prepare.vocab_size", self.vocab_size, "at least 300 (256 bytes + merges + eos)"
            )
        if self.num_workers < 0:
            raise ConfigError("prepare.num_workers", self.num_workers, "0 (auto) or a positive integer")
        if self.min_words < 0:
            raise ConfigError("prepare.min_words", self.min_words, "0 or more")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("prepare.eval_fraction", self.eval_fraction, "in [0, 1)")
        if self.oversize not in OVERSIZE_RULES:
            raise ConfigError("prepare.oversize", self.oversize, f"one of {', '.join(OVERSIZE_RULES)}")
        for key in ("near_threshold", "quality_threshold", "domain_threshold"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"prepare.{key}", value, "in [0, 1]")
        if self.perplexity_threshold <= 1.0:
            raise ConfigError("prepare.perplexity_threshold", self.perplexity_threshold, "greater than 1")
