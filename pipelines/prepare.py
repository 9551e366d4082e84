"""`dsv3ray prepare`: raw text → cleaned, tokenized, packed parquet shards (the data contract).

Stages, in order, each switchable in [prepare]:
  read/validate → normalize → length → quality (fastText, perplexity) → domain similarity
  → dedup (exact + MinHash LSH; the first copy that passed the filters survives)
  → tokenize + pack (train / eval by document hash).
Workers (Ray Data tasks, one per CPU at a time, on reused worker processes) run everything per
document, including tokenizing when the tokenizer is given; the driver takes the order-dependent
dedup decision and packs, in input order. Without a tokenizer, one is trained on the kept text
and a second pass tokenizes.
Every input record (a JSON line, a parquet row, a text file) ends in exactly one of: kept, dropped
(reason) or quarantined (reason, written to DIR/quarantine/), so
`input_records == kept + sum(dropped) + quarantined` holds on every run (see report.json).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import os
import shutil
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from dsv3ray.errors import ConfigError, UserError
from dsv3ray.tokenizer import Tokenizer, train_tokenizer
from pipelines.readers import OK

OVERSIZE_RULES = ("drop", "split")
BLOCK_BYTES = 4 << 20  # Ray Data block size while preparing
# Blocks a cleaning task may yield ahead of the driver's executor taking them (Ray Data's default,
# 2, stalls the task at every yield the executor is late for: the driver shares the cores; 16
# blocks of at most BLOCK_BYTES bound the memory).
GEN_BUFFER_BLOCKS = 16


@dataclass
class PrepareConfig:
    """Section [prepare]. Defaults run every stage that needs no user-supplied data."""

    seq_len: int = 256  # packed rows hold seq_len + 1 tokens
    vocab_size: int = 8192
    tokenizer: str | None = None  # path to an existing tokenizer.json; None = train one on the kept text
    tokenizer_train_chars: int = 50_000_000  # text budget for training the tokenizer
    eval_fraction: float = 0.02  # documents whose hash falls in this fraction go to eval
    max_doc_tokens: int = 2048  # documents are cut at the token level into pieces of at most this
    truncate_tokens: bool = False  # True: keep only a document's first piece; False: keep all pieces
    batch_size: int = 1024  # documents per cleaning batch (512: 15% fewer docs/s, benchmarks/prepare.py)
    split_bytes: int = 4 << 20  # plain jsonl files larger than this are read in byte ranges, in parallel
    num_workers: int = 0  # cleaning/tokenizing tasks at once; 0 = one per CPU (as many queued)
    rows_per_shard: int = 8192  # packed rows per output parquet shard
    seed: int = 0
    # 1. validate
    text_key: str = "text"  # the JSON key / parquet column holding a record's text ("content": The Stack)
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
    quality_label: str = "__label__good"  # the label of good documents in the model
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
            "split_bytes": self.split_bytes,
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
        if not isinstance(self.text_key, str) or not self.text_key:
            raise ConfigError("prepare.text_key", self.text_key, "the JSON key / parquet column of the text")


# ---------------------------------------------------------------------------------------------
# the pipeline


class _Kept:
    """What a worker process keeps between the tasks of one prepare run: the run's cleaner (or
    tokenizer), built by the run's first task in that process, so its later tasks find the
    per-chunk caches warm. Ray hands later tasks, and later runs, to the same idle processes (their
    imports done: a run on a warm cluster starts no process). One run's object at a time: dropped
    when a task of another run arrives, or IDLE_S seconds after the last task ended (an idle worker
    of a long-lived cluster holds nothing)."""

    IDLE_S = 20.0

    def __init__(self):
        self.key, self.value, self.active, self.ended = None, None, 0, 0.0
        self.lock = threading.Lock()
        self.reaper: threading.Thread | None = None

    @contextlib.contextmanager
    def use(self, key: str, build):
        with self.lock:
            if self.key != key:
                self.key, self.value = None, None  # (the last run's, before building this one's)
                self.value, self.key = build(), key
                # what is alive now (imports, Ray's, the new object: ~135k objects) left out of the
                # collector's full passes: one cost a cleaning worker 70-130 ms of its run (the
                # objects built here hold no cycles: dropping them frees them; unfrozen when idle)
                gc.freeze()
            self.active += 1
            value = self.value
            if self.reaper is None:
                self.reaper = threading.Thread(target=self._reap, daemon=True, name="dsv3ray-kept")
                self.reaper.start()
        try:
            yield value
        finally:
            with self.lock:
                self.active -= 1
                self.ended = time.monotonic()

    def _reap(self):
        while True:
            time.sleep(self.IDLE_S / 4)
            with self.lock:
                idle = self.value is not None and not self.active
                if idle and time.monotonic() - self.ended >= self.IDLE_S:
                    self.key, self.value = None, None
                    gc.unfreeze()
                    gc.collect()


_KEPT = _Kept()


def _read_clean(
    parts: list[dict], run: str, held: list, max_record_bytes: int, batch_size: int, text_key: str
) -> Iterator[pa.Table]:
    """Pass 1's read task (`_tasks_source`): a work task's items (`readers.group_work`'s: read in
    order, small files together) → cleaned tables of ~batch_size rows each, by this process's
    cleaner of the run (`_Kept`; built from `held`: [ref of its CleanSettings])."""
    from pipelines.readers import read_files_rows

    with _KEPT.use(f"{run}/clean", lambda: _cleaner(held)) as cleaner:
        for rows, seconds in read_files_rows(parts, max_record_bytes, batch_size, text_key=text_key):
            yield cleaner.clean_rows(rows, seconds)


def _cleaner(held: list):
    import ray

    from dsv3ray.malloc import tune_this_process
    from pipelines.clean import Cleaner

    tune_this_process()  # (a batch's large arrays reuse freed heap memory: dsv3ray.malloc)
    return Cleaner(ray.get(held[0]))


def _tokenize(path: str, run: str, held: list) -> Iterator[pa.Table]:
    """Pass 2's read task: a clean-text shard → tokenized tables (pipelines.pack.Tokenize, kept per
    process for the run like the cleaner)."""
    import ray

    from pipelines.pack import Tokenize

    with _KEPT.use(f"{run}/tokenize", lambda: Tokenize(**ray.get(held[0]))) as tokenize:
        yield from tokenize(path)


def _tasks_source(name: str, fn, args: list, **kwargs):
    """A Ray Data datasource whose read tasks are fn(arg, **kwargs) for each of `args`, in order:
    a pass's work, read and processed in one task each (ray::Read<name>). Read tasks travel as task
    arguments: nothing is put in the object store per task (`ray.data.from_items` put a block for
    each: ~1.4 ms of the driver's time apiece before a run started, 34 s for a 100 GB input in 4 MB
    ranges). Tasks, not an actor pool: Ray Data runs a task again when its worker died, and Ray
    reuses the worker processes for the next run's tasks (an actor pool's processes start, and
    import Ray Data, for every run: ~1.7 s of two processes on 2 cores)."""
    import functools

    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class TasksSource(Datasource):
        def get_name(self) -> str:
            return name

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(functools.partial(fn, a, **kwargs), meta) for a in args]

    return TasksSource()


def _blocks(ds) -> Iterator[pa.Table]:
    """The dataset's blocks (Arrow tables), in order, each fetched as its bundle comes, by this
    thread (iter_batches' prefetching and formatting threads cost the driver ~50 ms of CPU a
    docstrings run, on cores its workers share: blocks here are whole batches already)."""
    import ray

    for bundle in ds.iter_internal_ref_bundles():
        # (a task with no output, e.g. an empty file's, leaves an empty block, without columns)
        yield from (t for t in ray.get([entry.ref for entry in bundle.blocks]) if t.num_rows)


def _concurrency(cfg: PrepareConfig, tasks: int) -> int:
    """Cleaning/tokenizing tasks submitted at once: prepare.num_workers; by default twice the
    cluster's CPUs: one runs per CPU, the others wait at the raylet, so a worker starts its next
    task as it ends one, not after a round trip through the driver's executor (which shares the
    CPUs with dedup and packing: one task per CPU left workers idle up to ~0.8 s between tasks,
    and 200k documents took 14.1-14.5 s instead of 9.8-9.9)."""
    import ray

    if cfg.num_workers:
        return max(1, min(cfg.num_workers, tasks))
    return max(1, min(2 * int(ray.cluster_resources().get("CPU", 1)), tasks))


def _hold(value) -> list:
    """A read task's large argument (models, settings), put in the object store once by the driver,
    which holds it for the run: [ref] (inside a list a ref reaches the task as the ref: only the
    run's first task in a process reads it, to build what the process keeps)."""
    import ray

    return [ray.put(value)]


class _Progress:
    """One line every `every` seconds for long stages."""

    def __init__(self, name: str, log, every: float = 5.0):
        self.name, self.log, self.every = name, log, every
        self.start = self.last = time.perf_counter()

    def tick(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.log(f"prepare: {self.name}: {done:,} records ({rate:,.0f}/s){extra}")


class _CleanTextWriter:
    """Kept documents (text, text_hash) → DIR/_clean/part-NNNNN.parquet, bounded buffers."""

    def __init__(self, out_dir: Path, max_bytes: int = 16 << 20, max_rows: int = 4096):
        self.dir = out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.texts: list[str] = []
        self.hashes: list[int] = []
        self.size, self.max_bytes, self.max_rows = 0, max_bytes, max_rows
        self.files: list[Path] = []

    def add(self, text: str, text_hash: int) -> None:
        self.texts.append(text)
        self.hashes.append(text_hash)
        self.size += len(text)
        if self.size >= self.max_bytes or len(self.texts) >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        path = self.dir / f"part-{len(self.files):05d}.parquet"
        table = pa.table(
            {"text": pa.array(self.texts, pa.large_string()), "text_hash": pa.array(self.hashes, pa.int64())}
        )
        pq.write_table(table, path)
        self.files.append(path)
        self.texts, self.hashes, self.size = [], [], 0

    def iter_texts(self, budget_chars: int):
        """Kept texts in order, for training the tokenizer, up to `budget_chars`."""
        used = 0
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if used >= budget_chars:
                        return
                    yield text[: budget_chars - used]
                    used += len(text)


class _Reservoir:
    """A uniform sample of at most `size` (text[:4000], kept, reason) of the offered rows
    (Algorithm R, its draws made per batch in numpy: row t replaces a slot j < size, j uniform
    in [0, t), once the sample is full)."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng, self.seen = size, np.random.default_rng([seed, 0x5A4D]), 0
        self.items: list[tuple[str, bool, str]] = []

    def offer(self, texts: pa.ChunkedArray, rows, kept, reason) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        fill = min(max(self.size - len(self.items), 0), rows.size)
        at, into = rows[:fill], np.arange(len(self.items), len(self.items) + fill)  # (row, its slot)
        self.items += [None] * fill
        rest = rows[fill:]
        if rest.size:
            t = self.seen + fill + 1 + np.arange(rest.size)  # rows offered so far, this one included
            slot = (self.rng.random(rest.size) * t).astype(np.int64)
            hit = slot < self.size
            # a slot replaced twice in the batch holds the later row (rows replace in order)
            _, last = np.unique(slot[hit][::-1], return_index=True)
            at = np.concatenate((at, rest[hit][::-1][last]))
            into = np.concatenate((into, slot[hit][::-1][last]))
        if at.size:  # only sampled rows become Python strings, in one take
            for text, r, j in zip(texts.take(pa.array(at)).to_pylist(), at.tolist(), into.tolist()):
                self.items[j] = (text[:4000], bool(kept[r]), "" if kept[r] else reason[r])
        self.seen += rows.size


def _row_runs(offsets: np.ndarray, values: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The values of the list rows where mask, as views: one slice per run of selected rows (a
    list array's offsets and values; a batch's kept rows come in runs between the dropped ones),
    copied once by the packer."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    first, last = edges[0::2], edges[1::2]  # runs of selected rows [first, last)
    return [values[offsets[a] : offsets[b]] for a, b in zip(first.tolist(), last.tolist())]


class _Packing:
    """Kept documents' tokens → the train / eval packers, in input order, a batch at a time."""

    def __init__(self, cfg: PrepareConfig, tok: Tokenizer, out: Path):
        from pipelines.pack import Packer, ShardWriter, token_dtype

        dtype = token_dtype(tok.vocab_size)
        self.packers = {
            "train": Packer(
                cfg.seq_len,
                ShardWriter(
                    out / "train", cfg.rows_per_shard, dtype, background=True, vocab_size=tok.vocab_size
                ),
            ),
            "eval": Packer(
                cfg.seq_len, ShardWriter(out / "eval", cfg.rows_per_shard, dtype, background=True)
            ),
        }
        self.docs: Counter = Counter()
        self.pieces = self.truncated = 0
        self.seconds = 0.0

    def add(self, table: pa.Table, kept: np.ndarray) -> None:
        """table: tokens (list<int32>, eos last), eval, pieces, truncated_tokens; kept: rows to pack."""
        t0 = time.perf_counter()
        if kept.any():
            is_eval = table.column("eval").to_numpy(zero_copy_only=False)
            self.pieces += int(table.column("pieces").to_numpy()[kept].sum())
            self.truncated += int(table.column("truncated_tokens").to_numpy()[kept].sum())
            # a block of several tasks' tables: its chunks' (offsets, values), read in place (the
            # offsets index .values, which ignores a slice's offset); the ids' range for the packer
            chunks = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in table.column("tokens").chunks]
            ids = [v[o[0] : o[-1]] for o, v in chunks if o[-1] > o[0]]
            low, high = (
                min((int(v.min()) for v in ids), default=0),
                max((int(v.max()) for v in ids), default=0),
            )
            for split, mask in (("train", kept & ~is_eval), ("eval", kept & is_eval)):
                if not mask.any():
                    continue
                self.docs[split] += int(mask.sum())
                parts, lo = [], 0
                for offsets, values in chunks:
                    sub = mask[lo : lo + offsets.size - 1]
                    lo += offsets.size - 1
                    if sub.any():
                        parts += _row_runs(offsets, values, sub)
                self.packers[split].add_parts(parts, low, high)
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        """The shard writers' threads end (after Packer.finish: nothing left to wait for)."""
        for p in self.packers.values():
            p.writer.close()


def _load_models(cfg: PrepareConfig, log) -> dict:
    """Model payloads for the workers: fastText bytes, unigram LM, domain filter."""
    from pipelines.quality import QualityScorer, UnigramLM, default_quality_model, reference_texts

    out: dict = {"quality_model": None, "unigram_lm": None, "domain": None}
    if cfg.quality:
        if cfg.quality_model is None:
            path = default_quality_model(cfg.seed)
            log(f"prepare: quality model: the project's default ({path})")
        else:
            path = Path(cfg.quality_model)
            if not path.is_file():
                raise UserError(
                    f"prepare.quality_model {path} does not exist: train one with `dsv3ray quality train` or unset it"
                )
        # a bad file or label: one line here, not a worker traceback
        scorer = QualityScorer(path, cfg.quality_label)
        out["quality_model"] = scorer.payload(path)
        out["quality_model_path"] = str(path)
    if cfg.perplexity:
        out["unigram_lm"] = UnigramLM.fit(reference_texts(cfg.perplexity_reference))
    if cfg.domain_examples is not None:
        from pipelines.corpus import stdlib_documents
        from pipelines.domain import DomainFilter

        if not Path(cfg.domain_examples).exists():
            raise UserError(
                f"prepare.domain_examples {cfg.domain_examples} does not exist: pass a jsonl/txt file"
            )
        examples = reference_texts(cfg.domain_examples)
        if not examples:
            raise UserError(f"prepare.domain_examples {cfg.domain_examples} holds no readable text example")
        background = [d["text"] for d, _ in zip(stdlib_documents(min_chars=200), range(500))]
        out["domain"] = DomainFilter(examples, background, seed=cfg.seed)
    return out


def _init_ray():
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS / `ray job submit` → that cluster; otherwise a new local Ray on this machine
        # (address="local": never a stale or foreign `ray start` cluster found in /tmp/ray)
        address = None if os.environ.get("RAY_ADDRESS") else "local"
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return ray


_OUTPUT_DIRS = ("train", "eval", "quarantine", "_clean", "_corpus")  # what a run replaces in DIR
_OUTPUT_FILES = ("meta.json", "report.json", "tokenizer.json")


def _check_output(out: Path, files: list[Path]) -> None:
    """Refuse an --output whose clearing would delete what prepare did not write: an input (say
    `--input data/train --output data`), or the train/ and eval/ of a dataset's own splits. A run
    marks DIR as its own from its first seconds (quarantine/records.jsonl, then report.json and
    meta.json), so a crashed run's leftovers are still replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare: output {out} is a file: pass a directory for --output")
    real = Path(os.path.realpath(out))
    for f in files:
        rf = Path(os.path.realpath(f))
        inside = next((d for d in _OUTPUT_DIRS if (real / d) in rf.parents), None)
        if inside is not None or (rf.parent == real and rf.name in _OUTPUT_FILES):
            where = f"{inside}/" if inside is not None else rf.name
            raise UserError(
                f"prepare: input {f} is in {where} of the output {out}, which prepare replaces: "
                "pass another --output"
            )
    if not any((out / m).exists() for m in ("meta.json", "report.json", "quarantine/records.jsonl")):
        foreign = [d for d in _OUTPUT_DIRS if (out / d).exists()]
        if foreign:
            raise UserError(
                f"prepare: output {out} holds {', '.join(d + '/' for d in foreign)} that no earlier prepare "
                "wrote (no meta.json or report.json): pass a new or empty directory for --output"
            )


def _clear_outputs(out: Path) -> None:
    for sub in _OUTPUT_DIRS:
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    for name in _OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def prepare(inputs: list[str], output: str | Path, cfg: PrepareConfig | None = None, log=print) -> dict:
    """Run the whole pipeline; returns the report (also written to DIR/report.json).

    An input "corpus:stdlib" (or "corpus:stdlib:BYTES") stands for the built-in demo corpus
    (pipelines.corpus), written to DIR/_corpus/ first.
    """
    from pipelines import native
    from pipelines.clean import TIMED, CleanSettings
    from pipelines.dataset import quiet_ray_data_console
    from pipelines.dedup import Deduplicator
    from pipelines.pack import unigram_entropy
    from pipelines.readers import QUARANTINE, SplitLines, expand_inputs, group_work, plan_work

    cfg = cfg or PrepareConfig()
    t_all = time.perf_counter()
    out = Path(output)
    demo = [i for i in inputs if _is_demo_input(i)]
    given = [i for i in inputs if not _is_demo_input(i)]
    # (none at all: expand_inputs says so; an --output inside an input directory is no input)
    files = expand_inputs(given, skip=out) if given or not demo else []
    _check_output(out, files)  # before anything is deleted
    _clear_outputs(out)
    if demo:  # the built-in corpus is written into DIR/_corpus (cleared above)
        files += expand_inputs(_demo_inputs(demo, out, log))
    models = _load_models(cfg, log)
    # the C helpers, built here once for this machine's workers (else each would on first use)
    native_helpers = native.library() is not None
    if not native_helpers:
        log(
            "prepare: the C helpers (pipelines/native.c) are not available here: the numpy paths run (slower)"
        )
    # a known tokenizer: tokenize in the cleaning pass (one pass); else train one on the kept text
    fused = cfg.tokenizer is not None
    tok = Tokenizer.load(cfg.tokenizer) if fused else None  # a bad path: one line, before Ray starts
    ray = _init_ray()
    ctx = ray.data.DataContext.get_current()
    saved = (
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
        ctx.target_max_block_size, ctx._max_num_blocks_in_streaming_gen_buffer,
        ctx.op_resource_reservation_enabled, ctx.downstream_capacity_backpressure_ratio,
    )  # fmt: skip
    # order is part of the result: which duplicate survives, which rows pack together
    ctx.execution_options.preserve_order = True
    # one operator per pass (a read that cleans): Ray Data's per-operator reservation (half the
    # CPUs each, the input operator's half lent out only later) ran the first ~1 s of a run on
    # one task of two; and its backpressure on the driver's pace (the tasks' queued outputs over
    # what the driver takes) left workers idle between tasks: a task's output is bounded by
    # GEN_BUFFER_BLOCKS instead
    ctx.op_resource_reservation_enabled = False
    ctx.downstream_capacity_backpressure_ratio = None
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # small blocks stream: the driver decides and packs while the workers clean (the default
    # 128 MiB would hand it whole work items at once, and hold them in memory)
    ctx.target_max_block_size = BLOCK_BYTES
    ctx._max_num_blocks_in_streaming_gen_buffer = GEN_BUFFER_BLOCKS
    loud = quiet_ray_data_console()
    run = uuid.uuid4().hex  # a worker process keeps its cleaner for this run's tasks (_Kept)
    settings = CleanSettings(
        normalize=cfg.normalize, min_words=cfg.min_words, max_chars=cfg.max_chars, oversize=cfg.oversize,
        dedup_exact=cfg.dedup_exact, dedup_near=cfg.dedup_near, minhash_perms=cfg.minhash_perms,
        shingle_words=cfg.shingle_words, near_threshold=cfg.near_threshold, seed=cfg.seed,
        quality_model=models["quality_model"], quality_label=cfg.quality_label,
        quality_threshold=cfg.quality_threshold, unigram_lm=models["unigram_lm"],
        perplexity_threshold=cfg.perplexity_threshold, domain=models["domain"],
        domain_threshold=cfg.domain_threshold, max_doc_tokens=cfg.max_doc_tokens,
        eval_fraction=cfg.eval_fraction, truncate_tokens=cfg.truncate_tokens,
    )  # fmt: skip
    if fused:
        settings.tokenizer_json = tok.hf.to_str()
    report: dict = {
        "inputs": [str(f) for f in files],
        "files": {"count": len(files), "empty": [str(f) for f in files if _size(f) == 0]},
        "input_records": 0,
        "kept": 0,
        "dropped": Counter(),
        "quarantined": 0,
        "quarantine_reasons": Counter(),
        "stages": {},
        "native_helpers": native_helpers,  # (this machine's; a cluster node without a C compiler: numpy)
    }
    packing = None
    topic_job: concurrent.futures.Future | None = None  # the topic summary, once pass 1 has ended
    try:
        # ---- pass 1: read → validate → normalize → length → scores and their decisions → dedup keys
        # (→ tokens when the tokenizer is given) on the workers; dedup decisions and packing on the driver
        t_pass1 = time.perf_counter()
        items = plan_work(files, cfg.split_bytes)
        tasks = group_work(items, cfg.split_bytes)  # (small files share a task)
        lines = SplitLines(items)  # (a split file's line numbers: counted here, in order)
        source = _tasks_source(
            "Clean", _read_clean, [t["parts"] for t in tasks], run=run, held=_hold(settings),
            max_record_bytes=cfg.max_record_bytes, batch_size=cfg.batch_size, text_key=cfg.text_key,
        )  # fmt: skip
        ds = ray.data.read_datasource(
            source, override_num_blocks=max(1, len(tasks)), concurrency=_concurrency(cfg, len(tasks))
        )
        dedup = Deduplicator(cfg.dedup_exact, cfg.dedup_near)
        clean = None if fused else _CleanTextWriter(out / "_clean")  # pass 2's units of parallelism
        packing = _Packing(cfg, tok, out) if fused else None
        seconds_T = np.zeros(len(TIMED))  # summed worker seconds of TIMED (all workers)
        t_dedup = 0.0
        topics = _Reservoir(1000, cfg.seed)  # documents that reached the decisions, for the topic summary
        progress = _Progress("clean", log)
        (out / "quarantine").mkdir()
        with open(out / "quarantine" / "records.jsonl", "w", encoding="utf-8") as qf:
            for table in _blocks(ds):
                for c in table.column("seconds").chunks:  # (a block: several batches' rows)
                    seconds_T += c.flatten().to_numpy().reshape(-1, len(TIMED)).sum(axis=0)
                n = table.num_rows
                report["input_records"] += n
                status = table.column("status").to_numpy(zero_copy_only=False)
                reason = table.column("reason").to_pylist()
                line = lines.of(table)
                for i in np.flatnonzero(status == QUARANTINE):
                    report["quarantined"] += 1
                    report["quarantine_reasons"][reason[i]] += 1
                    rec = {"source": table.column("source")[i].as_py(), "line": int(line[i])}
                    rec |= {k: table.column(k)[i].as_py() for k in ("reason", "excerpt")}
                    qf.write(json.dumps(rec, ensure_ascii=False) + "\n")
                # dedup, in input order, over what the workers kept
                t0 = time.perf_counter()
                ok = np.flatnonzero(status == OK)
                # OK rows hold the same number of band keys each (0 with near-dedup off), others none
                keys = table.column("band_keys").combine_chunks().values.to_numpy()
                kept = np.zeros(n, dtype=bool)
                codes = dedup.check_codes(table.column("text_hash").to_numpy()[ok], keys)
                kept[ok] = codes == 0
                dup = codes > 0
                for i, c in zip(ok[dup].tolist(), codes[dup].tolist()):
                    reason[i] = dedup.REASONS[c]
                t_dedup += time.perf_counter() - t0
                report["kept"] += int(kept.sum())
                report["dropped"].update(
                    [reason[i] for i in np.flatnonzero((status != QUARANTINE) & ~kept).tolist()]
                )
                has_text = table.column("text").is_valid().to_numpy(zero_copy_only=False)
                topics.offer(table.column("text"), np.flatnonzero(has_text), kept, reason)
                if fused:
                    packing.add(table, kept)
                elif kept.any():
                    mask = pa.array(kept)
                    for text, h in zip(
                        table.column("text").filter(mask).to_pylist(),
                        table.column("text_hash").filter(mask).to_pylist(),
                    ):
                        clean.add(text, h)
                progress.tick(report["input_records"], f", kept {report['kept']:,}")
        sample = topics.items
        if clean is not None:
            clean.flush()
        pass1_s = time.perf_counter() - t_pass1
        stage_s = dict(zip(TIMED, seconds_T.tolist()))
        for stage in TIMED:
            report["stages"][stage] = {"seconds": round(stage_s[stage], 3)}
        report["stages"]["dedup"] = {"seconds": round(t_dedup, 3), "state_bytes": dedup.nbytes}
        report["stages"]["clean_pass"] = {
            "seconds": round(pass1_s, 3),
            "records_per_s": round(report["input_records"] / max(pass1_s, 1e-9), 1),
        }
        assert (
            report["input_records"]
            == report["kept"] + sum(report["dropped"].values()) + report["quarantined"]
        )
        if models["domain"] is not None or sample:
            from pipelines.domain import topic_summary

            # clustered in a thread while the run's tail is written (the shard writer's last
            # shards, compressed with the GIL released): ~0.1 s of a run's serial end otherwise
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsv3ray-topics")
            topic_job = pool.submit(topic_summary, sample, cfg.domain_clusters, cfg.seed)
            pool.shutdown(wait=False)  # (its one task runs on; result() waits for it)
            report["topics"] = None  # (its place in the report; filled by _topics_done)
        if report["kept"] == 0:
            _topics_done(report, topic_job)
            _write_report(out, report, t_all)
            raise UserError(
                f"prepare: no document survived cleaning ({report['input_records']} records read; "
                f"see {out / 'report.json'} for the reasons): check the input or relax [prepare] thresholds"
            )

        # ---- tokenizer
        t0 = time.perf_counter()
        if not fused:
            log(f"prepare: training a {cfg.vocab_size}-token byte-level BPE on the kept text")
            tok = train_tokenizer(clean.iter_texts(cfg.tokenizer_train_chars), cfg.vocab_size)
        tok.save(out / "tokenizer.json")
        report["stages"]["tokenizer"] = {
            "seconds": round(time.perf_counter() - t0, 3),
            "vocab_size": tok.vocab_size,
        }

        # ---- pass 2 (tokenizer trained above): tokenize (workers) → pack (driver, in order)
        t0 = time.perf_counter()
        if not fused:
            held = _hold({
                "tokenizer_json": tok.hf.to_str(), "max_doc_tokens": cfg.max_doc_tokens,
                "eval_fraction": cfg.eval_fraction, "truncate": cfg.truncate_tokens, "max_chars": cfg.max_chars,
            })  # fmt: skip
            source = _tasks_source("Tokenize", _tokenize, [str(p) for p in clean.files], run=run, held=held)
            ds2 = ray.data.read_datasource(
                source, override_num_blocks=len(clean.files), concurrency=_concurrency(cfg, len(clean.files))
            )
            packing = _Packing(cfg, tok, out)
            progress = _Progress("tokenize", log)
            for table in _blocks(ds2):
                packing.add(table, np.ones(table.num_rows, dtype=bool))
                progress.tick(sum(packing.docs.values()))
        packers, docs = packing.packers, packing.docs
        tail = {split: p.finish() for split, p in packers.items()}
        # fused: the workers' tokenize seconds + the driver's packing; else pass 2's wall time
        tok_s = stage_s["tokenize"] + packing.seconds if fused else time.perf_counter() - t0
        report["stages"]["tokenize_pack"] = {
            "seconds": round(tok_s, 3),
            "docs_per_s": round(sum(docs.values()) / max(tok_s, 1e-9), 1),
            "fused_with_clean_pass": fused,
        }
        truncated, pieces = packing.truncated, packing.pieces
        num_train, num_eval = packers["train"].writer.num_rows, packers["eval"].writer.num_rows
        report["tokens"] = {
            "train": packers["train"].tokens,
            "eval": packers["eval"].tokens,
            "dropped_partial_row": tail,
            "truncated": truncated,
        }
        report["documents"] = {"train": docs["train"], "eval": docs["eval"], "pieces": pieces}
        if num_train == 0:
            _topics_done(report, topic_job)
            _write_report(out, report, t_all)
            raise UserError(
                f"prepare: the kept text ({report['tokens']['dropped_partial_row']['train']} tokens) fills no "
                f"training row of {cfg.seq_len + 1} tokens: add input or lower prepare.seq_len"
            )
        if num_eval == 0:
            log("prepare: warning: the eval split is empty (too few documents for prepare.eval_fraction)")
        meta = {
            "seq_len": cfg.seq_len,
            "vocab_size": tok.vocab_size,
            "num_train": num_train,
            "num_eval": num_eval,
            "tokenizer": "tokenizer.json",
            "unigram_entropy": unigram_entropy(packers["train"].writer.counts_V),
            "eos_id": tok.eos_id,
            "token_dtype": packers["train"].writer.dtype.name,
            "format": "input_ids = seq_len + 1 token ids end to end (fixed-size binary, little-endian "
            "token_dtype); feed the row as input_ids and labels (the model shifts)",
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        report["meta"] = meta
        if clean is not None:
            shutil.rmtree(out / "_clean")
    finally:
        if packing is not None:
            packing.close()  # (a run that stopped early: its writer threads end)
        (
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
            ctx.target_max_block_size, ctx._max_num_blocks_in_streaming_gen_buffer,
            ctx.op_resource_reservation_enabled, ctx.downstream_capacity_backpressure_ratio,
        ) = saved  # fmt: skip
        loud()
    _topics_done(report, topic_job)
    _write_report(out, report, t_all)
    log(summary(report))
    return report


def _topics_done(report: dict, job: concurrent.futures.Future | None) -> None:
    """The topic summary in the report, once its thread has ended (a no-op without one)."""
    if job is not None:
        report["topics"] = job.result()


def _is_demo_input(item: str) -> bool:
    return item == "corpus:stdlib" or item.startswith("corpus:stdlib:")


def _demo_inputs(inputs: list[str], out: Path, log) -> list[str]:
    resolved = []
    for item in inputs:
        if _is_demo_input(item):
            size = item.split(":")[2] if item.count(":") == 2 else "4000000"
            if not size.isdigit():
                raise UserError(f"prepare: input {item!r}: use corpus:stdlib or corpus:stdlib:BYTES")
            from pipelines.corpus import write_demo_corpus

            path = out / "_corpus" / "stdlib.jsonl"
            info = write_demo_corpus(path, int(size))
            log(f"prepare: demo corpus: {info['documents']:,} stdlib documents, {info['bytes']:,} bytes")
            resolved.append(str(path))
        else:
            resolved.append(item)
    return resolved


def _size(path: Path) -> int:
    """Bytes of a regular file; -1 for anything else (missing, unreadable, a FIFO or device)."""
    try:
        st = path.stat()
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def _write_report(out: Path, report: dict, t_all: float) -> None:
    report["seconds"] = round(time.perf_counter() - t_all, 3)
    report["records_per_s"] = round(report["input_records"] / max(report["seconds"], 1e-9), 1)
    report["dropped"] = dict(sorted(report["dropped"].items()))
    report["quarantine_reasons"] = dict(sorted(report["quarantine_reasons"].items()))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def summary(report: dict) -> str:
    """The readable end-of-run summary."""
    n = report["input_records"]
    pct = lambda k: f"{100 * k / n:.1f}%" if n else "-"
    lines = [
        f"prepare: {n:,} records from {report['files']['count']} files in {report['seconds']:.1f}s "
        f"({report['records_per_s']:,.0f} records/s)",
        f"  kept        {report['kept']:>10,}  {pct(report['kept'])}",
    ]
    for reason, k in report["dropped"].items():
        lines.append(f"  dropped     {k:>10,}  {pct(k):>6}  {reason}")
    for reason, k in report["quarantine_reasons"].items():
        lines.append(f"  quarantined {k:>10,}  {pct(k):>6}  {reason}")
    if "meta" in report:
        m = report["meta"]
        lines.append(
            f"  packed {m['num_train']:,} train + {m['num_eval']:,} eval rows of {m['seq_len'] + 1} tokens, "
            f"vocab {m['vocab_size']}, unigram entropy {m['unigram_entropy']:.2f} nats/token"
        )
    stages = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in report["stages"].items())
    lines.append(f"  stages: {stages}")
    return "\n".join(lines)


def cli_prepare(run, args) -> int:
    """`dsv3ray prepare [--config FILE] --input PATH... --output DIR`."""
    if not getattr(args, "input", None):
        raise UserError("prepare: no input given: pass --input FILE_OR_DIR_OR_GLOB ...")
    if not getattr(args, "output", None):
        raise UserError("prepare: no output given: pass --output DIR")
    prepare(list(args.input), args.output, run.prepare)
    return 0
