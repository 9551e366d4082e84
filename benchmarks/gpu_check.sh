#!/usr/bin/env bash
# GPU check for the MoE kernels: correctness on CUDA (compiled Triton, fp32 + bf16), the benchmark
# with the Triton path (d) against grouped_mm (e), a profile of each variant (host vs device time),
# then the tile sweep of the Triton expert MLP.
# Runs in a copy of this repo on a bare GPU machine; finishes in at most 8 minutes (step timeouts
# 60 + 60 + 110 + 80 + 45 + 120 s; steps 1-4 took 2.5 minutes on the 2026-11-28 H200); writes
# everything under $OUT: env.txt, smoke.txt, pytest_*.txt/.xml, bench.txt, moe_layer.jsonl,
# profile/ (profile.jsonl, one profiler table per variant), tiles.jsonl, summary.txt.
#
#   bash benchmarks/gpu_check.sh            # OUT defaults to ./gpu_out
#   GPU_CHECK_TILES=0 bash benchmarks/gpu_check.sh    # without the tile sweep
#
# Needs python3 with torch (CUDA) + triton + pytest; does NOT need this repo installed (PYTHONPATH),
# nor deepspeed/ray. Prints a short summary at the end; exit 0 when tests passed and the benchmark ran.
set -u
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# 0. environment (and what is missing; there may be no network: pip is tried, never waited on long)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
for mod in torch triton; do  # never pip-installed here: they must match the machine's CUDA
  "$PY" -c "import $mod" 2>/dev/null || { log "FAIL: python module $mod is missing on this machine"; exit 2; }
done
if ! "$PY" -c "import pytest" 2>/dev/null; then
  log "pytest missing: trying pip (60 s max; carry a wheel if the machine is offline)"
  timeout 60 "$PY" -m pip install -q pytest >> "$OUT/pip.log" 2>&1 || log "pip install pytest failed (see pip.log)"
fi
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  log "FAIL: torch does not see a CUDA device"; exit 2
fi
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"

# 1. smoke: the compiled (non-interpreted) path end to end, with a clear error if compilation fails
timeout 60 "$PY" - > "$OUT/smoke.txt" 2>&1 <<'PYEOF'
import torch, kernels
d = "cuda"
T, D, I, E, K = 256, 512, 128, 16, 2
x = torch.randn(T, D, device=d, dtype=torch.bfloat16, requires_grad=True)
lg = torch.randn(T, E, device=d, requires_grad=True)
w1 = (torch.randn(E, 2 * I, D, device=d) / 20).bfloat16().requires_grad_()
w2 = (torch.randn(E, D, I, device=d) / 10).bfloat16().requires_grad_()
w, ex, c = kernels.route(lg, torch.zeros(E, device=d), K, 4, 2, True, 2.5)
xs, idx, offs = kernels.permute(x, ex, E)
y = kernels.unpermute(kernels.grouped_swiglu(xs, w1, w2, offs), idx, w)
y.float().square().sum().backward()
print("smoke ok", tuple(y.shape), float(y.float().norm()), int(c.sum()))
PYEOF
SMOKE=$?
cat "$OUT/smoke.txt"; log "smoke rc=$SMOKE"

# 2. kernel tests on CUDA: (a) the CPU subset, now compiled and on cuda; (b) the gpu-marked full grid,
# with the model-level ones (torch and Triton MoE paths give the same loss and expert load on CUDA)
timeout 60 "$PY" -m pytest tests/test_kernels.py -m "not gpu" -q -p no:cacheprovider $XDIST \
  --junitxml="$OUT/pytest_subset.xml" > "$OUT/pytest_subset.txt" 2>&1
SUBSET=$?
tail -n 15 "$OUT/pytest_subset.txt"; log "pytest -m 'not gpu' (compiled, on cuda) rc=$SUBSET (124 = timed out)"
timeout 110 "$PY" -m pytest tests/test_kernels.py tests/test_moe.py -m gpu -q -p no:cacheprovider $XDIST \
  --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.txt" 2>&1
GRID=$?
tail -n 25 "$OUT/pytest_gpu.txt"; log "pytest -m gpu (full fp32/bf16 grid, model torch vs triton) rc=$GRID (124 = timed out)"
TESTS=$(( SUBSET || GRID ))

# 3. benchmark: seed shapes, bf16, top-1/2/8, all variants incl. Triton (d) and grouped_mm (e)
timeout 80 "$PY" benchmarks/moe_layer.py --reps 10 --warmup 2 --out "$OUT/moe_layer.jsonl" \
  > "$OUT/bench.txt" 2>&1
BENCH=$?
cat "$OUT/bench.txt" | tail -n 20; log "benchmark rc=$BENCH"

# 3b. where each variant's step goes: host (Python, launches) vs device (kernels), top ops of each
timeout 45 "$PY" benchmarks/moe_profile.py --reps 5 --out "$OUT/profile" > "$OUT/profile.txt" 2>&1
log "profile rc=$? (124 = timed out; per-variant tables in profile/)"

# 4. summary of the GPU targets
"$PY" - "$OUT/moe_layer.jsonl" "$OUT/profile/profile.jsonl" >> "$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    rows = []
for r in rows:
    ms = lambda k: (r.get(k) or {}).get("ms")
    print(f"top-{r['top_k']}: seed {ms('seed')} dense {ms('dense')} torch {ms('torch')} triton {ms('triton')} ms | "
          f"expert MLP triton {ms('mlp_triton')} vs grouped_mm {ms('mlp_gmm')} -> x{r.get('triton_mlp_vs_gmm')} (target >= 1) | "
          f"routing triton {ms('routing_triton')} vs torch {ms('routing_torch')} -> x{r.get('triton_routing_speedup')} (target >= 2)")
try:
    prof = [json.loads(l) for l in open(sys.argv[2])]
except OSError:
    prof = []
for p in prof:
    print(f"profile top-{p['top_k']} {p['variant']}: wall {p.get('wall_ms')} host {p.get('host_ms')} device "
          f"{p.get('device_ms')} ms, {p.get('kernels')} kernels {p.get('error', '')}")
PYEOF

# 5. tile sweep of the Triton expert MLP (seed shapes, top-1 and top-8): the "best" lines hold the
# tiles to put into kernels.grouped_mlp._blocks (its result does not change this script's status)
if [ "${GPU_CHECK_TILES:-1}" != 0 ]; then
  timeout 120 "$PY" benchmarks/grouped_mlp_tiles.py --reps 10 --out "$OUT/tiles.jsonl" > "$OUT/tiles.txt" 2>&1
  log "tile sweep rc=$? (124 = timed out; lines so far are in tiles.jsonl)"
  grep '"stage": "best"' "$OUT/tiles.jsonl" >> "$OUT/summary.txt" 2>/dev/null || true
fi
cat "$OUT/summary.txt"
[ "$SMOKE" = 0 ] && [ "$TESTS" = 0 ] && [ "$BENCH" = 0 ]
