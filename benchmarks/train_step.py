"""Training step time under Ray Train vs the same DeepSpeed loop under torchrun; prints JSON.

    python benchmarks/train_step.py [--workers 2] [--steps 20] [--reps 2] [--preset debug] [--gpu]

Both sides train the same model (preset, EP = workers), the same DeepSpeed config, the same
batch shapes and the same synthetic prepared data:
- ray:      `dsv3ray.train.train` (TorchTrainer, sampler actor, Ray Data rows, TensorBoard) —
            the real training path; its step time excludes the first step.
- torchrun: `torchrun --nproc_per_node=W benchmarks/train_step.py --torchrun-worker ...`: the
            DeepSpeed step loop alone (local sampler, rows read with pyarrow).
ray_overhead = ray step time / torchrun step time - 1 (target <= 0.05).
MFU = tokens/s x train FLOPs/token (dsv3ray.cost) / (measured matmul peak per worker x W); the peak
is a timed fp32 (CPU) / bf16 (GPU) GEMM with the threads one worker gets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEQ_LEN, MICRO_BATCH, VOCAB = 128, 4, 2048


def matmul_peak_flops(device: str, threads: int, n: int = 1024, reps: int = 5) -> float:
    """Measured dense GEMM FLOP/s of one worker (same thread count as a training worker)."""
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2.0 * n**3 * reps / (time.perf_counter() - t)


def _model_overrides(preset: str) -> list[str]:
    return [
        f"model.vocab_size={VOCAB}",
        f"model.max_position_embeddings={SEQ_LEN + 1}",
        "model.moe_impl=auto",
    ]


def run_config(args, data: Path, run_dir: Path):
    from dsv3ray.runconfig import resolve_run_config

    return resolve_run_config(
        preset=args.preset,
        overrides=_model_overrides(args.preset)
        + [
            f"data.prepared={data}",
            f"train.run_dir={run_dir}",
            f"train.num_workers={args.workers}",
            f"train.ep_size={args.workers}",
            f"train.steps={args.steps}",
            f"train.micro_batch_size={MICRO_BATCH}",
            f"train.use_gpu={'true' if args.gpu else 'false'}",
            "train.log_every=1000000",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.checkpoint_every=0",
            "curriculum.enabled=false",
            "deepspeed.zero_optimization={stage = 1}",
            'deepspeed.optimizer={type = "AdamW", params = {lr = 1e-3}}',
        ],
    )


# --- the torchrun side ---------------------------------------------------------------------------


def torchrun_worker(args) -> None:
    """The DeepSpeed step loop of dsv3ray.train without Ray: same model, engine, batches."""
    import pyarrow.parquet as pq
    import torch.distributed as dist

    from dsv3ray.engine import build_engine, grads_are_finite
    from dsv3ray.model import build_model
    from dsv3ray.parallel import create_expert_parallel
    from pipelines.pack import rows_from_arrow
    from pipelines.sampler import CurriculumSampler

    run = run_config(args, Path(args.data), Path(args.out) / "unused")
    cfg, mcfg = run.train, run.model
    torch.set_num_threads(args.threads)
    from dsv3ray.train import plan

    ds_config = plan(run)["ds_config"]
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cfg.use_gpu else torch.device("cpu")
    )
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    # build_engine initializes torch.distributed from torchrun's env; the EP groups need it first
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = create_expert_parallel(cfg.ep_size, mcfg.n_routed_experts)
    engine, _, _ = build_engine(build_model(mcfg, ep=ep), ds_config, ep=ep)
    model = engine.module
    t = pq.read_table(Path(args.data) / "train")
    table_NS = np.zeros((t.num_rows, SEQ_LEN + 1), dtype=np.int32)
    table_NS[np.asarray(t["sample_id"])] = rows_from_arrow(t["input_ids"], SEQ_LEN + 1)
    sampler = CurriculumSampler(t.num_rows, cfg.seed, run.curriculum)  # same ids on every rank
    G = cfg.micro_batch_size * world
    times = []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        ids = sampler.batch_for_step(step, G)[rank * cfg.micro_batch_size : (rank + 1) * cfg.micro_batch_size]
        x_BS = torch.from_numpy(table_NS[ids].astype(np.int64)).to(device)
        out = engine(x_BS, labels_BS=x_BS)
        engine.backward(out.loss)
        assert grads_are_finite(engine)
        engine.step()
        # one closing all-reduce, as dsv3ray.train's step: loss sums, per-sample losses (each
        # rank in its slots), expert load
        B, load = cfg.micro_batch_size, out.expert_load_LE.detach()
        vec = torch.zeros(2 + G + load.numel(), dtype=torch.float64)
        vec[:2] = torch.stack([out.loss.detach(), out.ce_loss.detach()]).double().cpu()
        vec[2 + rank * B : 2 + (rank + 1) * B] = out.loss_per_sample.detach().double().cpu()
        vec[2 + G :] = load.double().cpu().reshape(-1)
        vec = vec.to(device)
        dist.all_reduce(vec)
        vec = vec.cpu()
        stats = vec[:2].float()
        model.update_routing_bias(vec[2 + G :].reshape(load.shape).float().to(device), summed=True)
        sampler.commit(step)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if rank == 0:
        Path(args.out, "torchrun.json").write_text(
            json.dumps(
                {
                    "step_time_s": float(np.mean(times[1:])),
                    "peak_rss_mb": peak,
                    "final_ce": float(stats[1] / world),
                }
            )
        )
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of each launcher")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torchrun_worker:
        torchrun_worker(args)
        return

    from dsv3ray.cost import train_flops_per_token
    from dsv3ray.data import write_synthetic_prepared
    from dsv3ray.malloc import worker_env
    from dsv3ray.train import train

    work = Path(tempfile.mkdtemp(prefix="dsv3ray-bench-"))
    data = write_synthetic_prepared(
        work / "data", num_train=512, num_eval=16, seq_len=SEQ_LEN, vocab_size=VOCAB
    )
    threads = max(1, (os.cpu_count() or 1) // args.workers) if not args.gpu else 4
    # the torchrun workers get the malloc settings Ray Train workers get (dsv3ray.malloc)
    env = {**os.environ, **worker_env(), "OMP_NUM_THREADS": str(threads)}

    # Alternate the launchers (torchrun, Ray, torchrun, Ray, ...) so load from other processes on a
    # shared machine hits both alike; Ray is shut down between repetitions. Estimate = the fastest
    # repetition of each (the least disturbed), all repetitions are printed too.
    import ray

    tr_times, ray_times = [], []
    for rep in range(args.reps):
        out_dir = work / f"torchrun{rep}"
        out_dir.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}", "--standalone", __file__,
               "--torchrun-worker", "--data", str(data), "--out", str(out_dir), "--threads", str(threads),
               f"--workers={args.workers}", f"--steps={args.steps}", f"--preset={args.preset}"] + (["--gpu"] if args.gpu else [])  # fmt: skip
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tr = json.loads((out_dir / "torchrun.json").read_text())
        tr_times.append(tr["step_time_s"])
        run = run_config(args, data, work / f"ray-run{rep}")
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON only
            s = train(run)
            ray.shutdown()
        ray_times.append(s["step_time_s"])
    device = "cuda" if args.gpu else "cpu"
    peak = matmul_peak_flops(device, threads)
    tokens_per_step = MICRO_BATCH * args.workers * SEQ_LEN
    flops_tok = train_flops_per_token(run.model, SEQ_LEN)
    ray_step, tr_step = min(ray_times), min(tr_times)
    out = {
        "preset": args.preset,
        "workers": args.workers,
        "ep_size": args.workers,
        "device": device,
        "threads_per_worker": threads,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "reps": args.reps,
        "ray_step_times_s": ray_times,
        "torchrun_step_times_s": tr_times,
        "ray_step_time_s": ray_step,
        "torchrun_step_time_s": tr_step,
        "ray_overhead": ray_step / tr_step - 1.0,
        "ray_tokens_per_s": tokens_per_step / ray_step,
        "torchrun_tokens_per_s": tokens_per_step / tr_step,
        "train_flops_per_token": flops_tok,
        "matmul_peak_flops_per_worker": peak,
        "ray_mfu": tokens_per_step / ray_step * flops_tok / (peak * args.workers),
        "torchrun_mfu": tokens_per_step / tr_step * flops_tok / (peak * args.workers),
        "ray_peak_rss_mb_per_worker": s.get("peak_rss_mb_per_worker"),
        "torchrun_peak_rss_mb_rank0": tr["peak_rss_mb"],
        "peak_gpu_mem_mb": s.get("peak_gpu_mem_mb"),
        "final_ce": {"ray": s.get("final_train_loss"), "torchrun": tr["final_ce"]},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
