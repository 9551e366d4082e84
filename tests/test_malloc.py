"""dsv3ray.malloc: large tensors come from (and go back to) the heap, not a fresh mmap each time."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3ray import malloc

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

# In a fresh process: how many blocks glibc serves with mmap (mallinfo2().hblks) while a 64 MiB
# tensor is alive, allocated in the main thread and in another thread, after `setup`.
PROBE = r"""
import ctypes, json, sys, threading
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
exec(sys.argv[1])

def mmapped_while_alive():
    before = libc.mallinfo2().hblks
    t = torch.empty(32 << 20, dtype=torch.bfloat16).fill_(1)
    during = libc.mallinfo2().hblks
    del t
    return during - before

out = {"main": mmapped_while_alive()}
box = {}
th = threading.Thread(target=lambda: box.update(thread=mmapped_while_alive()))
th.start(); th.join()
out.update(box)
print(json.dumps(out))
"""


def _probe(setup: str, env: dict | None = None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != malloc.OPT_OUT}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setup], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_default_glibc_maps_a_large_block_and_the_settings_keep_it_in_the_heap():
    assert _probe("pass") == {"main": 1, "thread": 1}  # what the settings are for
    tuned = _probe("from dsv3ray.malloc import tune_this_process; assert tune_this_process()")
    assert tuned["main"] == 0
    # the worker environment (read by glibc at start) also covers other threads: one arena
    assert _probe("pass", malloc.worker_env()) == {"main": 0, "thread": 0}


@glibc_only
def test_system_opt_out_changes_nothing():
    assert _probe(
        "from dsv3ray.malloc import tune_this_process; assert not tune_this_process()",
        {malloc.OPT_OUT: "system"},
    ) == {"main": 1, "thread": 1}


@glibc_only
def test_worker_env_leaves_what_the_user_set(monkeypatch):
    for k in malloc.WORKER_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv(malloc.OPT_OUT, raising=False)
    assert malloc.worker_env() == malloc.WORKER_ENV
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    env = malloc.worker_env()
    assert "MALLOC_ARENA_MAX" not in env and env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 30)
    assert malloc.worker_env(one_arena=False).keys() == env.keys()  # (GPU: the thresholds only)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert "MALLOC_ARENA_MAX" not in malloc.worker_env(one_arena=False)
    monkeypatch.setenv(malloc.OPT_OUT, "system")
    assert malloc.worker_env() == {}
