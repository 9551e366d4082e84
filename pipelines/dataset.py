"""Reading a prepared directory (the data contract written by pipelines.prepare.prepare).

`read_prepared(dir, split)` → a Ray Dataset of {sample_id int64, input_ids: one row of seq_len + 1
token ids as fixed-size binary (meta.json's token_dtype, uint16 or int32; `pipelines.pack.rows_from_arrow`
turns a column of them into an array; shards of earlier versions hold list<int32>, also read)}.
Before Ray touches the shards, each shard's parquet footer and schema are checked: a corrupt shard
is either a one-line UserError (on_corrupt="fail", the default) or skipped with its name logged and
counted (on_corrupt="skip"; `check_shards` returns the skipped names for callers that count).
A split of at most DRIVER_READ_BYTES is read in the calling process and handed to Ray as Arrow
blocks; a larger one by Ray Data's parallel read tasks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dsv3ray.errors import UserError

SPLITS = ("train", "eval")
# a split whose shards hold at most this many bytes is read by the caller's process, not Ray Data tasks
DRIVER_READ_BYTES = 256 << 20
META_KEYS = ("seq_len", "vocab_size", "num_train", "num_eval", "tokenizer", "unigram_entropy", "eos_id")


def _worth_showing(record) -> bool:
    """Ray Data's console records shown while ours run: warnings and errors, but not the one saying
    progress bars are off (we turn them off: our commands print their own progress)."""
    return record.levelno >= 30 and "Progress bars disabled" not in record.getMessage()


def quiet_ray_data_console():
    """Filter Ray Data's console handler in this process with `_worth_showing`: its per-dataset
    INFO lines ("execution finished in 1.8 seconds", one per split and pass) repeat what our
    summaries say; its log file keeps everything. Returns the undo."""
    import logging

    import ray.data  # noqa: F401  (sets up its handlers)

    handlers = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    for h in handlers:
        h.addFilter(_worth_showing)

    def undo():
        for h in handlers:
            h.removeFilter(_worth_showing)

    return undo


def load_meta(dir: str | Path) -> dict:
    path = Path(dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{dir} is not a prepared directory (no meta.json): run `dsv3ray prepare` first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}): re-run `dsv3ray prepare`") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: re-run `dsv3ray prepare` with this version")
    return meta


def check_shards(files: list[Path], on_corrupt: str = "fail", log=print) -> tuple[list[str], list[str]]:
    """(readable files, skipped files): footer, schema and row width are checked per shard."""
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    good, skipped = [], []
    for f in files:
        try:
            schema = pq.read_schema(f)
            if "sample_id" not in schema.names or "input_ids" not in schema.names:
                raise ValueError(f"columns {schema.names}, expected sample_id and input_ids")
            kind = schema.field("input_ids").type
            if not (pa.types.is_fixed_size_binary(kind) or pa.types.is_list(kind)):
                raise ValueError(f"input_ids is {kind}, expected fixed-size binary rows of token ids")
            pq.read_metadata(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            if on_corrupt == "fail":
                raise UserError(
                    f"prepared shard {f} is corrupt ({type(e).__name__}: {e}): re-run `dsv3ray prepare`, "
                    "or skip corrupt shards (train.corrupt_shard = 'skip')"
                ) from None
            log(f"[dsv3ray] skipping corrupt prepared shard {f} ({type(e).__name__}: {e})")
            skipped.append(str(f))
            continue
        good.append(str(f))
    return good, skipped


def read_prepared(
    dir: str | Path, split: str, files: list[str] | None = None, on_corrupt: str = "fail", log=print
):
    """A Ray Dataset over DIR/split/*.parquet (or the given, already checked, `files`)."""
    import ray

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if files is None:
        shards = sorted((Path(dir) / split).glob("*.parquet"))
        if not shards:
            raise UserError(f"{dir} has no {split}/*.parquet shards: run `dsv3ray prepare` first")
        files, skipped = check_shards(shards, on_corrupt, log)
        if skipped:
            log(f"[dsv3ray] {split}: skipped {len(skipped)} corrupt shard(s) of {len(shards)}")
        if not files:
            raise UserError(f"every {split} shard of {dir} is corrupt: re-run `dsv3ray prepare`")
    columns = ["sample_id", "input_ids"]
    if files and sum(os.path.getsize(f) for f in files) <= DRIVER_READ_BYTES:
        # small splits are read here: Ray Data's read tasks first start and import in worker
        # processes (1-3.5 s per split on 2 cores for a few MB; pyarrow here 0.03 s)
        tables = []
        for f in files:
            try:
                tables.append(pq.read_table(f, columns=columns))
            except Exception as e:  # noqa: BLE001 - a data page broken behind a sound footer
                raise UserError(
                    f"prepared shard {f} cannot be read ({type(e).__name__}: {e}): re-run `dsv3ray prepare`"
                ) from None
        return ray.data.from_arrow(tables)
    return ray.data.read_parquet(list(files)).select_columns(columns)
