"""Fused DeepSeek-V3 router in Triton: sigmoid + correction bias + group-limited top-k + normalize + scale.

One program handles BLOCK_T tokens with all E experts in registers (E <= 1024). Selection is an
iterative arg-max (K and topk_group are small), ties go to the lowest expert index like a stable
sort. The per-expert token counts are summed per block and added with one vector atomic.
Backward: only the K chosen logits of a token get gradient, through sigmoid and the normalization.

Legend: T tokens, E experts, K top-k, G groups.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])  # sizes vary per call: compile once
def _route_fwd_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    experts_ptr,
    scores_ptr,
    counts_ptr,
    T,
    E,
    scale,
    K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e_E = tl.arange(0, BLOCK_E)
    t_ok = t_T < T
    e_ok = e_E < E
    ok_TE = t_ok[:, None] & e_ok[None, :]
    logits_TE = tl.load(logits_ptr + t_T[:, None] * E + e_E[None, :], mask=ok_TE, other=0.0).to(tl.float32)
    bias_E = tl.load(bias_ptr + e_E, mask=e_ok, other=0.0).to(tl.float32)
    scores_TE = tl.sigmoid(logits_TE)
    neg_inf = float("-inf")
    biased_TE = tl.where(ok_TE, scores_TE + bias_E[None, :], neg_inf)
    big = BLOCK_E  # larger than any expert index: the "no index" of arg-min reductions

    if N_GROUP > 1:
        group_size = E // N_GROUP
        group_E = e_E // group_size
        # group score = top-2 sum of biased scores in the group, broadcast back to its experts
        group_score_TE = tl.full((BLOCK_T, BLOCK_E), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (group_E == g)[None, :] & ok_TE
            v_TE = tl.where(in_g, biased_TE, neg_inf)
            top1_T = tl.max(v_TE, axis=1)
            arg1_T = tl.min(tl.where(v_TE == top1_T[:, None], e_E[None, :], big), axis=1)
            top2_T = tl.max(tl.where(e_E[None, :] == arg1_T[:, None], neg_inf, v_TE), axis=1)
            group_score_TE = tl.where(in_g, (top1_T + top2_T)[:, None], group_score_TE)
        keep_TE = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            best_T = tl.max(group_score_TE, axis=1)
            # lowest group index among ties, like torch.topk on distinct values
            gbest_T = tl.min(tl.where(group_score_TE == best_T[:, None], group_E[None, :], big), axis=1)
            chosen_TE = group_E[None, :] == gbest_T[:, None]
            keep_TE += chosen_TE.to(tl.int32)
            group_score_TE = tl.where(chosen_TE, neg_inf, group_score_TE)
        biased_TE = tl.where(keep_TE > 0, biased_TE, neg_inf)

    k_K = tl.arange(0, BLOCK_K)
    w_TK = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    idx_TK = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    picked_TE = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
    for k in tl.static_range(K):
        best_T = tl.max(biased_TE, axis=1)
        arg_T = tl.min(tl.where(biased_TE == best_T[:, None], e_E[None, :], big), axis=1)
        hit_TE = e_E[None, :] == arg_T[:, None]
        w_T = tl.sum(tl.where(hit_TE, scores_TE, 0.0), axis=1)
        w_TK = tl.where(k_K[None, :] == k, w_T[:, None], w_TK)
        idx_TK = tl.where(k_K[None, :] == k, arg_T[:, None], idx_TK)
        picked_TE += hit_TE.to(tl.int32)
        biased_TE = tl.where(hit_TE, neg_inf, biased_TE)

    ok_TK = t_ok[:, None] & (k_K[None, :] < K)
    tl.store(scores_ptr + t_T[:, None] * K + k_K[None, :], w_TK, mask=ok_TK)
    if NORM:
        w_TK = w_TK / (tl.sum(w_TK, axis=1)[:, None] + 1e-20)
    w_TK = w_TK * scale
    tl.store(weights_ptr + t_T[:, None] * K + k_K[None, :], w_TK, mask=ok_TK)
    tl.store(experts_ptr + t_T[:, None] * K + k_K[None, :], idx_TK.to(tl.int64), mask=ok_TK)
    picked_TE = tl.where(t_ok[:, None], picked_TE, 0)
    tl.atomic_add(counts_ptr + e_E, tl.sum(picked_TE, axis=0), mask=e_ok)


@triton.jit(do_not_specialize=["T"])  # sizes vary per call: compile once
def _route_bwd_kernel(
    grad_w_ptr,
    scores_ptr,
    experts_ptr,
    grad_logits_ptr,
    T,
    E,
    scale,
    K: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    k_K = tl.arange(0, BLOCK_K)
    ok_TK = (t_T < T)[:, None] & (k_K[None, :] < K)
    flat_TK = t_T[:, None] * K + k_K[None, :]
    g_TK = tl.load(grad_w_ptr + flat_TK, mask=ok_TK, other=0.0).to(tl.float32)
    s_TK = tl.load(scores_ptr + flat_TK, mask=ok_TK, other=0.0)
    e_TK = tl.load(experts_ptr + flat_TK, mask=ok_TK, other=0)
    if NORM:
        # w = scale * s / (sum s + eps):  dL/ds_k = scale * (g_k - sum_j g_j w_j / scale) / denom
        denom_T = tl.sum(s_TK, axis=1) + 1e-20
        gw_T = tl.sum(g_TK * s_TK, axis=1) / denom_T
        ds_TK = scale * (g_TK - gw_T[:, None]) / denom_T[:, None]
    else:
        ds_TK = scale * g_TK
    dlogit_TK = ds_TK * s_TK * (1.0 - s_TK)
    tl.store(grad_logits_ptr + t_T[:, None] * E + e_TK, dlogit_TK, mask=ok_TK)


def _route_launch(logits_TE, bias_E, top_k, n_group, topk_group, norm_topk_prob, scale):
    T, E = logits_TE.shape
    dev = logits_TE.device
    weights_TK = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    experts_TK = torch.empty(T, top_k, device=dev, dtype=torch.int64)
    scores_TK = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    counts_E = torch.zeros(E, device=dev, dtype=torch.int32)
    block_e = triton.next_power_of_2(E)
    # keep the (BLOCK_T, BLOCK_E) working set near 4K values per program
    block_t = max(2, min(64, 4096 // block_e, triton.next_power_of_2(max(T, 1))))
    grid = (triton.cdiv(T, block_t),)
    if T > 0:
        _route_fwd_kernel[grid](
            logits_TE,
            bias_E,
            weights_TK,
            experts_TK,
            scores_TK,
            counts_E,
            T,
            E,
            float(scale),
            K=top_k,
            N_GROUP=n_group,
            TOPK_GROUP=topk_group,
            NORM=bool(norm_topk_prob),
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(top_k),
        )
    return weights_TK, experts_TK, scores_TK, counts_E.to(torch.int64)


class _RouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, n_group, topk_group, norm_topk_prob, scale):
        weights_TK, experts_TK, scores_TK, counts_E = _route_launch(
            logits_TE, bias_E, top_k, n_group, topk_group, norm_topk_prob, scale
        )
        ctx.save_for_backward(scores_TK, experts_TK)
        ctx.meta = (logits_TE.shape, logits_TE.dtype, norm_topk_prob, scale)
        ctx.mark_non_differentiable(experts_TK, counts_E)
        return weights_TK, experts_TK, counts_E

    @staticmethod
    def backward(ctx, grad_weights_TK, _grad_experts, _grad_counts):
        scores_TK, experts_TK = ctx.saved_tensors
        (T, E), dtype, norm, scale = ctx.meta
        K = scores_TK.shape[1]
        grad_logits_TE = torch.zeros(T, E, device=scores_TK.device, dtype=torch.float32)
        if grad_weights_TK is not None and T > 0:
            block_t = 128
            _route_bwd_kernel[(triton.cdiv(T, block_t),)](
                grad_weights_TK.contiguous(),
                scores_TK,
                experts_TK,
                grad_logits_TE,
                T,
                E,
                float(scale),
                K=K,
                NORM=bool(norm),
                BLOCK_T=block_t,
                BLOCK_K=triton.next_power_of_2(K),
            )
        return grad_logits_TE.to(dtype), None, None, None, None, None, None


def check_route_args(E: int, top_k: int, n_group: int, topk_group: int) -> None:
    """ValueError for a routing setup that cannot work (shared by the torch and Triton paths)."""
    if not 1 <= top_k <= E:
        raise ValueError(f"route: top_k={top_k} must be in [1, num_experts={E}]")
    if n_group < 1 or E % n_group:
        raise ValueError(f"route: n_group={n_group} must divide num_experts={E}")
    if n_group > 1 and E // n_group < 2:
        raise ValueError(f"route: groups need >= 2 experts each (num_experts={E}, n_group={n_group})")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if top_k > topk_group * (E // n_group):
        raise ValueError(f"route: top_k={top_k} exceeds the experts of the kept groups")


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton router -> (weights_TK fp32, experts_TK int64, counts_E int64); gradients flow to logits."""
    T, E = logits_TE.shape
    check_route_args(E, top_k, n_group, topk_group)
    if E > 1024:
        raise ValueError(f"route: the Triton router holds all experts in registers; num_experts={E} > 1024")
    return _RouteFn.apply(
        logits_TE.contiguous(),
        bias_E.detach().contiguous(),
        top_k,
        n_group,
        topk_group,
        norm_topk_prob,
        routed_scaling_factor,
    )
