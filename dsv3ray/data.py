"""Training-side data path: where a run's tokens come from and how they reach the workers.

`[data]` names either a prepared directory (the pipelines' contract: train/ and eval/ parquet,
tokenizer.json, meta.json) or raw inputs; with raw inputs the run first prepares them into
`<run_dir>/data` with `pipelines.prepare.prepare`. Rows reach each worker through
`ray.train.get_dataset_shard`; the train split is NOT split across workers (every worker may be
handed any sample id by the curriculum sampler), so each worker reads a whole id -> tokens table
in the shards' dtype: num_samples * (seq_len + 1) * 2 bytes (uint16, vocab <= 65,536; 4 bytes
above), e.g. 100k samples of 512 tokens = 103 MB. `data.table` says where it lives: in each
worker's memory, or on disk, one memory-mapped file per node (`TableSpec`): the node's first
worker writes it, the others on the node map the same file (the page cache holds it once, and
evicts it under pressure), and so do other runs on the same data (a sweep's trials) and a worker
group restarted after a failure, instead of reading the split again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsv3ray.errors import ConfigError, UserError

TABLE_MODES = ("auto", "memory", "disk")


@dataclass
class DataConfig:
    # A prepared directory (contract of pipelines.prepare); "" = prepare `inputs` first.
    prepared: str = ""
    # Raw inputs (files or globs: jsonl / parquet / txt, or "corpus:stdlib" = the built-in demo
    # corpus), prepared into <run_dir>/data with the [prepare] section; used when `prepared` is "".
    inputs: list[str] = field(default_factory=list)
    # (Neither set is allowed here so other commands can omit [data]; `train` checks it.)
    # Held-out split used for eval loss.
    eval_split: str = "eval"
    # Where a worker keeps a split's id -> tokens table: "memory" (an array in every worker),
    # "disk" (one memory-mapped file per node, shared by its workers and by other runs on the same
    # data, kept across restarts of the worker group, removed when the last run using it ends),
    # "auto" = disk for a split over table_memory_mb.
    table: str = "auto"
    table_memory_mb: float = 1024.0
    # Directory of the disk tables on each node: local disk with room for the splits ("" = the
    # system's temporary directory, $TMPDIR or /tmp).
    table_dir: str = ""

    def __post_init__(self):
        if self.table not in TABLE_MODES:
            raise ConfigError("data.table", self.table, " | ".join(f'"{m}"' for m in TABLE_MODES))
        if not self.table_memory_mb >= 0:
            raise ConfigError("data.table_memory_mb", self.table_memory_mb, "a size in MB, >= 0")
        if self.prepared and self.inputs:
            raise ConfigError(
                "data.inputs", self.inputs, "give either data.prepared or data.inputs, not both"
            )
        if self.eval_split not in ("eval", "train"):
            raise ConfigError(
                "data.eval_split", self.eval_split, '"eval" (or "train" to evaluate on training rows)'
            )


@dataclass
class PreparedData:
    """A checked prepared directory: what the driver hands to the trainer."""

    dir: Path
    meta: dict
    train_files: list[str]
    eval_files: list[str]
    num_train: int  # rows in the readable train shards (= meta num_train unless shards were skipped)
    num_eval: int
    skipped: list[str] = field(default_factory=list)


def _check_shards(files: list[Path], policy: str) -> tuple[list[str], int, list[str]]:
    """(readable shards, their row count, skipped shards); a corrupt shard fails or is skipped."""
    import pyarrow.parquet as pq

    from pipelines.dataset import check_shards

    good, skipped = check_shards(files, policy, log=lambda msg: print(msg, flush=True))
    return good, sum(pq.read_metadata(f).num_rows for f in good), skipped


def check_prepared(path: str | Path, corrupt_shard: str = "fail", need_eval: bool = True) -> PreparedData:
    """Validate a prepared directory before any worker starts (user errors as one line).
    `need_eval=False` (data.eval_split = "train"): an empty eval split is fine."""
    from pipelines.dataset import load_meta

    d = Path(path).expanduser().resolve()  # absolute: Ray Tune trials and job workers run elsewhere
    if not (d / "meta.json").is_file():
        raise UserError(
            f"data.prepared={str(d)!r} is not a prepared directory (no meta.json): run `dsv3ray prepare` first or fix the path"
        )
    meta = load_meta(d)
    out = {}
    no_eval = (
        f"prepared directory {d} has no eval rows (none of its documents fell in prepare.eval_fraction):"
        " prepare more input or a larger prepare.eval_fraction, or evaluate on training rows"
        ' (data.eval_split = "train")'
    )
    for split in ("train", "eval"):
        files = sorted((d / split).glob("*.parquet"))
        if not files and split == "eval" and meta["num_eval"] == 0:
            if need_eval:
                raise UserError(no_eval)
            out[split] = ([], 0, [])
            continue
        if not files:
            raise UserError(
                f"prepared directory {d} has no {split}/*.parquet shards: re-run `dsv3ray prepare`"
            )
        out[split] = _check_shards(files, corrupt_shard)
    (train_files, num_train, sk1), (eval_files, num_eval, sk2) = out["train"], out["eval"]
    if not train_files or num_train == 0:
        raise UserError(f"prepared directory {d} has no readable training rows: re-run `dsv3ray prepare`")
    if need_eval and (not eval_files or num_eval == 0):
        raise UserError(
            no_eval
            if meta["num_eval"] == 0
            else f"prepared directory {d} has no readable eval rows: re-run `dsv3ray prepare`"
        )
    return PreparedData(d, meta, train_files, eval_files, num_train, num_eval, sk1 + sk2)


def resolve_data(cfg: DataConfig, prepare_cfg, run_dir: Path, corrupt_shard: str = "fail") -> PreparedData:
    """The prepared directory of this run: `data.prepared`, or `data.inputs` prepared into run_dir/data."""
    if cfg.prepared:
        return check_prepared(cfg.prepared, corrupt_shard, need_eval=cfg.eval_split == "eval")
    if not cfg.inputs:
        raise ConfigError(
            "data.prepared",
            cfg.prepared,
            "set data.prepared to a prepared directory or data.inputs to raw input files",
        )
    from pipelines.prepare import prepare

    out = run_dir / "data"
    if not (out / "meta.json").is_file():  # a resumed run reuses its prepared data
        prepare(list(cfg.inputs), out, prepare_cfg)
    return check_prepared(out, corrupt_shard, need_eval=cfg.eval_split == "eval")


TABLE_SUBDIR = "dsv3ray-tables"
_TABLE_FIX = 'set data.table_dir to a local disk with room, or data.table = "memory"'


@dataclass
class TableSpec:
    """One split's id -> tokens table as the driver plans it (`table_spec`) and a worker builds it
    (`load_table`). A disk table is `<table_dir>/dsv3ray-tables/<key>.<split>.tokens` on each node,
    its shape and dtype in the `.json` beside it; key = the split's shards (paths, sizes, mtimes),
    so every run on a node that trains on the same data maps one file: concurrent trials of a
    sweep, a worker group restarted after a failure. Each run's first worker on the node holds it
    (a `.holder-<host>-<pid>` file) while training; the last to leave removes it."""

    split: str
    num_rows: int
    row_len: int
    dtype: str | None  # meta.json's token_dtype (None: told by the shards)
    dense: bool  # sample ids are 0..num_rows-1 (no shard of the split was skipped)
    disk: bool
    key: str = ""
    table_dir: str = ""

    @property
    def path(self) -> Path:
        root = Path(self.table_dir).expanduser() if self.table_dir else Path(tempfile.gettempdir())
        return root / TABLE_SUBDIR / f"{self.key}.{self.split}.tokens"

    @property
    def nbytes(self) -> int:  # (dtype unknown: int32, the wider)
        return self.num_rows * self.row_len * (2 if self.dtype == "uint16" else 4)


def table_spec(cfg: DataConfig, data: PreparedData, split: str, row_len: int) -> TableSpec:
    """Where the workers keep `split`'s table: data.table ("auto": disk over data.table_memory_mb)."""
    files = data.train_files if split == "train" else data.eval_files
    num_rows = data.num_train if split == "train" else data.num_eval
    spec = TableSpec(
        split, num_rows, row_len, data.meta.get("token_dtype"),
        dense=not any(Path(f).parent.name == split for f in data.skipped), disk=False,
    )  # fmt: skip
    over = spec.nbytes > cfg.table_memory_mb * 2**20
    if num_rows and (cfg.table == "disk" or (cfg.table == "auto" and over)):
        stats = [(str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        ident = json.dumps([stats, row_len, num_rows, spec.dtype])
        spec.disk, spec.table_dir = True, cfg.table_dir
        spec.key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return spec


def load_table(iterator, spec: TableSpec, local_rank: int, log=print) -> np.ndarray:
    """The split's table on this worker: built in memory, or (disk) mapped read-only by every worker
    of the node once its first worker (local rank 0) holds the file and has written it, unless a
    complete one is there (a restart, another run on the same data)."""
    if not spec.disk:
        return build_table(iterator, spec.num_rows, spec.row_len, spec.dtype, dense=spec.dense)
    path = spec.path
    if local_rank == 0:
        hold_tables([spec])
        with _locked(path.with_name(path.name + ".lock")):  # one writer; others wait, then map
            if path.is_file():
                log(f"[dsv3ray] {spec.split} table: mapping {path} (written earlier on this node)")
            else:
                _write_table(iterator, spec, log)
    return map_table(path, log)


def hold_tables(specs: list[TableSpec]) -> None:
    """This run holds its disk tables on this node (its first worker, before it loads any: a table
    of the run's not held yet would look unused to the collection of another's)."""
    disk = [s for s in specs if s.disk]
    if not disk:
        return
    d = disk[0].path.parent  # (one table_dir per run)
    _mkdir(d)
    with _locked(d / ".lock"):
        for s in disk:
            _holder(s.path).touch()
        _collect(d)  # partial files of dead writers, tables no live run holds


def release_table(spec: TableSpec) -> None:
    """This run is done with its node's disk table: removed when no other live run holds it
    (workers still mapping it keep reading)."""
    if not spec.disk or not spec.path.parent.is_dir():
        return
    with _locked(spec.path.parent / ".lock"):
        _holder(spec.path).unlink(missing_ok=True)
        _collect(spec.path.parent)


def _write_table(iterator, spec: TableSpec, log) -> None:
    path = spec.path
    t0 = time.perf_counter()
    try:
        build_table(iterator, spec.num_rows, spec.row_len, spec.dtype, dense=spec.dense, out=path)
    except BaseException:  # (a bad row, a changed directory): no partial file left behind
        for name in (path.name, f"{path.name}.sorted"):
            path.with_name(f"{name}.tmp-{_me()}").unlink(missing_ok=True)
        raise
    log(
        f"[dsv3ray] {spec.split} table: {spec.num_rows:,} rows x {spec.row_len} ids"
        f" ({size_text(path.stat().st_size)}) written to {path} in"
        f" {time.perf_counter() - t0:.1f} s; this node's workers map it"
    )


def _me() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _holder(path: Path) -> Path:
    return path.with_name(f"{path.name}.holder-{_me()}")


def _alive(tag: str) -> bool:
    """Whether the process `<host>-<pid>` lives (one of another host, on a shared table_dir: yes)."""
    host, _, pid = tag.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _collect(d: Path) -> None:
    """Under the directory's lock: the partial files of dead writers and the holders of dead runs
    go, then every table that no holder is left for."""
    for f in d.iterdir():
        for mark in (".tmp-", ".holder-"):
            if mark in f.name and not _alive(f.name.rpartition(mark)[2]):
                f.unlink(missing_ok=True)
    held = {f.name.partition(".holder-")[0] for f in d.glob("*.holder-*")}
    for table in d.glob("*.tokens"):
        if table.name not in held:
            for f in (table, Path(f"{table}.json")):
                f.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock between the processes of this node (flock on `lock`, made if missing;
    lock files are never removed: one removed while another process waits on it breaks the lock)."""
    import fcntl

    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the token table directory {d} on this node ({e.strerror}): {_TABLE_FIX}"
        ) from None


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def map_table(path: Path, log=print, poll_s: float = 0.2, say_every_s: float = 60.0) -> np.ndarray:
    """A disk table mapped read-only, once it is complete (another worker may be writing it)."""
    t0 = time.monotonic()
    said = 0.0
    while not path.is_file():
        time.sleep(poll_s)
        waited = time.monotonic() - t0
        if waited - said >= say_every_s:
            said = waited
            log(f"[dsv3ray] waiting {waited:.0f} s for this node's first worker to write {path}")
    meta = json.loads(Path(f"{path}.json").read_text())
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=tuple(meta["shape"]))


def _allocate(out: Path | None, num_rows: int, row_len: int, dt: np.dtype) -> np.ndarray:
    """The table's storage: memory, or a file of its full size at out + `.tmp-<pid>` (its space
    reserved up front: a disk that fills while a mapped page is written kills the process)."""
    if out is None:
        return np.empty((num_rows, row_len), dtype=dt)
    tmp = out.with_name(f"{out.name}.tmp-{_me()}")
    nbytes = num_rows * row_len * dt.itemsize
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                f.truncate(nbytes)  # a filesystem without fallocate
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write the {size_text(nbytes)} token table {out} on this node ({e.strerror}): {_TABLE_FIX}"
        ) from None
    return np.memmap(tmp, dtype=dt, mode="r+", shape=(num_rows, row_len))


def _finish(table: np.ndarray, out: Path) -> None:
    """A written disk table made visible: flushed, its shape beside it, renamed into place."""
    table.flush()
    meta = Path(f"{out}.json")
    tmp_meta = meta.with_name(f"{meta.name}.tmp-{_me()}")
    tmp_meta.write_text(json.dumps({"dtype": table.dtype.name, "shape": list(table.shape)}))
    os.replace(tmp_meta, meta)
    os.replace(table.filename, out)


def build_table(
    iterator,
    num_rows: int,
    row_len: int,
    dtype: str | None = None,
    dense: bool = False,
    out: Path | None = None,
) -> np.ndarray:
    """id -> tokens table (num_rows, row_len) from a Ray Data iterator over a whole split, in the
    shards' dtype (meta.json's token_dtype, uint16 or int32; None: told by the row width; callers
    widen a batch when they take it). `out`: written to that file (see `_allocate`), returned
    mapped read-write; else in memory.

    dense: the sample ids are 0..num_rows-1 (prepare's contract): each batch lands at its ids.
    Otherwise (corrupt shards were skipped) rows land in arrival order and are renumbered densely
    in sample-id order after the last (the same on every worker).
    """
    from pipelines.pack import rows_from_arrow

    table, seen, ids_parts, total = None, np.zeros(num_rows if dense else 0, bool), [], 0
    changed = "the prepared directory changed during the run"
    for batch in iterator.iter_batches(batch_size=4096, batch_format="pyarrow"):
        ids_M = batch.column("sample_id").to_numpy().astype(np.int64, copy=False)
        try:
            rows_MS = rows_from_arrow(batch.column("input_ids"), row_len, dtype)
        except ValueError as e:
            raise UserError(
                f"data {e}, meta.json says seq_len+1 = {row_len}: re-run `dsv3ray prepare`"
            ) from None
        if table is None:
            table = _allocate(out, num_rows, row_len, rows_MS.dtype)
        m = ids_M.size
        if dense:
            if m and (ids_M.min() < 0 or ids_M.max() >= num_rows):
                raise UserError(f"data split has sample ids outside 0..{num_rows - 1}: {changed}")
            table[ids_M] = rows_MS
            seen[ids_M] = True
        elif total + m <= num_rows:
            table[total : total + m] = rows_MS
            ids_parts.append(ids_M)
        total += m
    if total != num_rows:
        raise UserError(f"data split has {total} rows, expected {num_rows}: {changed}")
    if table is None:  # (no rows)
        return np.zeros((0, row_len), np.dtype(dtype or np.int32))
    if dense and not seen.all():
        raise UserError(f"data split repeats sample ids (expected 0..{num_rows - 1} once each): {changed}")
    if not dense:
        order = np.argsort(np.concatenate(ids_parts), kind="stable")
        if not np.array_equal(order, np.arange(num_rows)):
            if out is None:
                table = table[order]
            else:
                table = _permuted(table, order, out)
    if out is not None:
        _finish(table, out)
    return table


def _permuted(table: np.memmap, order: np.ndarray, out: Path, chunk_rows: int = 1 << 14) -> np.memmap:
    """table[order] as a new disk table (chunk by chunk: never the whole table in memory)."""
    first = table.filename
    sorted_ = _allocate(out.with_name(out.name + ".sorted"), len(order), table.shape[1], table.dtype)
    for i in range(0, len(order), chunk_rows):
        sorted_[i : i + chunk_rows] = table[order[i : i + chunk_rows]]
    del table
    os.unlink(first)
    return sorted_


def write_synthetic_prepared(
    path: str | Path,
    num_train: int = 256,
    num_eval: int = 32,
    seq_len: int = 32,
    vocab_size: int = 256,
    seed: int = 0,
) -> Path:
    """A prepared directory (same contract as `pipelines.prepare`) of a learnable synthetic language.

    For benchmarks and fast tests that should not pay for tokenizer training: token t+1 =
    (7 * t + 3) mod V with probability 0.9, else uniform, so a model can get far below the
    unigram entropy (≈ ln V) while the data stays a fixed function of `seed`.
    """
    from pipelines.pack import ShardWriter, token_dtype

    d = Path(path)
    rng = np.random.default_rng(seed)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for split, n in (("train", num_train), ("eval", num_eval)):
        rows = np.empty((n, seq_len + 1), dtype=np.int32)
        rows[:, 0] = rng.integers(0, vocab_size, n)
        for t in range(1, seq_len + 1):
            follow = (7 * rows[:, t - 1] + 3) % vocab_size
            rows[:, t] = np.where(rng.random(n) < 0.9, follow, rng.integers(0, vocab_size, n))
        if split == "train":
            counts += np.bincount(rows.ravel(), minlength=vocab_size)
        writer = ShardWriter(d / split, max(n, 1), token_dtype(vocab_size))
        writer.add_rows(rows)
        writer.flush()
    p = counts[counts > 0] / counts.sum()
    meta = {
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "num_train": num_train,
        "num_eval": num_eval,
        "tokenizer": "synthetic",
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "eos_id": vocab_size - 1,
        "token_dtype": token_dtype(vocab_size).name,
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    return d
