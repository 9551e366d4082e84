"""Training-side data path: where a run's tokens come from and how they reach the workers.

`[data]` names either a prepared directory (the pipelines' contract: train/ and eval/ parquet,
tokenizer.json, meta.json) or raw inputs; with raw inputs the run first prepares them into
`<run_dir>/data` with `pipelines.prepare.prepare`. Rows reach each worker through
`ray.train.get_dataset_shard`; the train split is NOT split across workers (every worker may be
handed any sample id by the curriculum sampler), so each worker holds an id -> tokens table in the
shards' dtype: memory = num_samples * (seq_len + 1) * 2 bytes per worker (uint16, vocab <= 65,536;
4 bytes above), e.g. 100k samples of 512 tokens = 103 MB per worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsv3ray.errors import ConfigError, UserError


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

    def __post_init__(self):
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


def build_table(iterator, num_rows: int, row_len: int, dtype: str | None = None) -> np.ndarray:
    """id -> tokens table (num_rows, row_len) from a Ray Data iterator over a whole split, in the
    shards' dtype (meta.json's token_dtype, uint16 or int32; None: told by the row width; callers
    widen a batch when they take it).

    Sample ids are dense per split; when corrupt shards were skipped they are not, and rows are
    renumbered densely in sample-id order (the same on every worker).
    """
    from pipelines.pack import rows_from_arrow

    ids_parts, rows_parts = [], []
    for batch in iterator.iter_batches(batch_size=4096, batch_format="pyarrow"):
        ids_parts.append(batch.column("sample_id").to_numpy().astype(np.int64, copy=False))
        try:
            rows_parts.append(rows_from_arrow(batch.column("input_ids"), row_len, dtype))
        except ValueError as e:
            raise UserError(
                f"data {e}, meta.json says seq_len+1 = {row_len}: re-run `dsv3ray prepare`"
            ) from None
    ids_M = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    if ids_M.size != num_rows:
        raise UserError(
            f"data split has {ids_M.size} rows, expected {num_rows}: the prepared directory changed during the run"
        )
    rows_MS = np.concatenate(rows_parts) if rows_parts else np.zeros((0, row_len), np.int32)
    order = np.argsort(ids_M, kind="stable")
    if np.array_equal(ids_M[order], np.arange(num_rows)):
        table_NS = np.empty_like(rows_MS)
        table_NS[ids_M] = rows_MS
        return table_NS
    return rows_MS[order]


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
