"""The batched fastText predict (pipelines.ftpredict) gives fastText's own scores: on real and
fuzzed text (every separator fastText or str.split knows, label tokens, literal </s>, unknown,
non-ASCII and very long words), for the default model and for models with word trigrams,
character n-grams and three labels, across batches and a table small enough to empty."""

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DSV3RAY_CACHE", str(Path(tempfile.gettempdir()) / "dsv3ray-test-cache"))

from dsv3ray.runtable import byte_runs, padded  # noqa: E402
from pipelines.ftpredict import (  # noqa: E402
    UNICODE_SPACES,
    BatchPredictor,
    fnv1a_reference,
    fnv1a_runs,
    fnv1a_runs_numpy,
)
from pipelines.quality import (  # noqa: E402
    MAX_PREDICT_CHARS,
    QualityScorer,
    default_quality_model,
    load_scorer,
)


@pytest.fixture(scope="module")
def texts():
    from pipelines.corpus import stdlib_documents

    docs = [d["text"] for d, _ in zip(stdlib_documents(min_chars=50), range(600))]
    rng = random.Random(0)
    vocab = " ".join(docs[:50]).split()[:3000]
    seps = [" ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x00", "\x1c", "\x1f", *UNICODE_SPACES, "\u200b"]
    odd = [
        "</s>",
        "__label__good",
        "__label__bad",
        "__label__nope",
        "é",
        "日本語",
        "x" * 17,
        "w" * 24,
        "z" * 25,
        "ÿ" * 9,
        "y" * 300,
    ]
    fuzz = []
    for _ in range(3000):
        n = rng.randint(0, 30)
        words = [rng.choice(odd) if rng.random() < 0.1 else rng.choice(vocab) for _ in range(n)]
        fuzz.append("".join(w + rng.choice(seps) for w in words)[: rng.randint(0, 400)])
    edge = ["", " ", "zzqqxxunknown", "</s>", "the </s> the", "__label__good", "a" * 100_000 + " the"]
    edge += ["the " * 30_000]  # longer than MAX_PREDICT_CHARS: the first 100k characters decide
    return docs + fuzz + edge


def _check(scorer: QualityScorer, texts, batch: int = 256):
    ref = np.array(scorer.fasttext_scores(texts), dtype=np.float64)
    got = np.concatenate(
        [scorer.batch.scores(texts[i : i + batch], MAX_PREDICT_CHARS) for i in range(0, len(texts), batch)]
    )
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got == 0, ref == 0)  # no prediction (no ids) in the same places
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    return ref


def test_default_model_scores_equal_fasttext(texts):
    scorer = QualityScorer(default_quality_model())
    assert scorer.batch is not None  # softmax, word bigrams, no character n-grams: covered
    ref = _check(scorer, texts)
    assert 0.05 < (ref > 0.5).mean() < 0.95  # both sides of the threshold occur
    _check(scorer, texts, batch=7)  # warm now: same scores
    np.testing.assert_allclose(scorer.scores(texts[:300]), scorer.fasttext_scores(texts[:300]), atol=2e-6)
    small = QualityScorer(default_quality_model())
    small.batch = BatchPredictor(small.model, small.model.get_words(), small.label, max_entries=50)
    _check(small, texts[:200], batch=10)  # the table empties (and some batches bypass it)
    assert small.batch.table.size <= 50


def _train(tmp_path, texts, **kw):
    """A two-label model: b = the words of a text reversed."""
    import fasttext

    lines = [
        f"__label__a {t}" if i % 3 else f"__label__b {' '.join(t.split()[::-1])}" for i, t in enumerate(texts)
    ]
    src = tmp_path / "train.txt"
    src.write_text("\n".join(" ".join(ln.split()) for ln in lines) + "\n", encoding="utf-8")
    return fasttext.train_supervised(input=str(src), epoch=10, lr=0.5, thread=1, seed=0, verbose=0, **kw)


@pytest.mark.parametrize(
    "kw", [dict(wordNgrams=3, bucket=5000, dim=8), dict(minn=2, maxn=4, bucket=5000, dim=8, wordNgrams=2)]
)
def test_other_models_score_equal_fasttext(tmp_path, texts, kw):
    model = _train(tmp_path, texts[:400], **kw)
    path = tmp_path / "m.bin"
    model.save_model(str(path))
    scorer = QualityScorer(path, label="__label__a")
    assert scorer.batch is not None
    ref = _check(scorer, texts[400:1400])
    assert np.ptp(ref[ref > 0]) > 0.3  # the model tells texts apart: scores spread
    if scorer.batch.subwords:  # character n-grams: the worker gets the model itself
        assert scorer.payload(path) == path.read_bytes()
        with pytest.raises(TypeError, match="character n-grams"):
            pickle.dumps(scorer.batch)
        np.testing.assert_allclose(
            load_scorer(scorer.payload(path), "__label__a").scores(texts[400:1400]), ref, atol=2e-6
        )


def test_the_predictor_travels_without_the_model(texts):
    """What a cleaning worker receives of the default model: its batched predictor, pickled
    without fastText's model and with an empty word table; it scores as the model does."""
    scorer = QualityScorer(default_quality_model())
    scorer.batch.scores(texts[:300], MAX_PREDICT_CHARS)  # (a warm table: not sent)
    payload = scorer.payload(default_quality_model())
    assert payload is scorer.batch
    blob = pickle.dumps(payload)
    assert len(blob) < default_quality_model().stat().st_size / 4  # smaller than the .bin
    worker = load_scorer(pickle.loads(blob))
    assert worker.model is None and worker.batch.model is None and worker.batch.table.size == 0
    ref = np.array(scorer.fasttext_scores(texts), dtype=np.float64)
    got = worker.scores(texts)
    assert np.array_equal(got == 0, ref == 0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_three_labels_and_uncovered_losses(tmp_path, texts):
    import fasttext

    src = tmp_path / "t.txt"
    src.write_text(
        "\n".join(
            f"__label__{'abc'[i % 3]} {' '.join(t.split()[i % 3 :])}" for i, t in enumerate(texts[:400])
        )
        + "\n",
        encoding="utf-8",
    )
    for loss, covered in (("softmax", True), ("hs", False), ("ova", False)):
        model = fasttext.train_supervised(
            input=str(src), epoch=2, thread=1, seed=0, verbose=0, loss=loss, dim=8, wordNgrams=2, bucket=5000
        )
        path = tmp_path / f"{loss}.bin"
        model.save_model(str(path))
        scorer = QualityScorer(path, label="__label__b")
        assert (scorer.batch is not None) == covered
        if covered:
            ref = np.array(scorer.fasttext_scores(texts[400:1400]))
            got = scorer.scores(texts[400:1400])
            np.testing.assert_allclose(got, ref, atol=2e-6)
        else:  # fastText's own predict
            assert np.array_equal(scorer.scores(texts[:5]), np.float32(scorer.fasttext_scores(texts[:5])))


def test_word_hash_and_separators():
    rng = random.Random(4)
    words = [
        "",
        "a",
        "é",
        "日本",
        "\udcff",
        *("".join(rng.choice("aé日\x7f~") for _ in range(rng.randint(1, 90))) for _ in range(500)),
    ]
    enc = [w.encode("utf-8", "surrogatepass") for w in words]
    want = [(h - (1 << 32) if h >= 1 << 31 else h) & ((1 << 64) - 1) for h in map(fnv1a_reference, enc)]
    joined, starts, ends = byte_runs(enc)
    assert fnv1a_runs(padded(joined), starts, ends).tolist() == want  # (in C where built)
    assert fnv1a_runs_numpy(padded(joined), starts, ends).tolist() == want
    assert fnv1a_reference(b"a") == (2166136261 ^ 97) * 16777619 % (1 << 32)
    assert set(UNICODE_SPACES) == {chr(c) for c in range(128, 0x110000) if chr(c).isspace()}


def test_models_too_big_to_copy_keep_fasttexts_predict(monkeypatch, texts):
    import pipelines.ftpredict as ftp

    monkeypatch.setattr(ftp, "MAX_INPUT_MATRIX_BYTES", 1 << 20)  # the default model is ~7.7 MB
    scorer = QualityScorer(default_quality_model())
    assert scorer.batch is None and np.array_equal(
        scorer.scores(texts[:20]), np.float32(scorer.fasttext_scores(texts[:20]))
    )
    assert QualityScorer(default_quality_model(), batched=False).batch is None
