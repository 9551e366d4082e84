"""glibc malloc settings for training processes: large freed blocks are kept for reuse.

PyTorch's CPU allocator is plain malloc/free. glibc serves a block above its mmap threshold (at
most 32 MiB by default) with a fresh mmap and unmaps it on free, so every step's large
activations, routed-token copies and gradients land on new pages: a page fault for every 4 KiB the
first time each is written, on every step. Measured on this project's 2-vCPU box, 64 MiB of bf16
rows (the seed's MoE layer at top-8: 4096 tokens x 8 x 1024): `clone` 19 -> 4 ms, `index_select`
24 -> 6 ms, `.float()` 37 -> 6 ms; the whole layer's forward + backward 1.24 -> 0.71 s
(benchmarks/RESULTS.md). The settings below make such blocks come from the heap (mmap threshold
1 GiB) and stay there when freed (trim threshold 1 GiB, heap grown 64 MiB at a time), as a caching
allocator would: a process keeps the peak of one step's memory instead of handing it back and
faulting it in again.

Two ways in, because glibc gives a thread its own arena (whose heaps hold at most 64 MiB) and
Ray Train runs the training loop in a thread of the worker:
- `worker_env()`: environment variables for processes Ray starts for us (train workers, teacher
  actors); glibc reads them at process start. For CPU work MALLOC_ARENA_MAX=1 also puts every
  thread on the main arena, which can serve any size; a GPU process keeps its arenas (its large
  tensors live on the device, and many threads allocating on the host would contend for one).
- `tune_this_process()`: the same thresholds set with mallopt in a running process (the CLI's
  driver, benchmarks, torchrun workers, `prepare`'s cleaning workers when they build their
  cleaner), for the allocations of its main thread.

A variable the user set wins; DSV3RAY_MALLOC=system turns both off (e.g. under LD_PRELOAD of
jemalloc/tcmalloc, which ignore glibc's settings anyway). Other C libraries: nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
    "MALLOC_ARENA_MAX": "1",
}
OPT_OUT = "DSV3RAY_MALLOC"  # "system": leave malloc as it is

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def enabled() -> bool:
    return os.environ.get(OPT_OUT, "").strip().lower() != "system" and platform.libc_ver()[0] == "glibc"


def worker_env(one_arena: bool = True) -> dict[str, str]:
    """The variables for a process Ray will start (runtime_env env_vars): those the user has not
    set in this process's environment; {} when turned off or not on glibc. one_arena=False (GPU
    processes): the thresholds only."""
    if not enabled():
        return {}
    keys = [k for k in WORKER_ENV if one_arena or k != "MALLOC_ARENA_MAX"]
    return {k: WORKER_ENV[k] for k in keys if k not in os.environ}


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def tune_this_process() -> bool:
    """Set the thresholds in this process with mallopt (each one the user has not set in the
    environment); True when applied."""
    if not enabled():
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    done = True
    for env, param, value in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ("MALLOC_TOP_PAD_", _M_TOP_PAD, TOP_PAD),
    ):
        if env not in os.environ:
            done &= libc.mallopt(param, value) == 1
    if not done:
        log.warning("mallopt refused a setting: large tensors keep glibc's default (mmap per block)")
    return done
