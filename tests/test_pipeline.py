"""`dsv3ray prepare` end to end on Ray: messy input → the prepared-directory contract; accounting;
determinism; fuzzed garbage; domain stage; reading back with corrupt shards."""

import gzip
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("DSV3RAY_CACHE", str(Path(tempfile.gettempdir()) / "dsv3ray-test-cache"))
# a private local Ray even when someone runs `ray start` on this machine (ray.init would join it)
os.environ.setdefault("RAY_ADDRESS", "local")

from dsv3ray.errors import UserError  # noqa: E402
from dsv3ray.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from pipelines.corpus import stdlib_documents  # noqa: E402
from pipelines.dataset import load_meta, read_prepared  # noqa: E402
from pipelines.pack import rows_from_arrow  # noqa: E402
from pipelines.prepare import PrepareConfig, cli_prepare, prepare  # noqa: E402
from pipelines.quality import synth_junk  # noqa: E402

SMALL = dict(seq_len=64, vocab_size=600, batch_size=64, eval_fraction=0.1, rows_per_shard=200)


def accounting_holds(report):
    return report["input_records"] == report["kept"] + sum(report["dropped"].values()) + report["quarantined"]


@pytest.fixture(scope="module")
def corpus():
    return [d["text"] for d, _ in zip(stdlib_documents(min_chars=400), range(300))]


@pytest.fixture(scope="module")
def messy(tmp_path_factory, corpus):
    """A directory of mixed formats with planted duplicates, junk and every kind of bad input."""
    d = tmp_path_factory.mktemp("messy")
    rng = random.Random(0)
    words = " ".join(corpus).split()
    docs = corpus[:200]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(docs)]
    lines += [json.dumps({"text": docs[3]}), json.dumps({"text": "  " + docs[5] + "\n"})]  # exact dups
    w = docs[7].split()
    lines.append(json.dumps({"text": " ".join(w[:-2] + ["slightly", "edited."])}))  # near dup
    lines += [json.dumps({"text": synth_junk(rng, words, k)}) for k in (1, 2, 4) for _ in range(4)]  # junk
    lines += ["{broken", json.dumps({"txt": "x"}), json.dumps({"text": ["a"]}), "[" * 50_000 + "]" * 50_000]
    lines += [json.dumps({"text": "too short"}), ""]
    (d / "main.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(d / "more.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in corpus[200:260]))
    raw = gzip.compress("\n".join(json.dumps({"text": t}) for t in corpus[260:300]).encode())
    (d / "cut.jsonl.gz").write_bytes(raw[: len(raw) * 2 // 3])  # truncated gzip
    pq.write_table(
        pa.table({"text": [corpus[0], None, corpus[100] + " extra words here"]}), d / "rows.parquet"
    )
    (d / "doc.txt").write_text(corpus[150] + "\n\nA plain text file holds one document.")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20)
    (d / "bad.parquet").write_bytes(b"PAR1garbage")
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (d / "huge_line.jsonl").write_text(json.dumps({"text": "word " * 300_000}) + "\n")  # 1.5 MB > limit
    os.symlink(d / "nowhere", d / "dangling.jsonl")
    return d


@pytest.fixture(scope="module")
def prepared(ray_local, messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    cfg = PrepareConfig(**SMALL, perplexity=True, perplexity_threshold=1e5, max_record_bytes=1 << 20)
    logs = []
    report = prepare([str(messy)], out, cfg, log=logs.append)
    return out, report, cfg, logs


def test_contract_and_accounting(prepared, messy):
    out, report, cfg, logs = prepared
    assert accounting_holds(report)
    disk = json.loads((out / "report.json").read_text())
    assert accounting_holds(disk) and disk["kept"] == report["kept"]
    from pipelines import native

    assert disk["native_helpers"] is (native.library() is not None)  # (the C helpers: built here)
    # planted: docs[3], docs[5] (equal after normalize), corpus[0] in parquet; the stdlib repeats some too
    assert disk["dropped"]["duplicate_exact"] >= 3
    assert disk["dropped"]["near_duplicate"] >= 1
    assert disk["dropped"]["low_quality"] >= 10  # the planted junk
    assert disk["dropped"]["too_short"] >= 1 and disk["dropped"]["blank_line"] == 1
    q = disk["quarantine_reasons"]
    for reason in (
        "malformed_json", "missing_text", "text_not_string", "json_too_deep", "truncated_or_corrupt_gzip",
        "binary_file", "unreadable_file", "invalid_utf8", "record_too_large",
    ):  # fmt: skip
        assert q.get(reason, 0) >= 1, reason
    assert q["unreadable_file"] == 2  # bad.parquet and the dangling link
    qlines = (out / "quarantine" / "records.jsonl").read_text().splitlines()
    assert len(qlines) == disk["quarantined"]
    assert all({"source", "line", "reason", "excerpt"} <= set(json.loads(x)) for x in qlines)
    assert str(messy / "empty.jsonl") in disk["files"]["empty"]
    assert {"read", "normalize", "dedup", "quality", "clean_pass", "tokenize_pack"} <= set(disk["stages"])
    assert disk["stages"]["read"]["seconds"] > 0
    assert disk["topics"] and "prepare:" in logs[-1] and "kept" in logs[-1]

    meta = load_meta(out)
    assert meta["seq_len"] == 64 and meta["num_train"] > 50 and meta["num_eval"] > 0
    assert 3.0 < meta["unigram_entropy"] < np.log(meta["vocab_size"])
    tok = Tokenizer.load(out / meta["tokenizer"])
    assert tok.eos_id == meta["eos_id"] and tok.vocab_size == meta["vocab_size"]
    assert meta["token_dtype"] == "uint16"  # (vocab <= 65,536)
    for split, n in (("train", meta["num_train"]), ("eval", meta["num_eval"])):
        t = pq.read_table(out / split)
        assert t.schema.field("input_ids").type == pa.binary(2 * (cfg.seq_len + 1))
        assert t.column("sample_id").to_pylist() == list(range(n))
        rows = rows_from_arrow(t.column("input_ids"), cfg.seq_len + 1)
        assert rows.shape == (n, cfg.seq_len + 1) and rows.dtype == np.uint16 and rows.max() < tok.vocab_size
    text = tok.decode(
        rows_from_arrow(pq.read_table(out / "train").column("input_ids"), cfg.seq_len + 1)[0].tolist()
    )
    assert len(text.split()) > 10  # real words come back out
    assert not (out / "_clean").exists()


def test_deterministic_and_given_tokenizer(prepared, messy, tmp_path):
    out, report, cfg, _ = prepared
    shutil.copy(out / "tokenizer.json", tmp_path / "tok.json")
    again = prepare(
        [str(messy)], tmp_path / "p2",
        PrepareConfig(**SMALL, perplexity=True, perplexity_threshold=1e5, max_record_bytes=1 << 20,
                      tokenizer=str(tmp_path / "tok.json"), num_workers=2),
        log=lambda _: None,
    )  # fmt: skip
    assert again["dropped"] == report["dropped"] and again["kept"] == report["kept"]
    for split in ("train", "eval"):
        a = pq.read_table(out / split)
        b = pq.read_table(tmp_path / "p2" / split)
        assert a.equals(b), split  # same rows, same ids, with two cleaning workers instead of one


def test_ray_data_console_quiet_while_we_run(prepared):
    """Ray Data's per-dataset INFO lines and its "progress bars disabled" warning stay off the
    console while prepare (or train's reads) run; real warnings still show; prepare puts the
    handler back as it was (the fixture ran one)."""
    import logging

    from pipelines.dataset import _worth_showing, quiet_ray_data_console

    console = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    assert console and all(_worth_showing not in h.filters for h in console)

    def record(level, msg):
        return logging.LogRecord("ray.data", level, __file__, 0, msg, None, None)

    lines = [
        record(logging.INFO, "Dataset dataset_0_0 execution finished in 1.70 seconds"),
        record(logging.WARNING, "Progress bars disabled. To enable, set ..."),
        record(logging.WARNING, "a block was lost"),
    ]
    undo = quiet_ray_data_console()
    try:
        assert [bool(console[0].filter(r)) for r in lines] == [False, False, True]
    finally:
        undo()
    assert all(console[0].filter(r) for r in lines)


def test_small_files_share_tasks_same_result(prepared, messy, tmp_path, monkeypatch):
    """The messy directory's small files run as one task (readers.group_work) in the fixture's run;
    one task per file gives the same report and the same shards."""
    import pipelines.readers as readers

    out, report, cfg, _ = prepared
    monkeypatch.setattr(readers, "group_work", lambda items, target: [{"parts": [it]} for it in items])
    alone = prepare([str(messy)], tmp_path / "alone", cfg, log=lambda _: None)
    for key in ("input_records", "kept", "dropped", "quarantined", "quarantine_reasons"):
        assert alone[key] == report[key], key
    for split in ("train", "eval"):
        assert pq.read_table(out / split).equals(pq.read_table(tmp_path / "alone" / split)), split


def test_text_under_another_key(ray_local, corpus, tmp_path):
    """prepare.text_key reaches the cleaning tasks' readers: jsonl and parquet with "content"."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in corpus[:60]) + "\n")
    pq.write_table(pa.table({"content": corpus[60:90]}), src / "b.parquet")
    cfg = PrepareConfig(**SMALL, text_key="content")
    report = prepare([str(src)], tmp_path / "out", cfg, log=lambda _: None)
    assert report["input_records"] == 90 and report["quarantined"] == 0 and report["kept"] > 60
    assert accounting_holds(report)


def test_quarantine_lines_of_a_file_read_in_ranges(ray_local, corpus, tmp_path):
    """A big jsonl file read in byte ranges by several tasks (nothing counted before the cuts):
    every quarantined record names its line in the file, as a whole-file read would."""
    lines, bad = [], {}
    for i in range(3000):
        if i % 211 == 5:
            lines.append('{"text": broken')
            bad[i + 1] = "malformed_json"
        elif i % 307 == 9:
            lines.append(json.dumps({"id": i}))
            bad[i + 1] = "missing_text"
        else:
            lines.append(json.dumps({"text": corpus[i % len(corpus)] + f" copy {i}"}))
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "a.jsonl").write_text(
        "{oops\n" + json.dumps({"text": corpus[0]}) + "\n"
    )  # a whole file first
    cfg = PrepareConfig(**SMALL, split_bytes=64 << 10, num_workers=2)
    report = prepare(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "big.jsonl")], tmp_path / "out", cfg, log=lambda _: None
    )
    assert report["input_records"] == 3002 and accounting_holds(report)
    recs = [
        json.loads(x) for x in (tmp_path / "out" / "quarantine" / "records.jsonl").read_text().splitlines()
    ]
    assert {(r["line"], r["reason"]) for r in recs if r["source"].endswith("big.jsonl")} == set(bad.items())
    assert [(r["line"], r["reason"]) for r in recs if r["source"].endswith("a.jsonl")] == [
        (1, "malformed_json")
    ]
    assert list(recs[0]) == ["source", "line", "reason", "excerpt"]


def test_fuzzed_garbage_and_domain(ray_local, corpus, tmp_path):
    rng = random.Random(7)
    inp = tmp_path / "fuzz"
    inp.mkdir()
    for i in range(12):
        kind = i % 4
        if kind == 0:  # random bytes under a jsonl name
            (inp / f"f{i}.jsonl").write_bytes(
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000)))
            )
        elif kind == 1:  # mutated JSON lines
            lines = []
            for t in corpus[i * 10 : i * 10 + 10]:
                s = json.dumps({"text": t, "id": rng.random()})
                cut = rng.randrange(len(s))
                lines.append(
                    s if rng.random() < 0.5 else s[:cut] + rng.choice(['"', "{", "\\", "\x00", "]"]) + s[cut:]
                )
            (inp / f"f{i}.jsonl").write_text("\n".join(lines))
        elif kind == 2:  # wrong types and nesting
            vals = [
                None,
                1,
                2.5,
                True,
                [],
                {},
                {"text": {"a": 1}},
                "str",
                {"text": None},
                {"text": "ok " * 40},
            ]
            (inp / f"f{i}.json").write_text("\n".join(json.dumps(rng.choice(vals)) for _ in range(20)))
        else:  # gzip of random length, possibly truncated
            data = gzip.compress(
                "\n".join(json.dumps({"text": t}) for t in corpus[i * 5 : i * 5 + 5]).encode()
            )
            (inp / f"f{i}.jsonl.gz").write_bytes(data[: rng.randrange(10, len(data) + 1)])
    (inp / "good.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus[150:300]))
    email = [d["text"] for d in stdlib_documents(min_chars=200) if d["id"].startswith("email/")]
    (tmp_path / "domain.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in email[:40]))
    (inp / "email.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in email[40:120]))
    cfg = PrepareConfig(**SMALL, domain_examples=str(tmp_path / "domain.jsonl"), domain_threshold=0.6)
    report = prepare([str(inp)], tmp_path / "out", cfg, log=lambda _: None)
    assert accounting_holds(report) and report["input_records"] > 300
    assert report["quarantined"] > 20
    assert report["dropped"]["off_domain"] > 50  # the stdlib docs that are not about email
    assert report["kept"] > 10 and report["topics"]
    assert load_meta(tmp_path / "out")["num_train"] > 0


def test_user_errors(ray_local, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare([str(tmp_path / "missing.jsonl")], tmp_path / "o")
    run = SimpleNamespace(prepare=PrepareConfig(**SMALL))
    with pytest.raises(UserError, match="--input"):
        cli_prepare(run, SimpleNamespace(input=[], output=str(tmp_path / "o")))
    (tmp_path / "junk.jsonl").write_text("{bad\n" * 5 + json.dumps({"text": "short"}) + "\n")
    with pytest.raises(UserError, match="no document survived"):
        prepare([str(tmp_path / "junk.jsonl")], tmp_path / "o", PrepareConfig(**SMALL))
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["input_records"] == 6 and report["quarantined"] == 5 and accounting_holds(report)
    with pytest.raises(UserError, match="tokenizer file .*nope.json does not exist"):
        prepare([str(tmp_path / "junk.jsonl")], tmp_path / "o", PrepareConfig(**SMALL, tokenizer="nope.json"))
    with pytest.raises(UserError, match="quality_model"):
        prepare(
            [str(tmp_path / "junk.jsonl")], tmp_path / "o", PrepareConfig(**SMALL, quality_model="nope.bin")
        )


def test_read_prepared_with_corrupt_shard(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    n = load_meta(out)["num_train"]
    assert read_prepared(out, "train").count() == n
    shards = sorted((out / "train").glob("*.parquet"))
    assert len(shards) >= 2
    bad_rows = pq.read_metadata(shards[0]).num_rows
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        read_prepared(out, "train")
    logs = []
    ds = read_prepared(out, "train", on_corrupt="skip", log=logs.append)
    assert ds.count() == n - bad_rows
    assert any(shards[0].name in line for line in logs)
    # a data page broken behind a sound footer (check_shards reads footers only): one line, no traceback
    shutil.copy(shards[1], shards[0])
    raw = bytearray(shards[0].read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little")
    raw[4 : len(raw) - footer - 8] = bytes(len(raw) - footer - 12)
    shards[0].write_bytes(bytes(raw))
    with pytest.raises(UserError, match="cannot be read"):
        read_prepared(out, "train")


def test_read_prepared_small_split_in_process_equals_ray_data(prepared, monkeypatch):
    """A small split is read by the calling process (Arrow blocks handed to Ray), a large one by
    Ray Data's read tasks: the same rows either way."""
    import pipelines.dataset as dataset

    def rows(ds):
        t = pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        return t.sort_by("sample_id").to_pydict()

    small = rows(read_prepared(prepared[0], "train"))
    monkeypatch.setattr(dataset, "DRIVER_READ_BYTES", 0)
    assert rows(read_prepared(prepared[0], "train")) == small
    assert len(small["sample_id"]) == load_meta(prepared[0])["num_train"]


def test_killed_cleaning_worker_loses_nothing(ray_local, corpus, tmp_path):
    """A cleaning task's worker process killed (SIGKILL) mid-run: Ray Data runs its work item again
    (its blocks may have run ahead of the driver), and the prepared shards and the accounting are
    exactly those of an undisturbed run."""
    import signal
    import threading
    import time

    import psutil

    rng = random.Random(1)
    sentences = [s for d in corpus for s in d.split(". ") if len(s) > 40]
    docs = [". ".join(rng.choice(sentences) for _ in range(rng.randint(6, 14))) for _ in range(16_000)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    train_tokenizer(docs[:500], 600).save(tmp_path / "tok.json")  # given: shards are packed while cleaning
    cfg = PrepareConfig(
        seq_len=64, batch_size=256, eval_fraction=0.1, rows_per_shard=500, split_bytes=256 << 10,
        num_workers=2, tokenizer=str(tmp_path / "tok.json"),
    )  # fmt: skip
    calm = prepare([str(tmp_path / "in.jsonl")], tmp_path / "calm", cfg, log=lambda _: None)

    killed, shards_then = [], []
    out = tmp_path / "killed"

    def kill_one_worker():  # once the driver has packed a first shard: the workers are mid-run
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            if len(list((out / "train").glob("*.parquet"))) >= 1:
                for p in psutil.process_iter(["pid", "cmdline"]):
                    if "ray::ReadClean" in " ".join(p.info["cmdline"] or []):
                        shards_then.append(len(list((out / "train").glob("*.parquet"))))
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    report = prepare([str(tmp_path / "in.jsonl")], out, cfg, log=lambda _: None)
    killer.join()
    assert killed, "no cleaning task's worker was found to kill"
    total = len(list((out / "train").glob("*.parquet")))
    assert shards_then[0] <= total // 2, (shards_then, total)  # killed in the first half of the run
    assert accounting_holds(report)
    for k in ("input_records", "kept", "dropped", "quarantined"):
        assert report[k] == calm[k], k
    for split in ("train", "eval"):
        assert pq.read_table(out / split).equals(pq.read_table(tmp_path / "calm" / split)), split
