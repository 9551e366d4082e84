"""The run state a training checkpoint carries besides the weights (state.pt, loaded with
weights_only=True): every rank's Distiller counters and the running cost so far survive a restart.

The end-to-end checks (a real worker restart / resume) are in test_distill.py (counters) and
test_train.py (cost); here the same save/load helpers run without Ray, on 2 gloo ranks.
"""

import pytest
import torch.distributed as dist
from distributed import spawn

from dsv3ray import checkpoint as ck
from dsv3ray.cost import RunningCost
from dsv3ray.distill import DistillConfig, Distiller
from dsv3ray.train import _staging_dir, gather_distiller_states, remove_stale_staging, restore_distiller


def _distiller(rank: int) -> Distiller:
    return Distiller(DistillConfig(teacher="t"), teachers=[object()], rank=rank)


def _used(d: Distiller, rank: int) -> Distiller:
    """A Distiller some steps into a run: rank-specific totals of every kind."""
    d.counters.update(
        kd_batches=5 + rank, fallback_batches=2 + rank, teacher_errors=1, timeouts=rank, refetched=3
    )
    d._wait_s, d.teacher_ce_ema = 1.25 + rank, 3.5
    d._label_bytes, d._label_tokens = 4800 * (rank + 1), 100
    return d


def _round_trip(rank, world, ckpt_dir):
    """The trainer's path: gather (collective) -> rank 0 saves state.pt -> every rank loads it."""
    states = gather_distiller_states(_used(_distiller(rank), rank), world)
    if rank == 0:
        ck.save_train_state(ckpt_dir, {"step": 7, "distiller": states})
    dist.barrier()
    fresh = _distiller(rank)
    restore_distiller(fresh, ck.load_train_state(ckpt_dir), rank)
    assert fresh.summary() == _used(_distiller(rank), rank).summary()
    assert fresh.state_dict() == _used(_distiller(rank), rank).state_dict()
    assert fresh._counter_metrics()["distill/fallback_batches"] == 2 + rank


def test_distiller_counters_round_trip_through_the_checkpoint_per_rank(tmp_path):
    spawn(_round_trip, 2, str(tmp_path), init="torch")


def test_restore_distiller_without_saved_state_or_rank_keeps_zeros(tmp_path):
    ck.save_train_state(tmp_path, {"step": 3, "distiller": [_used(_distiller(0), 0).state_dict()]})
    state = ck.load_train_state(tmp_path)
    d = _distiller(1)
    restore_distiller(d, state, rank=1)  # a larger elastic group: rank 1 was not saved
    assert d.summary()["distill_kd_batches"] == 0
    restore_distiller(None, state, rank=0)  # no [distill]: nothing to restore
    restore_distiller(d, {"step": 3}, rank=0)  # a checkpoint from before the counters were saved
    assert d.summary()["distill_fallback_batches"] == 0


def test_running_cost_so_far_is_plain_floats_that_load_weights_only(tmp_path):
    spent = RunningCost("CPU", 2).at(1800.0)
    ck.save_train_state(tmp_path, {"step": 3, "spent": spent})
    loaded = ck.load_train_state(tmp_path)["spent"]
    assert loaded == spent and loaded["gpu_hours"] == pytest.approx(1.0)


def test_staging_dirs_of_dead_workers_are_removed(tmp_path, monkeypatch):
    """A worker SIGKILLed while saving leaves its staged checkpoint in the temp dir; the next
    worker start removes it, and never a live process's staging dir or anything else."""
    import os
    import subprocess
    import sys
    import tempfile

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    gone = tmp_path / f"dsv3ray-ckpt-6-r1-p{dead_pid}-abc"
    (gone / "ds").mkdir(parents=True)
    (gone / "ds" / "model.pt").write_bytes(b"x" * 100)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = _staging_dir(8, 0)  # this process: alive
    assert mine.parent == tmp_path and f"-p{os.getpid()}-" in mine.name
    other = tmp_path / "dsv3ray-ckpt-notours"  # not a staging name: left alone
    other.mkdir()
    assert remove_stale_staging() == [gone]
    assert not gone.exists() and mine.is_dir() and other.is_dir()
    assert remove_stale_staging(tmp_path) == []
