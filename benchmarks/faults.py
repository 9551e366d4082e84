"""Fault evidence (issue 9): a short training with a real worker kill and a teacher kill; prints
time lost to each fault, samples lost and samples repeated as one JSON line.

`dsv3ray.train.train` on 2 workers (debug model, EP=2, CPU, `[distill]` on with one teacher actor
loaded from a HF directory), twice: the baseline without faults, then one run with two real
process deaths:
- teacher kill: as soon as step 2's checkpoint exists, this driver SIGKILLs the teacher actor's
  process (found among its own descendants). Ray restarts the actor (it reloads the teacher) and
  re-sends in-flight requests; labels later than `distill.timeout_s` make that batch train with CE
  (counted in fallback_batches, never dropped).
- worker kill: `train.kill_at_step` makes the last worker SIGKILL its own process at the start of
  that step; Ray Train's FailureConfig restarts the group from the last checkpoint.
Read back from the run's outputs:
- step times: TensorBoard event wall_time (rank 0 logs every step after its update; each worker-
  group attempt writes its own event file); distill/kd_loss marks labelled steps,
  distill/fallback_batches counts CE fallbacks (rank 0's Distiller);
- worker time_lost_s = first step completed after recovery - kill (the kill time: mtime of the
  marker the worker writes right before its SIGKILL); restart_overhead_s = that minus a normal
  step; setback_s = the step reached at the kill, completed again - kill (adds the steps recomputed
  since the checkpoint);
- teacher time_lost_s = first step trained on labels of the restarted teacher - kill (labels of
  steps >= killed step + prefetch were requested after the kill);
- samples: each run is exactly one epoch (num_train = steps x global batch); the sampler ledger
  saved in the final checkpoint: lost = expected ids - consumed, repeated = ids committed twice;
- wall_time_vs_no_fault = the faulty run's fit time / the baseline's.
`--distiller-level` adds the teacher kill under the Distiller / teacher pool API alone (a
miniature step loop in this process, its own no-fault baseline).

Full run on 2 shared CPU cores: about 3-4 minutes.

    .venv/bin/python benchmarks/faults.py              # prints one JSON line
    .venv/bin/python benchmarks/faults.py --quick      # shorter (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ_LEN = 16
VOCAB = 128
MICRO_BATCH = 4
NUM_WORKERS = 2
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, moe_impl="torch")


# --- shared: the sampler ledger -> samples lost / repeated -----------------------------------------


def ledger_counts(state: dict, expected_ids: np.ndarray) -> dict:
    """Samples lost / repeated from a CurriculumSampler state_dict, for a run of exactly one epoch.

    Epochs below `state["epoch"]` are closed: the sampler closes an epoch only once its bitmap
    holds every id. Open epochs: the ids set in their bitmap.
    """
    n = int(state["num_samples"])
    consumed = np.zeros(n, dtype=bool)
    if int(state["epoch"]) >= 1:
        consumed[:] = True  # epoch 0 closed: every id consumed
    else:
        bits = state["ledger"].get(0)
        if bits is not None:
            consumed = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=n).astype(bool)
    lost = np.setdiff1d(expected_ids, np.flatnonzero(consumed))
    return {
        "samples_expected": int(expected_ids.size),
        "samples_committed": int(state["samples_drawn"]),
        "samples_lost": int(lost.size),
        "samples_repeated": int(state["duplicates"]),
    }


# --- 1. worker kill through dsv3ray.train ----------------------------------------------------------


def _run_config(
    data: Path, run_dir: Path, steps: int, ckpt_every: int, kill_at: int, teacher_dir: Path, timeout_s: float
):
    from dsv3ray.runconfig import resolve_run_config

    repo = Path(__file__).resolve().parents[1]
    return resolve_run_config(
        config=str(repo / "configs" / "debug.toml"),
        overrides=[
            f"model.vocab_size={VOCAB}",
            "model.num_hidden_layers=2",
            "model.max_position_embeddings=64",
            f"train.num_workers={NUM_WORKERS}",
            "train.ep_size=2",
            f"train.micro_batch_size={MICRO_BATCH}",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            f"data.prepared={data}",
            f"train.run_dir={run_dir}",
            f"train.steps={steps}",
            f"train.checkpoint_every={ckpt_every}",
            f"train.kill_at_step={kill_at}",
            "train.max_failures=1",
            # [distill]: one teacher actor (a HF directory: a restarted actor reloads it from there)
            f"distill.teacher={teacher_dir}",
            "distill.k=8",
            "distill.prefetch=2",
            f"distill.timeout_s={timeout_s}",
            "distill.teacher_num_cpus=0.5",
            "distill.max_restarts=2",
            "distill.max_task_retries=3",
        ],
    )


def _events(tb_dir: Path) -> list[dict[str, list[tuple[float, int, float]]]]:
    """Per attempt (one event file each, oldest first): tag -> [(wall_time, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    attempts = []
    for f in tb_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if "train/bad_steps" in tags:
            attempts.append({t: sorted((e.wall_time, e.step, e.value) for e in acc.Scalars(t)) for t in tags})
    return sorted(attempts, key=lambda a: a["train/bad_steps"][0][0])


class TeacherKiller(threading.Thread):
    """SIGKILLs the run's teacher actor process once the run's first checkpoint exists (a step known
    to be done), as the driver-side fault. The process is found among this driver's descendants
    (the local Ray this script started), so nothing outside this benchmark is touched."""

    def __init__(self, run_dir: Path, after_step: int):
        super().__init__(daemon=True)
        self.trigger = run_dir / "checkpoints" / f"step_{after_step:08d}"
        self.t_kill: float | None = None
        self.pid: int | None = None
        self.error = ""
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set() and not self.trigger.exists():
            time.sleep(0.02)
        if self.stop.is_set():
            self.error = f"{self.trigger} never appeared"
            return
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "TeacherWorker" in " ".join(p.cmdline()):
                    found.append(p.pid)
            except psutil.Error:
                pass
        if len(found) != 1:
            self.error = f"expected one TeacherWorker process under this driver, found {found}"
            return
        self.pid = found[0]
        self.t_kill = time.time()
        os.kill(self.pid, signal.SIGKILL)


def teacher_numbers(ev: dict, t_kill: float, prefetch: int) -> dict:
    """The teacher kill read from one attempt's events (rank 0's Distiller metrics per step)."""
    done_before = [st for t, st, _ in ev["train/bad_steps"] if t <= t_kill]
    s_k = max(done_before) if done_before else 0
    # labels of steps < s_k + prefetch may have been asked of the old process before the kill;
    # a labelled step from s_k + prefetch on was labelled by the restarted teacher
    kd = [(t, st) for t, st, _ in ev.get("distill/kd_loss", []) if st >= s_k + prefetch]
    fb = ev.get("distill/fallback_batches", [])  # cumulative count
    fb_steps = [b[1] for a, b in zip(fb, fb[1:]) if b[2] > a[2]] + ([fb[0][1]] if fb and fb[0][2] > 0 else [])
    waits = [v for _, st, v in ev.get("distill/wait_s", []) if st > s_k]
    return {
        "killed_after_step": s_k,
        "first_labelled_step_after_restart": kd[0][1] if kd else None,
        "time_lost_s": round(kd[0][0] - t_kill, 3) if kd else None,
        # the part of it the student spent blocked on labels (the rest it kept training)
        "label_wait_after_kill_s": round(sum(waits), 3),
        "fallback_batches_rank0": int(fb[-1][2]) if fb else None,  # trained with CE: counted, not lost
        "fallback_steps_rank0": sorted(fb_steps),
    }


def training_faults(work: Path, steps: int, ckpt_every: int, kill_at: int, timeout_s: float) -> dict:
    """Baseline run, then one run with a teacher kill (after the first checkpoint) and a worker kill."""
    import torch

    from dsv3ray import checkpoint as ckpt
    from dsv3ray.data import write_synthetic_prepared
    from dsv3ray.distill import export_model
    from dsv3ray.model import ModelConfig, build_model
    from dsv3ray.train import train

    global_batch = MICRO_BATCH * NUM_WORKERS
    num_train = steps * global_batch  # the run is exactly one epoch: every id once
    data = write_synthetic_prepared(work / "data", num_train, 8, SEQ_LEN, VOCAB)
    expected = np.arange(num_train)
    torch.manual_seed(1)
    teacher_dir = work / "teacher-hf"
    export_model(build_model(ModelConfig.from_preset("debug", **SMALL, first_k_dense_replace=2)), teacher_dir)

    print(f"[faults] baseline run ({steps} steps, distillation on, no fault)", file=sys.stderr, flush=True)
    base = train(_run_config(data, work / "run-baseline", steps, ckpt_every, 0, teacher_dir, timeout_s))
    (base_ev,) = _events(work / "run-baseline" / "tb")
    base_times = base_ev["train/bad_steps"]
    # a normal step: median gap between consecutive steps of the baseline (warm-up step excluded)
    gaps = [b[0] - a[0] for a, b in zip(base_times[1:], base_times[2:]) if b[1] == a[1] + 1]
    normal_step = statistics.median(gaps) if gaps else float("nan")
    base_ledger = ledger_counts(ckpt.load_train_state(base["checkpoint"])["sampler"], expected)
    assert base_ledger["samples_lost"] == 0 and base_ledger["samples_repeated"] == 0, base_ledger

    print(
        f"[faults] run with a teacher SIGKILL after step {ckpt_every}'s checkpoint and a worker SIGKILL at step {kill_at}",
        file=sys.stderr,
        flush=True,
    )
    run_dir = work / "run-faults"
    killer = TeacherKiller(run_dir, ckpt_every)
    killer.start()
    try:
        s = train(_run_config(data, run_dir, steps, ckpt_every, kill_at, teacher_dir, timeout_s))
    finally:
        killer.stop.set()
        killer.join()
    ledger = ledger_counts(ckpt.load_train_state(s["checkpoint"])["sampler"], expected)
    attempts = _events(run_dir / "tb")

    # -- worker kill: the restarted group's rank 0 writes a new event file
    marker = run_dir / f".killed-step-{kill_at}"
    assert marker.is_file(), f"no fault marker {marker}: the worker was not killed"
    t_kill = marker.stat().st_mtime  # written by the worker right before it SIGKILLs itself
    assert len(attempts) == 2, f"expected 2 attempts (one restart), got {len(attempts)}"
    after = attempts[1]["train/bad_steps"]
    assert after[0][0] > t_kill
    t_first, first_step, _ = after[0]
    assert first_step == s["resumed_from_step"] + 1, (first_step, s["resumed_from_step"])
    reached = kill_at - 1  # the last step completed (on every rank: collectives) before the kill
    t_reached = min(t for t, st, _ in after if st == reached)
    worker = {
        "kill": f"SIGKILL of worker rank {NUM_WORKERS - 1} process at the start of step {kill_at}",
        "restarts": s["restarts"],
        "resumed_from_step": s["resumed_from_step"],
        "first_step_after_recovery": first_step,
        "time_lost_s": round(t_first - t_kill, 3),
        "restart_overhead_s": round(t_first - t_kill - normal_step, 3),
        "setback_s": round(t_reached - t_kill, 3),
        "last_step_before_kill": reached,
        "steps_recomputed": reached - s["resumed_from_step"],
        "samples_lost": ledger["samples_lost"],
        "samples_repeated": ledger["samples_repeated"],
    }

    # -- teacher kill: steps from the first attempt's event file (rank 0's Distiller)
    if killer.t_kill is None:
        teacher = {"error": killer.error}
    else:
        teacher = {
            "kill": "SIGKILL of the teacher actor process, label requests in flight",
            **teacher_numbers(attempts[0], killer.t_kill, prefetch=2),
            "kd_batches_rank0_last_attempt": s.get("distill_kd_batches"),
            "samples_lost": ledger["samples_lost"],
            "samples_repeated": ledger["samples_repeated"],
        }
        kd_step = teacher["first_labelled_step_after_restart"]
        if kd_step is not None and kd_step >= kill_at:
            teacher["note"] = "the teacher recovered only after the worker kill: time_lost_s includes it"
    return {
        "level": "dsv3ray.train.train (Ray Train + DeepSpeed, [distill] on): one run, both faults",
        "steps": steps,
        "global_batch": global_batch,
        "checkpoint_every": ckpt_every,
        "distill_timeout_s": timeout_s,
        "normal_step_s": round(normal_step, 4),
        "worker_kill": worker,
        "teacher_kill": teacher,
        **ledger,
        "wall_s": round(s["wall_s"], 2),
        "baseline_wall_s": round(base["wall_s"], 2),
        "wall_time_vs_no_fault": round(s["wall_s"] / base["wall_s"], 3),
        "final_ce_loss": s.get("final_train_loss"),
        "baseline_final_ce_loss": base.get("final_train_loss"),
    }


# --- optional: the teacher kill under the Distiller / teacher pool API alone -----------------------


def _distill_loop(data: Path, teacher_dir: Path, steps: int, kill_at: int | None, timeout_s: float) -> dict:
    """The worker's distillation step loop in miniature; optionally SIGKILL the teacher at `kill_at`."""
    import pyarrow.parquet as pq
    import ray
    import torch

    from actors.teacher import start_teacher_pool, stop_teacher_pool
    from dsv3ray.distill import DistillConfig, Distiller
    from dsv3ray.model import ModelConfig, build_model
    from pipelines.pack import rows_from_arrow
    from pipelines.sampler import CurriculumSampler

    table = pq.read_table(data / "train" / "part-00000.parquet")
    rows_NS = rows_from_arrow(table.column("input_ids"), SEQ_LEN + 1).astype(np.int64)
    rows_NS = rows_NS[np.argsort(table.column("sample_id").to_numpy())]
    B = MICRO_BATCH * NUM_WORKERS
    num_train = len(rows_NS)
    assert num_train == steps * B, (num_train, steps, B)

    torch.manual_seed(0)
    student = build_model(ModelConfig.from_preset("debug", **SMALL))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    cfg = DistillConfig(
        teacher=str(teacher_dir),
        k=8,
        prefetch=2,
        timeout_s=timeout_s,
        teacher_num_cpus=0.5,
        max_restarts=2,
        max_task_retries=3,
    )
    sampler = CurriculumSampler(num_train, seed=0, total_samples=num_train)
    (handle,) = start_teacher_pool(cfg, student_vocab_size=VOCAB)
    tokens_per_step = B * SEQ_LEN
    d = Distiller(cfg, [handle], rank=0, tokens_per_step=tokens_per_step, last_step=steps)

    def fetch(step):
        return [torch.from_numpy(rows_NS[sampler.batch_for_step(step, B)])]

    pid0 = ray.get(handle.info.remote())["pid"]
    done, t_kill, stale = [], None, set()  # done: (wall time, step, labelled, by the restarted teacher)
    t0 = time.time()
    try:
        for step in range(1, steps + 1):
            tokens = (step - 1) * tokens_per_step
            d.prefetch(step, tokens, fetch)
            if step == kill_at:
                # requests for this step and the next are out: which are already answered?
                refs = {k: p.ref for k, p in d.pending.items()}
                ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
                stale = {k for k, r in refs.items() if r in ready}  # labelled by the old process
                t_kill = time.time()
                os.kill(pid0, signal.SIGKILL)
            ids = sampler.batch_for_step(step, B)
            x_BS = torch.from_numpy(rows_NS[ids])
            kd_before = d.counters["kd_batches"]
            out = student(x_BS, labels_BS=x_BS)
            loss, _, difficulty_B = d.loss(step, tokens, 0, out, x_BS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sampler.report_losses(ids, difficulty_B.numpy())
            sampler.commit(step)
            labelled = d.counters["kd_batches"] > kd_before
            fresh = t_kill is not None and labelled and (step, 0) not in stale
            done.append((time.time(), step, labelled, fresh))
        wall = time.time() - t0
        pid1 = ray.get(handle.info.remote(), timeout=60)["pid"]
    finally:
        stop_teacher_pool([handle])
    res = {
        "steps": steps,
        "kd_batches": d.counters["kd_batches"],
        "fallback_batches": d.counters["fallback_batches"],
        "timeouts": d.counters["timeouts"],
        "teacher_errors": d.counters["teacher_errors"],
        "batches_trained": len(done),
        "wall_s": wall,
        "label_wait_s": d.summary()["distill_wait_s"],
        "ledger": ledger_counts(sampler.state_dict(), np.arange(num_train)),
        "step_times": [t for t, *_ in done],
    }
    if kill_at is not None:
        firsts = [(t, st) for t, st, _, fresh in done if fresh]
        res.update(
            teacher_restarted=pid1 != pid0,
            first_labelled_step_after_restart=firsts[0][1] if firsts else None,
            time_lost_s=(firsts[0][0] - t_kill) if firsts else None,
            fallback_steps=[st for _, st, lab, _ in done if not lab],
        )
    return res


def teacher_kill(work: Path, steps: int, kill_at: int, timeout_s: float) -> dict:
    import torch

    from dsv3ray.data import write_synthetic_prepared
    from dsv3ray.distill import export_model
    from dsv3ray.model import ModelConfig, build_model

    data = write_synthetic_prepared(
        work / "data-distill", steps * MICRO_BATCH * NUM_WORKERS, 8, SEQ_LEN, VOCAB
    )
    # The teacher as a HF directory (what distill.teacher names in a run): a restarted actor reloads
    # it from there. (An InMemoryTeacher source this size goes to the object store as the actor's
    # constructor argument; Ray frees it after creation and the restart then fails.)
    torch.manual_seed(1)
    teacher_dir = work / "teacher-hf"
    export_model(build_model(ModelConfig.from_preset("debug", **SMALL, first_k_dense_replace=2)), teacher_dir)
    print("[faults] teacher kill: baseline distillation loop (no fault)", file=sys.stderr, flush=True)
    base = _distill_loop(data, teacher_dir, steps, None, timeout_s)
    assert base["fallback_batches"] == 0 and base["ledger"]["samples_lost"] == 0, base
    print(
        f"[faults] teacher kill: SIGKILL of the teacher actor at step {kill_at}", file=sys.stderr, flush=True
    )
    r = _distill_loop(data, teacher_dir, steps, kill_at, timeout_s)
    t = base["step_times"]
    normal_step = statistics.median(np.diff(t[1:])) if len(t) > 2 else float("nan")
    return {
        "level": "Distiller + teacher pool API (dsv3ray.distill, actors.teacher) in a miniature step loop "
        "(the same fault without Ray Train around it)",
        "kill": f"SIGKILL of the teacher actor process at step {kill_at}, label requests in flight",
        "teacher_source": "HF directory (reloaded by the restarted actor)",
        "steps": steps,
        "timeout_s": timeout_s,
        "teacher_restarted": r["teacher_restarted"],
        "first_labelled_step_after_restart": r["first_labelled_step_after_restart"],
        "time_lost_s": None if r["time_lost_s"] is None else round(r["time_lost_s"], 3),
        "fallback_batches": r["fallback_batches"],  # trained with CE: counted, not lost
        "fallback_steps": r["fallback_steps"],
        "kd_batches": r["kd_batches"],
        "timeouts": r["timeouts"],
        "teacher_errors": r["teacher_errors"],
        "batches_lost": steps - r["batches_trained"],
        "label_wait_s": r["label_wait_s"],  # time the student blocked on labels, whole run
        "baseline_label_wait_s": base["label_wait_s"],
        **r["ledger"],
        "normal_step_s": round(normal_step, 4),
        "wall_s": round(r["wall_s"], 2),
        "baseline_wall_s": round(base["wall_s"], 2),
        "wall_time_vs_no_fault": round(r["wall_s"] / base["wall_s"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    ap.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir, removed)")
    ap.add_argument("--teacher-timeout", type=float, default=2.0, help="distill.timeout_s")
    ap.add_argument(
        "--distiller-level",
        action="store_true",
        help="also the teacher kill under the Distiller API alone (miniature loop, no Ray Train)",
    )
    ap.add_argument("--verbose", action="store_true", help="forward the workers' logs")
    args = ap.parse_args()

    import ray

    from dsv3ray.engine import clear_stale_build_locks

    clear_stale_build_locks()  # (the workers do it too; here before any of them waits)
    # steps, checkpoint_every, kill_at_step: checkpoints every 2 steps; the teacher dies right after
    # step 2's checkpoint; the worker at the start of step kill_at (resume from the last checkpoint)
    steps, ckpt_every, kill_at = (10, 2, 8) if args.quick else (12, 2, 9)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="dsv3ray-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    # Our own local Ray (never a shared `ray start` cluster): 2 workers + teacher/sampler headroom.
    ray.init(
        address="local",
        num_cpus=NUM_WORKERS + 1,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=args.verbose,
        configure_logging=False,
    )
    out = {"benchmark": "faults", "device": "cpu", "cpu_count": os.cpu_count()}
    t0 = time.perf_counter()
    try:
        out["train"] = training_faults(work, steps, ckpt_every, kill_at, args.teacher_timeout)
        if args.distiller_level:
            out["distiller_level_teacher_kill"] = teacher_kill(work, 12, 4, args.teacher_timeout)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    tr = out["train"]
    # the headline numbers (README): time lost per fault, samples lost / repeated, vs the baseline
    out["worker_kill_time_lost_s"] = tr["worker_kill"]["time_lost_s"]
    out["teacher_kill_time_lost_s"] = tr["teacher_kill"].get("time_lost_s")
    out["teacher_kill_fallback_batches"] = tr["teacher_kill"].get("fallback_batches_rank0")
    parts = [tr] + ([out["distiller_level_teacher_kill"]] if args.distiller_level else [])
    out["samples_lost"] = sum(p["samples_lost"] for p in parts)
    out["samples_repeated"] = sum(p["samples_repeated"] for p in parts)
    out["wall_time_vs_no_fault"] = tr["wall_time_vs_no_fault"]
    out["baseline"] = "the same run (same data, steps, distillation) without faults"
    out["ok"] = out["samples_lost"] == 0 and out["samples_repeated"] == 0
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
