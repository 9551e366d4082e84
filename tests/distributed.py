"""Multi-process helpers for tests: run fn(rank, world_size, *args) in fresh processes (no Ray).

`init="deepspeed"` adds DeepSpeed's comm over the process group (`dsv3ray.engine.init_deepspeed_comm`,
what the engine tests need), `init="torch"` is the plain gloo/nccl process group alone. A failing rank fails the test.

The ranks meet through a file in a fresh temporary directory (`init_method="file://..."`), not a
TCP port: a port picked free and closed before rank 0 binds it could be taken in between by another
test or process on the machine (a flaky EADDRINUSE in full-suite runs).

A rank that succeeds leaves with `os._exit(0)`, skipping interpreter finalization: a gloo worker
thread may still be dropping its finished work (and the last reference to a Python-owned tensor)
when the main thread finalizes, and that thread's late GIL take aborts the process
("terminate called without an active exception", ~1 run in 10 here).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args, backend: str = "gloo", init: str = "deepspeed") -> None:
    assert init in ("deepspeed", "torch"), init
    rendezvous = Path(tempfile.mkdtemp(prefix="dsv3ray-dist-"))
    try:
        init_method = (rendezvous / "store").as_uri()  # the file must not exist yet: rank 0 creates it
        mp.spawn(
            _entry,
            args=(fn, world_size, init_method, free_port(), backend, init, args),
            nprocs=world_size,
            join=True,
        )
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


def _entry(rank, fn, world_size, init_method, port, backend, init, args):
    os.environ.update(
        # Nothing binds MASTER_PORT (the ranks meet through the file); it is set, distinct per spawn,
        # for code that reads the usual variables (DeepSpeed's CPU shared-memory op names its
        # segments after it, where that op is built).
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # one thread per rank: the CPU is shared
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    if init == "deepspeed":
        from dsv3ray.engine import init_deepspeed_comm

        init_deepspeed_comm(backend)  # deepspeed.comm over that group, as the engine does it
        fn(rank, world_size, *args)
        _exit_cleanly()
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Success: flush and leave without finalization (see the module note); failures raise before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
