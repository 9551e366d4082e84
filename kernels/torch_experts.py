"""A faster plain-torch grouped SwiGLU for CPU: one dense GEMM per non-empty expert, hand-written backward.

Why not `grouped_mm` on CPU: its CPU kernel runs every group through a generic path and its
autograd backward materializes transposed copies, so at fine-grained MoE shapes (few rows per
expert) it is several times slower than one oneDNN/AMX GEMM of the same FLOPs. Here every
product goes to `torch.mm` on contiguous row slices with the weight in its stored layout
(x @ W^T, dy @ W, dy^T @ h), written straight into preallocated outputs (no cat), and the SwiGLU
elementwise work runs once over all rows. The offsets go to the host (`.tolist()`): free on CPU,
a sync on GPU, where the Triton kernels or `grouped_mm` are the right tools.

Same signature and semantics as `kernels.grouped_swiglu` (the seam contract).
Legend: N rows, D hidden, I intermediate, J = 2I, E experts.
"""

import torch
import torch.nn.functional as F


def _groups(offsets_E: torch.Tensor):
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            yield e, start, end
        start = end


class _GroupedSwiGLUTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EJD, w2_EDI, offsets_E):
        N = x_ND.shape[0]
        E, D, I = w2_EDI.shape
        groups = list(_groups(offsets_E))
        assert not groups or groups[-1][2] == N, "offsets_E must end at the number of rows"
        gu_NJ = x_ND.new_empty(N, 2 * I)
        for e, s, t in groups:
            torch.mm(x_ND[s:t], w1_EJD[e].t(), out=gu_NJ[s:t])
        g_NI, u_NI = gu_NJ[:, :I], gu_NJ[:, I:]
        h_NI = F.silu(g_NI) * u_NI
        y_ND = x_ND.new_zeros(N, D) if len(groups) == 0 else x_ND.new_empty(N, D)
        for e, s, t in groups:
            torch.mm(h_NI[s:t], w2_EDI[e].t(), out=y_ND[s:t])
        ctx.save_for_backward(x_ND, w1_EJD, w2_EDI, gu_NJ, h_NI)
        ctx.groups = groups
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w1_EJD, w2_EDI, gu_NJ, h_NI = ctx.saved_tensors
        groups = ctx.groups
        N = x_ND.shape[0]
        E, D, I = w2_EDI.shape
        dy_ND = dy_ND.contiguous().to(x_ND.dtype)
        dh_NI = x_ND.new_empty(N, I)
        dw2_EDI = torch.zeros_like(w2_EDI)
        dw1_EJD = torch.zeros_like(w1_EJD)
        for e, s, t in groups:
            torch.mm(dy_ND[s:t], w2_EDI[e], out=dh_NI[s:t])
            torch.mm(dy_ND[s:t].t(), h_NI[s:t], out=dw2_EDI[e])
        # SwiGLU backward over all rows at once, in fp32
        g_NI, u_NI = gu_NJ[:, :I].float(), gu_NJ[:, I:].float()
        sig_NI = torch.sigmoid(g_NI)
        dh32_NI = dh_NI.float()
        dgu_NJ = torch.cat(
            [dh32_NI * u_NI * sig_NI * (1 + g_NI * (1 - sig_NI)), dh32_NI * g_NI * sig_NI], dim=1
        ).to(x_ND.dtype)
        dx_ND = torch.zeros_like(x_ND)
        for e, s, t in groups:
            torch.mm(dgu_NJ[s:t], w1_EJD[e], out=dx_ND[s:t])
            torch.mm(dgu_NJ[s:t].t(), x_ND[s:t], out=dw1_EJD[e])
        return dx_ND, dw1_EJD, dw2_EDI, None


def grouped_swiglu_torch(
    x_ND: torch.Tensor, gate_up_proj_E2ID: torch.Tensor, down_proj_EDI: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    """Per-expert SwiGLU over expert-sorted rows with per-expert GEMMs (CPU strategy); grads to x and weights."""
    if x_ND.dtype != gate_up_proj_E2ID.dtype or x_ND.dtype != down_proj_EDI.dtype:
        raise ValueError(
            f"grouped_swiglu_torch: x, gate_up_proj and down_proj must share a dtype, got "
            f"{x_ND.dtype}, {gate_up_proj_E2ID.dtype}, {down_proj_EDI.dtype}"
        )
    return _GroupedSwiGLUTorch.apply(x_ND.contiguous(), gate_up_proj_E2ID, down_proj_EDI, offsets_E)
