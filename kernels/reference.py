"""Plain torch references for the MoE hot path: the ground truth every Triton kernel is tested against.

Written for clarity, not speed (`grouped_swiglu_ref` loops over experts). Autograd gives the
gradients. Same signatures as the Triton versions in this package (the seam contract).

Legend: T tokens, D hidden, E experts, K top-k, N = T*K routed rows, I expert intermediate size.
"""

import torch
import torch.nn.functional as F


def route_ref(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 sigmoid router -> (weights_TK fp32, experts_TK int64, counts_E int64).

    The bias steers selection only; weights are the unbiased scores of the chosen experts.
    """
    T, E = logits_TE.shape
    scores_TE = torch.sigmoid(logits_TE.float())
    biased_TE = scores_TE.detach() + bias_E.float()
    if n_group > 1:
        # group score = sum of its top-2 biased scores; keep topk_group groups
        group_TG = biased_TE.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.repeat_interleave(E // n_group, dim=1)
        biased_TE = biased_TE.masked_fill(~keep_TE, float("-inf"))
    experts_TK = biased_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, experts_TK)
    if norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * routed_scaling_factor
    counts_E = torch.bincount(experts_TK.flatten(), minlength=E)
    return weights_TK, experts_TK, counts_E


def permute_ref(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (t, k) stably sorted by expert -> (x_sorted_ND, sort_idx_N int64, offsets_E int32 end offsets)."""
    K = experts_TK.shape[1]
    sort_idx_N = torch.argsort(experts_TK.flatten(), stable=True)
    counts_E = torch.bincount(experts_TK.flatten(), minlength=num_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return x_TD[sort_idx_N // K], sort_idx_N, offsets_E


def unpermute_ref(
    y_sorted_ND: torch.Tensor, sort_idx_N: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * y_sorted[row of (t, k)], in fp32, returned in y_sorted's dtype."""
    T, K = weights_TK.shape
    y_NKD = torch.empty_like(y_sorted_ND, dtype=torch.float32)
    # scatter back to flat (t, k) order; index_put keeps it differentiable
    y_NKD = y_NKD.index_put((sort_idx_N,), y_sorted_ND.float())
    y_TKD = y_NKD.view(T, K, -1)
    return (weights_TK.float().unsqueeze(-1) * y_TKD).sum(1).to(y_sorted_ND.dtype)


def grouped_swiglu_ref(
    x_ND: torch.Tensor, gate_up_proj_E2ID: torch.Tensor, down_proj_EDI: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    """Per-expert SwiGLU over contiguous row groups, one plain matmul chain per expert (fp32 accumulate)."""
    I = down_proj_EDI.shape[2]
    out = []
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        x_mD = x_ND[start:end].float()
        gate_up_mJ = x_mD @ gate_up_proj_E2ID[e].float().t()
        h_mI = F.silu(gate_up_mJ[:, :I]) * gate_up_mJ[:, I:]
        out.append(h_mI @ down_proj_EDI[e].float().t())
        start = end
    assert start == x_ND.shape[0], "offsets_E must end at the number of rows"
    if not out:
        return x_ND.new_zeros(0, down_proj_EDI.shape[1])
    return torch.cat(out).to(x_ND.dtype)
