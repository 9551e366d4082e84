"""Fault tolerance of a real Ray Train + DeepSpeed run (2 workers x EP=2 on CPU).

One run, two real worker deaths (SIGKILL of the worker process): one mid-epoch, one in the middle
of a checkpoint write (after DeepSpeed's files, before the manifest). FailureConfig restarts the
group from the last complete checkpoint both times; the sampler ledger restored WITH the
checkpoint keeps every epoch exactly-once.
"""

import pytest

from dsv3ray.data import write_synthetic_prepared
from dsv3ray.runconfig import resolve_run_config
from dsv3ray.train import train

pytestmark = pytest.mark.slow

BASE = [
    "model.vocab_size=128",
    "model.num_hidden_layers=2",
    "model.max_position_embeddings=64",
    "train.num_workers=2",
    "train.ep_size=2",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
]


def test_worker_killed_mid_epoch_and_mid_checkpoint(ray_local, worker_lines, tmp_path):
    data = write_synthetic_prepared(tmp_path / "data", num_train=64, num_eval=8, seq_len=16, vocab_size=128)
    written, mapped = worker_lines("table: 64 rows x 17 ids"), worker_lines("(written earlier on this node)")
    run = resolve_run_config(
        config="configs/debug.toml",
        overrides=BASE
        + [
            f"data.prepared={data}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=10",  # global batch 8 over 64 samples: epoch 0 ends at step 8
            "train.checkpoint_every=3",
            "train.kill_at_step=5",  # dies mid-epoch -> resumes from step 3
            "train.kill_in_checkpoint_step=6",  # dies while writing step 6 -> resumes from step 3 again
            "train.max_failures=2",
            # the tables on disk: each start's workers on this node map the file the first start wrote
            "data.table=disk",
            f"data.table_dir={tmp_path / 'tables'}",
        ],
    )
    s = train(run)
    assert s["restarts"] == 2
    assert s["data_tables"] == {"train": "disk", "eval": "disk"}
    assert worker_lines("table: 64 rows x 17 ids") == written + 1  # train: one write
    assert worker_lines("(written earlier on this node)") == mapped + 4  # 2 restarts x 2 splits
    left = (tmp_path / "tables" / "dsv3ray-tables").iterdir()
    assert not [f for f in left if not f.name.endswith(".lock")]  # removed at the end (lock files stay)
    assert s["steps"] == 10 and s["resumed_from_step"] == 3
    sampler = s["sampler"]
    # epoch 0 finished: every one of the 64 samples exactly once; 10 steps x 8 committed once each
    assert sampler["epoch"] == 1 and sampler["duplicates"] == 0
    assert sampler["samples_drawn"] == 80 and sampler["consumed"] == 16
    # The loss continues from the checkpoint: each attempt wrote its own event file, and the
    # attempts that re-ran step 4 from the step-3 checkpoint (weights, optimizer, RNG, sampler
    # ledger + curriculum state) reproduce the first attempt's step-4 loss.
    per_attempt = _ce_per_event_file(tmp_path / "run" / "tb")
    assert len(per_attempt) == 3
    step4 = [a[4] for a in per_attempt if 4 in a]
    assert len(step4) == 3 and max(step4) - min(step4) < 1e-3, step4
    assert s["first_ce_after_resume"] == pytest.approx(step4[-1], abs=1e-5)
    assert s["first_ce_after_resume"] < per_attempt[0][1] - 0.2  # not a fresh start
    assert s["bad_steps"] == 0


def _ce_per_event_file(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        out.append({e.step: e.value for e in acc.Scalars("train/ce_loss")})
    return out


def test_worker_side_user_error_is_one_line_without_retries(ray_local, tmp_path):
    """A mistake only the workers see (rows wider than meta.json's seq_len, found while building the
    id -> tokens table) reaches the driver as one UserError line, not a Ray/DeepSpeed traceback.
    The table is on disk: the node's other worker, waiting for the file that will never come, is
    stopped with the group, and no partial file is left."""
    import json

    from dsv3ray.errors import UserError

    data = write_synthetic_prepared(tmp_path / "data", num_train=16, num_eval=4, seq_len=16, vocab_size=128)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "seq_len": 15}))
    run = resolve_run_config(
        config="configs/debug.toml",
        overrides=BASE
        + [
            f"data.prepared={data}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.num_workers=2",
            "train.ep_size=1",
            "train.steps=1",
            "train.max_failures=1",  # (the restarted group returns at once: see train_loop)
            "data.table=disk",
            f"data.table_dir={tmp_path / 'tables'}",
        ],
    )
    with pytest.raises(UserError, match="data rows have 17 tokens .*seq_len\\+1 = 16") as e:
        train(run)
    assert "\n" not in str(e.value) and "re-run `dsv3ray prepare`" in str(e.value)
    assert not [f for f in (tmp_path / "tables").rglob("*") if f.is_file() and not f.name.endswith(".lock")]
