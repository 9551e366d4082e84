"""MoE layer benchmark: the seed's DynamicSparseLayer vs dense vs our torch and Triton paths (fwd + bwd).

Prints one JSON line per top-k case. Variants (each one full training step: forward + backward):
  (a) seed        the seed article's DynamicSparseLayer: E nn.Linear(D, D) experts, softmax router,
                  top-k mask, sum(expert(x * mask[:, i:i+1])) * 1/keep_ratio: EVERY expert runs on
                  EVERY token (obvious typos fixed, semantics kept).
  (b) dense       a dense SwiGLU FFN with the routed layer's activated parameters (intermediate K*I):
                  the FLOP floor.
  (c) torch       our layer as the model runs it with moe_impl="torch" on this device
                  (dsv3ray.moe.moe_ops): on CPU the CPU strategy, kernels' permute_torch /
                  unpermute_torch (gather-only backward) and grouped_swiglu_torch (per-expert GEMMs,
                  one single-threaded worker per core); on CUDA the plain seams (grouped_mm,
                  indexing). Without dsv3ray: kernels' references.
  (c') torch_alt  the other torch seams, for comparison: on CPU the plain ones (dsv3ray.moe.TORCH_OPS:
                  grouped_mm, indexing with a scatter-add backward), on CUDA the CPU strategy. The
                  router is (c)'s in both.
  (d) triton      our layer through the Triton kernels (GPU; on CPU only with --triton-cpu).
  (e) gmm_mlp     the expert MLP alone through torch.nn.functional.grouped_mm (+ mlp_triton,
                  mlp_torch_fast = grouped_swiglu_torch on the same rows), and routing alone
                  (route+permute+unpermute): routing_torch = (c)'s, routing_torch_alt = (c')'s, Triton.
Times are the minimum over repetitions (robust to other load on a shared machine), in ms; `cpu_ms`
is the process CPU time of that step (all threads; on a loaded machine it shows the work done when
wall time also shows waiting for a core).
Memory: `saved_MB` = bytes autograd keeps for backward (activations, parameters excluded) on every
device; `peak_MB` = peak allocated during the step above the start (CUDA only).

The process runs with dsv3ray's malloc settings (`dsv3ray.malloc`, as its training processes do:
large freed blocks stay in the heap); `DSV3RAY_MALLOC=system` measures with glibc's defaults. The
JSON line's `malloc` says which.

Our layer's experts are SwiGLU with I = --intermediate (default 344 ~ D/3, so one expert has the seed
expert's D*D parameters and a token's activated expert FLOPs match the seed's per-expert FLOPs).
Usage: python benchmarks/moe_layer.py [--quick] [--tokens 4096 --hidden 1024 --experts 128 --top-k 1 2 8]
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402  (the repo root must be importable first)

try:  # the model's torch seams (entry-level script: may import dsv3ray)
    from dsv3ray.moe import CPU_TORCH_OPS as _DSV3_CPU_OPS
    from dsv3ray.moe import TORCH_OPS as _DSV3_OPS
    from dsv3ray.moe import moe_ops as _dsv3_moe_ops
except Exception as exc:  # noqa: BLE001 - fall back to the references, say so in the output
    _DSV3_OPS = _DSV3_CPU_OPS = _dsv3_moe_ops = None
    _DSV3_ERR = f"{type(exc).__name__}: {exc}"
else:
    _DSV3_ERR = None


class Ops:
    def __init__(self, route, permute, grouped_swiglu, unpermute):
        self.route, self.permute, self.grouped_swiglu, self.unpermute = (
            route,
            permute,
            grouped_swiglu,
            unpermute,
        )


def _ops(o) -> Ops:
    return Ops(o.route, o.permute, o.grouped_swiglu, o.unpermute)


def torch_ops(dev: torch.device) -> Ops:
    """(c): what the model runs with moe_impl="torch" on dev (dsv3ray.moe.moe_ops); kernels'
    references without dsv3ray."""
    if _dsv3_moe_ops is not None:
        return _ops(_dsv3_moe_ops("torch", dev))
    return Ops(kernels.route_ref, kernels.permute_ref, kernels.grouped_swiglu_ref, kernels.unpermute_ref)


def alt_ops(dev: torch.device) -> Ops:
    """(c'): the other torch seams of dsv3ray.moe (CPU strategy <-> grouped_mm + indexing);
    without dsv3ray, kernels' CPU-strategy pieces."""
    if _dsv3_moe_ops is not None:
        return _ops(_DSV3_OPS if _dsv3_moe_ops("torch", dev) is _DSV3_CPU_OPS else _DSV3_CPU_OPS)
    return Ops(
        kernels.route_ref, kernels.permute_torch, kernels.grouped_swiglu_torch, kernels.unpermute_torch
    )


TRITON_OPS = Ops(kernels.route, kernels.permute, kernels.grouped_swiglu, kernels.unpermute)


# ----------------------------------------------------------------------------- the layers


class DynamicSparseLayer(nn.Module):
    """The seed article's layer (typos fixed): every expert runs on every (masked) token."""

    def __init__(self, hidden_size: int, num_experts: int, keep_ratio: float):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(hidden_size, hidden_size) for _ in range(num_experts)])
        self.router = nn.Linear(hidden_size, num_experts)
        self.keep_ratio = keep_ratio
        self.k = max(1, round(keep_ratio * num_experts))

    def forward(self, x_TD):
        scores_TE = F.softmax(self.router(x_TD), dim=-1)
        top = scores_TE.topk(self.k, dim=-1)
        mask_TE = torch.zeros_like(scores_TE).scatter(-1, top.indices, top.values)
        out = sum(expert(x_TD * mask_TE[:, i : i + 1]) for i, expert in enumerate(self.experts))
        return out * (1.0 / self.keep_ratio)


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_TD):
        g, u = self.gate_up(x_TD).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class RoutedMoE(nn.Module):
    """Our routed layer over the four seams (shared experts left out: they are a dense FFN)."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, top_k: int):
        super().__init__()
        D, E, I = hidden_size, num_experts, intermediate_size
        self.router_weight = nn.Parameter(torch.randn(E, D) / D**0.5)  # fp32 like DeepSeek's gate
        self.register_buffer("bias_E", torch.zeros(E))
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, D) / D**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, D, I) / I**0.5)
        self.top_k = top_k

    def forward(self, x_TD, ops: Ops, mlp=None):
        E = self.bias_E.shape[0]
        logits_TE = x_TD.float() @ self.router_weight.t()
        w_TK, ex_TK, _ = ops.route(logits_TE, self.bias_E, self.top_k, 1, 1, self.top_k > 1, 1.0)
        xs_ND, sort_idx_N, offsets_E = ops.permute(x_TD, ex_TK, E)
        ys_ND = (mlp or ops.grouped_swiglu)(xs_ND, self.gate_up_proj, self.down_proj, offsets_E)
        return ops.unpermute(ys_ND, sort_idx_N, w_TK)


def gmm_swiglu(x_ND, w1_EJD, w2_EDI, offsets_E):
    """The expert MLP through grouped_mm alone (variant e)."""
    gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    I = w2_EDI.shape[2]
    gu_NJ = gmm(x_ND, w1_EJD.transpose(1, 2), offs=offsets_E)
    h_NI = F.silu(gu_NJ[:, :I]) * gu_NJ[:, I:]
    return gmm(h_NI, w2_EDI.transpose(1, 2), offs=offsets_E)


# ----------------------------------------------------------------------------- measuring


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _err(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def measure_all(cases: dict, dev) -> dict:
    """cases: name -> (step, params, reps, warmup); step() runs forward + backward.

    Repetitions are interleaved (round r of every variant, then round r + 1) so that load from
    other processes on a shared machine hits all variants alike; each variant reports its minimum
    wall time, its process CPU time in that round, the bytes autograd saved for backward
    (parameters excluded) and, on CUDA, its peak allocation above the start. A variant that raises
    reports its error and drops out; the others go on.
    """
    res = {name: {"ms": None, "cpu_ms": None, "walls": [], "cpus": []} for name in cases}

    def run(name, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others
            res[name]["error"] = _err(exc)

    def zero(params):
        for p in params:
            p.grad = None

    for name, (step, params, _, warmup) in cases.items():
        for _ in range(warmup):
            zero(params)
            run(name, step)
    for r in range(max((c[2] for c in cases.values()), default=0)):
        for name, (step, params, reps, _) in cases.items():
            if r >= reps or "error" in res[name]:
                continue

            def timed(step=step, name=name):
                _sync(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                _sync(dev)
                res[name]["walls"].append(time.perf_counter() - t0)
                res[name]["cpus"].append(time.process_time() - c0)

            zero(params)
            run(name, timed)
    for name, (step, params, _, _) in cases.items():
        out = res[name]
        walls, cpus = out.pop("walls"), out.pop("cpus")
        if "error" in out or not walls:
            continue
        best = min(range(len(walls)), key=walls.__getitem__)
        out["ms"], out["cpu_ms"] = round(walls[best] * 1e3, 3), round(cpus[best] * 1e3, 3)
        out["reps"] = len(walls)
        out.update(_memory(step, params, dev))
    return res


def _memory(step, params, dev) -> dict:
    """Saved-for-backward bytes (parameters excluded) of one more step and, on CUDA, its peak."""
    for p in params:
        p.grad = None
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    base = 0
    if dev.type == "cuda":
        _sync(dev)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak = None
    if dev.type == "cuda":
        _sync(dev)
        peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return {"saved_MB": round(sum(seen.values()) / 2**20, 2), "peak_MB": peak}


def bandwidth_GBps(dev, dtype) -> float:
    n = (2**30 if dev.type == "cuda" else 2**27) // 2
    a = torch.ones(n, device=dev, dtype=dtype)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(4):
        _sync(dev)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best / 1e9


# ----------------------------------------------------------------------------- one case


def run_case(args, top_k: int, dev, dtype, bw_GBps: float) -> dict:
    T, D, E, I = args.tokens, args.hidden, args.experts, args.intermediate
    K = top_k
    keep_ratio = K / E
    torch.manual_seed(0)
    x_TD = torch.randn(T, D, device=dev, dtype=dtype)
    gy_TD = torch.randn(T, D, device=dev, dtype=dtype)
    on_gpu = dev.type == "cuda"
    warm = args.warmup
    out = {
        "top_k": K,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": T,
        "hidden": D,
        "experts": E,
        "intermediate": I,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_path_from": "dsv3ray.moe" if _DSV3_OPS is not None else f"kernels references ({_DSV3_ERR})",
        "torch_is": "CPU strategy" if torch_ops(dev).permute is kernels.permute_torch else "plain seams",
    }

    def layer_step(mod, fwd):
        x = x_TD.clone().requires_grad_()

        def step():
            fwd(x).backward(gy_TD)

        return step, list(mod.parameters())

    cases = {}  # name -> (step, params, reps, warmup), measured together below
    # (a) seed
    if not args.skip_seed:
        seed = DynamicSparseLayer(D, E, keep_ratio).to(dev, dtype)
        step, ps = layer_step(seed, seed)
        cases["seed"] = (step, ps, args.seed_reps, warm if on_gpu else 0)
    # (b) dense FFN with the activated parameters of K experts
    dense = DenseSwiGLU(D, K * I).to(dev, dtype)
    step, ps = layer_step(dense, dense)
    cases["dense"] = (step, ps, args.reps, warm)
    # (c), (c'), (d): our layer
    moe = RoutedMoE(D, E, I, K).to(dev)
    moe.gate_up_proj.data = moe.gate_up_proj.data.to(dtype)
    moe.down_proj.data = moe.down_proj.data.to(dtype)
    variants = {
        "torch": (torch_ops(dev), None),
        "torch_alt": (alt_ops(dev), None),
    }
    if on_gpu or args.triton_cpu:
        variants["triton"] = (TRITON_OPS, None)
    for name, (ops, mlp) in variants.items():
        step, ps = layer_step(moe, lambda x, ops=ops, mlp=mlp: moe(x, ops, mlp))
        cases[name] = (step, ps, args.reps, warm)
    if "triton" not in variants:
        out["triton"] = {"ms": None, "skipped": "no GPU (the interpreter is for correctness, not speed)"}

    # (e) the expert MLP alone on the same routed rows, and routing alone
    with torch.no_grad():
        logits_TE = x_TD.float() @ moe.router_weight.t()
        _, ex_TK, _ = kernels.route_ref(logits_TE, moe.bias_E, K, 1, 1, K > 1, 1.0)
        xs_ND, _, offsets_E = kernels.permute_ref(x_TD, ex_TK, E)
    gys_ND = torch.randn_like(xs_ND)
    w1 = moe.gate_up_proj.detach().clone().requires_grad_()
    w2 = moe.down_proj.detach().clone().requires_grad_()
    mlps = {"mlp_gmm": gmm_swiglu, "mlp_torch_fast": kernels.grouped_swiglu_torch}
    if on_gpu or args.triton_cpu:
        mlps["mlp_triton"] = kernels.grouped_swiglu
    for name, fn in mlps.items():
        xs = xs_ND.clone().requires_grad_()

        def mstep(fn=fn, xs=xs):
            fn(xs, w1, w2, offsets_E).backward(gys_ND)

        cases[name] = (mstep, [w1, w2], args.reps, warm)
    routings = {"routing_torch": torch_ops(dev), "routing_torch_alt": alt_ops(dev)}
    if on_gpu or args.triton_cpu:
        routings["routing_triton"] = TRITON_OPS
    for name, ops in routings.items():
        lg = logits_TE.clone().requires_grad_()
        xr = x_TD.clone().requires_grad_()

        def rstep(ops=ops, lg=lg, xr=xr):
            w_TK, e_TK, _ = ops.route(lg, moe.bias_E, K, 1, 1, K > 1, 1.0)
            xs, idx_N, _ = ops.permute(xr, e_TK, E)
            ops.unpermute(xs, idx_N, w_TK).backward(gy_TD)

        cases[name] = (rstep, [], args.reps, warm)
    out.update(measure_all(cases, dev))

    # ratios and FLOP / memory accounting
    def ms(k):
        return (out.get(k) or {}).get("ms")

    def ratio(a, b):
        return round(ms(a) / ms(b), 3) if ms(a) and ms(b) else None

    N = T * K
    flops_seed = 3 * (E * 2 * T * D * D + 2 * T * D * E)  # fwd + 2x for bwd; every expert, every token
    flops_ours = 3 * (6 * N * D * I + 2 * T * D * E)
    flops_dense = 3 * (6 * T * D * K * I)
    best_ours = min([m for m in (ms("torch"), ms("torch_alt"), ms("triton")) if m] or [math.nan])
    out["best_ours_ms"] = best_ours
    out["speedup_vs_seed"] = ratio("seed", "torch")  # (a)/(c)
    out["vs_dense_active"] = ratio("torch", "dense")  # (c)/(b)
    out["speedup_vs_seed_alt"] = ratio("seed", "torch_alt")
    out["vs_dense_active_alt"] = ratio("torch_alt", "dense")
    out["torch_fast_vs_gmm_mlp"] = ratio("mlp_gmm", "mlp_torch_fast")
    out["triton_vs_torch"] = ratio("torch", "triton")
    out["triton_mlp_vs_gmm"] = ratio("mlp_gmm", "mlp_triton")  # target >= 1 on GPU
    out["triton_routing_speedup"] = ratio("routing_torch", "routing_triton")  # target >= 2 on GPU
    out["targets"] = {
        "speedup_vs_seed>=": round(0.4 * E / K, 1),
        "vs_dense_active<=": 2.5 if K == 1 else (1.3 if K == 8 else None),
    }
    out["gflop_step"] = {"seed": flops_seed / 1e9, "ours": flops_ours / 1e9, "dense": flops_dense / 1e9}
    sd = (out.get("seed") or {}).get("saved_MB")
    best_saved = min(
        [v["saved_MB"] for k, v in out.items() if k in ("torch", "torch_alt", "triton") and v.get("saved_MB")]
        or [0]
    )
    out["seed_claims"] = {
        "compute_reduction_claimed": round(1 / keep_ratio, 1),  # what keep_ratio promises
        "compute_reduction_seed_code": 1.0,  # its code still runs all E experts on all T tokens
        "compute_reduction_ours_vs_seed_flops": round(flops_seed / flops_ours, 1),
        "activation_memory_reduction_claimed": round(1 / keep_ratio, 1),
        "activation_memory_reduction_ours_vs_seed": round(sd / best_saved, 1) if sd and best_saved else None,
    }
    if K == 1:
        w_bytes = E * 3 * D * I * torch.finfo(dtype).bits // 8
        moved = 3 * w_bytes  # read in forward, read in backward, gradients written
        out["memory_floor"] = {
            "expert_weight_MB": round(w_bytes / 2**20, 1),
            "bytes_moved_MB": round(moved / 2**20, 1),
            "bandwidth_GBps": round(bw_GBps, 1),
            "floor_ms": round(moved / bw_GBps / 1e6, 3),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed-reps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--quick", action="store_true", help="512 tokens, 2 reps: about a minute on 2 idle CPU cores"
    )
    p.add_argument("--skip-seed", action="store_true")
    p.add_argument(
        "--triton-cpu", action="store_true", help="also time the Triton path under the interpreter"
    )
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.reps = min(args.tokens, 512), 2
    try:  # the settings dsv3ray's training processes run with
        from dsv3ray.malloc import tune_this_process

        malloc = "dsv3ray.malloc" if tune_this_process() else "system"
    except ImportError:
        malloc = "system"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    bw = bandwidth_GBps(dev, dtype)
    for k in args.top_k:
        line = json.dumps({**run_case(args, k, dev, dtype, bw), "malloc": malloc})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
