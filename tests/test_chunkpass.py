"""The shared chunk lookup (pipelines.chunkpass) gives each stage exactly its own result: token ids
equal to the tokenizer library's, fastText scores equal to the batched predictor's, MinHash
signatures equal to MinHasher's, on real and fuzzed text (every separator, label tokens, `</s>`,
the eos token, double and edge spaces, final sigma and other case mappings, long words), across
batches, a table small enough to empty, and partial requests; texts it cannot serve are reported
as such. The cleaning worker's output is the same with and without it."""

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DSV3RAY_CACHE", str(Path(tempfile.gettempdir()) / "dsv3ray-test-cache"))

from dsv3ray.tokenizer import EOS_TOKEN, train_tokenizer  # noqa: E402
from pipelines.chunkpass import ChunkPass  # noqa: E402
from pipelines.clean import MAX_MINHASH_CHARS, Cleaner, CleanSettings, normalize_text  # noqa: E402
from pipelines.dedup import MinHasher  # noqa: E402
from pipelines.ftpredict import UNICODE_SPACES  # noqa: E402
from pipelines.quality import MAX_PREDICT_CHARS, QualityScorer, default_quality_model  # noqa: E402
from pipelines.readers import OK  # noqa: E402

ODD = [
    "</s>", "__label__good", EOS_TOKEN, "x<|endoftext|>y", "é", "日本語", "ΟΔΟΣ", "Σ", "ΣΑΣ.", "aΣ'", "ΑΣ:Β",
    "İstanbul", "ß", "ǅungla", "ﬁne", "w" * 24, "z" * 25, "y" * 300, "don't", "--", "(", "a.b.c", "_x_",
]  # fmt: skip
SEPS = [" ", " ", " ", " ", "  ", "\t", "\n", "\n\n", "\r", "\x0b", "\x00", "\x1c", *UNICODE_SPACES, "\u200b"]


@pytest.fixture(scope="module")
def parts():
    from pipelines.corpus import stdlib_documents

    docs = [d["text"] for d, _ in zip(stdlib_documents(min_chars=200), range(400))]
    tok = train_tokenizer(docs[:100], vocab_size=600)
    scorer = QualityScorer(default_quality_model())
    rng = random.Random(0)
    vocab = " ".join(docs[:50]).split()[:3000]
    fuzz = []
    for _ in range(1500):
        words = [
            rng.choice(ODD) if rng.random() < 0.08 else rng.choice(vocab) for _ in range(rng.randint(0, 40))
        ]
        text = "".join(w + rng.choice(SEPS) for w in words)
        fuzz.append(text[: rng.randint(0, 500)] if rng.random() < 0.5 else text.strip(" "))
    edge = [
        "",
        " ",
        "a",
        "a b",
        " a",
        "a ",
        "a  b",
        "Σ Σ",
        *NEWLINE_EDGES,
        "the " * 30_000 + "end",
    ]  # last: > MAX_PREDICT_CHARS
    texts = [normalize_text(d) for d in docs] + fuzz + edge
    return tok, scorer, texts


# runs of newlines cut chunks (SpaceChunks(newlines=True)); served: a run between two chunks, of
# at most _ChunkCache.MAX_NEWLINES newlines
NEWLINE_EDGES = [
    "one\ntwo three", "a\n\nb", "a\n\n\nb c", "a\n\n\n\nb", "end.\nNext (x)\n\n- item\n's 12\n3",
    "a\n\n\n\n\nb", "a\n", "\na", "a \nb", "a\n b", "\n", "a\n\n",
]  # fmt: skip
NEWLINE_SERVED = 5  # the first five


def test_runs_of_newlines_between_chunks_are_served_exactly(parts):
    tok, scorer, _ = parts
    cp = ChunkPass(tok, scorer.batch, MinHasher(64, 5, 0.8, 0), MAX_PREDICT_CHARS, MAX_MINHASH_CHARS)
    assert cp.newlines and [len(ids) for ids in cp.nl_ids][:1] == [1]
    _check(cp, tok, scorer, NEWLINE_EDGES, batch=len(NEWLINE_EDGES))
    lk = cp.lookup(NEWLINE_EDGES)
    served = lk.tokens & lk.quality & lk.minhash
    assert served.tolist() == [True] * NEWLINE_SERVED + [False] * (len(NEWLINE_EDGES) - NEWLINE_SERVED)
    g = lk.groups[0]  # "one", a run of one newline, "two", "three"
    assert g.entry[g.bounds[0] : g.bounds[1]].tolist()[1] == cp.nl_entry[0]


def _check(cp: ChunkPass, tok, scorer, texts, batch: int, every: int = 1):
    """Each stage from the chunks equals its own path where served; returns the served fractions."""
    mh = cp.minhash
    served = np.zeros(3)
    for b in range(0, len(texts), batch):
        ts = texts[b : b + batch]
        lk = cp.lookup(ts)
        want = np.arange(len(ts)) % every == 0
        q, q_done = cp.quality(lk, want)
        sig, s_done = cp.signatures(lk, want)
        flat, offsets, t_done = cp.tokens(lk, want)
        for done in (q_done, s_done, t_done):
            assert not (done & ~want).any()  # only what was asked for
        idx = np.flatnonzero(q_done)
        np.testing.assert_allclose(
            q[idx], scorer.batch.scores([ts[i] for i in idx], MAX_PREDICT_CHARS), atol=1e-6
        )
        idx = np.flatnonzero(s_done)
        assert np.array_equal(sig[idx], mh.signatures([ts[i] for i in idx]))
        lib = tok.hf.encode_batch([ts[i] for i in np.flatnonzero(t_done)], add_special_tokens=False)
        for i, enc in zip(np.flatnonzero(t_done), lib):
            assert flat[offsets[i] : offsets[i + 1]].tolist() == enc.ids, ts[i]
        assert (np.diff(offsets)[~t_done] == 0).all()
        served += [q_done.sum(), s_done.sum(), t_done.sum()]
    return served / sum(
        (np.arange(len(texts[b : b + batch])) % every == 0).sum() for b in range(0, len(texts), batch)
    )


def test_each_stage_from_the_chunks_equals_its_own_path(parts):
    tok, scorer, texts = parts
    cp = ChunkPass(tok, scorer.batch, MinHasher(64, 5, 0.8, 0), MAX_PREDICT_CHARS, MAX_MINHASH_CHARS)
    served = _check(cp, tok, scorer, texts, batch=64)
    assert (served > 0.25).all(), served  # (the fuzz breaks the rules often on purpose)
    assert (_check(cp, tok, scorer, texts[:400], batch=64) > 0.95).all()  # normalized stdlib docs
    warm = _check(cp, tok, scorer, texts, batch=200, every=2)  # warm table, half of each batch asked
    np.testing.assert_allclose(warm, served, atol=0.05)
    # what is served, and what is not
    lk = cp.lookup(
        ["plain words here", "two  spaces", " edge", "a __label__good b", f"a {EOS_TOKEN} b", "the </s> end",
         "Σ σ ΟΔΟΣ", "y" * 300, "the " * 30_000 + "end"]
    )  # fmt: skip
    assert lk.tokens.tolist() == [True, False, False, True, False, True, True, False, True]
    assert lk.quality.tolist() == [True, False, False, False, True, False, True, False, False]
    assert lk.minhash.tolist() == [True, False, False, True, True, True, True, False, True]


def test_a_small_table_empties_and_stays_exact(parts):
    tok, scorer, texts = parts
    cp = ChunkPass(
        tok, scorer.batch, MinHasher(32, 3, 0.7, 1), MAX_PREDICT_CHARS, MAX_MINHASH_CHARS, max_entries=300
    )
    served = _check(cp, tok, scorer, texts[:600], batch=16)
    assert cp.table.size <= 300 and served.min() > 0  # small batches still fit after emptying
    _check(cp, tok, scorer, texts[:100], batch=100)  # more new chunks than the table holds: own paths


def test_a_table_that_empties_within_a_lookup_keeps_its_earlier_groups_exact(parts):
    """A lookup of several groups whose later group fills the table: emptying it there would take
    the entries the earlier groups found (found on real text: an index error, or another chunk's
    rows where the index still fit). The lookup starts again on an empty table instead."""
    tok, scorer, texts = parts
    cp = ChunkPass(
        tok, scorer.batch, MinHasher(32, 3, 0.7, 1), MAX_PREDICT_CHARS, MAX_MINHASH_CHARS, max_entries=600
    )
    cp.GROUP_CHARS = 2000  # ~10 texts a group
    served = _check(cp, tok, scorer, texts[:400], batch=40)
    assert cp.table.size <= 600 and served.min() > 0.3


def test_stages_not_given_are_not_served(parts):
    tok, scorer, texts = parts
    cp = ChunkPass(None, None, MinHasher(64, 5, 0.8, 0), 0, MAX_MINHASH_CHARS)
    lk = cp.lookup(texts[:50])
    assert not lk.tokens.any() and not lk.quality.any() and lk.minhash.any()
    flat, offsets, done = cp.tokens(lk, np.ones(50, bool))
    assert flat.size == 0 and not done.any()
    assert not ChunkPass().active


@pytest.mark.parametrize(
    "max_chars, cuts",
    [(10**6, None), (300, None), (10**6, (150, 200, 250))],  # 300: oversized texts are split
)  # (150, 200, 250): texts past each stage's cut, and past all of them (looked up as "")
def test_cleaner_output_is_the_same_without_the_chunk_pass(parts, max_chars, cuts):
    tok, scorer, texts = parts
    s = CleanSettings(
        normalize=True, min_words=5, max_chars=max_chars, oversize="split", dedup_exact=True, dedup_near=True,
        minhash_perms=64, shingle_words=5, near_threshold=0.8, seed=0,
        quality_model=default_quality_model().read_bytes(), quality_threshold=0.3,
        tokenizer_json=tok.hf.to_str(), max_doc_tokens=512, eval_fraction=0.1, truncate_tokens=False,
    )  # fmt: skip
    rows = [("f", i, OK, "", "", t) for i, t in enumerate(texts[:500] + texts[-1600:])]
    with_chunks, without = Cleaner(s), Cleaner(s)
    without.chunks = ChunkPass()  # serves nothing: every stage takes its own path
    if cuts is not None:
        with_chunks.chunks = ChunkPass(tok, with_chunks.scorer.batch, with_chunks.minhash, *cuts)
        assert with_chunks.chunks.max_chars == 250
    for b in range(0, len(rows), 300):
        a = with_chunks.clean_rows(rows[b : b + 300])
        c = without.clean_rows(rows[b : b + 300])
        for name in a.column_names:
            if name in ("quality", "perplexity", "domain"):  # (NaN where not scored)
                np.testing.assert_allclose(a.column(name).to_numpy(), c.column(name).to_numpy(), atol=1e-6)
            elif name != "seconds":
                assert a.column(name).equals(c.column(name)), name
        assert (a.column("status").to_numpy() == OK).sum() > 50
    assert with_chunks.chunks.table.size > 0 and without.chunks.table.size == 0
