"""tests/distributed.py: the ranks meet through a file, so a port taken by anyone else (the race a
picked-then-closed free port had in full-suite runs) cannot fail a multi-process test."""

import socket

import distributed
import pytest
import torch
import torch.distributed as dist


def _sum_of_ranks(rank, world_size):
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    assert x.item() == world_size * (world_size + 1) / 2
    assert dist.get_rank() == rank and dist.get_world_size() == world_size


@pytest.mark.parametrize("init", ["torch", "deepspeed"])
def test_spawn_works_while_the_picked_port_is_taken(monkeypatch, init):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # as if another process grabbed the port between free_port() and the ranks starting
        monkeypatch.setattr(distributed, "free_port", lambda: taken.getsockname()[1])
        distributed.spawn(_sum_of_ranks, 2, init=init)
