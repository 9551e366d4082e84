"""benchmarks/faults.py: how it reads samples lost / repeated and the teacher's time lost (no Ray;
the full benchmark runs two trainings and takes minutes: `python benchmarks/faults.py --quick`)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import faults  # noqa: E402

from pipelines.sampler import CurriculumSampler  # noqa: E402


def _run(sampler, steps, batch):
    for step in range(1, steps + 1):
        sampler.batch_for_step(step, batch)
        sampler.commit(step)


def test_ledger_counts_full_epoch_short_epoch_and_duplicates():
    n, batch = 24, 4
    expected = np.arange(n)
    full = CurriculumSampler(n, seed=0)
    _run(full, n // batch, batch)
    assert faults.ledger_counts(full.state_dict(), expected) == {
        "samples_expected": n,
        "samples_committed": n,
        "samples_lost": 0,
        "samples_repeated": 0,
    }
    short = CurriculumSampler(n, seed=0)
    _run(short, n // batch - 1, batch)  # one step never committed: its ids are lost
    assert faults.ledger_counts(short.state_dict(), expected)["samples_lost"] == batch
    # ids committed a second time in the same epoch (what a ledger restored out of step with the
    # weights would do) are counted as repeated
    redo = CurriculumSampler(n, seed=0)
    _run(redo, 2, batch)
    consumed = np.flatnonzero(np.unpackbits(redo.state_dict()["ledger"][0], count=n))
    redo._pending[3] = [(0, consumed[:batch])]
    redo.commit(3)
    got = faults.ledger_counts(redo.state_dict(), expected)
    assert got["samples_repeated"] == batch and got["samples_lost"] == n - 2 * batch


def test_teacher_numbers_from_step_events():
    # steps 1..6 one second apart; the teacher dies at t=2.5 (after step 2): step 3's labels were
    # asked before the kill, steps 3 and 4 fell back to CE, step 5 is the first relabelled one
    ev = {
        "train/bad_steps": [(float(t), t, 0.0) for t in range(1, 7)],
        "distill/kd_loss": [(1.0, 1, 0.5), (2.0, 2, 0.5), (5.0, 5, 0.5), (6.0, 6, 0.5)],
        "distill/fallback_batches": [(1.0, 1, 0), (2.0, 2, 0), (3.0, 3, 1), (4.0, 4, 2), (5.0, 5, 2)],
        "distill/wait_s": [(float(t), t, 0.25) for t in range(1, 7)],
    }
    got = faults.teacher_numbers(ev, t_kill=2.5, prefetch=2)
    assert got == {
        "killed_after_step": 2,
        "first_labelled_step_after_restart": 5,
        "time_lost_s": 2.5,
        "label_wait_after_kill_s": 1.0,
        "fallback_batches_rank0": 2,
        "fallback_steps_rank0": [3, 4],
    }
