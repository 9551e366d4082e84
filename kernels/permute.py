"""Permute / unpermute in Triton: a stable counting sort of routed rows by expert, and the weighted combine.

permute (three kernels, no host sync):
  1. `_block_hist_kernel`: per block of BLOCK_N flat rows (t*K + k), its per-expert row counts.
  2. `_block_scan_kernel` (one program) on the small (num_blocks, E) table: expert end offsets and,
     per block and expert, where its rows start (exclusive scan over blocks).
  3. `_permute_scatter_kernel`: each row's destination = base[block, expert] + its rank among the
     block's earlier rows of the same expert (stable); writes sort_idx_N, dest_N and copies the row.
unpermute: y_TD[t] = sum_k w[t, k] * y_sorted[dest[t*K + k]], fp32 accumulate, no atomics (each
program owns whole output rows), so the result is deterministic.

Legend: T tokens, D hidden, E experts, K top-k, N = T*K rows, B blocks of rows.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N"])  # sizes vary per call: compile once
def _block_hist_kernel(experts_ptr, hist_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    n_N = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    e_E = tl.arange(0, BLOCK_E)
    ex_N = tl.load(experts_ptr + n_N, mask=n_N < N, other=-1)
    hist_E = tl.sum((ex_N[:, None] == e_E[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + pid * E + e_E, hist_E, mask=e_E < E)


@triton.jit(do_not_specialize=["NB"])  # sizes vary per call: compile once
def _block_scan_kernel(hist_ptr, base_ptr, offsets_ptr, NB, E, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program: offsets_E = cumsum of expert totals; base[b, e] = start of e + rows of e in blocks < b."""
    e_E = tl.arange(0, BLOCK_E)
    ok_E = e_E < E
    b_B = tl.arange(0, BLOCK_B)
    total_E = tl.zeros((BLOCK_E,), tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        ok_BE = ((b0 + b_B) < NB)[:, None] & ok_E[None, :]
        h_BE = tl.load(hist_ptr + (b0 + b_B)[:, None] * E + e_E[None, :], mask=ok_BE, other=0)
        total_E += tl.sum(h_BE, axis=0)
    end_E = tl.cumsum(total_E, 0)
    tl.store(offsets_ptr + e_E, end_E, mask=ok_E)
    run_E = end_E - total_E
    for b0 in range(0, NB, BLOCK_B):
        ok_BE = ((b0 + b_B) < NB)[:, None] & ok_E[None, :]
        h_BE = tl.load(hist_ptr + (b0 + b_B)[:, None] * E + e_E[None, :], mask=ok_BE, other=0)
        base_BE = run_E[None, :] + tl.cumsum(h_BE, 0) - h_BE
        tl.store(base_ptr + (b0 + b_B)[:, None] * E + e_E[None, :], base_BE, mask=ok_BE)
        run_E += tl.sum(h_BE, axis=0)


@triton.jit(do_not_specialize=["N"])  # sizes vary per call: compile once
def _permute_scatter_kernel(
    x_ptr,
    experts_ptr,
    base_ptr,
    x_sorted_ptr,
    sort_idx_ptr,
    dest_ptr,
    N,
    E,
    D,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_N = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_N = n_N < N
    ex_N = tl.load(experts_ptr + n_N, mask=ok_N, other=-1)
    # stable rank inside the block: earlier rows (j < i) routed to the same expert
    i_N = tl.arange(0, BLOCK_N)
    same_NN = (ex_N[:, None] == ex_N[None, :]) & (i_N[None, :] < i_N[:, None])
    rank_N = tl.sum(same_NN.to(tl.int32), axis=1)
    base_N = tl.load(base_ptr + pid * E + ex_N, mask=ok_N, other=0)
    dest_N = base_N + rank_N
    tl.store(sort_idx_ptr + dest_N, n_N.to(tl.int64), mask=ok_N)
    tl.store(dest_ptr + n_N, dest_N, mask=ok_N)
    src_N = (n_N // K).to(tl.int64)
    dst_N = dest_N.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d_D = d0 + tl.arange(0, BLOCK_D)
        ok_ND = ok_N[:, None] & (d_D[None, :] < D)
        row_ND = tl.load(x_ptr + src_N[:, None] * D + d_D[None, :], mask=ok_ND)
        tl.store(x_sorted_ptr + dst_N[:, None] * D + d_D[None, :], row_ND, mask=ok_ND)


@triton.jit(do_not_specialize=["T"])  # sizes vary per call: compile once
def _gather_sum_kernel(
    src_ptr,
    dest_ptr,
    w_ptr,
    out_ptr,
    T,
    D,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum_k (w[t, k] *) src[dest[t*K + k]]: unpermute forward and permute backward."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t_T = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d_D = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_T = t_T < T
    ok_TD = ok_T[:, None] & (d_D[None, :] < D)
    acc_TD = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        row_T = tl.load(dest_ptr + t_T * K + k, mask=ok_T, other=0).to(tl.int64)
        v_TD = tl.load(src_ptr + row_T[:, None] * D + d_D[None, :], mask=ok_TD, other=0.0).to(tl.float32)
        if HAS_W:
            w_T = tl.load(w_ptr + t_T * K + k, mask=ok_T, other=0.0).to(tl.float32)
            v_TD = v_TD * w_T[:, None]
        acc_TD += v_TD
    tl.store(out_ptr + t_T[:, None] * D + d_D[None, :], acc_TD.to(out_ptr.dtype.element_ty), mask=ok_TD)


@triton.jit(do_not_specialize=["T"])  # sizes vary per call: compile once
def _unpermute_bwd_kernel(
    grad_y_ptr,
    y_sorted_ptr,
    dest_ptr,
    w_ptr,
    grad_ys_ptr,
    grad_w_ptr,
    T,
    D,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_y_sorted[dest[t,k]] = w[t,k] * g[t];  grad_w[t,k] = <g[t], y_sorted[dest[t,k]]> (fp32)."""
    pid = tl.program_id(0)
    t_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_T = t_T < T
    t64_T = t_T.to(tl.int64)
    for k in tl.static_range(K):
        row_T = tl.load(dest_ptr + t_T * K + k, mask=ok_T, other=0).to(tl.int64)
        w_T = tl.load(w_ptr + t_T * K + k, mask=ok_T, other=0.0).to(tl.float32)
        dot_T = tl.zeros((BLOCK_T,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_D = d0 + tl.arange(0, BLOCK_D)
            ok_TD = ok_T[:, None] & (d_D[None, :] < D)
            g_TD = tl.load(grad_y_ptr + t64_T[:, None] * D + d_D[None, :], mask=ok_TD, other=0.0).to(
                tl.float32
            )
            y_TD = tl.load(y_sorted_ptr + row_T[:, None] * D + d_D[None, :], mask=ok_TD, other=0.0).to(
                tl.float32
            )
            dot_T += tl.sum(g_TD * y_TD, axis=1)
            gys_TD = (g_TD * w_T[:, None]).to(grad_ys_ptr.dtype.element_ty)
            tl.store(grad_ys_ptr + row_T[:, None] * D + d_D[None, :], gys_TD, mask=ok_TD)
        tl.store(grad_w_ptr + t_T * K + k, dot_T, mask=ok_T)


@triton.jit(do_not_specialize=["N"])  # sizes vary per call: compile once
def _invert_kernel(sort_idx_ptr, dest_ptr, N, BLOCK_N: tl.constexpr):
    n_N = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_N = n_N < N
    src_N = tl.load(sort_idx_ptr + n_N, mask=ok_N, other=0)
    tl.store(dest_ptr + src_N, n_N.to(tl.int32), mask=ok_N)


def _block_d(D: int) -> int:
    return min(256, triton.next_power_of_2(max(D, 16)))


def _gather_sum(src_ND, dest_N, w_TK, T, K, out_dtype):
    D = src_ND.shape[1]
    out_TD = torch.empty(T, D, device=src_ND.device, dtype=out_dtype)
    if T == 0:
        return out_TD
    block_t, block_d = 16, _block_d(D)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _gather_sum_kernel[grid](
        src_ND,
        dest_N,
        w_TK if w_TK is not None else src_ND,
        out_TD,
        T,
        D,
        K=K,
        HAS_W=w_TK is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out_TD


def _permute_launch(x_TD, experts_TK, num_experts):
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    N, E = T * K, num_experts
    dev = x_TD.device
    block_e = triton.next_power_of_2(E)
    block_n = max(16, min(64, 8192 // block_e))  # the (BLOCK_N, BLOCK_E) one-hot histogram stays small
    num_blocks = triton.cdiv(N, block_n)
    flat_N = experts_TK.reshape(-1).contiguous()
    hist_BE = torch.empty(num_blocks, E, device=dev, dtype=torch.int32)
    x_sorted_ND = torch.empty(N, D, device=dev, dtype=x_TD.dtype)
    sort_idx_N = torch.empty(N, device=dev, dtype=torch.int64)
    dest_N = torch.empty(N, device=dev, dtype=torch.int32)
    if N == 0:
        return x_sorted_ND, sort_idx_N, torch.zeros(E, device=dev, dtype=torch.int32), dest_N
    _block_hist_kernel[(num_blocks,)](flat_N, hist_BE, N, E, BLOCK_N=block_n, BLOCK_E=block_e)
    # where each block's rows of each expert start in the sorted order (one small program)
    base_BE = torch.empty_like(hist_BE)
    offsets_E = torch.empty(E, device=dev, dtype=torch.int32)
    _block_scan_kernel[(1,)](
        hist_BE, base_BE, offsets_E, num_blocks, E, BLOCK_B=max(1, min(64, 8192 // block_e)), BLOCK_E=block_e
    )
    _permute_scatter_kernel[(num_blocks,)](
        x_TD,
        flat_N,
        base_BE,
        x_sorted_ND,
        sort_idx_N,
        dest_N,
        N,
        E,
        D,
        K,
        BLOCK_N=block_n,
        BLOCK_D=_block_d(D),
    )
    return x_sorted_ND, sort_idx_N, offsets_E, dest_N


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, experts_TK, num_experts):
        x_sorted_ND, sort_idx_N, offsets_E, dest_N = _permute_launch(x_TD, experts_TK, num_experts)
        ctx.save_for_backward(dest_N)
        ctx.meta = (x_TD.shape[0], experts_TK.shape[1])
        ctx.mark_non_differentiable(sort_idx_N, offsets_E)
        return x_sorted_ND, sort_idx_N, offsets_E

    @staticmethod
    def backward(ctx, grad_x_sorted_ND, _g_idx, _g_offs):
        (dest_N,) = ctx.saved_tensors
        T, K = ctx.meta
        g_ND = grad_x_sorted_ND.contiguous()
        return _gather_sum(g_ND, dest_N, None, T, K, g_ND.dtype), None, None


def invert_permutation(sort_idx_N: torch.Tensor) -> torch.Tensor:
    """dest_N (int32) with dest_N[sort_idx_N[r]] = r."""
    N = sort_idx_N.shape[0]
    dest_N = torch.empty(N, device=sort_idx_N.device, dtype=torch.int32)
    if N:
        _invert_kernel[(triton.cdiv(N, 1024),)](sort_idx_N.contiguous(), dest_N, N, BLOCK_N=1024)
    return dest_N


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted_ND, sort_idx_N, weights_TK):
        T, K = weights_TK.shape
        y_sorted_ND = y_sorted_ND.contiguous()
        weights_TK = weights_TK.contiguous()
        dest_N = invert_permutation(sort_idx_N)
        ctx.save_for_backward(y_sorted_ND, dest_N, weights_TK)
        return _gather_sum(y_sorted_ND, dest_N, weights_TK, T, K, y_sorted_ND.dtype)

    @staticmethod
    def backward(ctx, grad_y_TD):
        y_sorted_ND, dest_N, weights_TK = ctx.saved_tensors
        T, K = weights_TK.shape
        N, D = y_sorted_ND.shape
        grad_ys_ND = torch.empty_like(y_sorted_ND)
        grad_w_TK = torch.empty(T, K, device=weights_TK.device, dtype=torch.float32)
        if T:
            block_t = 16
            _unpermute_bwd_kernel[(triton.cdiv(T, block_t),)](
                grad_y_TD.contiguous(),
                y_sorted_ND,
                dest_N,
                weights_TK,
                grad_ys_ND,
                grad_w_TK,
                T,
                D,
                K=K,
                BLOCK_T=block_t,
                BLOCK_D=_block_d(D),
            )
        return grad_ys_ND, None, grad_w_TK.to(weights_TK.dtype)


def permute(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton permute -> (x_sorted_ND, sort_idx_N int64, offsets_E int32 end offsets); grad flows to x."""
    if x_TD.shape[0] != experts_TK.shape[0]:
        raise ValueError(f"permute: x has {x_TD.shape[0]} tokens but experts_TK has {experts_TK.shape[0]}")
    if num_experts > 4096:
        raise ValueError(
            f"permute: num_experts={num_experts} > 4096 is not supported by the Triton histogram"
        )
    return _PermuteFn.apply(x_TD.contiguous(), experts_TK, num_experts)


def unpermute(y_sorted_ND: torch.Tensor, sort_idx_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Triton weighted combine back to token order; grads flow to y_sorted and weights."""
    if y_sorted_ND.shape[0] != weights_TK.numel():
        raise ValueError(
            f"unpermute: {y_sorted_ND.shape[0]} rows but weights_TK has {weights_TK.numel()} entries"
        )
    return _UnpermuteFn.apply(y_sorted_ND, sort_idx_N, weights_TK)
