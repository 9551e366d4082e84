"""Distillation: compression, KD loss math, stage schedule, teacher actors (with a killed teacher),
and the evidence that a distilled student beats the same student trained with CE alone."""

import os
import signal
import time

import numpy as np
import pytest
import torch

from actors.teacher import (
    InMemoryTeacher,
    TeacherWorker,
    check_teacher_matches,
    check_teacher_path,
    start_teacher_pool,
    stop_teacher_pool,
)
from dsv3ray.config import section_from_dict
from dsv3ray.distill import (
    DistillConfig,
    Distiller,
    SoftLabels,
    compress,
    export_model,
    kd_loss,
    mix_loss,
    stage_at,
)
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.model import ModelConfig, build_model

V = 32  # vocab of the tiny models and the synthetic language


def tiny_cfg(dense: bool, **kw) -> ModelConfig:
    base = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=64,
        first_k_dense_replace=2 if dense else 1,
        moe_impl="torch",
    )
    base.update(kw)
    return ModelConfig(**base)


def markov_language(seed: int = 0, concentration: float = 0.15) -> torch.Tensor:
    """A peaked random bigram language (V, V): each token has a few likely successors.

    Rows are Dirichlet(concentration) draws, made from normalized Gamma draws (seeded generator).
    """
    g = torch.Generator().manual_seed(seed)
    gam_VV = torch._standard_gamma(torch.full((V, V), concentration), generator=g) + 1e-6
    return gam_VV / gam_VV.sum(-1, keepdim=True)


def sample_sequences(trans_VV: torch.Tensor, n: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, s, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, s):
        x[:, t] = torch.multinomial(trans_VV[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("compression", "full"),
        ("k", 0),
        ("alpha", 1.5),
        ("temperature", 0.0),
        ("prefetch", 0),
        ("timeout_s", 0.0),
    ],
)
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError) as e:
        section_from_dict(DistillConfig, {key: value}, "distill")
    assert f"distill.{key}" in str(e.value) and "\n" not in str(e.value)


def test_config_sample_k_fits_uint8_and_unknown_key():
    with pytest.raises(ConfigError, match="distill.k"):
        DistillConfig(compression="sample", k=256)
    with pytest.raises(ConfigError, match="distill.topk"):
        section_from_dict(DistillConfig, {"topk": 4}, "distill")
    assert not DistillConfig().enabled and DistillConfig(teacher="t").enabled


def test_teacher_path_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_teacher_path(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="holds no model"):
        check_teacher_path(str(tmp_path))


def test_teacher_loads_from_a_run_directory_export(tmp_path):
    """A run leaves its model in <run_dir>/hf (export_model); the teacher loads the run directory."""
    torch.manual_seed(8)
    model = build_model(tiny_cfg(dense=False))
    export_model(model, tmp_path / "hf")
    assert check_teacher_path(str(tmp_path)) == tmp_path / "hf"
    worker = TeacherWorker(str(tmp_path), DistillConfig(teacher=str(tmp_path), k=3))
    x_BS = torch.randint(0, V, (2, 6))
    d = worker.label(x_BS.numpy())
    with torch.no_grad():
        logits = model(x_BS).logits
    assert np.array_equal(d["ids_BPK"], logits[:, :-1].topk(3, -1).indices.numpy())
    check_teacher_matches(str(tmp_path), V)
    with pytest.raises(UserError, match="vocab_size=32 but model.vocab_size=64"):
        check_teacher_matches(str(tmp_path), 64)


def test_demo_config_resolves_for_teacher_and_student():
    """configs/distill_demo.toml is the student's run; the teacher's run = it + the overrides
    `make demo-distill` passes (dsv3ray.demo.TEACHER_OVERRIDES, also in the config's header)."""
    from dsv3ray.runconfig import resolve_run_config

    student = resolve_run_config(config="configs/distill_demo.toml")
    assert student.distill.enabled and student.model.num_moe_layers > 0
    assert student.data.prepared == "runs/distill-teacher/data"  # the teacher's tokenizer and data
    from dsv3ray.demo import TEACHER_OVERRIDES

    teacher = resolve_run_config(config="configs/distill_demo.toml", overrides=list(TEACHER_OVERRIDES))
    assert not teacher.distill.enabled and teacher.distill.save_as_teacher
    assert teacher.model.num_moe_layers == 0  # dense: every layer an MLP
    assert teacher.model.vocab_size == student.model.vocab_size == student.prepare.vocab_size
    header = open("configs/distill_demo.toml").read().split("[model]")[0]
    assert "--set model.first_k_dense_replace=4" in header and "save_as_teacher=true" in header


# --- compression and loss ------------------------------------------------------------------------


def test_topk_compression_is_exact_and_sized():
    torch.manual_seed(0)
    logits_BSV = torch.randn(3, 7, V) * 3
    soft = compress(logits_BSV, "topk", 5, 2.0)
    ref_BPV = torch.log_softmax(logits_BSV[:, :-1] / 2.0, -1)
    top_BPK = ref_BPV.topk(5, -1)
    assert soft.ids_BPK.shape == (3, 6, 5) and soft.ids_BPK.dtype == np.int32
    assert np.array_equal(soft.ids_BPK, top_BPK.indices.numpy())
    assert torch.allclose(torch.from_numpy(soft.logp_BPK).float(), top_BPK.values, atol=2e-3)
    assert soft.bytes_per_token() == 5 * (4 + 2)


def test_sample_compression_counts_and_determinism():
    torch.manual_seed(1)
    logits_BSV = torch.randn(2, 9, V)
    a = compress(logits_BSV, "sample", 16, 1.0, generator=torch.Generator().manual_seed(3))
    b = compress(logits_BSV, "sample", 16, 1.0, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(a.ids_BPK, b.ids_BPK) and np.array_equal(a.counts_BPK, b.counts_BPK)
    assert (a.counts_BPK.sum(-1) == 16).all()  # every draw is counted exactly once
    ids, counts = a.ids_BPK.reshape(-1, 16), a.counts_BPK.reshape(-1, 16)
    for row_ids, row_counts in zip(ids, counts):
        kept = row_ids[row_counts > 0]
        assert len(set(kept.tolist())) == len(kept)  # duplicates merged
    assert a.bytes_per_token() == 16 * (4 + 2 + 1)


def test_kd_loss_with_full_support_equals_dense_kl_and_gradient():
    torch.manual_seed(2)
    T = 2.0
    teacher_BSV = torch.randn(2, 5, V) * 2
    student_BSV = torch.randn(2, 5, V, requires_grad=True)
    labels_BS = torch.randint(0, V, (2, 5))
    labels_BS[1, 3] = -100  # position 2 of sample 1 is ignored
    soft = compress(teacher_BSV, "topk", V, T)  # k = V: nothing is cut
    loss, per_sample_B = kd_loss(student_BSV, soft, T, labels_BS)
    # dense reference on the transported (fp16) teacher log-probs, scattered back to vocab order
    logp_BPV = torch.empty(2, 4, V).scatter_(
        -1, torch.from_numpy(soft.ids_BPK).long(), torch.from_numpy(soft.logp_BPK).float()
    )
    assert (logp_BPV - torch.log_softmax(teacher_BSV[:, :-1] / T, -1)).abs().max() < 5e-3
    p_BPV = torch.softmax(logp_BPV, -1)
    kl_BP = (p_BPV * (p_BPV.log() - torch.log_softmax(student_BSV[:, :-1] / T, -1))).sum(-1) * T * T
    mask_BP = (labels_BS[:, 1:] != -100).float()
    ref = (kl_BP * mask_BP).sum() / mask_BP.sum()
    assert torch.allclose(loss, ref, atol=1e-4)
    assert torch.allclose(per_sample_B[1], (kl_BP[1] * mask_BP[1]).sum() / 3, atol=1e-4)
    g, g_ref = torch.autograd.grad(loss, student_BSV)[0], torch.autograd.grad(ref, student_BSV)[0]
    assert torch.allclose(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("kind,T,dtype", [("sample", 1.5, torch.float32), ("topk", 1.0, torch.bfloat16)])
def test_kd_backward_matches_autograd_reference(kind, T, dtype):
    """The hand-written backward equals autograd through log_softmax + gather (bf16 logits too)."""
    torch.manual_seed(9)
    soft = compress(torch.randn(3, 6, V) * 2, kind, 5, T, generator=torch.Generator().manual_seed(1))
    logits_BSV = (torch.randn(3, 6, V) * 2).to(dtype).requires_grad_(True)
    labels_BS = torch.randint(0, V, (3, 6))
    labels_BS[0, 2:] = -100
    loss, _ = kd_loss(logits_BSV, soft, T, labels_BS)
    ids = torch.from_numpy(soft.ids_BPK).long()
    logp_t = torch.from_numpy(soft.logp_BPK).float()
    if kind == "topk":
        ref_BPK = torch.log_softmax(logp_t, -1)
        w_BPK = ref_BPK.exp()
    else:
        counts = torch.from_numpy(soft.counts_BPK).float()
        w_BPK, ref_BPK = counts / counts.sum(-1, keepdim=True), logp_t
    logp_s = torch.log_softmax(logits_BSV[:, :-1].float() / T, -1).gather(-1, ids)
    kl_BP = (w_BPK * (ref_BPK - logp_s)).sum(-1) * T * T
    mask_BP = (labels_BS[:, 1:] != -100).float()
    ref = (kl_BP * mask_BP).sum() / mask_BP.sum()
    assert torch.allclose(loss, ref, atol=1e-5)
    g = torch.autograd.grad(loss, logits_BSV)[0]
    g_ref = torch.autograd.grad(ref, logits_BSV)[0]
    assert g.dtype == dtype and torch.allclose(
        g.float(), g_ref.float(), atol=1e-6 if dtype == torch.float32 else 1e-3
    )
    assert (g[0, 1:] == 0).all()  # masked positions (and the last one) get no gradient


def test_sampled_labels_are_unbiased_and_topk_is_not():
    """Averaged over many draws the sampled-KD gradient equals the full-KL gradient; top-k's does not."""
    torch.manual_seed(3)
    n = 4000
    teacher_1SV = torch.randn(1, 2, V) * 1.5
    student_1SV = torch.randn(1, 2, V)
    student_NSV = student_1SV.expand(n, 2, V).clone().requires_grad_(True)
    full = (
        (
            torch.softmax(teacher_1SV[:, :1], -1)
            * (torch.log_softmax(teacher_1SV[:, :1], -1) - torch.log_softmax(student_NSV[:, :1], -1))
        )
        .sum(-1)
        .mean()
    )
    g_full = torch.autograd.grad(full, student_NSV)[0].sum(0)
    soft = compress(teacher_1SV.expand(n, 2, V), "sample", 4, 1.0, generator=torch.Generator().manual_seed(0))
    g_sample = torch.autograd.grad(kd_loss(student_NSV, soft, 1.0)[0], student_NSV)[0].sum(0)
    soft_top = compress(teacher_1SV, "topk", 4, 1.0)
    student_1SV.requires_grad_(True)
    g_top = torch.autograd.grad(kd_loss(student_1SV, soft_top, 1.0)[0], student_1SV)[0][0]
    assert (g_sample - g_full).abs().max() < 0.25 * g_full.abs().max()
    assert (g_top - g_full).abs().max() > 2 * (g_sample - g_full).abs().max()


def test_mix_loss_replaces_only_the_ce_part():
    torch.manual_seed(4)
    model = build_model(tiny_cfg(dense=False))
    x_BS = torch.randint(0, V, (2, 8))
    out = model(x_BS, labels_BS=x_BS)
    kd = torch.tensor(5.0)
    other = out.loss - out.ce_loss  # balance (+ MTP) terms
    assert torch.allclose(mix_loss(out, kd, 0.25), 0.75 * out.ce_loss + 0.25 * kd + other)
    assert torch.allclose(mix_loss(out, kd, 0.0), out.loss)


def test_stage_switch_by_steps_or_tokens_survives_resume(capsys):
    cfg = DistillConfig(teacher="t", kd_steps=10, kd_tokens=5000)
    assert stage_at(cfg, 9, 4999) == 1
    assert stage_at(cfg, 10, 0) == 2 and stage_at(cfg, 3, 5000) == 2
    assert stage_at(DistillConfig(teacher="t"), 10**9, 10**12) == 1  # no limit: KD throughout
    assert stage_at(DistillConfig(), 0, 0) == 2  # no teacher: plain CE
    d = Distiller(cfg, teachers=[object()])
    assert [d.stage(s, s * 100) for s in (8, 9, 10, 11)] == [1, 1, 2, 2]
    out = capsys.readouterr().out
    assert "switching to stage 2" in out and "step 10" in out
    resumed = Distiller(cfg, teachers=[object()])  # restored step 12 -> stage 2 from the first call
    assert resumed.stage(12, 1200) == 2
    assert "step 12 (1200 tokens) is in stage 2" in capsys.readouterr().out


class _RecordingTeacher:
    """Boundary stand-in for an actor handle: records label requests (prefetch only, no waiting)."""

    def __init__(self):
        self.requests = []
        self.label = self

    def remote(self, x, seed):
        self.requests.append((x.shape, seed))
        return object()


def test_prefetch_is_bounded_and_stops_at_stage_2_and_the_last_step():
    cfg = DistillConfig(teacher="t", prefetch=3, kd_tokens=500)
    teacher = _RecordingTeacher()
    d = Distiller(cfg, [teacher], rank=0, tokens_per_step=100, last_step=6)
    fetched = []

    def fetch(s):
        fetched.append(s)
        return [torch.zeros(2, 5, dtype=torch.long)] * 2  # two micro-batches per step

    d.prefetch(0, 0, fetch)
    assert fetched == [0, 1, 2] and len(d.pending) == 6
    d._drop_before(1)  # step 0 trained
    d.prefetch(1, 100, fetch)
    assert fetched == [0, 1, 2, 3]  # only the new step; at most `prefetch` steps ahead
    d._drop_before(3)
    d.prefetch(3, 300, fetch)  # step 5 would start at 500 tokens = stage 2: no labels needed
    assert fetched == [0, 1, 2, 3, 4]
    d2 = Distiller(DistillConfig(teacher="t", prefetch=4), [teacher], tokens_per_step=100, last_step=6)
    d2.prefetch(5, 500, fetch)
    assert fetched[-2:] == [5, 6]  # never beyond the run's last step


# --- the teacher worker (plain class) ------------------------------------------------------------


def test_teacher_worker_labels_a_batch_like_the_model():
    torch.manual_seed(5)
    teacher = build_model(tiny_cfg(dense=True))
    worker = TeacherWorker(InMemoryTeacher.from_model(teacher), DistillConfig(teacher="t", k=4))
    x_BS = torch.randint(0, V, (3, 10))
    soft = SoftLabels.from_dict({k: v for k, v in worker.label(x_BS.numpy()).items() if k != "compute_s"})
    with torch.no_grad():
        out = teacher(x_BS, labels_BS=x_BS)
    assert soft.ids_BPK.shape == (3, 9, 4)
    assert np.array_equal(soft.ids_BPK, out.logits[:, :-1].topk(4, -1).indices.numpy())
    assert np.allclose(soft.teacher_loss_B, out.loss_per_sample.numpy(), atol=1e-5)
    assert not any(p.requires_grad for p in worker.model.parameters()) and not worker.model.training


# --- teacher actors on Ray: prefetch, a killed teacher, timeouts, a dead pool ---------------------


def _train_steps(distiller, student, opt, batches, steps, prefetch=True, fetch=None):
    """The worker's step loop in miniature: prefetch ahead, forward, KD-or-CE loss, backward."""
    seen = []
    for step in steps:
        if prefetch:
            distiller.prefetch(step, step * 36, fetch or (lambda s: [batches[s % len(batches)]]))
        x_BS = batches[step % len(batches)]
        out = student(x_BS, labels_BS=x_BS)
        loss, metrics, difficulty_B = distiller.loss(step, step * 36, 0, out, x_BS)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics["difficulty_B"], metrics["x_BS"], metrics["student_ce_B"] = (
            difficulty_B,
            x_BS,
            out.loss_per_sample,
        )
        seen.append(metrics)
    return seen


def test_killed_teacher_restarts_and_late_labels_fall_back_to_ce(ray_local):
    torch.manual_seed(6)
    # > 100 KiB of weights: the teacher travels through Ray's object store (not inlined), so the
    # restart in 2) proves the pool keeps it alive for a re-run constructor
    teacher = build_model(
        tiny_cfg(dense=True, num_hidden_layers=1, first_k_dense_replace=1, intermediate_size=1024)
    )
    cfg = DistillConfig(
        teacher="in-memory", k=4, prefetch=2, timeout_s=20.0, max_restarts=2, max_task_retries=3
    )
    with pytest.raises(UserError, match="distill.teacher_num_gpus=1.0 but the Ray cluster has 0 GPUs"):
        start_teacher_pool(
            DistillConfig(teacher="t", teacher_num_gpus=1.0), source=InMemoryTeacher.from_model(teacher)
        )
    pool = start_teacher_pool(cfg, source=InMemoryTeacher.from_model(teacher))  # held for the run
    (handle,) = pool
    try:
        student = build_model(tiny_cfg(dense=False, num_hidden_layers=1, first_k_dense_replace=0))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        batches = [torch.randint(0, V, (4, 10)) for _ in range(4)]
        d = Distiller(cfg, [handle], rank=0, tokens_per_step=36)
        pid0 = ray_local.get(handle.info.remote())["pid"]

        # 1) labels arrive ahead of time (prefetch keeps the queue non-empty)
        m = _train_steps(d, student, opt, batches, range(0, 3))
        assert d.counters["kd_batches"] + d.counters["fallback_batches"] == 3
        assert max(x["distill/queue_depth"] for x in m) >= 1  # the next step was already requested
        assert "distill/kd_loss" in m[-1] and m[-1]["distill/teacher_latency_s"] > 0
        with torch.no_grad():  # the curriculum signal: student CE - teacher CE per sequence
            teacher_ce_B = teacher(m[-1]["x_BS"], labels_BS=m[-1]["x_BS"]).loss_per_sample
        assert torch.allclose(m[-1]["difficulty_B"], m[-1]["student_ce_B"] - teacher_ce_B, atol=1e-4)

        # 1b) labels prefetched for rows the step does not train (its batch split changed) are not
        # used: the step's real rows are sent again (step 3 was prefetched right; 4 and 5 are not)
        kd_before = d.counters["kd_batches"]
        wrong_rows = lambda s: [batches[(s + 1) % len(batches)]]  # noqa: E731
        _train_steps(d, student, opt, batches, range(3, 5), fetch=wrong_rows)
        assert d.counters["refetched"] == 1 and d.counters["kd_batches"] == kd_before + 2

        # 2) SIGKILL the teacher process with requests in flight: Ray restarts it, resends them
        os.kill(pid0, signal.SIGKILL)
        t0 = time.monotonic()
        kd_before = d.counters["kd_batches"]
        m = _train_steps(d, student, opt, batches, range(5, 9))
        assert time.monotonic() - t0 < 6 * cfg.timeout_s  # never hangs
        assert d.counters["kd_batches"] + d.counters["fallback_batches"] == 9  # no batch dropped
        assert d.counters["kd_batches"] > kd_before  # distillation resumed on the restarted actor
        assert ray_local.get(handle.info.remote(), timeout=30)["pid"] != pid0

        # 3) labels that do not arrive within the timeout: that batch trains with CE, counted
        # (no prefetch: each request is sent at loss time and given 0.1 ms)
        d.cfg = DistillConfig(**{**cfg.__dict__, "timeout_s": 1e-4})
        d.pending.clear()
        before = dict(d.counters)
        m = _train_steps(d, student, opt, batches, range(9, 11), prefetch=False)
        # (each is a timeout; rarely Ray answers one with an actor error first: also CE, counted)
        late = sum(d.counters[k] - before[k] for k in ("timeouts", "teacher_errors"))
        assert late == 2 and d.counters["timeouts"] > before["timeouts"], (before, d.counters)
        assert d.counters["fallback_batches"] - before["fallback_batches"] == 2
        assert m[-1]["distill/fallback_batches"] == d.counters["fallback_batches"]
        assert "distill/kd_loss" not in m[-1]
        baseline = m[-1]["student_ce_B"] - m[-1]["difficulty_B"]  # fallback: running mean teacher CE
        assert torch.allclose(baseline, torch.full_like(baseline, d.teacher_ce_ema), atol=1e-5)

        # 4) a teacher dead for good (no restarts left): CE at once, no waiting on the timeout
        d.cfg = cfg
        ray_local.kill(handle, no_restart=True)
        deadline = time.monotonic() + 30  # (ray.kill returns before the actor is gone: one more
        while time.monotonic() < deadline:  # request could still be answered, and count as KD)
            try:
                ray_local.get(handle.info.remote(), timeout=5)
            except ray_local.exceptions.RayActorError:
                break
            time.sleep(0.05)
        t0 = time.monotonic()
        before = dict(d.counters)
        _train_steps(d, student, opt, batches, range(11, 14))
        assert time.monotonic() - t0 < cfg.timeout_s
        assert d.counters["fallback_batches"] - before["fallback_batches"] == 3
        assert d.counters["teacher_errors"] > before["teacher_errors"] and set(d.dead) == {0}
        assert d.counters["kd_batches"] + d.counters["fallback_batches"] == 14
    finally:
        stop_teacher_pool(pool)


# --- evidence: distillation beats CE for the same student, data and steps -------------------------


@pytest.fixture
def one_thread():
    """Tiny models: extra threads only add contention on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_distilled_student_beats_ce_student_on_held_out_loss(one_thread):
    trans_VV = markov_language(0)  # entropy ~1.96 nats/token
    S = 17
    torch.manual_seed(0)
    teacher = build_model(tiny_cfg(dense=True, num_hidden_layers=1, first_k_dense_replace=1))
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-2)
    corpus = sample_sequences(trans_VV, 32 * 80, S, seed=1)
    for step in range(80):
        x_BS = corpus[step * 32 : (step + 1) * 32]
        loss = teacher(x_BS, labels_BS=x_BS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_BS = sample_sequences(trans_VV, 128, S, seed=2)

    def held_out(model) -> float:
        with torch.no_grad():
            return float(model(held_BS, labels_BS=held_BS).ce_loss)

    assert held_out(teacher) < 2.2  # the teacher learned the language

    # the student sees only 32 sequences; the teacher labels them once (it is frozen)
    train_BS = sample_sequences(trans_VV, 32, S, seed=3)
    cfg = DistillConfig(teacher="in-memory", k=8, temperature=1.0, alpha=0.9)
    worker = TeacherWorker(InMemoryTeacher.from_model(teacher), cfg)
    labels = worker.label(train_BS.numpy())
    labels.pop("compute_s")
    soft = SoftLabels.from_dict(labels)

    def train_student(distill: bool) -> float:
        torch.manual_seed(7)
        student = build_model(tiny_cfg(dense=False, num_hidden_layers=1, first_k_dense_replace=0))
        opt = torch.optim.AdamW(student.parameters(), lr=2e-2)
        for _ in range(40):
            out = student(train_BS, labels_BS=train_BS)
            loss = out.loss
            if distill:
                kd, _ = kd_loss(out.logits, soft, cfg.temperature, train_BS)
                loss = mix_loss(out, kd, cfg.alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return held_out(student)

    ce_only, distilled = train_student(False), train_student(True)
    assert distilled < ce_only - 0.5, (distilled, ce_only)


# --- end to end: `dsv3ray train` with [distill] (Ray Train + DeepSpeed workers, teacher actor) ----


@pytest.mark.slow
def test_train_with_distill_section_two_stages(ray_local, tmp_path):
    """A dense teacher (exported like a finished run) distills into the MoE student for 3 steps,
    then the run switches to CE; the metrics reach TensorBoard and no batch fell back. The worker
    dies before step 3 and resumes from the step-2 checkpoint: the counters go on from it."""
    from dsv3ray.data import write_synthetic_prepared
    from dsv3ray.runconfig import resolve_run_config
    from dsv3ray.train import train

    data = write_synthetic_prepared(tmp_path / "data", num_train=64, num_eval=8, seq_len=16, vocab_size=128)
    common = [
        "model.vocab_size=128",
        "model.num_hidden_layers=2",
        "model.max_position_embeddings=64",
        f"data.prepared={data}",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
    ]
    torch.manual_seed(0)
    teacher_run = resolve_run_config(
        config="configs/distill_demo.toml", overrides=common + ["model.first_k_dense_replace=2"]
    )
    export_model(build_model(teacher_run.model), tmp_path / "teacher" / "hf")
    run = resolve_run_config(
        config="configs/distill_demo.toml",
        overrides=common
        + [
            f"train.run_dir={tmp_path / 'student'}",
            "train.num_workers=1",  # 2 workers x EP=2 passes too (checked by hand), at twice the time
            "train.ep_size=1",
            "train.steps=5",
            f"distill.teacher={tmp_path / 'teacher'}",
            "distill.kd_steps=4",
            "distill.k=8",
            "distill.timeout_s=120.0",
            "distill.save_as_teacher=true",  # the student exports itself as a teacher
            "train.checkpoint_every=2",
            "train.kill_at_step=3",  # SIGKILL before step 3; Ray Train restarts from step 2
            "train.max_failures=1",
        ],
    )
    summary = train(run)
    assert summary["steps"] == 5 and summary["restarts"] == 1 and summary["resumed_from_step"] == 2
    # rank 0's totals over both attempts (2 KD steps restored from the checkpoint + step 3):
    # 3 stage-1 steps x 1 micro-batch, each trained with KD or counted as fallback
    assert summary["distill_kd_batches"] + summary["distill_fallback_batches"] == 3
    assert summary["distill_fallback_batches"] == 0 and summary["distill_label_bytes_per_token"] == 8 * 6
    from dsv3ray.metrics import read_scalars

    sc = read_scalars(tmp_path / "student" / "tb")  # both attempts' event files
    assert dict(sc["distill/stage"]) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0, 5: 2.0}
    kd = [v for _, v in sc["distill/kd_loss"]]
    assert len(kd) == 3 and all(np.isfinite(kd))
    assert sc["distill/fallback_batches"][-1][1] == 0
    assert dict(sc["distill/kd_batches"])[3] == 3  # rank 0: one micro-batch per step, after the restart
    # the student's own export (all 16 experts) loads as a teacher
    worker = TeacherWorker(str(tmp_path / "student"), DistillConfig(teacher="s", k=4))
    moe = worker.model.moe_layers()[0]
    assert moe.experts.gate_up_proj.shape[0] == run.model.n_routed_experts
    # ... and holds exactly the experts DeepSpeed checkpointed at the last step (one file per global expert)
    from dsv3ray.checkpoint import list_checkpoints

    exported = worker.model.state_dict()
    files = sorted(
        (list_checkpoints(tmp_path / "student")[-1][1] / "ds").rglob("layer_*_expert_*_model_states.pt")
    )
    assert len(files) == run.model.n_routed_experts * run.model.num_moe_layers
    for f in files:
        for key, saved in torch.load(f, weights_only=False).items():
            # model.layers.{l}.mlp.experts.ds_moe.deepspeed_moe.experts.deepspeed_experts.{j}.{name}
            owner, rest = key.split(".ds_moe.")
            j, name = rest.rsplit(".", 2)[-2:]
            assert torch.equal(exported[f"{owner}.{name}"][int(j)], saved), key
    d = worker.label(np.zeros((1, 8), dtype=np.int32))
    assert np.isfinite(d["logp_BPK"].astype(np.float32)).all() and np.isfinite(d["teacher_loss_B"]).all()
