"""Grouped SwiGLU expert MLP in Triton over expert-sorted rows, driven by end offsets (no pointer arrays).

Forward:  gu_NJ = x @ [Wg; Wu]^T with SwiGLU fused in the epilogue (h = silu(g) * u), then y = h @ Wd^T.
Backward: dgu = (dy @ Wd) with the SwiGLU backward fused in the epilogue, dx = dgu @ [Wg; Wu],
          dWd[e] = dy_e^T @ h_e, dW1[e] = dgu_e^T @ x_e (fp32 accumulate, empty groups give zeros).

Row tiles never straddle two experts: program `pid_m` reads its (expert, row range) from a small
tile table built from the offsets on the device (`_tile_table_kernel`), so the launch needs no host
sync on GPU; the grid is sized by the upper bound cdiv(N, BLOCK_M) + E and surplus programs do
nothing. Expert weights are addressed through strides, so one grouped GEMM kernel serves x@W^T,
dy@W and dgu@W. Only the weight-gradient kernel reads the offsets directly (one program per
expert and output tile, looping over that expert's rows).

Legend: N rows, D hidden, I expert intermediate, J = 2I, E experts; P, Q weight-grad dims.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tiles"])  # sizes vary per call: compile once
def _tile_table_kernel(
    offsets_ptr, tiles_ptr, E, num_tiles, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr
):
    """For tiles p in this block: expert = number of experts whose tiles all come before p."""
    e_E = tl.arange(0, BLOCK_E)
    ok_E = e_E < E
    end_E = tl.load(offsets_ptr + e_E, mask=ok_E, other=0)
    start_E = tl.load(offsets_ptr + e_E - 1, mask=ok_E & (e_E > 0), other=0)
    tiles_E = tl.where(ok_E, (end_E - start_E + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end_E = tl.cumsum(tiles_E, 0)
    p_P = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    expert_P = tl.sum((tile_end_E[None, :] <= p_P[:, None]).to(tl.int32), axis=1)
    hit_PE = e_E[None, :] == expert_P[:, None]
    first_P = tl.sum(tl.where(hit_PE, (tile_end_E - tiles_E)[None, :], 0), axis=1)
    row_start_P = tl.sum(tl.where(hit_PE, start_E[None, :], 0), axis=1) + (p_P - first_P) * BLOCK_M
    row_end_P = tl.where(expert_P < E, tl.sum(tl.where(hit_PE, end_E[None, :], 0), axis=1), row_start_P)
    ok_P = p_P < num_tiles
    tl.store(tiles_ptr + p_P, tl.minimum(expert_P, E - 1), mask=ok_P)
    tl.store(tiles_ptr + num_tiles + p_P, row_start_P, mask=ok_P)
    tl.store(tiles_ptr + 2 * num_tiles + p_P, row_end_P, mask=ok_P)


@triton.jit
def _load_tile(tiles_ptr, pid_m, num_tiles):
    """-> (expert, row_start, row_end) of row tile pid_m from the (3, num_tiles) table of `_tile_table`."""
    e = tl.load(tiles_ptr + pid_m)
    row_start = tl.load(tiles_ptr + num_tiles + pid_m)
    row_end = tl.load(tiles_ptr + 2 * num_tiles + pid_m)
    return e, row_start, row_end


@triton.jit(do_not_specialize=["num_tiles"])  # sizes vary per call: compile once
def _gate_up_swiglu_kernel(
    x_ptr,
    w_ptr,
    tiles_ptr,
    num_tiles,
    gu_ptr,
    h_ptr,
    D,
    I,
    stride_we,
    stride_wj,
    stride_wd,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row_start, row_end = _load_tile(tiles_ptr, pid_m, num_tiles)
    m_M = row_start + tl.arange(0, BLOCK_M)
    ok_M = m_M < row_end
    m64_M = m_M.to(tl.int64)
    n_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_N = n_N < I
    w_e = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    num_k = tl.where(row_end > row_start, tl.cdiv(D, BLOCK_K), 0)
    for kb in range(0, num_k):
        k_K = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        ok_K = k_K < D
        x_MK = tl.load(
            x_ptr + m64_M[:, None] * D + k_K[None, :], mask=ok_M[:, None] & ok_K[None, :], other=0.0
        )
        ok_KN = ok_K[:, None] & ok_N[None, :]
        wg_KN = tl.load(w_e + n_N[None, :] * stride_wj + k_K[:, None] * stride_wd, mask=ok_KN, other=0.0)
        wu_KN = tl.load(
            w_e + (n_N[None, :] + I) * stride_wj + k_K[:, None] * stride_wd, mask=ok_KN, other=0.0
        )
        acc_g = tl.dot(x_MK, wg_KN, acc_g, input_precision=PREC)
        acc_u = tl.dot(x_MK, wu_KN, acc_u, input_precision=PREC)
    h_MN = acc_g * tl.sigmoid(acc_g) * acc_u
    ok_MN = ok_M[:, None] & ok_N[None, :]
    out_t = h_ptr.dtype.element_ty
    gu_row = gu_ptr + m64_M[:, None] * (2 * I)
    tl.store(gu_row + n_N[None, :], acc_g.to(out_t), mask=ok_MN)
    tl.store(gu_row + I + n_N[None, :], acc_u.to(out_t), mask=ok_MN)
    tl.store(h_ptr + m64_M[:, None] * I + n_N[None, :], h_MN.to(out_t), mask=ok_MN)


@triton.jit(do_not_specialize=["num_tiles"])  # sizes vary per call: compile once
def _grouped_mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    tiles_ptr,
    num_tiles,
    gu_ptr,
    KD,
    ND,
    stride_be,
    stride_bk,
    stride_bn,
    SWIGLU_BWD: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[rows of e] = A[rows of e] (M, KD) @ B[e] (KD, ND), B addressed by strides.

    SWIGLU_BWD: the product is dh (M, I=ND); with the saved pre-activations gu = [g, u] the
    epilogue writes C = dgu (M, 2I) = [dh * u * silu'(g), dh * silu(g)].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row_start, row_end = _load_tile(tiles_ptr, pid_m, num_tiles)
    m_M = row_start + tl.arange(0, BLOCK_M)
    ok_M = m_M < row_end
    m64_M = m_M.to(tl.int64)
    n_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_N = n_N < ND
    b_e = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    num_k = tl.where(row_end > row_start, tl.cdiv(KD, BLOCK_K), 0)
    for kb in range(0, num_k):
        k_K = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        ok_K = k_K < KD
        a_MK = tl.load(
            a_ptr + m64_M[:, None] * KD + k_K[None, :], mask=ok_M[:, None] & ok_K[None, :], other=0.0
        )
        b_KN = tl.load(
            b_e + k_K[:, None] * stride_bk + n_N[None, :] * stride_bn,
            mask=ok_K[:, None] & ok_N[None, :],
            other=0.0,
        )
        acc = tl.dot(a_MK, b_KN, acc, input_precision=PREC)
    ok_MN = ok_M[:, None] & ok_N[None, :]
    out_t = c_ptr.dtype.element_ty
    if SWIGLU_BWD:
        gu_row = gu_ptr + m64_M[:, None] * (2 * ND)
        g = tl.load(gu_row + n_N[None, :], mask=ok_MN, other=0.0).to(tl.float32)
        u = tl.load(gu_row + ND + n_N[None, :], mask=ok_MN, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = acc * u * sig * (1.0 + g * (1.0 - sig))
        du = acc * g * sig
        c_row = c_ptr + m64_M[:, None] * (2 * ND)
        tl.store(c_row + n_N[None, :], dg.to(out_t), mask=ok_MN)
        tl.store(c_row + ND + n_N[None, :], du.to(out_t), mask=ok_MN)
    else:
        tl.store(c_ptr + m64_M[:, None] * ND + n_N[None, :], acc.to(out_t), mask=ok_MN)


@triton.jit
def _weight_grad_kernel(
    a_ptr,
    b_ptr,
    dw_ptr,
    offsets_ptr,
    P,
    Q,
    PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW[e] (P, Q) = A[rows of e]^T (P, m) @ B[rows of e] (m, Q); A is (N, P), B is (N, Q), row-major."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    num_q = tl.cdiv(Q, BLOCK_Q)
    p_P = (pid // num_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_Q = (pid % num_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ok_P = p_P < P
    ok_Q = q_Q < Q
    end = tl.load(offsets_ptr + e)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    for m0 in range(start, end, BLOCK_K):
        m_K = m0 + tl.arange(0, BLOCK_K)
        ok_K = m_K < end
        m64_K = m_K.to(tl.int64)
        aT_PK = tl.load(
            a_ptr + m64_K[None, :] * P + p_P[:, None], mask=ok_P[:, None] & ok_K[None, :], other=0.0
        )
        b_KQ = tl.load(
            b_ptr + m64_K[:, None] * Q + q_Q[None, :], mask=ok_K[:, None] & ok_Q[None, :], other=0.0
        )
        acc = tl.dot(aT_PK, b_KQ, acc, input_precision=PREC)
    dw_e = dw_ptr + e.to(tl.int64) * P * Q
    tl.store(
        dw_e + p_P[:, None] * Q + q_Q[None, :],
        acc.to(dw_ptr.dtype.element_ty),
        mask=ok_P[:, None] & ok_Q[None, :],
    )


def _blocks(device: torch.device, N: int, E: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps per kernel: wide tiles for the interpreter (fewer, bigger numpy steps), a
    Hopper-friendly set on GPU (fp32 tiles are twice the bytes: one pipeline stage less for shared memory)."""
    if device.type != "cuda":
        one = dict(warps=4, stages=1)
        return dict(mm=(32, 128, 128, one), gate_up=(32, 128, 128, one), wgrad=(128, 128, 64, one))
    # few rows per expert (fine-grained MoE at top-1): 64-row tiles waste less on partial tiles
    bm = 64 if N / max(E, 1) <= 96 else 128
    stages = 3 if dtype != torch.float32 else 2
    row = dict(warps=4 if bm == 64 else 8, stages=stages)
    return dict(
        mm=(bm, 128, 64, row), gate_up=(bm, 64, 64, row), wgrad=(128, 128, 32, dict(warps=8, stages=stages))
    )


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_table(offsets_E: torch.Tensor, N: int, block_m: int) -> torch.Tensor:
    """(3, num_tiles) int32 rows (expert, row_start, row_end) of every BLOCK_M row tile, expert after expert.

    One tiny Triton program, no host sync on GPU: the table has the upper bound cdiv(N, BLOCK_M) + E
    entries and surplus tiles are empty (row_end == row_start). On CPU the sync is free, so the table
    is cut to the real tiles (the interpreter pays per program).
    """
    E = offsets_E.shape[0]
    if offsets_E.device.type == "cuda":
        num_tiles = triton.cdiv(N, block_m) + E
    else:
        counts_E = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long))
        num_tiles = int(((counts_E + block_m - 1) // block_m).sum())
    tiles = torch.empty(3, num_tiles, device=offsets_E.device, dtype=torch.int32)
    if num_tiles:
        block_e = triton.next_power_of_2(max(E, 1))
        block_p = max(1, min(256, 8192 // block_e))
        _tile_table_kernel[(triton.cdiv(num_tiles, block_p),)](
            offsets_E, tiles, E, num_tiles, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_E=block_e
        )
    return tiles


def _launch_gate_up(x_ND, w_EJD, tiles, cfg):
    N, D = x_ND.shape
    E, J, _ = w_EJD.shape
    I = J // 2
    gu_NJ = torch.empty(N, J, device=x_ND.device, dtype=x_ND.dtype)
    h_NI = torch.empty(N, I, device=x_ND.device, dtype=x_ND.dtype)
    bm, bn, bk, launch = cfg["gate_up"]
    num_tiles = tiles.shape[1]
    if num_tiles:
        _gate_up_swiglu_kernel[(num_tiles, triton.cdiv(I, bn))](
            x_ND, w_EJD, tiles, num_tiles, gu_NJ, h_NI, D, I, *w_EJD.stride(),
            PREC=_prec(x_ND.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=launch["warps"], num_stages=launch["stages"],
        )  # fmt: skip
    return gu_NJ, h_NI


def _launch_mm(a_NK, b_E, b_strides, n_out, tiles, cfg, gu_NJ=None):
    """C = A @ B[e] per group; b_strides = (expert, k, n). With gu_NJ: fused SwiGLU backward (C is dgu)."""
    N, KD = a_NK.shape
    swiglu = gu_NJ is not None
    c = torch.empty(N, 2 * n_out if swiglu else n_out, device=a_NK.device, dtype=a_NK.dtype)
    bm, bn, bk, launch = cfg["mm"]
    num_tiles = tiles.shape[1]
    if num_tiles:
        _grouped_mm_kernel[(num_tiles, triton.cdiv(n_out, bn))](
            a_NK, b_E, c, tiles, num_tiles, gu_NJ if swiglu else c, KD, n_out, *b_strides,
            SWIGLU_BWD=swiglu, PREC=_prec(a_NK.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=launch["warps"], num_stages=launch["stages"],
        )  # fmt: skip
    return c


def _launch_wgrad(a_NP, b_NQ, offsets_E, dtype, cfg):
    N, P = a_NP.shape
    Q = b_NQ.shape[1]
    E = offsets_E.shape[0]
    dw_EPQ = torch.empty(E, P, Q, device=a_NP.device, dtype=dtype)
    bp, bq, bk, launch = cfg["wgrad"]
    grid = (E, triton.cdiv(P, bp) * triton.cdiv(Q, bq))
    if E:
        _weight_grad_kernel[grid](
            a_NP, b_NQ, dw_EPQ, offsets_E, P, Q, PREC=_prec(a_NP.dtype),
            BLOCK_P=bp, BLOCK_Q=bq, BLOCK_K=bk, num_warps=launch["warps"], num_stages=launch["stages"],
        )  # fmt: skip
    return dw_EPQ


class _GroupedSwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, gate_up_proj_E2ID, down_proj_EDI, offsets_E, tiles=None):
        E, D, I = down_proj_EDI.shape
        N = x_ND.shape[0]
        cfg = {**_blocks(x_ND.device, N, E, x_ND.dtype), **(tiles or {})}
        tiles_gu = _tile_table(offsets_E, N, cfg["gate_up"][0])
        tiles_mm = tiles_gu if cfg["mm"][0] == cfg["gate_up"][0] else _tile_table(offsets_E, N, cfg["mm"][0])
        gu_NJ, h_NI = _launch_gate_up(x_ND, gate_up_proj_E2ID, tiles_gu, cfg)
        # y = h @ Wd[e]^T: B[e][k=i, n=d] = Wd[e, d, i]
        s_e, s_d, s_i = down_proj_EDI.stride()
        y_ND = _launch_mm(h_NI, down_proj_EDI, (s_e, s_i, s_d), D, tiles_mm, cfg)
        ctx.save_for_backward(x_ND, gate_up_proj_E2ID, down_proj_EDI, offsets_E, tiles_mm, gu_NJ, h_NI)
        ctx.cfg = cfg
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        x_ND, w1_EJD, w2_EDI, offsets_E, tiles_mm, gu_NJ, h_NI = ctx.saved_tensors
        cfg = ctx.cfg
        E, D, I = w2_EDI.shape
        dy_ND = grad_y_ND.contiguous().to(x_ND.dtype)
        # dgu = swiglu_bwd(dy @ Wd[e]): B[e][k=d, n=i] = Wd[e, d, i]
        s_e, s_d, s_i = w2_EDI.stride()
        dgu_NJ = _launch_mm(dy_ND, w2_EDI, (s_e, s_d, s_i), I, tiles_mm, cfg, gu_NJ=gu_NJ)
        # dx = dgu @ W1[e]: B[e][k=j, n=d] = W1[e, j, d]
        dx_ND = _launch_mm(dgu_NJ, w1_EJD, w1_EJD.stride(), D, tiles_mm, cfg)
        dw2_EDI = _launch_wgrad(dy_ND, h_NI, offsets_E, w2_EDI.dtype, cfg)
        dw1_EJD = _launch_wgrad(dgu_NJ, x_ND, offsets_E, w1_EJD.dtype, cfg)
        return dx_ND, dw1_EJD, dw2_EDI, None, None


def grouped_swiglu(
    x_ND: torch.Tensor,
    gate_up_proj_E2ID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    offsets_E: torch.Tensor,
    tiles: dict | None = None,
) -> torch.Tensor:
    """Triton grouped SwiGLU experts over expert-sorted rows; grads to x and both weights.

    `tiles` replaces the default tile sizes of some kernels: {"gate_up" | "mm": (BLOCK_M, BLOCK_N,
    BLOCK_K, {"warps", "stages"}), "wgrad": (BLOCK_P, BLOCK_Q, BLOCK_K, {...})} (the values
    `_blocks` picks; `benchmarks/grouped_mlp_tiles.py` times the candidates on a GPU)."""
    if tiles is not None and not set(tiles) <= {"gate_up", "mm", "wgrad"}:
        raise ValueError(f"grouped_swiglu: tiles keys must be gate_up, mm, wgrad; got {sorted(tiles)}")
    E, J, D = gate_up_proj_E2ID.shape
    if down_proj_EDI.shape != (E, D, J // 2) or J % 2:
        raise ValueError(
            f"grouped_swiglu: gate_up_proj {tuple(gate_up_proj_E2ID.shape)} and down_proj "
            f"{tuple(down_proj_EDI.shape)} must be (E, 2I, D) and (E, D, I)"
        )
    if x_ND.shape[1] != D or offsets_E.shape != (E,):
        raise ValueError(
            f"grouped_swiglu: x {tuple(x_ND.shape)} / offsets {tuple(offsets_E.shape)} do not fit E={E}, D={D}"
        )
    if x_ND.dtype != gate_up_proj_E2ID.dtype or x_ND.dtype != down_proj_EDI.dtype:
        raise ValueError(
            f"grouped_swiglu: x, gate_up_proj and down_proj must share a dtype, got "
            f"{x_ND.dtype}, {gate_up_proj_E2ID.dtype}, {down_proj_EDI.dtype}"
        )
    return _GroupedSwiGLUFn.apply(
        x_ND.contiguous(), gate_up_proj_E2ID, down_proj_EDI, offsets_E.to(torch.int32).contiguous(), tiles
    )
