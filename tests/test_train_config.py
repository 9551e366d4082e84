"""Fast checks of the training entry (no Ray): config validation and user errors as one line."""

import numpy as np
import pyarrow as pa
import pytest

from dsv3ray import checkpoint as ck
from dsv3ray.cli import main
from dsv3ray.config import section_from_dict
from dsv3ray.data import build_table, check_prepared, write_synthetic_prepared
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
