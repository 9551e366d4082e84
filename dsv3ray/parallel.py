"""Expert parallelism: routed experts sharded over `ep_size` ranks, tokens moved by all-to-all.

Legend: T tokens, D hidden, E routed experts (global), e = E / ep_size local experts, K top-k,
N = T*K routed rows on this rank (sorted by global expert), M rows received for the local experts,
P = ep_size peers.

Topology = DeepSpeed's own (`deepspeed.utils.groups._create_expert_and_data_parallel`, group name
`ep_size_{n}`): world ranks [0..W) form expert-parallel groups of consecutive ranks
[i*n, (i+1)*n) (the n ranks that together hold one copy of all experts; all-to-all runs here)
and expert-data-parallel groups {j, j+n, j+2n, ...} (ranks holding the same expert shard; expert
gradients are averaged only there). Using DeepSpeed's groups (not our own) means the engine's
ZeRO partitioning, gradient reduction and expert checkpoints agree with our dispatch.

`dispatch`/`combine` are differentiable: backward of an all-to-all is the all-to-all with the
split sizes swapped. Works with gloo (CPU) and nccl (GPU); split sizes travel through one small
int64 all-to-all, and are needed on the host (a sync per layer, as in every dropless EP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3ray.errors import ConfigError


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert / expert-data-parallel groups of this EP size."""
    return f"ep_size_{ep_size}"


def check_ep_size(ep_size: int, num_experts: int, world_size: int) -> None:
    """ep_size must divide both the routed experts and the world size (user error otherwise)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ConfigError("train.ep_size", ep_size, f"must be >= 1 and divide n_routed_experts={num_experts}")
    if world_size % ep_size:
        raise ConfigError("train.ep_size", ep_size, f"must divide the number of workers ({world_size})")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over `group`; backward sends gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        x_ND = x_ND.contiguous()
        y_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(y_MD, x_ND, out_splits, in_splits, group=group)
        return y_MD

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits = ctx.splits
        grad_MD = grad_MD.contiguous()
        grad_ND = grad_MD.new_empty((sum(in_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD, in_splits, out_splits, group=ctx.group)
        return grad_ND, None, None, None


@dataclass
class DispatchHandle:
    """What `combine` needs to send rows back: the splits of both directions and the regrouping."""

    send_splits: list[int]  # rows this rank sent to each peer (its N rows, by peer)
    recv_splits: list[int]  # rows this rank received from each peer
    regroup_M: torch.Tensor  # position in received order of each local-expert-ordered row (M,)


class ExpertParallel:
    """One EP rank's view: which experts it owns and how routed rows reach them.

    `group` is the torch.distributed group of the ep_size ranks sharing one copy of all experts
    (None when ep_size == 1: no communication). `edp_group` averages expert gradients.
    """

    def __init__(self, ep_size: int = 1, ep_rank: int = 0, group=None, edp_group=None):
        assert 0 <= ep_rank < ep_size
        assert ep_size == 1 or group is not None, "ep_size > 1 needs a process group"
        self.ep_size, self.ep_rank, self.group, self.edp_group = ep_size, ep_rank, group, edp_group

    @property
    def group_name(self) -> str:
        return group_name(self.ep_size)

    def local_experts(self, num_experts: int) -> range:
        """Global ids [r*e, (r+1)*e) of the experts this rank holds."""
        assert num_experts % self.ep_size == 0, f"E={num_experts} not divisible by ep_size={self.ep_size}"
        e = num_experts // self.ep_size
        return range(self.ep_rank * e, (self.ep_rank + 1) * e)

    def dispatch(
        self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle | None]:
        """Send rows (sorted by global expert, `counts_E` per expert) to the ranks owning them.

        Returns the rows for this rank's experts grouped by local expert, their end offsets
        (int32, the `offs` of grouped_mm) and a handle for `combine`.
        """
        (E,) = counts_E.shape
        assert E % self.ep_size == 0, f"E={E} not divisible by ep_size={self.ep_size}"
        if self.ep_size == 1:
            return x_sorted_ND, torch.cumsum(counts_E, 0).to(torch.int32), None
        P, e = self.ep_size, E // self.ep_size
        send_counts_Pe = counts_E.to(torch.int64).reshape(P, e).contiguous()
        # recv_counts_Pe[p, j] = rows peer p sends for my local expert j
        recv_counts_Pe = torch.empty_like(send_counts_Pe)
        dist.all_to_all_single(recv_counts_Pe, send_counts_Pe, group=self.group)
        both = torch.stack([send_counts_Pe.sum(1), recv_counts_Pe.sum(1)]).tolist()  # one host sync
        send_splits, recv_splits = both
        assert x_sorted_ND.shape[0] == sum(send_splits), "counts_E must count the rows of x_sorted_ND"
        x_recv_MD = _AllToAll.apply(x_sorted_ND, recv_splits, send_splits, self.group)
        # Received rows come peer-major (peer p's rows for experts 0..e-1, then peer p+1...):
        # a stable sort by local expert groups them expert-major, keeping peer order inside.
        M, device = x_recv_MD.shape[0], x_recv_MD.device
        expert_of_row_M = torch.arange(e, device=device).repeat(P)
        expert_of_row_M = expert_of_row_M.repeat_interleave(recv_counts_Pe.flatten(), output_size=M)
        regroup_M = torch.argsort(expert_of_row_M, stable=True)
        offsets_e = torch.cumsum(recv_counts_Pe.sum(0), 0).to(torch.int32)
        return x_recv_MD[regroup_M], offsets_e, DispatchHandle(send_splits, recv_splits, regroup_M)

    def combine(self, y_local_MD: torch.Tensor, handle: DispatchHandle | None) -> torch.Tensor:
        """Exact inverse of `dispatch`: rows return to their source rank in their original order."""
        if handle is None:
            return y_local_MD
        # Undo the regrouping (y_recv[regroup[i]] = y_local[i]) with a gather, not a scatter,
        # so the backward is a plain index too.
        regroup_M = handle.regroup_M
        inverse_M = torch.empty_like(regroup_M)
        inverse_M[regroup_M] = torch.arange(len(regroup_M), device=regroup_M.device)
        y_recv_MD = y_local_MD[inverse_M]
        return _AllToAll.apply(y_recv_MD, handle.send_splits, handle.recv_splits, self.group)


def _ensure_deepspeed_comm() -> None:
    """DeepSpeed's group helpers go through deepspeed.comm: attach it to the existing torch.distributed."""
    from dsv3ray.engine import init_deepspeed_comm

    init_deepspeed_comm(dist.get_backend())


def create_expert_parallel(ep_size: int, num_experts: int) -> ExpertParallel:
    """This rank's ExpertParallel with DeepSpeed's `ep_size_{n}` expert and expert-data groups.

    Call on every rank (group creation is collective). Without torch.distributed only
    ep_size == 1 is possible.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    check_ep_size(ep_size, num_experts, world_size)
    if not dist.is_initialized():
        return ExpertParallel()
    from deepspeed.utils import groups

    _ensure_deepspeed_comm()
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    ep_rank = dist.get_rank(group=ep_group)
    return ExpertParallel(
        ep_size, ep_rank, ep_group if ep_size > 1 else None, groups._get_expert_data_parallel_group(name)
    )


def expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Routed-expert parameters: `gate_up_proj`/`down_proj` directly under a module named `experts`."""
    return {
        n: p
        for n, p in model.named_parameters()
        if f".{n}".rsplit(".", 2)[-2:-1] == ["experts"]
        and n.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")
    }


def mark_expert_params(model: torch.nn.Module, ep: ExpertParallel | None) -> int:
    """Mark routed-expert params as DeepSpeed MoE params; returns how many were marked.

    `allreduce = False` keeps them out of the data-parallel gradient all-reduce and
    `group_name = "ep_size_{n}"` makes DeepSpeed (engine all-reduce, ZeRO 1/2 partitioning,
    optimizer param groups) reduce them over the expert-data-parallel group instead.
    """
    name = group_name(ep.ep_size if ep is not None else 1)
    params = expert_parameters(model)
    for p in params.values():
        p.allreduce = False
        p.group_name = name
    return len(params)
