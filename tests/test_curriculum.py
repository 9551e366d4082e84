"""Curriculum controller + exactly-once sampler: schedule, planted hard samples, resume, crash."""

import copy

import numpy as np
import pytest

from actors.curriculum import CurriculumConfig, CurriculumController
from dsv3ray.config import section_from_dict
from dsv3ray.errors import ConfigError
from pipelines.sampler import CurriculumSampler

N, HARD = 1000, np.arange(0, 1000, 10)  # every 10th sample is hard (10%)


def loss_of(ids):
    return np.where(np.isin(ids, HARD), 6.0, 2.0) + 0.01 * (ids % 7)


def run(sampler, steps, batch, start=0):
    """Drive the protocol; returns the ids of each step."""
    out = []
    for step in range(start, start + steps):
        ids = sampler.batch_for_step(step, batch)
        assert np.array_equal(ids, sampler.batch_for_step(step, batch))  # idempotent per step
        sampler.report_losses(ids, loss_of(ids))
        sampler.commit(step)
        out.append(ids)
    return out


def test_config_checks():
    with pytest.raises(ConfigError, match="curriculum.temperature"):
        section_from_dict(CurriculumConfig, {"temperature": 0.0}, "curriculum")
    with pytest.raises(ConfigError, match="curriculum.bogus"):
        section_from_dict(CurriculumConfig, {"bogus": 1}, "curriculum")


def test_controller_ema_and_schedule():
    c = CurriculumController(4, CurriculumConfig(warmup_fraction=0.5, ema_decay=0.5))
    assert c.weights(0.9) is None  # nothing reported yet: uniform
    c.report([0, 1, 2], [1.0, 1.0, 5.0])
    c.report([2], [3.0])
    assert c.difficulty_N[2] == pytest.approx(4.0)  # 0.5 * 5 + 0.5 * 3
    assert c.weights(0.2) is None  # warmup: uniform
    w = c.weights(0.8)
    assert w[2] > w[3] > w[0]  # hard > unseen (mean) > easy
    c2 = CurriculumController(4, c.cfg)
    c2.load_state_dict(copy.deepcopy(c.state_dict()))
    np.testing.assert_array_equal(c2.weights(0.8), w)


def test_planted_hard_samples_rise_late_and_every_epoch_is_exactly_once():
    batch, epochs = 50, 4
    steps_per_epoch = N // batch
    s = CurriculumSampler(
        N,
        seed=3,
        curriculum_cfg=CurriculumConfig(warmup_fraction=0.25, temperature=0.5),
        total_samples=epochs * N,
    )
    draws = run(s, epochs * steps_per_epoch, batch)
    for e in range(epochs):
        epoch_ids = np.concatenate(draws[e * steps_per_epoch : (e + 1) * steps_per_epoch])
        assert np.array_equal(np.sort(epoch_ids), np.arange(N))  # none twice, none skipped
    hard_frac = [np.isin(d, HARD).mean() for d in draws]
    head = 2  # the first 100 draws of an epoch: room for all 100 hard samples
    early = np.mean(hard_frac[:head])  # head of epoch 0 (uniform phase): ~10%
    late = np.mean(hard_frac[3 * steps_per_epoch : 3 * steps_per_epoch + head])  # head of epoch 3
    assert early < 0.25
    assert late > 0.7  # hard samples now come first in the epoch
    assert s.stats()["duplicates"] == 0 and s.stats()["epoch"] == epochs


def test_curriculum_off_is_uniform():
    s = CurriculumSampler(N, seed=3, curriculum_cfg=CurriculumConfig(enabled=False), total_samples=2 * N)
    draws = run(s, 40, 50)
    assert np.mean([np.isin(d, HARD).mean() for d in draws[20:25]]) < 0.25


def test_resume_reproduces_the_draw_order():
    cfg = CurriculumConfig(warmup_fraction=0.1)
    a = CurriculumSampler(N, seed=7, curriculum_cfg=cfg, total_samples=3 * N)
    run(a, 10, 64)
    state = copy.deepcopy(a.state_dict())
    rest_a = run(a, 30, 64, start=10)
    b = CurriculumSampler(N, seed=7, curriculum_cfg=cfg, total_samples=3 * N)
    b.load_state_dict(state)
    rest_b = run(b, 30, 64, start=10)
    for x, y in zip(rest_a, rest_b):
        np.testing.assert_array_equal(x, y)
    c = CurriculumSampler(N, seed=8, curriculum_cfg=cfg, total_samples=3 * N)
    assert not np.array_equal(run(c, 1, 64)[0], run(CurriculumSampler(N, 7, cfg), 1, 64)[0])


def test_crash_restore_exactly_once_with_straddling_batches():
    """Crash after drawing (not committing) steps, restore an older checkpoint, continue."""
    batch = 96  # does not divide N: batches straddle epochs
    s = CurriculumSampler(N, seed=1, curriculum_cfg=CurriculumConfig(warmup_fraction=0.0))
    committed = run(s, 8, batch)
    ckpt = copy.deepcopy(s.state_dict())
    committed_after_ckpt = run(s, 3, batch, start=8)  # lost with the crash
    s.batch_for_step(11, batch)  # drawn, never committed
    s.batch_for_step(12, batch)  # prefetched: must not overlap step 11
    assert not np.intersect1d(s.batch_for_step(11, batch), s.batch_for_step(12, batch)).size
    del committed_after_ckpt
    r = CurriculumSampler(N, seed=1, curriculum_cfg=CurriculumConfig(warmup_fraction=0.0))
    r.load_state_dict(ckpt)
    committed += run(r, 2 * N // batch + 3 - 8, batch, start=8)
    flat = np.concatenate(committed)
    assert flat.size >= 2 * N
    for e in range(2):
        np.testing.assert_array_equal(np.sort(flat[e * N : (e + 1) * N]), np.arange(N))
    assert r.stats()["duplicates"] == 0
    assert len(r.state_dict()["ledger"]) <= 2  # compact: one bitmap per open epoch


def test_errors():
    s = CurriculumSampler(10, seed=0)
    s.batch_for_step(0, 4)
    with pytest.raises(ValueError, match="global batch 4"):
        s.batch_for_step(0, 5)
    with pytest.raises(ValueError, match="not drawn"):
        s.commit(3)
    s.commit(0)
    with pytest.raises(ValueError, match="already committed"):
        s.batch_for_step(0, 4)
    with pytest.raises(ValueError, match="same prepared data"):
        CurriculumSampler(11, seed=0).load_state_dict(s.state_dict())


def run_ahead(sampler, steps, batch, start=0, last_step=30):
    """The trainer's protocol: step s+1 is asked for before step s trains, then s commits (the
    run's last step asks for none). Returns the ids of each step."""
    out = []
    for step in range(start, start + steps):
        ids = sampler.batch_for_step(step, batch)
        if step < last_step:
            sampler.batch_for_step(step + 1, batch)  # drawn while `step` is pending
        sampler.report_losses(ids, loss_of(ids) + np.sin(step + ids))  # changing losses: the
        sampler.commit(step)  # weights depend on which steps were reported before a draw
        out.append(ids)
    return out


def test_draws_ahead_resume_in_the_same_order_and_exactly_once(tmp_path):
    """A checkpoint taken between steps holds the step drawn ahead; a resume answers it as the run
    did (it cannot be recomputed: it was drawn before the checkpoint's step was committed), through
    the trainer's weights_only state file; a resume with another global batch redraws it."""
    from dsv3ray import checkpoint as ck

    batch, cfg = 96, CurriculumConfig(warmup_fraction=0.0)  # weighted from the first reported loss
    a = CurriculumSampler(N, seed=5, curriculum_cfg=cfg, total_samples=3 * N)
    head = run_ahead(a, 10, batch)  # step 10 was asked for while step 9 trained
    ck.save_train_state(tmp_path, {"sampler": a.state_dict()})
    tail_a = run_ahead(a, 21, batch, start=10)

    b = CurriculumSampler(N, seed=5, curriculum_cfg=cfg, total_samples=3 * N)
    b.load_state_dict(ck.load_train_state(tmp_path)["sampler"])
    tail_b = run_ahead(b, 21, batch, start=10)
    for x, y in zip(tail_a, tail_b, strict=True):
        np.testing.assert_array_equal(x, y)
    flat = np.concatenate(head + tail_b)
    assert flat.size // N == 2  # (the third epoch is under way)
    for e in range(2):  # batches straddle epochs; each epoch has every id exactly once
        np.testing.assert_array_equal(np.sort(flat[e * N : (e + 1) * N]), np.arange(N))
    assert b.stats()["duplicates"] == 0

    c = CurriculumSampler(N, seed=5, curriculum_cfg=cfg, total_samples=3 * N)
    c.load_state_dict(ck.load_train_state(tmp_path)["sampler"])
    tail_c = run_ahead(c, 20, 100, start=10, last_step=29)  # another global batch: step 10 drawn anew
    assert tail_c[0].size == 100
    flat = np.concatenate(head + tail_c)
    for e in range(2):
        np.testing.assert_array_equal(np.sort(flat[e * N : (e + 1) * N]), np.arange(N))
    assert c.stats()["duplicates"] == 0
    with pytest.raises(ValueError, match="global batch 100"):  # a draw of this run stays strict
        c.batch_for_step(30, 100), c.batch_for_step(30, 50)
