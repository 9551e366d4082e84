"""Quality stage: a fastText classifier (P(good) per document) and an optional unigram perplexity filter.

The default classifier is trained by the project itself, reproducibly, from data it has: positives
are the standard library's docstrings and pydoc topics (well-formed technical prose), negatives are
junk synthesized from them with a seeded RNG (shuffled words, nav/boilerplate lines, markup soup,
repeated tokens, keyboard mash / number soup). It is trained single-threaded with a fixed seed and
cached under $DSV3RAY_CACHE (default ~/.cache/dsv3ray), keyed by the recipe version and the Python
version (the stdlib text it learns from).

`dsv3ray quality train --input LABELED --output MODEL.bin` trains one from a fastText-format file
(`__label__good some text` per line). fastText's high-level `predict` breaks on NumPy 2, so the
scorer calls the low-level `model.f.predict`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from dsv3ray.errors import UserError

RECIPE_VERSION = "q2"
GOOD, BAD = "__label__good", "__label__bad"
MAX_PREDICT_CHARS = 100_000  # a document's first 100k chars decide its score (fastText averages)
_WORD = re.compile(r"\w+", re.UNICODE)

_BOILER = [
    "Home", "About us", "Contact", "Privacy Policy", "Terms of Service", "Login", "Sign up", "Subscribe",
    "Cookie settings", "All rights reserved", "Share on Facebook", "Tweet", "Read more", "Next page",
    "Previous", "Skip to content", "Menu", "Search", "Copyright", "Click here", "Buy now", "Free shipping",
    "Add to cart", "Follow us", "Newsletter", "FAQ", "Sitemap", "Accept all cookies", "Back to top",
]  # fmt: skip
_TAGS = ["div", "span", "a", "li", "ul", "td", "tr", "table", "script", "style", "p", "img", "br", "meta"]


def cache_dir() -> Path:
    d = Path(os.environ.get("DSV3RAY_CACHE", Path.home() / ".cache" / "dsv3ray"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def one_line(text: str) -> str:
    r"""fastText reads one line per example: newlines and runs of whitespace become one space.
    (str.split() splits where the regex \s+ matches: 5x faster than re.sub on a 1 KB document;
    the fuzz test compares both.)"""
    return " ".join(text[:MAX_PREDICT_CHARS].split())


def synth_junk(rng: random.Random, words: list[str], kind: int, source: str = "") -> str:
    """One junk document of `kind` 0..4 built from real tokens, so vocabulary alone cannot tell it.

    kind 0 shuffles the tokens of `source` (a real document): right words, no syntax.
    """
    n = rng.randint(30, 200)
    if kind == 0:
        tokens = source.split() or [rng.choice(words) for _ in range(n)]
        rng.shuffle(tokens)
        return " ".join(tokens)
    if kind == 1:  # navigation / boilerplate
        return " | ".join(rng.choice(_BOILER) for _ in range(n // 3)) + f" © {rng.randint(1990, 2030)}"
    if kind == 2:  # markup soup
        parts = []
        for _ in range(n // 2):
            t = rng.choice(_TAGS)
            parts.append(f'<{t} class="{rng.choice(words)}-{rng.randint(0, 99)}">{rng.choice(words)}</{t}>')
        return "".join(parts)
    if kind == 3:  # repeated tokens
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        return " ".join([phrase] * (n // 2))
    # keyboard mash, numbers and symbols
    alphabet = "asdfghjklqwertyuiopzxcvbnm0123456789#$%&*+=/_-"
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 12))) for _ in range(n))


def build_default_training_file(path: Path, seed: int = 0, max_docs: int = 4000) -> dict:
    """Write the labeled fastText file of the default model; returns counts."""
    from pipelines.corpus import stdlib_documents

    good = [one_line(d["text"]) for d, _ in zip(stdlib_documents(min_chars=120), range(max_docs))]
    rng = random.Random(seed)
    words = sorted({w for t in good for w in t.split()})  # whitespace tokens keep their punctuation
    bad = [one_line(synth_junk(rng, words, i % 5, good[(i * 7919) % len(good)])) for i in range(len(good))]
    lines = [f"{GOOD} {t}" for t in good] + [f"{BAD} {t}" for t in bad]
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"good": len(good), "bad": len(bad)}


def train_fasttext(labeled: Path, out: Path, seed: int = 0):
    import fasttext

    model = fasttext.train_supervised(
        input=str(labeled), epoch=10, lr=0.5, wordNgrams=2, dim=16, bucket=100_000, minCount=2,
        thread=1, seed=seed, verbose=0,
    )  # fmt: skip
    model.save_model(str(out))
    return model


def default_quality_model(seed: int = 0) -> Path:
    """Path of the default classifier, training (about 10 s) and caching it on first use."""
    key = hashlib.sha256(f"{RECIPE_VERSION}|{sys.version}|{seed}".encode()).hexdigest()[:16]
    out = cache_dir() / f"quality-{key}.bin"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        labeled = Path(tmp) / "train.txt"
        build_default_training_file(labeled, seed)
        part = Path(tmp) / "model.bin"
        train_fasttext(labeled, part, seed)
        os.replace(part, out)  # atomic: concurrent first uses never see half a file
    return out


class QualityScorer:
    """P(label) per text with a fastText model (from a path or the model file's bytes): fastText's
    predict batched in numpy (pipelines.ftpredict) where it covers the model, fastText's own
    otherwise."""

    def __init__(self, model_path: str | Path, label: str = GOOD, batched: bool = True):
        from fasttext.FastText import _FastText

        try:  # = fasttext.load_model without its stderr warning on every worker
            self.model = _FastText(model_path=str(model_path))
        except ValueError as e:
            raise UserError(
                f"quality model {model_path} cannot be loaded ({e}): pass a fastText .bin"
            ) from None
        self.label = label
        if label not in self.model.get_labels():
            raise UserError(
                f"quality model {model_path} has no label {label!r} (labels: {self.model.get_labels()}): "
                "set prepare.quality_label"
            )
        from pipelines.ftpredict import batch_predictor

        self.batch = batch_predictor(self.model, label) if batched else None

    def scores(self, texts: list[str]) -> np.ndarray:
        """P(label) per text, float32 (0 where fastText predicts nothing), whichever path scores."""
        if self.batch is not None:
            return self.batch.scores(texts, MAX_PREDICT_CHARS)
        return np.asarray(self.fasttext_scores(texts), dtype=np.float32)

    def fasttext_scores(self, texts: list[str]) -> list[float]:
        """fastText's own predict, one text at a time (the reference and the benchmark's limit)."""
        # f.multilinePredict returns wrong probabilities under NumPy 2: one predict call per text
        predict, label = self.model.f.predict, self.label
        out = []
        for t in texts:
            pairs = predict(one_line(t), -1, 0.0, "replace")
            out.append(next((float(p) for p, lab in pairs if lab == label), 0.0))
        return out

    @classmethod
    def of_predictor(cls, batch, label: str = GOOD) -> QualityScorer:
        """A scorer that is only its batched predictor (`pipelines.ftpredict.BatchPredictor`, as
        a worker receives it: no fastText model in the process, so no `fasttext_scores`)."""
        scorer = cls.__new__(cls)
        scorer.model, scorer.label, scorer.batch = None, label, batch
        return scorer

    def payload(self, model_path: str | Path):
        """What a worker needs to score as this scorer (loaded from `model_path`) does: the
        batched predictor where it travels without the model (pickled:
        pipelines.ftpredict.BatchPredictor.__getstate__), else the model file's contents."""
        if self.batch is not None and not self.batch.subwords:
            return self.batch
        return Path(model_path).read_bytes()


def load_scorer(payload, label: str = GOOD) -> QualityScorer:
    """The scorer of a `QualityScorer.payload`."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return load_scorer_from_bytes(bytes(payload), label)
    return QualityScorer.of_predictor(payload, label)


def load_scorer_from_bytes(data: bytes, label: str = GOOD) -> QualityScorer:
    """Workers receive the model's bytes (no shared filesystem needed) and load a private copy."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(data)
    try:
        return QualityScorer(f.name, label)
    finally:
        os.unlink(f.name)


class UnigramLM:
    """Word unigram LM with add-one smoothing; perplexity = exp(mean negative log-prob per word)."""

    def __init__(self, counts: dict[str, int]):
        total = sum(counts.values())
        self.denominator = total + len(counts) + 1  # +1: the unknown-word slot
        self.logp = {w: math.log((c + 1) / self.denominator) for w, c in counts.items()}
        self.unk = math.log(1 / self.denominator)

    @classmethod
    def fit(cls, texts) -> UnigramLM:
        counts = Counter()
        for t in texts:
            counts.update(_WORD.findall(t.lower()))
        return cls(dict(counts))

    def perplexity(self, text: str) -> float:
        words = _WORD.findall(text[:MAX_PREDICT_CHARS].lower())
        if not words:
            return float("inf")
        nll = -sum(self.logp.get(w, self.unk) for w in words) / len(words)
        return math.exp(nll)


def reference_texts(path: str | None):
    """Texts of the perplexity reference: a jsonl/txt file, or None = the stdlib docs corpus."""
    if path is None:
        from pipelines.corpus import stdlib_documents

        return [d["text"] for d in stdlib_documents()]
    from pipelines.readers import OK, expand_inputs, read_records

    return [r[5] for f in expand_inputs([path]) for r in read_records(f, 1 << 30) if r[2] == OK]


def cli_quality_train(run, args) -> int:
    """`dsv3ray quality train --input LABELED_FILE --output MODEL.bin`."""
    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise UserError(f"quality train: labeled file {src} does not exist: pass a fastText-format file")
    lines = [ln for ln in src.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    labels = Counter(ln.split()[0] for ln in lines if ln.startswith("__label__"))
    if len(labels) < 2:
        raise UserError(
            f"quality train: {src} needs lines like '__label__good text' with at least two labels, found {dict(labels)}"
        )
    seed = getattr(getattr(run, "prepare", None), "seed", 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # a deterministic 10% hold-out to report precision; the saved model uses all lines
        held = [ln for i, ln in enumerate(lines) if i % 10 == 9]
        fit = Path(tmp) / "fit.txt"
        fit.write_text("\n".join(ln for i, ln in enumerate(lines) if i % 10 != 9) + "\n", encoding="utf-8")
        test = Path(tmp) / "held.txt"
        test.write_text("\n".join(held) + "\n", encoding="utf-8")
        n, precision, _ = (
            train_fasttext(fit, Path(tmp) / "m.bin", seed).test(str(test)) if held else (0, 0.0, 0)
        )
        clean = Path(tmp) / "all.txt"
        clean.write_text("\n".join(lines) + "\n", encoding="utf-8")
        train_fasttext(clean, out, seed)
    print(f"quality model: {out} labels={dict(labels)} held-out accuracy={precision:.3f} on {n} lines")
    return 0
