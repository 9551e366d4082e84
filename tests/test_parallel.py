"""Expert parallelism: dispatch/combine over 2 gloo processes (no Ray) against a single-rank reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import spawn as _spawn

from dsv3ray.errors import ConfigError
from dsv3ray.parallel import ExpertParallel, check_ep_size, create_expert_parallel, mark_expert_params

D, E = 8, 6


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in world_size fresh gloo processes; a worker failure fails the test."""
    _spawn(fn, world_size, *args, init="torch")


def _rank_data(rank: int, tokens: list[int], K: int, skip_experts: tuple[int, ...]):
    """Deterministic tokens of one rank: x (T, D) and expert choices (T, K) avoiding skip_experts."""
    g = torch.Generator().manual_seed(100 + rank)
    T = tokens[rank]
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    allowed = torch.tensor([i for i in range(E) if i not in skip_experts])
    picks = [allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)]
    experts_TK = torch.stack(picks) if picks else torch.zeros(0, K, dtype=torch.int64)
    return x_TD, experts_TK


def _sort(x_TD, experts_TK):
    """Rows sorted by expert (a plain reference of the permute seam)."""
    K = experts_TK.shape[1]
    sort_idx_N = torch.argsort(experts_TK.flatten(), stable=True)
    counts_E = torch.bincount(experts_TK.flatten(), minlength=E)
    return x_TD[sort_idx_N // K], sort_idx_N, counts_E


def _apply_experts(x_ND, W_eDD, offsets_e):
    """Expert j: tanh(x @ W_j); rows grouped by expert with end offsets."""
    outs, start = [], 0
    for j, end in enumerate(offsets_e.tolist()):
        outs.append(torch.tanh(x_ND[start:end] @ W_eDD[j]))
        start = end
    return torch.cat(outs) if outs else x_ND[:0]


def _unsort(y_ND, sort_idx_N, T, K):
    y_TKD = torch.zeros(T * K, y_ND.shape[1], dtype=y_ND.dtype)
    y_TKD = y_TKD.index_copy(0, sort_idx_N, y_ND)
    return y_TKD.view(T, K, y_ND.shape[1]).sum(1)


def _ep_worker(rank, world_size, tokens, K, skip_experts):
    ep = create_expert_parallel(world_size, E)  # groups already exist: reused
    assert (ep.ep_size, ep.ep_rank) == (world_size, rank)
    local = ep.local_experts(E)
    assert local == range(rank * E // world_size, (rank + 1) * E // world_size)
    W_EDD = torch.randn(E, D, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    # Reference: one rank holding all experts processes every rank's tokens.
    W_ref = W_EDD.clone().requires_grad_()
    ref_out, ref_x_grads = {}, {}
    for r in range(world_size):
        x_TD, experts_TK = _rank_data(r, tokens, K, skip_experts)
        x_TD.requires_grad_()
        x_sorted, sort_idx, counts = _sort(x_TD, experts_TK)
        y_TD = _unsort(_apply_experts(x_sorted, W_ref, torch.cumsum(counts, 0)), sort_idx, len(x_TD), K)
        (y_TD * (r + 1)).sum().backward()
        ref_out[r], ref_x_grads[r] = y_TD.detach(), x_TD.grad

    # EP: this rank's tokens, this rank's expert shard.
    x_TD, experts_TK = _rank_data(rank, tokens, K, skip_experts)
    x_TD.requires_grad_()
    W_local = W_EDD[local.start : local.stop].clone().requires_grad_()
    x_sorted, sort_idx, counts = _sort(x_TD, experts_TK)

    # dispatch -> identity -> combine is the identity (values and gradient)
    x_local, offsets_e, handle = ep.dispatch(x_sorted, counts)
    assert offsets_e.dtype == torch.int32 and len(offsets_e) == len(local)
    assert int(offsets_e[-1]) == x_local.shape[0]
    back = ep.combine(x_local, handle)
    assert torch.equal(back, x_sorted)

    # dispatch -> per-expert function -> combine equals the single-rank result
    y_local = _apply_experts(x_local, W_local, offsets_e)
    y_TD = _unsort(ep.combine(y_local, handle), sort_idx, len(x_TD), K)
    (y_TD * (rank + 1)).sum().backward()
    torch.testing.assert_close(y_TD.detach(), ref_out[rank], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_TD.grad, ref_x_grads[rank], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W_local.grad, W_ref.grad[local.start : local.stop], rtol=1e-12, atol=1e-12)


CASES = [
    ([13, 7], 2, ()),  # uneven token counts
    ([9, 0], 3, (1, 4)),  # one rank sends nothing; experts 1 and 4 (one per rank) get no rows
    ([1, 2], 1, (0, 1, 2)),  # rank 0's experts all empty
]


def _cases_worker(rank, world_size):
    from deepspeed.utils import groups

    # DeepSpeed's topology for 2 ranks: EP=2 -> both ranks in one EP group, each its own EDP group;
    # EP=1 -> each rank its own EP group, expert grads averaged over both.
    ep2, ep1 = create_expert_parallel(2, E), create_expert_parallel(1, E)
    assert dist.get_process_group_ranks(ep2.group) == [0, 1] and ep2.ep_rank == rank
    assert list(groups._get_expert_data_parallel_group_ranks("ep_size_2")) == [rank]
    assert list(groups._get_expert_data_parallel_group_ranks("ep_size_1")) == [0, 1]
    assert ep1.group is None and ep1.ep_rank == 0 and ep1.local_experts(E) == range(E)
    assert dist.get_process_group_ranks(ep1.edp_group) == [0, 1]
    for tokens, K, skip_experts in CASES:  # one process pair for all cases: start-up dominates
        _ep_worker(rank, world_size, tokens, K, skip_experts)


def _all_worker(rank, world_size):
    _cases_worker(rank, world_size)
    _moe_worker(rank, world_size)


def test_dispatch_combine_and_moe_layer_match_single_rank():
    """One process pair (start-up dominates): topology, dispatch/combine cases, then our MoE layer."""
    spawn(_all_worker, 2)


def test_single_rank_dispatch_is_passthrough():
    ep = ExpertParallel()
    x = torch.randn(5, D)
    counts = torch.tensor([2, 0, 3, 0, 0, 0])
    x_local, offsets, handle = ep.dispatch(x, counts)
    assert x_local is x and offsets.tolist() == [2, 2, 5, 5, 5, 5] and offsets.dtype == torch.int32
    assert ep.combine(x_local, handle) is x_local
    assert ep.local_experts(E) == range(E)


def test_ep_size_must_divide_experts_and_world():
    check_ep_size(2, 6, 4)
    with pytest.raises(ConfigError, match="train.ep_size"):
        check_ep_size(4, 6, 4)
    with pytest.raises(ConfigError, match="train.ep_size"):
        check_ep_size(3, 6, 4)
    with pytest.raises(ConfigError, match="train.ep_size"):
        create_expert_parallel(4, 6)  # single process: world size 1


def test_mark_expert_params_marks_only_routed_experts():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(3, 4, 2))
            self.down_proj = torch.nn.Parameter(torch.zeros(3, 2, 2))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(2, 6)
            self.experts = Experts()
            self.shared_experts = torch.nn.Linear(2, 2)

    model = torch.nn.Sequential(Layer(), Layer())
    assert mark_expert_params(model, ExpertParallel()) == 4
    marked = {n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False}
    assert marked == {f"{i}.experts.{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj")}
    assert {p.group_name for n, p in model.named_parameters() if n in marked} == {"ep_size_1"}


def _moe_worker(rank, world_size):
    """Our MoE layer at EP=2 (each rank its shard) equals EP=1 (all experts), forward and backward."""
    from dsv3ray.model import ModelConfig
    from dsv3ray.moe import MoE

    cfg = ModelConfig.from_preset("debug", moe_impl="torch")
    ep = create_expert_parallel(world_size, cfg.n_routed_experts)
    torch.manual_seed(0)
    full = MoE(cfg).double()
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sharded = MoE(cfg, ep).double()
    local = ep.local_experts(cfg.n_routed_experts)
    state = dict(full.state_dict())
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        state[name] = state[name][local.start : local.stop]
    sharded.load_state_dict(state)

    xs = [
        torch.randn(
            2, 5 + 3 * r, cfg.hidden_size, generator=torch.Generator().manual_seed(r), dtype=torch.float64
        )
        for r in range(world_size)
    ]
    ref_y = {}
    for r, x in enumerate(xs):  # reference: one rank with all experts sees every rank's tokens
        y, counts, bal = full(x)
        ((y * (r + 1)).sum() + bal).backward()
        ref_y[r] = y.detach()

    y, counts, bal = sharded(xs[rank])
    ((y * (rank + 1)).sum() + bal).backward()
    torch.testing.assert_close(y.detach(), ref_y[rank], rtol=1e-10, atol=1e-10)
    for name, p in sharded.named_parameters():
        ref = dict(full.named_parameters())[name].grad
        if name.startswith("experts."):  # expert shard: contributions from both ranks' tokens
            torch.testing.assert_close(p.grad, ref[local.start : local.stop], rtol=1e-10, atol=1e-10)
        else:  # replicated params: this rank's tokens only; summed over ranks = the reference
            total = p.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, ref, rtol=1e-10, atol=1e-10)
