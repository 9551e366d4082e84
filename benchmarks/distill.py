"""Distillation overhead: student step time with KD (teacher on its own Ray actor, labels
prefetched) vs the same student with CE alone, and soft-label bytes per token per compression.

Baseline = the same student, same batches, CE only. Target: KD / CE step time <= 1.10.
Also timed: KD with the labels already at hand ("kd_local"), the student-side cost of the KD loss
alone; the gap between it and "kd" is the teacher's cost to the student (waiting on labels, and on
a machine with fewer free cores than student + teacher need, CPU contention).
CE and KD rounds alternate so load drift on a shared machine hits both alike; medians are reported.
Prints one JSON line.

    .venv/bin/python benchmarks/distill.py                 # CPU, debug-preset student
    .venv/bin/python benchmarks/distill.py --device cuda   # GPU student, teacher on a GPU fraction
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating CE / KD rounds")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--compression", default="topk", choices=["topk", "sample"])
    ap.add_argument("--teacher-layers", type=int, default=2, help="layers of the dense teacher")
    ap.add_argument("--student-threads", type=int, default=1, help="torch threads of the student (CPU)")
    args = ap.parse_args()

    import ray

    from actors.teacher import InMemoryTeacher, start_teacher_pool, stop_teacher_pool
    from dsv3ray.distill import DistillConfig, Distiller, compress, kd_loss, mix_loss
    from dsv3ray.model import ModelConfig, build_model

    device = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(args.student_threads)
    torch.manual_seed(0)
    student_cfg = ModelConfig.from_preset("debug", moe_impl="torch" if args.device == "cpu" else "auto")
    teacher_cfg = ModelConfig.from_preset(
        "debug",
        num_hidden_layers=args.teacher_layers,
        first_k_dense_replace=args.teacher_layers,  # dense: every layer an MLP
        moe_impl="torch",
    )
    teacher = build_model(teacher_cfg)
    student = build_model(student_cfg).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    V = student_cfg.vocab_size
    batches = [torch.randint(0, V, (args.batch, args.seq + 1)) for _ in range(8)]

    # address="local": our own Ray, even where a `ray start` cluster ran (its address file stays behind)
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    cfg = DistillConfig(
        teacher="benchmark",
        compression=args.compression,
        k=args.k,
        prefetch=2,
        timeout_s=120.0,
        teacher_num_cpus=1.0,
        teacher_num_gpus=0.25 if args.device == "cuda" else 0.0,
    )
    handles = start_teacher_pool(cfg, source=InMemoryTeacher.from_model(teacher))
    tokens_per_step = args.batch * args.seq
    distiller = Distiller(cfg, handles, rank=0, tokens_per_step=tokens_per_step)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = 0

    # labels of every batch computed up front: isolates the student-side cost of the KD loss
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        local_labels = [
            compress(teacher(x).logits, args.compression, args.k, 1.0, generator=gen) for x in batches
        ]

    def one_step(mode: str) -> tuple[float, dict]:
        """mode: "ce" (baseline), "kd_local" (labels at hand), "kd" (labels from the teacher actor)."""
        nonlocal step
        x_BS = batches[step % len(batches)].to(device)
        sync()
        t0 = time.perf_counter()
        metrics = {}
        if mode == "kd":
            distiller.prefetch(step, step * tokens_per_step, lambda s: [batches[s % len(batches)]])
        out = student(x_BS, labels_BS=x_BS)
        loss = out.loss
        if mode == "kd":
            loss, metrics, _ = distiller.loss(step, step * tokens_per_step, 0, out, x_BS)
        elif mode == "kd_local":
            kd, _ = kd_loss(out.logits, local_labels[step % len(batches)], 1.0, x_BS)
            loss = mix_loss(out, kd, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step += 1
        return time.perf_counter() - t0, metrics

    ce_s, local_s, kd_s, waits, latencies = [], [], [], [], []
    try:
        for _ in range(2):  # warmup every path (first teacher call, allocator)
            for mode in ("ce", "kd_local", "kd"):
                one_step(mode)
        for _ in range(args.rounds):
            ce_s += [one_step("ce")[0] for _ in range(args.steps)]
            local_s += [one_step("kd_local")[0] for _ in range(args.steps)]
            # the first KD step of a round pays the prefetch that CE rounds do not issue; time the rest
            one_step("kd")
            for _ in range(args.steps):
                dt, m = one_step("kd")
                kd_s.append(dt)
                waits.append(m.get("distill/wait_s", 0.0))
                latencies.append(m.get("distill/teacher_latency_s", 0.0))
        fallbacks = distiller.counters["fallback_batches"]
    finally:
        stop_teacher_pool(handles)
        ray.shutdown()

    # bytes per token of each compression on real teacher logits of one batch
    with torch.no_grad():
        logits = teacher(batches[0]).logits
    bytes_per_token = {
        kind: compress(logits, kind, args.k, 1.0, generator=gen).bytes_per_token()
        for kind in ("topk", "sample")
    }
    bytes_per_token["dense_fp16"] = 2.0 * V
    ce_med, kd_med, local_med = statistics.median(ce_s), statistics.median(kd_s), statistics.median(local_s)
    print(
        json.dumps(
            {
                "benchmark": "distill",
                "device": str(device),
                "student": "debug preset (MoE)",
                "teacher": f"debug preset, {args.teacher_layers} dense layers, own Ray actor",
                "batch": args.batch,
                "seq": args.seq,
                "compression": args.compression,
                "k": args.k,
                "student_step_s_ce": round(ce_med, 5),
                "student_step_s_kd": round(kd_med, 5),
                "student_step_s_kd_local_labels": round(local_med, 5),
                "kd_local_over_ce": round(local_med / ce_med, 3),
                "kd_over_ce": round(kd_med / ce_med, 3),
                "target_kd_over_ce": 1.10,
                "meets_target": kd_med / ce_med <= 1.10,
                # what the student itself pays (KD loss + waiting on labels), i.e. the ratio when the
                # teacher does not share the student's cores (a GPU or node of its own)
                "student_side_over_ce": round((local_med + statistics.median(waits)) / ce_med, 3),
                "cpu_count": os.cpu_count(),
                "wait_s_per_step_median": round(statistics.median(waits), 5),
                "teacher_latency_s_median": round(statistics.median(latencies), 5),
                "fallback_batches": fallbacks,
                "bytes_per_token": {k: round(v, 2) for k, v in bytes_per_token.items()},
                "timed_steps": len(ce_s),
            }
        )
    )


if __name__ == "__main__":
    main()
