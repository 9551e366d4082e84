"""Heterogeneous workers: aggregate throughput of 2 DeepSpeed ranks, one of them 2x slower, with the
global batch split by measured throughput (`dsv3ray.hetero.BatchBalancer`) vs the naive equal split.

Throttle (documented): each rank emulates a device of a fixed speed. A calibration phase measures
the real cost per sample (equal split, no throttle; `unit` = headroom x the slowest rank's median
seconds per sample). Then in every step a rank runs its real forward/backward/step and sleeps until
its emulated budget n_r x unit x speed_r has passed (speed 1 for the fast rank, `factor` for the
slow one). Sleeping (not extra compute) keeps the two ranks from slowing each other down on a
shared CPU, and the budget absorbs the machine's load noise; a step whose real compute overran the
budget just counts as slower ("overrun_steps"). The balancer sees only what it would see on real
hardware: step wall time minus the time blocked in collectives (`CommTimer`).
Ideal = the sum of the ranks' capacities (n_r / compute_r, measured in the same step: machine load
hits both sides of the ratio alike); efficiency = (G / step wall time) / ideal, median over the
timed steps. Baseline = the equal split (2/3 of ideal for factor 2); target with balancing >= 0.90.
Also reported: "balance_efficiency" (the split alone: G / slowest rank's compute / ideal, i.e. with
communication removed) and "comm_share" (the step's time beyond the slowest rank's compute).
Both modes use the same engine, batches and loss weighting (the gradient equals the equal split's).
Prints one JSON line.

    .venv/bin/python benchmarks/hetero.py                      # 2 CPU ranks, EP=2, ZeRO-2
    .venv/bin/python benchmarks/hetero.py --factor 3 --ep 1 --stage 1
    HETERO_DEBUG=1 .venv/bin/python benchmarks/hetero.py    # also print every step (rank 0)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(args.threads)
    import deepspeed
    import torch.distributed as dist

    from dsv3ray.engine import build_engine, resolve_deepspeed_config
    from dsv3ray.hetero import (
        BatchBalancer,
        CommTimer,
        HeteroConfig,
        gather_measurements,
        loss_weight,
        micro_slices,
    )
    from dsv3ray.model import ModelConfig, build_model
    from dsv3ray.parallel import create_expert_parallel

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = ModelConfig.from_preset("debug", vocab_size=512, moe_impl="torch")
    ep = create_expert_parallel(args.ep, cfg.n_routed_experts)
    torch.manual_seed(0)
    G, A = args.global_batch, args.grad_accum
    ds, _ = resolve_deepspeed_config(
        {"zero_optimization": {"stage": args.stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
        device="cpu",
        has_moe=True,
        world_size=world,
        micro_batch_size=max(1, G // (world * A)),
        grad_accum=A,
        dtype="fp32",
    )
    engine, _, _ = build_engine(
        build_model(cfg, ep if args.ep > 1 else None), {**ds, "steps_per_print": 10**9}, ep
    )
    g = torch.Generator().manual_seed(1)
    speed = args.factor if rank == args.slow_rank else 1.0
    unit = None  # emulated seconds per sample at speed 1 (set by the calibration)

    def run(balance: bool, steps: int) -> dict:
        hcfg = HeteroConfig(
            balance=balance,
            warmup_steps=1,
            measure_steps=2,
            window=args.window,
            rebalance_threshold=args.threshold,
        )
        bal = BatchBalancer(world, G, hcfg, min_each=A)
        skip = hcfg.warmup_steps + hcfg.measure_steps + 1  # timed from the first step after a re-split
        step_s, effs, thr, ideal, balance_effs, comm_share = [], [], [], [], [], []
        overruns = 0
        per_sample = []
        for step in range(steps):
            ids_G = torch.randint(0, cfg.vocab_size, (G, args.seq), generator=g)
            start, stop = bal.bounds(rank)
            dist.barrier()
            t0 = time.perf_counter()
            with CommTimer() as ct:
                for a, b in micro_slices(stop - start, A):
                    x = ids_G[start + a : start + b]
                    loss = engine(x, x).loss
                    engine.backward(loss * loss_weight(b - a, G, world, A))
                    engine.step()
                compute = time.perf_counter() - t0 - ct.seconds
                per_sample.append(compute / (stop - start))
                if unit is not None:  # the throttle: pad to this rank's emulated budget
                    budget = unit * speed * (stop - start)
                    overruns += compute > budget
                    time.sleep(max(0.0, budget - compute))
                    compute = max(compute, budget)
                counts, secs = gather_measurements(stop - start, compute)
            wall = time.perf_counter() - t0  # the same on every rank: the step ends with an all-gather
            bal.observe(counts, secs)
            if os.environ.get("HETERO_DEBUG") and rank == 0:
                print(
                    f"{balance} s{step} n={counts} c={[round(x, 3) for x in secs]} comm={ct.seconds:.3f} wall={wall:.3f}"
                )
            if step >= skip:
                # Capacities measured in the same step as its wall time: the machine's load (other
                # processes on a shared CPU) hits both sides of the ratio alike.
                cap = sum(n / t for n, t in zip(counts, secs))
                step_s.append(wall)
                thr.append(G / wall)
                ideal.append(cap)
                effs.append(G / wall / cap)
                # the split alone (no communication): slowest rank's compute vs the ideal
                balance_effs.append(G / max(secs) / cap)
                comm_share.append(1.0 - max(secs) / wall)
        return {
            "per_sample_s": statistics.median(per_sample),
            "overrun_steps": overruns,
            "efficiency": statistics.median(effs) if effs else None,
            "efficiency_pooled": sum(thr) / sum(ideal) if ideal else None,
            "balance_efficiency": statistics.median(balance_effs) if balance_effs else None,
            "comm_share": statistics.median(comm_share) if comm_share else None,
            "samples_per_s": G * len(step_s) / sum(step_s) if step_s else None,
            "ideal_samples_per_s": statistics.mean(ideal) if ideal else None,
            "split": bal.split,
            "rebalances": bal.rebalances,
        }

    calib = run(False, args.calibration_steps)
    costs = [None] * world
    dist.all_gather_object(costs, calib["per_sample_s"])
    unit = args.headroom * max(costs)
    results = {"unit_s_per_sample": unit}
    for _ in range(args.rounds):  # alternate so machine-load drift hits both modes alike
        for mode in ("off", "on"):
            results.setdefault(mode, []).append(run(mode == "on", args.steps))
    if rank == 0:
        torch.save(results, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=2.0, help="how many times slower the slow rank is")
    ap.add_argument("--slow-rank", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="steps per mode and round (first 4 not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--calibration-steps", type=int, default=3)
    ap.add_argument("--headroom", type=float, default=2.5, help="emulated budget / measured cost per sample")
    ap.add_argument("--window", type=int, default=8, help="HeteroConfig.window")
    ap.add_argument("--threshold", type=float, default=0.1, help="HeteroConfig.rebalance_threshold")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    if args.steps <= 4:
        ap.error("--steps must be > 4 (1 warmup + 2 measured + 1 re-split step are not timed)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.pt")
        mp.spawn(_worker, args=(2, port, args, out), nprocs=2, join=True)
        results = torch.load(out)

    def agg(mode):
        rs = results[mode]
        return {
            "efficiency": statistics.median(r["efficiency"] for r in rs),
            "efficiency_pooled": statistics.median(r["efficiency_pooled"] for r in rs),
            "balance_efficiency": statistics.median(r["balance_efficiency"] for r in rs),
            "comm_share": statistics.median(r["comm_share"] for r in rs),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "ideal_samples_per_s": statistics.median(r["ideal_samples_per_s"] for r in rs),
            "split": rs[-1]["split"],
            "rebalances": rs[-1]["rebalances"],
            "overrun_steps": sum(r["overrun_steps"] for r in rs),
            "steps": args.steps * len(rs),
        }

    on, off = agg("on"), agg("off")
    print(
        json.dumps(
            {
                "benchmark": "hetero",
                "workers": 2,
                "slow_rank": args.slow_rank,
                "slow_factor": args.factor,
                "throttle": "each rank sleeps until its emulated budget n x unit x speed (slow rank: speed = factor) has passed",
                "global_batch": args.global_batch,
                "grad_accum": args.grad_accum,
                "seq": args.seq,
                "ep_size": args.ep,
                "zero_stage": args.stage,
                "emulated_s_per_sample": round(results["unit_s_per_sample"], 4),
                "headroom": args.headroom,
                "balanced": on,
                "equal_split": off,
                "efficiency_balanced": round(on["efficiency"], 4),
                "efficiency_equal_split": round(off["efficiency"], 4),
                "speedup_vs_equal_split": round(on["samples_per_s"] / off["samples_per_s"], 4),
                "target_efficiency": 0.9,
                "meets_target": on["efficiency"] >= 0.9,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
