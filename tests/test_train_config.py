"""Fast checks of the training entry (no Ray): config validation and user errors as one line."""

import numpy as np
import pytest

from dsv3ray import checkpoint as ck
from dsv3ray.cli import main
from dsv3ray.config import section_from_dict
from dsv3ray.data import build_table, check_prepared, write_synthetic_prepared
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.runconfig import resolve_run_config
from dsv3ray.train import TrainConfig, plan


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


def test_build_table_dense_and_renumbered():
    rows = np.arange(12, dtype=np.int32).reshape(4, 3)
    obj = np.empty(2, dtype=object)
    obj[:] = [rows[3], rows[1]]
    t = build_table(
        _Iter(
            [
                {"sample_id": np.array([2, 0]), "input_ids": np.stack([rows[2], rows[0]])},
                {"sample_id": np.array([3, 1]), "input_ids": obj},
            ]
        ),
        4,
        3,
    )
    assert np.array_equal(t, rows)
    # ids 5, 9 (a skipped shard left gaps): renumbered 0, 1 in id order
    t = build_table(_Iter([{"sample_id": np.array([9, 5]), "input_ids": np.stack([rows[1], rows[0]])}]), 2, 3)
    assert np.array_equal(t, rows[:2])
    with pytest.raises(UserError, match="expected 3"):
        build_table(_Iter([{"sample_id": np.array([0]), "input_ids": rows[:1]}]), 3, 3)


def test_cli_train_prints_one_line_and_exits_2(tmp_path, capsys):
    rc = main(["train", "--config", "configs/debug.toml", "--set", f"data.prepared={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "dsv3ray train: error:" in err and "Traceback" not in err
