"""Multi-process helpers for tests: run fn(rank, world_size, *args) in fresh processes (no Ray).

`init="deepspeed"` sets up torch.distributed through `deepspeed.init_distributed` (what the engine
tests need), `init="torch"` through a plain gloo/nccl process group. A failing rank fails the test.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args, backend: str = "gloo", init: str = "deepspeed") -> None:
    assert init in ("deepspeed", "torch"), init
    mp.spawn(_entry, args=(fn, world_size, free_port(), backend, init, args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, port, backend, init, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # one thread per rank: the CPU is shared
    if init == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        fn(rank, world_size, *args)
        return
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()
