"""Tile sweep for the Triton grouped SwiGLU expert MLP on a GPU; prints JSON lines.

    python benchmarks/grouped_mlp_tiles.py [--top-k 1 8] [--reps 10] [--out FILE]
    python benchmarks/grouped_mlp_tiles.py --smoke     # tiny shapes, 2 candidates: checks the script

Seed shapes (4096 tokens, hidden 1024, 128 experts, intermediate 344, bf16), forward + backward of
`kernels.grouped_swiglu(..., tiles=...)` for each candidate tile set, against
`torch.nn.functional.grouped_mm` (variant (e) of benchmarks/moe_layer.py) and against the default
tiles (`kernels.grouped_mlp._blocks`). The row GEMMs (gate/up with SwiGLU, and the plain grouped mm)
are swept first with the weight-gradient kernel at its default, then the weight-gradient kernel with
the best row tiles. One line per candidate: {"top_k", "stage", "tiles", "ms", "vs_grouped_mm",
"vs_default"}; then one "best" line per top-k with the tiles to put into `_blocks`. A candidate
that fails to compile (shared memory, register pressure) reports its error and the sweep goes on.
Target (issue #4): the Triton expert MLP at least matches grouped_mm (vs_grouped_mm >= 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for the row GEMMs; the gate/up kernel holds two
# accumulators, so it gets BLOCK_N / 2 columns of each
ROW_TILES = [
    (32, 128, 64, 4, 3),  # top-1 routes 32 rows to each expert: a 64-row tile is half padding
    (32, 256, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (64, 256, 32, 4, 4),
    (64, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
]
# (BLOCK_P, BLOCK_Q, BLOCK_K, warps, stages) for the per-expert weight gradients
WGRAD_TILES = [
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
]


def row_tiles(bm, bn, bk, warps, stages) -> dict:
    launch = {"warps": warps, "stages": stages}
    return {"gate_up": (bm, max(16, bn // 2), bk, launch), "mm": (bm, bn, bk, launch)}


def wgrad_tiles(bp, bq, bk, warps, stages) -> dict:
    return {"wgrad": (bp, bq, bk, {"warps": warps, "stages": stages})}


def problem(top_k: int, dev, dtype, T=4096, D=1024, I=344, E=128, seed=0):
    """Expert-sorted rows of T tokens routed uniformly to top_k of E experts, the weights, dy."""
    g = torch.Generator().manual_seed(seed)
    ex_TK = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)])
    counts_E = torch.bincount(ex_TK.reshape(-1), minlength=E)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32).to(dev)
    N = T * top_k
    x = torch.randn(N, D, generator=g).to(dev, dtype)
    w1 = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).to(dev, dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I**0.5).to(dev, dtype)
    dy = torch.randn(N, D, generator=g).to(dev, dtype)
    return x, w1, w2, offsets_E, dy


def timed(fn, x, w1, w2, offsets_E, dy, reps: int, warmup: int, dev) -> float:
    """Minimum ms of forward + backward over reps (after warmup: compiles, autotunes caches)."""
    ins = [t.clone().requires_grad_() for t in (x, w1, w2)]
    best = float("inf")
    for r in range(warmup + reps):
        for t in ins:
            t.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*ins, offsets_E).backward(dy)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if r >= warmup:
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def sweep(
    top_k: int, dev, dtype, reps: int, warmup: int, rows: list, wgrads: list, shape: dict, emit
) -> dict:
    import kernels
    from benchmarks.moe_layer import gmm_swiglu

    args = problem(top_k, dev, dtype, **shape)
    base = {"gmm": timed(gmm_swiglu, *args, reps, warmup, dev)}
    base["default"] = timed(kernels.grouped_swiglu, *args, reps, warmup, dev)

    def one(stage: str, tiles: dict) -> float | None:
        line = {"top_k": top_k, "stage": stage, "tiles": {k: list(v[:3]) + [v[3]] for k, v in tiles.items()}}
        try:
            ms = timed(lambda *a: kernels.grouped_swiglu(*a, tiles=tiles), *args, reps, warmup, dev)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile here is skipped
            emit(
                {
                    **line,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                }
            )
            return None
        emit({**line, "ms": round(ms, 3), "vs_grouped_mm": round(base["gmm"] / ms, 3),
              "vs_default": round(base["default"] / ms, 3)})  # fmt: skip
        return ms

    results = [(one("rows", row_tiles(*t)), row_tiles(*t)) for t in rows]
    ok = [(ms, t) for ms, t in results if ms is not None]
    best_rows = min(ok, key=lambda r: r[0])[1] if ok else {}
    results = [
        (one("wgrad", {**best_rows, **wgrad_tiles(*t)}), {**best_rows, **wgrad_tiles(*t)}) for t in wgrads
    ]
    ok += [(ms, t) for ms, t in results if ms is not None]
    best_ms, best = min(ok, key=lambda r: r[0]) if ok else (None, {})
    out = {
        "top_k": top_k, "stage": "best", "grouped_mm_ms": round(base["gmm"], 3),
        "default_ms": round(base["default"], 3), "best_ms": best_ms and round(best_ms, 3),
        "best_vs_grouped_mm": best_ms and round(base["gmm"] / best_ms, 3),
        "default_vs_grouped_mm": round(base["gmm"] / base["default"], 3),
        "tiles": {k: list(v[:3]) + [v[3]] for k, v in best.items()}, "target": "best_vs_grouped_mm >= 1",
    }  # fmt: skip
    emit(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 candidates (CPU: the interpreter)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.smoke:
        print(
            json.dumps({"skipped": "no GPU: tile timings mean nothing under the interpreter (use --smoke)"})
        )
        return 0
    if args.smoke:
        shape = dict(T=64, D=64, I=32, E=4)
        rows, wgrads, args.reps, args.warmup = (
            [(16, 32, 32, 4, 1), (32, 64, 32, 4, 1)],
            [(32, 32, 32, 4, 1)],
            1,
            0,
        )
    else:
        shape, rows, wgrads = {}, ROW_TILES, WGRAD_TILES
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sink = open(args.out, "a") if args.out else None

    def emit(line: dict) -> None:
        text = json.dumps({"device": dev.type, **line})
        print(text, flush=True)
        if sink:
            sink.write(text + "\n")
            sink.flush()

    for k in args.top_k:
        sweep(k, dev, dtype, args.reps, args.warmup, rows, wgrads, shape, emit)
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
