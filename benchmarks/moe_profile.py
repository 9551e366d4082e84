"""Where a MoE step's time goes: host (Python, launches) vs device (kernels), per variant; JSON lines.

    python benchmarks/moe_profile.py [--top-k 1 8] [--reps 5] [--out DIR]
    python benchmarks/moe_profile.py --smoke --triton-cpu    # tiny shapes: checks the script

The variants of `benchmarks/moe_layer.py` at its seed shapes (4096 tokens, hidden 1024, 128 experts,
intermediate 344, bf16), forward + backward: routing alone (route + permute + unpermute) through the
torch seams and through Triton, the expert MLP alone through grouped_mm and through Triton, and the
whole routed layer both ways. The 2026-11-28 H200 run left two GPU targets unmet (Triton MLP 0.4x
grouped_mm; Triton routing 1.2-1.85x the torch path, not 2x) with every step far above its kernels'
work (routing 1.5 ms for ~12 kernels on 8 MB): this says whether the wall time is the host issuing
work or the device running it, and which ops cost the most, so the next change aims at the right one.

One line per (top_k, variant): {"wall_ms": step with a sync at the end (min over reps), "host_ms":
the same step until its last call returns (no sync: what the Python thread spends issuing work),
"device_ms": the device time of its kernels per step (profiler; null on CPU), "kernels": device
kernel launches per step (null on CPU), "ops": aten ops per step, "top_host": the ops with the most
host time, "top_device": the kernels with the most device time}. A variant that fails reports its
error and the others go on. With --out DIR the lines go to DIR/profile.jsonl and each variant's
profiler table to DIR/<variant>_top<k>.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.moe_layer import (  # noqa: E402  (the repo root must be importable first)
    TRITON_OPS,
    RoutedMoE,
    gmm_swiglu,
    torch_ops,
)


def variants(top_k: int, shape: dict, dev, dtype, triton: bool) -> dict:
    """name -> step (forward + backward, fresh grads each call) at these shapes."""
    import kernels

    T, D, E, I = shape["tokens"], shape["hidden"], shape["experts"], shape["intermediate"]
    torch.manual_seed(0)
    moe = RoutedMoE(D, E, I, top_k).to(dev)
    moe.gate_up_proj.data = moe.gate_up_proj.data.to(dtype)
    moe.down_proj.data = moe.down_proj.data.to(dtype)
    x_TD = torch.randn(T, D, device=dev, dtype=dtype)
    gy_TD = torch.randn_like(x_TD)
    with torch.no_grad():
        logits_TE = x_TD.float() @ moe.router_weight.t()
        _, ex_TK, _ = kernels.route_ref(logits_TE, moe.bias_E, top_k, 1, 1, top_k > 1, 1.0)
        xs_ND, _, offsets_E = kernels.permute_ref(x_TD, ex_TK, E)
    gys_ND = torch.randn_like(xs_ND)
    seams = {"torch": torch_ops(dev)}
    if triton:
        seams["triton"] = TRITON_OPS
    steps = {}
    for name, ops in seams.items():

        def routing(ops=ops):
            lg = logits_TE.clone().requires_grad_()
            xr = x_TD.clone().requires_grad_()
            w_TK, e_TK, _ = ops.route(lg, moe.bias_E, top_k, 1, 1, top_k > 1, 1.0)
            xs, idx_N, _ = ops.permute(xr, e_TK, E)
            ops.unpermute(xs, idx_N, w_TK).backward(gy_TD)

        def layer(ops=ops):
            moe.zero_grad(set_to_none=True)
            moe(x_TD.clone().requires_grad_(), ops).backward(gy_TD)

        steps[f"routing_{name}"] = routing
        steps[f"layer_{name}"] = layer
    mlps = {"mlp_gmm": gmm_swiglu}
    if triton:
        mlps["mlp_triton"] = kernels.grouped_swiglu
    w1 = moe.gate_up_proj.detach().clone().requires_grad_()
    w2 = moe.down_proj.detach().clone().requires_grad_()
    for name, fn in mlps.items():

        def mlp(fn=fn):
            w1.grad = w2.grad = None
            fn(xs_ND.clone().requires_grad_(), w1, w2, offsets_E).backward(gys_ND)

        steps[name] = mlp
    return dict(sorted(steps.items()))


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(step, dev, reps: int, warmup: int, table_path: Path | None) -> dict:
    for _ in range(warmup):  # compiles, caches, allocator
        step()
    _sync(dev)
    host, wall = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
        _sync(dev)
        wall.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            step()
        _sync(dev)
    events = prof.events()
    on_device = [e for e in events if e.device_type.name == "CUDA"]
    averages = prof.key_averages()

    def top(key, n=8):
        rows = sorted(averages, key=lambda a: getattr(a, key), reverse=True)[:n]
        return [
            [a.key[:80], round(getattr(a, key) / reps / 1e3, 4), a.count // reps]
            for a in rows
            if getattr(a, key) > 0
        ]

    out = {
        "wall_ms": round(min(wall) * 1e3, 3),
        "host_ms": round(min(host) * 1e3, 3),
        "device_ms": round(sum(e.self_device_time_total for e in on_device) / reps / 1e3, 4) if on_device else None,
        "kernels": round(len(on_device) / reps, 1) if dev.type == "cuda" else None,
        "ops": round(sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")) / reps, 1),
        "top_host": top("self_cpu_time_total"),
        "top_device": top("self_device_time_total") if on_device else [],
    }  # fmt: skip
    if table_path is not None:
        sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
        table_path.write_text(averages.table(sort_by=sort_by, row_limit=30))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (64 tokens, hidden 32, 4 experts)")
    ap.add_argument("--triton-cpu", action="store_true", help="Triton variants under the interpreter too")
    ap.add_argument("--out", help="directory for profile.jsonl and the profiler tables")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = dict(tokens=4096, hidden=1024, experts=128, intermediate=344)
    if args.smoke:
        shape = dict(tokens=64, hidden=32, experts=4, intermediate=16)
        args.reps, args.warmup = 1, 1
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    triton = dev.type == "cuda" or args.triton_cpu
    for k in args.top_k:
        for name, step in variants(k, shape, dev, dtype, triton).items():
            line = {"top_k": k, "variant": name, "device": str(dev), "dtype": args.dtype, **shape}
            table = out_dir / f"{name}_top{k}.txt" if out_dir is not None else None
            try:
                line.update(measure(step, dev, args.reps, args.warmup, table))
            except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others
                line["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            text = json.dumps(line)
            print(text, flush=True)
            if out_dir is not None:
                with open(out_dir / "profile.jsonl", "a") as f:
                    f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
