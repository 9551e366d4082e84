"""Fast checks of the training entry (no Ray): config validation and user errors as one line."""

import errno
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from dsv3ray import checkpoint as ck
from dsv3ray import data as data_mod
from dsv3ray.cli import main
from dsv3ray.config import section_from_dict
from dsv3ray.data import (
    DataConfig,
    build_table,
    check_prepared,
    hold_tables,
    load_table,
    map_table,
    release_table,
    table_spec,
    write_synthetic_prepared,
)
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.runconfig import resolve_run_config
from dsv3ray.train import TrainConfig, ds_config_for_world, plan


@pytest.mark.parametrize(
    "data, key",
    [
        ({"ep_size": 3}, "train.ep_size"),
        ({"dtype": "fp8"}, "train.dtype"),
        ({"steps": 0}, "train.steps"),
        ({"corrupt_shard": "ignore"}, "train.corrupt_shard"),
        ({"num_workers": 0}, "train.num_workers"),
    ],
)
def test_train_config_rejects(data, key):
    with pytest.raises(ConfigError) as e:
        section_from_dict(TrainConfig, data, "train")
    assert e.value.key == key


def _run(tmp_path, *extra):
    return resolve_run_config(
        config="configs/debug.toml", overrides=[f"train.run_dir={tmp_path / 'run'}", *extra]
    )


def test_plan_user_errors(tmp_path):
    data = write_synthetic_prepared(tmp_path / "d", num_train=16, num_eval=4, seq_len=8, vocab_size=600)
    with pytest.raises(UserError, match="not a prepared directory"):
        plan(_run(tmp_path, f"data.prepared={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        plan(_run(tmp_path, f"data.prepared={data}"))  # debug.toml's vocab 512 < tokenizer's 600
    p = plan(_run(tmp_path, f"data.prepared={data}", "model.vocab_size=600", "train.tokens=1000"))
    assert p["global_batch"] == 8 and p["steps"] == 16  # ceil(1000 / (8 * 8))
    assert p["ds_config"]["train_batch_size"] == 8 and 0 < p["activation_ratio"] < 1
    # an existing checkpoint and resume = "never"
    d = tmp_path / "run" / "checkpoints" / ck.step_dir_name(4)
    d.mkdir(parents=True)
    ck.write_manifest(d, 0, 1, 4)
    with pytest.raises(UserError, match='resume = "never"'):
        plan(_run(tmp_path, f"data.prepared={data}", "model.vocab_size=600", "train.resume=never"))
    with pytest.raises(ConfigError, match="train.resume"):
        plan(
            _run(tmp_path, f"data.prepared={data}", "model.vocab_size=600", f"train.resume={tmp_path / 'x'}")
        )


def test_corrupt_shard_fail_or_skip(tmp_path):
    data = write_synthetic_prepared(tmp_path / "d", num_train=16, num_eval=4, seq_len=8, vocab_size=64)
    (data / "train" / "part-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="corrupt"):
        check_prepared(data, "fail")
    p = check_prepared(data, "skip")
    assert p.num_train == 16 and len(p.train_files) == 1 and p.skipped[0].endswith("part-00001.parquet")


class _Iter:
    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, batch_size, batch_format):
        yield from self.batches


def _batch(ids, rows_RL, dtype=np.uint16):
    """A batch as the shards hold it: fixed-size binary rows (or, dtype None, list<int32>)."""
    if dtype is None:
        ids_col = pa.array(rows_RL.tolist(), pa.list_(pa.int32()))
    else:
        data = np.ascontiguousarray(rows_RL, dtype=dtype)
        ids_col = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(data[0].nbytes), len(data), [None, pa.py_buffer(data)]
        )
    return pa.table({"sample_id": pa.array(ids, pa.int64()), "input_ids": ids_col})


def test_build_table_dense_and_renumbered():
    rows = np.arange(12, dtype=np.int32).reshape(4, 3)
    t = build_table(_Iter([_batch([2, 0], rows[[2, 0]]), _batch([3, 1], rows[[3, 1]])]), 4, 3)
    assert np.array_equal(t, rows) and t.dtype == np.uint16
    # ids 5, 9 (a skipped shard left gaps): renumbered 0, 1 in id order; int32 and list shards too
    for dtype in (np.int32, None):
        t = build_table(_Iter([_batch([9, 5], rows[[1, 0]], dtype)]), 2, 3)
        assert np.array_equal(t, rows[:2]) and t.dtype == np.int32
    with pytest.raises(UserError, match="expected 3"):
        build_table(_Iter([_batch([0], rows[:1])]), 3, 3)
    with pytest.raises(UserError, match="rows have 1.5 tokens .*seq_len\\+1 = 4"):
        build_table(_Iter([_batch([0], rows[:1])]), 1, 4)
    with pytest.raises(UserError, match="rows have 3 tokens .*seq_len\\+1 = 6"):
        build_table(_Iter([_batch([0], rows[:1])]), 1, 6, "uint16")


def test_build_table_dense_lands_each_batch_at_its_ids():
    rows = np.arange(15, dtype=np.int32).reshape(5, 3)
    batches = [_batch([3, 0], rows[[3, 0]]), _batch([4, 1, 2], rows[[4, 1, 2]])]
    t = build_table(_Iter(batches), 5, 3, dense=True)
    assert np.array_equal(t, rows) and t.dtype == np.uint16
    with pytest.raises(UserError, match="sample ids outside 0..1"):
        build_table(_Iter([_batch([0, 2], rows[:2])]), 2, 3, dense=True)
    with pytest.raises(UserError, match="repeats sample ids"):
        build_table(_Iter([_batch([0, 0], rows[:2])]), 2, 3, dense=True)


class _NoRead:
    def iter_batches(self, **_):
        raise AssertionError("a complete disk table must not be read again")


def _spec(tmp_path, data="d", **cfg):
    d = tmp_path / data
    if not d.exists():
        write_synthetic_prepared(d, num_train=40, num_eval=8, seq_len=8, vocab_size=64)
    p = check_prepared(d)
    c = DataConfig(prepared=str(d), table_dir=str(tmp_path / "tables"), **cfg)
    return p, table_spec(c, p, "train", 9)


def _prepared_iter(p):
    import pyarrow.parquet as pq

    return _Iter([pq.read_table(f) for f in reversed(p.train_files)] or [])


def _files(d):
    return sorted(f.name.replace(socket.gethostname(), "HOST") for f in d.iterdir())


def test_table_spec_modes_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="data.table="):
        DataConfig(table="ram")
    with pytest.raises(ConfigError, match="data.table_memory_mb"):
        DataConfig(table_memory_mb=-1)
    _, auto_small = _spec(tmp_path)
    assert not auto_small.disk and auto_small.dense and auto_small.nbytes == 40 * 9 * 2
    _, auto_big = _spec(tmp_path, table_memory_mb=0)
    _, disk = _spec(tmp_path, table="disk")
    _, memory = _spec(tmp_path, table="memory", table_memory_mb=0)
    assert auto_big.disk and disk.disk and not memory.disk
    # the key is the data's: runs on the same shards share a file, other shards get their own
    _, other_data = _spec(tmp_path, data="d2", table="disk")
    assert disk.key == auto_big.key != other_data.key
    assert disk.path.parent == tmp_path / "tables" / "dsv3ray-tables"


def test_disk_table_written_once_per_node_mapped_and_reused(tmp_path):
    p, spec = _spec(tmp_path, table="disk")
    in_memory = build_table(_prepared_iter(p), 40, 9, "uint16", dense=True)
    lines = []
    t = load_table(_prepared_iter(p), spec, local_rank=0, log=lines.append)
    assert isinstance(t, np.memmap) and not t.flags.writeable and np.array_equal(t, in_memory)
    assert t.dtype == np.uint16 and "written to" in lines[0]
    name = spec.path.name
    me = f"HOST-{os.getpid()}"
    assert _files(spec.path.parent) == [".lock", name, f"{name}.holder-{me}", f"{name}.json", f"{name}.lock"]
    # the node's first worker of a restarted group (or of another run on the same data) maps the
    # complete file and reads nothing, though the run that wrote it is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = spec.path.parent / f"{name}.holder-{socket.gethostname()}-{os.getpid()}"
    mine.rename(mine.with_name(f"{name}.holder-{socket.gethostname()}-{dead.pid}"))
    again = load_table(_NoRead(), spec, local_rank=0, log=lines.append)
    assert np.array_equal(again, in_memory) and "written earlier" in lines[1]
    assert _files(spec.path.parent) == [".lock", name, f"{name}.holder-{me}", f"{name}.json", f"{name}.lock"]
    # another run holds it too (a live process): released by this run, the table stays; once the
    # other run is gone, the next release anywhere on the node removes it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (spec.path.parent / f"{name}.holder-{socket.gethostname()}-{other.pid}").touch()
    release_table(spec)
    assert spec.path.is_file()
    other.kill()
    other.wait()
    release_table(spec)
    assert _files(spec.path.parent) == [".lock", f"{name}.lock"]
    # a worker of the node that is not its first waits for the file, then maps it
    got = {}
    waiter = threading.Thread(target=lambda: got.update(t=map_table(spec.path, poll_s=0.01)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    load_table(_prepared_iter(p), spec, local_rank=0, log=lines.append)
    waiter.join(10)
    assert np.array_equal(got["t"], in_memory)


def test_a_restarted_run_holds_all_its_tables_before_loading_one(tmp_path):
    """The first split's load collects tables no live run holds: the run's other split, whose
    holder died with the last start, must be held again first."""
    import pyarrow.parquet as pq

    p, train = _spec(tmp_path, table="disk")
    ev = table_spec(DataConfig(table="disk", table_dir=str(tmp_path / "tables")), p, "eval", 9)
    load_table(_prepared_iter(p), train, 0, log=lambda _: None)
    load_table(_Iter([pq.read_table(f) for f in p.eval_files]), ev, 0, log=lambda _: None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for h in train.path.parent.glob("*.holder-*"):
        h.rename(h.with_name(h.name.replace(f"-{os.getpid()}", f"-{dead.pid}")))
    hold_tables([train, ev])
    for spec in (train, ev):
        assert load_table(_NoRead(), spec, 0, log=lambda _: None).shape[1] == 9


def test_disk_table_renumbers_skipped_shards_and_cleans_up(tmp_path):
    rows = np.arange(12, dtype=np.int32).reshape(4, 3)
    spec = data_mod.TableSpec(
        "train", 2, 3, "int32", dense=False, disk=True, key="k", table_dir=str(tmp_path)
    )
    # partial files of a dead writer are removed, a live one's are not
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spec.path.parent.mkdir(parents=True)
    host = socket.gethostname()
    (spec.path.parent / f"x.tokens.tmp-{host}-{dead.pid}").write_bytes(b"partial")
    (spec.path.parent / f"y.tokens.tmp-{host}-{os.getpid()}").write_bytes(b"partial")
    t = load_table(_Iter([_batch([9, 5], rows[[1, 0]], np.int32)]), spec, 0, log=lambda _: None)
    assert np.array_equal(t, rows[:2]) and t.dtype == np.int32
    left = _files(spec.path.parent)
    me = f"HOST-{os.getpid()}"
    assert left == [
        ".lock", "k.train.tokens", f"k.train.tokens.holder-{me}", "k.train.tokens.json", "k.train.tokens.lock",
        f"y.tokens.tmp-{me}",
    ]  # fmt: skip
    # a write that fails after its file was made leaves no partial file behind
    bad = data_mod.TableSpec("eval", 2, 3, "int32", dense=True, disk=True, key="k", table_dir=str(tmp_path))
    with pytest.raises(UserError, match="outside 0..1"):
        load_table(
            _Iter([_batch([0, 1], rows[:2], np.int32), _batch([7], rows[:1], np.int32)]), bad, 0, print
        )
    assert not [f for f in _files(spec.path.parent) if f.startswith("k.eval.tokens.tmp")]


def test_disk_table_without_room_is_one_line(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    p, spec = _spec(tmp_path, table="disk")
    with pytest.raises(UserError, match=r"token table .* \(No space left on device\): set data.table_dir"):
        load_table(_prepared_iter(p), spec, local_rank=0, log=lambda _: None)
    assert not [f for f in spec.path.parent.iterdir() if ".tmp-" in f.name]


def test_cli_train_prints_one_line_and_exits_2(tmp_path, capsys):
    rc = main(["train", "--config", "configs/debug.toml", "--set", f"data.prepared={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "dsv3ray train: error:" in err and "Traceback" not in err


# --- elastic train.num_workers = [min, max] -------------------------------------------------------


def test_num_workers_pair_accepted():
    c = section_from_dict(TrainConfig, {"num_workers": [1, 4], "ep_size": 2}, "train")
    assert (c.min_workers, c.max_workers, c.elastic) == (1, 4, True)
    c = section_from_dict(TrainConfig, {"num_workers": 3}, "train")
    assert (c.min_workers, c.max_workers, c.elastic) == (3, 3, False)


@pytest.mark.parametrize(
    "value, key",
    [
        ([2, 1], "train.num_workers"),  # min > max
        ([0, 2], "train.num_workers"),
        ([1, 2, 3], "train.num_workers"),
        ([1], "train.num_workers"),
        ("two", "train.num_workers"),
        ([True, 2], "train.num_workers"),
    ],
)
def test_num_workers_bad_pairs_one_line(value, key):
    with pytest.raises(ConfigError) as e:
        section_from_dict(TrainConfig, {"num_workers": value}, "train")
    assert e.value.key == key and "\n" not in str(e.value)


def test_elastic_ep_size_must_divide_max(tmp_path):
    with pytest.raises(ConfigError, match=r"must divide train.num_workers=3 \(the maximum\)") as e:
        section_from_dict(TrainConfig, {"num_workers": [2, 3], "ep_size": 2}, "train")
    assert e.value.key == "train.ep_size"
    # the cross-section rule in the run config: ep_size divides the max and the routed experts
    run = _run(tmp_path, "train.num_workers=[1, 4]", "train.ep_size=4")
    assert run.train.max_workers == 4
    with pytest.raises(ConfigError, match="n_routed_experts"):
        _run(tmp_path, "train.num_workers=[1, 6]", "train.ep_size=3")  # debug: 16 routed experts


def test_cli_config_prints_num_workers_pair(capsys):
    rc = main(["config", "--config", "configs/debug.toml", "--set", "train.num_workers=[1, 2]"])
    out = capsys.readouterr().out
    assert rc == 0 and "num_workers = [1, 2]" in out
    rc = main(["config", "--config", "configs/debug.toml", "--set", "train.num_workers=[3, 2]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "train.num_workers" in err


def test_plan_elastic_global_batch_fixed_at_max(tmp_path):
    data = write_synthetic_prepared(tmp_path / "d", num_train=16, num_eval=4, seq_len=8, vocab_size=64)
    run = _run(tmp_path, f"data.prepared={data}", "train.num_workers=[1, 4]", "train.grad_accum=2")
    p = plan(run)
    assert p["global_batch"] == 4 * 2 * 4  # micro x grad_accum x MAX workers
    assert p["ds_config"]["train_batch_size"] == 32


@pytest.mark.parametrize(
    "G, gas, world, micro, tbs",
    [
        (32, 2, 4, 4, 32),  # the max group: the configured micro-batch
        (32, 2, 1, 16, 32),  # one worker takes the whole global batch, same train_batch_size
        (12, 1, 2, 6, 12),
        (3, 1, 2, 2, 4),  # uneven: nominal (largest slice); loss weights keep the math
    ],
)
def test_ds_config_for_world(G, gas, world, micro, tbs):
    ds = {"train_micro_batch_size_per_gpu": 99, "gradient_accumulation_steps": gas, "train_batch_size": 1}
    out = ds_config_for_world(ds, G, world)
    assert out["train_micro_batch_size_per_gpu"] == micro and out["train_batch_size"] == tbs
    assert out["train_batch_size"] == micro * gas * world  # DeepSpeed's own assertion
    assert ds["train_batch_size"] == 1  # the driver's config is not changed


def test_prepared_without_eval_rows(tmp_path):
    """A small corpus can leave the eval split empty: one line saying what to do, and with
    data.eval_split = "train" (evaluate on training rows) it is fine."""
    import json
    import shutil

    data = write_synthetic_prepared(tmp_path / "d", num_train=16, num_eval=4, seq_len=8, vocab_size=64)
    shutil.rmtree(data / "eval")  # what prepare leaves when no document fell in eval_fraction
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "num_eval": 0}))
    with pytest.raises(UserError, match='no eval rows .*data.eval_split = "train"'):
        check_prepared(data)
    p = check_prepared(data, need_eval=False)
    assert p.num_train == 16 and p.num_eval == 0 and p.eval_files == []
