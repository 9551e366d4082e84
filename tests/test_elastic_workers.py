"""Elastic `train.num_workers = [min, max]` end to end on the 2-CPU local Ray.

The run asks for [1, 2] workers x EP=2, but each worker needs 1.5 CPUs ([hetero]
resources_per_worker), so Ray Train's elastic policy starts the group with the one worker that
fits. That worker runs the whole global batch sized for the max (micro 4 x grad_accum 1 x 2
workers = 8 samples a step), at the EP size one worker supports (1), and the summary/report say
how many workers ran.
"""

import json

import pytest
from test_train import _run  # noqa: E402  (the same tiny model/data setup as the fixed-size run)

from dsv3ray import checkpoint as ck
from dsv3ray.data import write_synthetic_prepared
from dsv3ray.hetero import read_elastic_meta
from dsv3ray.metrics import read_scalars
from dsv3ray.train import train

pytestmark = pytest.mark.slow


def test_elastic_one_of_two_workers_trains_the_max_global_batch(ray_local, tmp_path):
    data = write_synthetic_prepared(tmp_path / "data", num_train=64, num_eval=16, seq_len=16, vocab_size=128)
    run_dir = tmp_path / "run"
    run = _run(
        data,
        run_dir,
        "train.num_workers=[1, 2]",
        "train.ep_size=2",
        "train.steps=4",
        "hetero.resources_per_worker.CPU=1.5",  # only one worker fits the 2-CPU Ray
    )
    s = train(run)
    assert s["num_workers"] == [1, 2] and s["world_size"] == 1 and s["ep_size"] == 1
    assert s["global_batch"] == 8 and s["steps"] == 4 and s["tokens"] == 4 * 8 * 16
    # the one worker drew the full global batch of the max group every step
    assert s["sampler"]["samples_drawn"] == 32 and s["sampler"]["duplicates"] == 0
    ce = [v for _, v in read_scalars(run_dir / "tb")["train/ce_loss"]]
    assert len(ce) == 4 and ce[-1] < ce[0], ce
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["world_size"] == 1 and rep["num_workers"] == [1, 2]
    final = ck.latest_valid(run_dir / "checkpoints")
    assert ck.validate(final).world_size == 1 and read_elastic_meta(final)["ep_size"] == 1
