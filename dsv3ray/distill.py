"""Progressive distillation, the core side: config, soft-label compression, the KD loss, the stage
schedule and the worker-side `Distiller` (bounded prefetch queue over teacher actors, CE fallback).

Notable:
- Soft labels travel compressed (`SoftLabels`), K slots per predicted position:
  * "topk": the teacher's K most likely tokens with their log-probs at temperature T. The target is
    the teacher distribution renormalized on those K tokens, which is BIASED (all tail mass is
    pushed onto the head; "Sparse Logit Sampling", arXiv 2503.16870). 6 bytes per slot.
  * "sample": K tokens drawn with replacement from the teacher distribution at temperature T
    (proposal q = p_T), duplicates merged into counts; importance weight of a token = count/K
    (= p/q times the empirical frequency). Sum_i w_i (log p_i - log s_i) is an UNBIASED estimate of
    KL(p_T || s_T) and its gradient of the full-vocabulary one. 7 bytes per slot.
- KD loss = T^2 * forward KL on the sent support, per position, averaged over valid positions
  (Hinton's T^2 keeps gradient scale independent of T). Mixed with CE: (1 - alpha) CE + alpha KD;
  the model's other terms (MTP, balance loss) are kept as they are.
- Two stages: stage 1 = KD (+ curriculum), stage 2 = CE on real data, switching after
  `kd_steps` steps or `kd_tokens` tokens (whichever comes first; 0 = no limit). The stage is a pure
  function of (step, tokens), so it survives resume from a checkpoint that restores both.
- Faults: labels that do not arrive within `timeout_s` (teacher dead, restarting, slow) make that
  batch train with CE alone; it is counted in `fallback_batches`, never dropped, never waited on
  forever. Teacher actors restart through Ray (`max_restarts`, `max_task_retries`, see actors.teacher).

This module is core-level: it imports no `actors`; the Distiller only calls `handle.label.remote(...)`
on the actor handles the entry layer gives it.

Shapes: B batch, S sequence (input positions), P = S - 1 predicted positions, V vocab, K slots.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dsv3ray.errors import ConfigError

log = logging.getLogger(__name__)

COMPRESSIONS = ("topk", "sample")


@dataclass
class DistillConfig:
    """Section [distill]. Distillation is on when `teacher` names a checkpoint."""

    teacher: str = ""  # HF DeepseekV3 directory (config.json + model.safetensors) or one of our runs
    compression: str = "topk"  # "topk" | "sample" (see module docstring)
    k: int = 32  # slots per position: top-k size or number of samples (sample: at most 255)
    temperature: float = 1.0
    alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * KD during stage 1
    kd_steps: int = 0  # stage 1 lasts this many steps (0 = no step limit)
    kd_tokens: int = 0  # ... or this many tokens (0 = no token limit); first limit reached wins
    num_teachers: int = 1  # teacher actors in the pool
    teacher_num_cpus: float = 1.0  # Ray resources of one teacher actor
    teacher_num_gpus: float = 0.0  # fractional GPUs allowed, e.g. 0.25
    prefetch: int = 2  # steps of labels requested ahead of the step being trained (bounded queue)
    timeout_s: float = 30.0  # wait at most this long for a batch's labels, then train it with CE
    max_restarts: int = 3  # Ray restarts of a dead teacher actor
    max_task_retries: int = 2  # Ray retries of a label request whose actor died
    seed: int = 0  # sampling seed ("sample" compression), combined with the step
    # Write this run's final model to <run_dir>/hf (all experts gathered) so a later run can name
    # this run directory as its `teacher`; set it on the teacher's run.
    save_as_teacher: bool = False

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ConfigError("distill.compression", self.compression, " | ".join(COMPRESSIONS))
        if self.k < 1 or (self.compression == "sample" and self.k > 255):
            raise ConfigError("distill.k", self.k, "an integer >= 1 (at most 255 with compression=sample)")
        if self.temperature <= 0:
            raise ConfigError("distill.temperature", self.temperature, "a number > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("distill.alpha", self.alpha, "a weight in [0, 1]")
        for key in ("kd_steps", "kd_tokens", "max_restarts", "max_task_retries", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distill.{key}", getattr(self, key), "an integer >= 0")
        if self.num_teachers < 1:
            raise ConfigError("distill.num_teachers", self.num_teachers, "an integer >= 1")
        if self.prefetch < 1:
            raise ConfigError("distill.prefetch", self.prefetch, "an integer >= 1 (steps ahead)")
        if self.teacher_num_cpus < 0 or self.teacher_num_gpus < 0:
            key = "teacher_num_cpus" if self.teacher_num_cpus < 0 else "teacher_num_gpus"
            raise ConfigError(f"distill.{key}", getattr(self, key), "a number >= 0")
        if self.timeout_s <= 0:
            raise ConfigError("distill.timeout_s", self.timeout_s, "seconds > 0")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


# ---------------------------------------------------------------------------------------------
# Soft labels: compression on the teacher side, expansion on the student side
# ---------------------------------------------------------------------------------------------


@dataclass
class SoftLabels:
    """Compressed teacher targets for the P = S-1 predicted positions of a (B, S) batch.

    ids_BPK int32 token ids; logp_BPK float16 teacher log-probs at temperature T (full softmax);
    counts_BPK uint8 sample counts ("sample" only, 0 = merged duplicate slot); teacher_loss_B
    float32 teacher CE per sequence (T = 1, real labels). numpy arrays so they travel through Ray's
    object store without pickling torch.
    """

    kind: str
    ids_BPK: np.ndarray
    logp_BPK: np.ndarray
    counts_BPK: np.ndarray | None
    teacher_loss_B: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the soft labels proper (ids, log-probs, counts; not the per-sequence loss)."""
        n = self.ids_BPK.nbytes + self.logp_BPK.nbytes
        return n + (self.counts_BPK.nbytes if self.counts_BPK is not None else 0)

    def bytes_per_token(self) -> float:
        B, P, _ = self.ids_BPK.shape
        return self.nbytes / max(1, B * P)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ids_BPK": self.ids_BPK,
            "logp_BPK": self.logp_BPK,
            "counts_BPK": self.counts_BPK,
            "teacher_loss_B": self.teacher_loss_B,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SoftLabels:
        return cls(d["kind"], d["ids_BPK"], d["logp_BPK"], d["counts_BPK"], d["teacher_loss_B"])


def compress(
    logits_BSV: torch.Tensor,
    kind: str,
    k: int,
    temperature: float,
    teacher_loss_B: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SoftLabels:
    """Compress teacher logits (B, S, V) into K slots for each of the first P = S-1 positions."""
    assert kind in COMPRESSIONS, kind
    B, S, V = logits_BSV.shape
    k = min(k, V)
    logp_BPV = torch.log_softmax(logits_BSV[:, :-1].float() / temperature, dim=-1)
    if kind == "topk":
        logp_BPK, ids_BPK = logp_BPV.topk(k, dim=-1)
        counts = None
    else:
        P = S - 1
        probs_NV = logp_BPV.reshape(B * P, V).exp()
        draws_NK = torch.multinomial(probs_NV, k, replacement=True, generator=generator)
        # merge duplicates: sort, count each run, keep the id once with its count, zero the rest
        draws_NK, _ = draws_NK.sort(dim=-1)
        first_NK = torch.ones_like(draws_NK, dtype=torch.bool)
        first_NK[:, 1:] = draws_NK[:, 1:] != draws_NK[:, :-1]
        run_id_NK = first_NK.cumsum(-1) - 1  # index of the run each draw belongs to
        counts_NK = torch.zeros_like(draws_NK).scatter_add_(1, run_id_NK, torch.ones_like(draws_NK))
        # counts_NK[:, r] = size of run r; move it to the run's first slot
        slot_count_NK = torch.where(first_NK, counts_NK.gather(1, run_id_NK), 0)
        ids_BPK = draws_NK.reshape(B, P, k)
        counts = slot_count_NK.reshape(B, P, k).to(torch.uint8).numpy()
        logp_BPK = logp_BPV.gather(-1, ids_BPK)
    if teacher_loss_B is None:
        teacher_loss_B = torch.full((B,), float("nan"))
    return SoftLabels(
        kind=kind,
        ids_BPK=ids_BPK.to(torch.int32).cpu().numpy(),
        logp_BPK=logp_BPK.to(torch.float16).cpu().numpy(),
        counts_BPK=counts,
        teacher_loss_B=teacher_loss_B.detach().float().cpu().numpy(),
    )


def _targets(soft: SoftLabels, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_BPK int64, w_BPK target weights, ref_logp_BPK the log p the KL subtracts from)."""
    # torch.tensor copies: arrays from Ray's object store are read-only
    ids = torch.tensor(soft.ids_BPK, device=device, dtype=torch.long)
    logp = torch.tensor(soft.logp_BPK, device=device, dtype=torch.float32)
    if soft.kind == "topk":
        # renormalized on the support: KL(w || s) restricted to the K tokens (biased, see docstring)
        ref = torch.log_softmax(logp, dim=-1)
        w = ref.exp()
    else:
        counts = torch.tensor(soft.counts_BPK, device=device, dtype=torch.float32)
        w = counts / counts.sum(-1, keepdim=True)
        ref = logp
    return ids, w, ref


class _SupportKL(torch.autograd.Function):
    """kl_BP = T^2 * sum_k w_k (ref_k - log s_k), s = softmax(logits / T), with a hand-written
    backward that writes d/dlogits = T * g * (sum(w) * s - scatter(w)) straight into one (B, S, V)
    buffer: about half the time of autograd's logsumexp + gather + slice backward chain, which
    matters because the KD term costs as much as the CE the model already computes."""

    @staticmethod
    def forward(ctx, logits_BSV, ids_BPK, w_BPK, ref_BPK, temperature: float):
        P = ids_BPK.shape[1]
        z_BPV = logits_BSV[:, :P].float()
        if temperature != 1.0:
            z_BPV = z_BPV / temperature
        lse_BP1 = torch.logsumexp(z_BPV, dim=-1, keepdim=True)
        logp_s_BPK = z_BPV.gather(-1, ids_BPK) - lse_BP1  # log s at the support only
        kl_BP = (w_BPK * (ref_BPK - logp_s_BPK)).sum(-1) * temperature**2
        ctx.save_for_backward(logits_BSV, ids_BPK, w_BPK, lse_BP1)
        ctx.temperature = temperature
        return kl_BP

    @staticmethod
    def backward(ctx, g_BP):
        logits_BSV, ids_BPK, w_BPK, lse_BP1 = ctx.saved_tensors
        T = ctx.temperature
        B, S, V = logits_BSV.shape
        P = ids_BPK.shape[1]
        grad_BSV = torch.empty((B, S, V), dtype=torch.float32, device=logits_BSV.device)
        grad_BSV[:, P:].zero_()  # positions without labels (the last one)
        s_BPV = grad_BSV[:, :P]
        z_BPV = logits_BSV[:, :P].float()
        if T != 1.0:
            torch.div(z_BPV, T, out=s_BPV)
            s_BPV.sub_(lse_BP1)
        else:
            torch.sub(z_BPV, lse_BP1, out=s_BPV)
        s_BPV.exp_()  # student probabilities at temperature T
        scale_BP1 = (T * g_BP).unsqueeze(-1)
        s_BPV.mul_(scale_BP1 * w_BPK.sum(-1, keepdim=True))
        s_BPV.scatter_add_(-1, ids_BPK, -w_BPK * scale_BP1)
        return grad_BSV.to(logits_BSV.dtype), None, None, None, None


def kd_loss(
    student_logits_BSV: torch.Tensor,
    soft: SoftLabels,
    temperature: float,
    labels_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T^2 * forward KL(teacher || student) on the sent support.

    Returns (loss: mean over valid positions, kd_per_sample_B detached). A position p is valid when
    labels[:, p+1] != -100 (same positions as the model's shifted CE), all P when labels is None.
    """
    ids_BPK, w_BPK, ref_BPK = _targets(soft, student_logits_BSV.device)
    P = ids_BPK.shape[1]
    # zero-weight slots (merged duplicates) contribute 0 * finite = 0
    kl_BP = _SupportKL.apply(student_logits_BSV, ids_BPK, w_BPK, ref_BPK, float(temperature))
    if labels_BS is None:
        mask_BP = torch.ones_like(kl_BP)
    else:
        mask_BP = (labels_BS[:, 1 : P + 1] != -100).to(kl_BP.dtype)
    per_sample_B = (kl_BP * mask_BP).sum(1) / mask_BP.sum(1).clamp_min(1)
    loss = (kl_BP * mask_BP).sum() / mask_BP.sum().clamp_min(1)
    return loss, per_sample_B.detach()


def mix_loss(out, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """Replace the CE part of the model's total loss by (1 - alpha) CE + alpha KD (MTP/balance kept)."""
    return out.loss - alpha * out.ce_loss + alpha * kd


def stage_at(cfg: DistillConfig, step: int, tokens: int) -> int:
    """1 = distill (KD), 2 = CE on real data. Pure in (step, tokens): a resumed run agrees."""
    if not cfg.enabled:
        return 2
    if cfg.kd_steps and step >= cfg.kd_steps:
        return 2
    if cfg.kd_tokens and tokens >= cfg.kd_tokens:
        return 2
    return 1


# ---------------------------------------------------------------------------------------------
# Worker side: bounded prefetch queue over the teacher actors, KD or CE fallback per batch
# ---------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    ref: Any  # ray.ObjectRef of the teacher's label dict
    teacher: int
    submitted: float
    x_BS: np.ndarray  # what was sent: labels are used only for exactly this batch


class Distiller:
    """One per training worker. Keys are (step, micro) pairs; the queue holds at most
    `prefetch` steps of requests. `loss(...)` returns the loss to backprop and the step's metrics.
    Labels are used only for exactly the rows they were computed for: if a step's micro-batch
    differs from what was prefetched (e.g. a heterogeneous batch split moved), it is asked again.

    Typical use in the step loop (tokens = tokens trained before this step):
        distiller.prefetch(step, tokens, fetch)   # fetch(s) -> [input_ids_BS for each micro-batch]
        for micro, x_BS in enumerate(my_micro_batches):
            out = model(x_BS, labels_BS=x_BS)
            loss, metrics, difficulty_B = distiller.loss(step, tokens, micro, out, x_BS)
            loss.backward()  # / engine.backward(loss)
        sampler.report_losses(ids, difficulty_B's of the step)

    Prefetching future steps means the curriculum's weights for them come from losses reported up
    to `prefetch` steps earlier: a lag of a few steps in its feedback, by design.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        teachers: list,
        rank: int = 0,
        tokens_per_step: int = 0,
        last_step: int | None = None,
    ):
        """teachers: TeacherWorker actor handles; tokens_per_step: global tokens per step (to see the
        stage of future steps); last_step: the run's last step (nothing is prefetched beyond it)."""
        assert teachers, "Distiller needs at least one teacher actor handle"
        self.cfg = cfg
        self.teachers = list(teachers)
        self.rank = rank
        self.tokens_per_step = tokens_per_step
        self.last_step = last_step
        self.pending: OrderedDict[tuple[int, int], _Pending] = OrderedDict()
        self.requested: set[int] = set()  # steps prefetch() already fetched
        self.teacher_ce_ema: float | None = None  # baseline of the difficulty when labels are missing
        self.last_stage: int | None = None
        self._next_teacher = rank  # ranks start on different teachers
        # teacher -> when it was reported dead; skipped for timeout_s, then asked again (an actor
        # reported dead may still come back through Ray's restarts)
        self.dead: dict[int, float] = {}
        self.counters = {
            "kd_batches": 0,
            "fallback_batches": 0,
            "teacher_errors": 0,
            "timeouts": 0,
            "refetched": 0,
        }
        self._wait_s = 0.0
        self._last_wait_s = 0.0
        self._latency_s = 0.0
        self._roundtrip_s = 0.0
        self._label_bytes = 0
        self._label_tokens = 0

    # --- queue ---
    def submit(self, key: tuple[int, int], input_ids_BS: torch.Tensor) -> None:
        """Ask a teacher for this batch's labels (no-op if already asked)."""
        if key in self.pending:
            return
        now = time.perf_counter()
        alive = [
            i for i in range(len(self.teachers)) if now - self.dead.get(i, -math.inf) > self.cfg.timeout_s
        ]
        if not alive:  # no teacher left: the batch will train with CE (counted in loss())
            return
        i = alive[self._next_teacher % len(alive)]
        self._next_teacher += 1
        x = input_ids_BS.detach().cpu().to(torch.int32).numpy()
        seed = (self.cfg.seed * 1_000_003 + key[0] * 1009 + key[1] * 31 + self.rank) % (2**31)
        ref = self.teachers[i].label.remote(x, seed)
        self.pending[key] = _Pending(ref, i, time.perf_counter(), x)

    def prefetch(self, step: int, tokens: int, fetch) -> None:
        """Request steps [step, step + prefetch) still in stage 1; fetch(s) -> [input_ids_BS per micro].

        Which steps get fetched depends only on (step, tokens, cfg), never on how earlier requests
        fared, so every rank calls `fetch` for the same steps (safe if fetch is collective).
        """
        for s in range(step, step + self.cfg.prefetch):
            if self.last_step is not None and s > self.last_step:
                break
            est_tokens = tokens + (s - step) * self.tokens_per_step
            if stage_at(self.cfg, s, est_tokens) != 1:
                break
            if s in self.requested:
                continue
            self.requested.add(s)
            for micro, x_BS in enumerate(fetch(s)):
                self.submit((s, micro), x_BS)

    def _drop_before(self, step: int) -> None:
        """Forget requests for steps already trained (e.g. after a rollback or a skipped step)."""
        for key in [k for k in self.pending if k[0] < step]:
            del self.pending[key]
        self.requested = {s for s in self.requested if s >= step}

    def wait(self, key: tuple[int, int]) -> SoftLabels | None:
        """The labels for `key`, or None (counted) if they do not arrive within timeout_s."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayError

        p = self.pending.pop(key, None)
        if p is None:
            return None
        t0 = time.perf_counter()
        try:
            d = ray.get(p.ref, timeout=self.cfg.timeout_s)
        except GetTimeoutError:
            self.counters["timeouts"] += 1
            log.warning(
                "distill: labels for step %s micro %s timed out after %.1fs; CE only",
                *key,
                self.cfg.timeout_s,
            )
            d = None
        except RayError as e:  # actor died past its restarts / task failed past its retries
            self.counters["teacher_errors"] += 1
            if isinstance(e, ActorDiedError):
                self.dead[p.teacher] = time.perf_counter()
            log.warning(
                "distill: teacher %d failed on step %s micro %s (%s); CE only",
                p.teacher,
                *key,
                type(e).__name__,
            )
            d = None
        now = time.perf_counter()
        self._last_wait_s = now - t0
        self._wait_s += now - t0
        if d is None:
            return None
        self._roundtrip_s = now - p.submitted
        self._latency_s = float(d.pop("compute_s", 0.0))
        return SoftLabels.from_dict(d)

    # --- loss ---
    def stage(self, step: int, tokens: int) -> int:
        s = stage_at(self.cfg, step, tokens)
        if s != self.last_stage and self.rank == 0:
            if self.last_stage is None:
                msg = f"distill: step {step} ({tokens} tokens) is in stage {s} ({'KD' if s == 1 else 'CE'})"
            else:
                msg = f"distill: switching to stage {s} (CE on real data) at step {step}, {tokens} tokens"
            print(f"[dsv3ray] {msg}", flush=True)  # the worker's stdout reaches the driver's log
        self.last_stage = s
        return s

    def loss(
        self, step: int, tokens: int, micro: int, out, input_ids_BS: torch.Tensor, labels_BS=None
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """(loss to backprop, metrics, difficulty_B) for one micro-batch already run through the student.

        Stage 1 with labels: (1 - alpha) CE + alpha KD; stage 1 without labels (timeout, dead
        teacher): the model's CE loss, counted in fallback_batches; stage 2: the model's CE loss.
        difficulty_B (float32, CPU) is the per-sequence signal for the curriculum: student CE minus
        teacher CE (the reducible loss); where the teacher's CE is unknown (fallback, stage 2) a
        running mean of it is subtracted instead, so the signal keeps one scale across the run.
        """
        labels_BS = input_ids_BS if labels_BS is None else labels_BS
        student_ce_B = out.loss_per_sample.detach().float().cpu()
        stage = self.stage(step, tokens)
        metrics = {"distill/stage": float(stage), "distill/ce_loss": float(out.ce_loss.detach())}
        self._drop_before(step)
        soft = None
        if stage == 1:
            key = (step, micro)
            p = self.pending.get(key)
            if p is not None and not np.array_equal(p.x_BS, input_ids_BS.detach().cpu().numpy()):
                # prefetched for another slice of the step (the batch split changed): ask again
                del self.pending[key]
                self.counters["refetched"] += 1
            if key not in self.pending:  # not prefetched: ask now and wait
                self.submit(key, input_ids_BS)
            metrics["distill/queue_depth"] = float(len(self.pending))
            self._last_wait_s = 0.0
            soft = self.wait(key)
            metrics["distill/wait_s"] = self._last_wait_s
            if soft is None:
                self.counters["fallback_batches"] += 1
        else:
            self.pending.clear()
        metrics.update(self._counter_metrics())
        if soft is None:
            baseline = self.teacher_ce_ema or 0.0
            return out.loss, metrics, student_ce_B - baseline
        B, S = input_ids_BS.shape
        assert soft.ids_BPK.shape[:2] == (B, S - 1), soft.ids_BPK.shape
        kd, _ = kd_loss(out.logits, soft, self.cfg.temperature, labels_BS)
        self.counters["kd_batches"] += 1
        self._label_bytes += soft.nbytes
        self._label_tokens += B * (S - 1)
        teacher_ce_B = torch.tensor(soft.teacher_loss_B, dtype=torch.float32)
        mean_t = float(teacher_ce_B.mean())
        self.teacher_ce_ema = (
            mean_t if self.teacher_ce_ema is None else 0.9 * self.teacher_ce_ema + 0.1 * mean_t
        )
        metrics.update(
            {
                "distill/kd_loss": float(kd.detach()),
                "distill/teacher_ce_loss": mean_t,
                "distill/teacher_latency_s": self._latency_s,
                "distill/label_roundtrip_s": self._roundtrip_s,
                "distill/label_bytes_per_token": self._label_bytes / max(1, self._label_tokens),
                "distill/kd_batches": float(self.counters["kd_batches"]),
            }
        )
        return mix_loss(out, kd, self.cfg.alpha), metrics, student_ce_B - teacher_ce_B

    def _counter_metrics(self) -> dict[str, float]:
        return {
            "distill/wait_s_total": self._wait_s,
            "distill/fallback_batches": float(self.counters["fallback_batches"]),
            "distill/teacher_errors": float(self.counters["teacher_errors"]),
            "distill/timeouts": float(self.counters["timeouts"]),
            "distill/refetched": float(self.counters["refetched"]),
        }

    def summary(self) -> dict[str, Any]:
        """This rank's run totals for the report: every stage-1 batch is a KD or a fallback batch."""
        return {
            "distill_kd_batches": self.counters["kd_batches"],
            "distill_fallback_batches": self.counters["fallback_batches"],
            "distill_teacher_errors": self.counters["teacher_errors"],
            "distill_timeouts": self.counters["timeouts"],
            "distill_wait_s": round(self._wait_s, 4),
            "distill_label_bytes_per_token": self._label_bytes / max(1, self._label_tokens),
        }

    def state_dict(self) -> dict[str, Any]:
        """The run totals (counters, waits, label bytes) and the difficulty baseline, as plain ints
        and floats (the training checkpoint loads with weights_only=True); the stage itself is
        recomputed from the restored step/tokens, queued requests are asked again."""
        return {
            "counters": {k: int(v) for k, v in self.counters.items()},
            "wait_s": float(self._wait_s),
            "teacher_ce_ema": None if self.teacher_ce_ema is None else float(self.teacher_ce_ema),
            "label_bytes": int(self._label_bytes),
            "label_tokens": int(self._label_tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        self._wait_s = float(state.get("wait_s", 0.0))
        self.teacher_ce_ema = state.get("teacher_ce_ema")
        self._label_bytes = int(state.get("label_bytes", 0))
        self._label_tokens = int(state.get("label_tokens", 0))


# ---------------------------------------------------------------------------------------------
# A trained run as a teacher: export the full model (all experts) as a HF DeepseekV3 directory
# ---------------------------------------------------------------------------------------------

TEACHER_EXPORT_DIR = "hf"  # <run_dir>/hf/: where a run leaves its final model for `distill.teacher`


def full_state_dict(model: torch.nn.Module, ep=None) -> dict[str, torch.Tensor]:
    """The model's state dict with every routed expert, on CPU.

    With expert parallelism each rank holds e = E/ep_size experts: their (e, ...) tensors are
    all-gathered over `ep.group` (a collective: every rank of the EP group must call this).
    """
    from dsv3ray.parallel import expert_parameters

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if ep is not None and ep.ep_size > 1:
        import torch.distributed as dist

        for name in expert_parameters(model):
            local = sd[name].contiguous()
            parts = [torch.empty_like(local) for _ in range(ep.ep_size)]
            dist.all_gather(parts, local, group=ep.group)
            sd[name] = torch.cat(parts, dim=0)  # EP rank r holds experts [r*e, (r+1)*e)
    return {k: v.cpu() for k, v in sd.items()}


def export_model(model: torch.nn.Module, out_dir, ep=None, write: bool = True):
    """Write the model (all experts gathered) to `out_dir` in the HF DeepseekV3 format, loadable
    as `distill.teacher`. Every EP rank calls it (collective); only `write=True` ranks write."""
    from dsv3ray.hf import export_state_dict

    sd = full_state_dict(model, ep)
    if write:
        return export_state_dict(sd, model.config, out_dir)
    return None
