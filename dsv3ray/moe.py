"""DeepSeekMoE: sigmoid router with group-limited top-k, fine-grained routed experts, shared experts.

The forward goes through four seam functions (route → permute → grouped_swiglu → unpermute);
this file holds their torch versions, `kernels/` the Triton ones with the same signatures, and
`ModelConfig.moe_impl` picks. Sparse by construction: tokens are sorted by expert and every
expert runs one slice of a grouped GEMM (`torch.nn.functional.grouped_mm`; on CPU kernels' CPU
strategy, one GEMM per expert over the intra-op threads: `CPU_TORCH_OPS`); no token visits an
expert it was not routed to. With an `ExpertParallel` the sorted rows travel to the rank that owns
their expert (all-to-all) and back, and this layer holds only its local expert shard.

Parameter layout = transformers 5's DeepseekV3MoE: `gate.weight` (E, D) fp32 router,
`gate.e_score_correction_bias` (E,) fp32 buffer (selection only), `experts.gate_up_proj`
(e, 2I, D), `experts.down_proj` (e, D, I), `shared_experts.{gate,up,down}_proj`. The training
layer marks the expert params for DeepSpeed (`dsv3ray.parallel.mark_expert_params`).

Shapes: T tokens, D hidden, E routed experts (global), e local experts, K top-k, N = T*K routed
rows, M rows received by this EP rank, I = moe_intermediate_size, B batch, S sequence.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ray.errors import UserError
from kernels.reference import route_ref
from kernels.torch_experts import grouped_swiglu_torch, permute_torch, unpermute_torch

if TYPE_CHECKING:  # the parallel engineer's module; used only through its contract
    from dsv3ray.parallel import ExpertParallel

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The four seams, torch versions
# ---------------------------------------------------------------------------------------------


# The torch router is the kernels package's reference router itself (one definition of the
# routing math): sigmoid scores; biased, group-limited top-k selection (the bias steers selection
# only); unbiased weights, normalized if norm_topk_prob, times routed_scaling_factor. Returns
# (weights_TK float32, experts_TK int64, counts_E int64); gradients reach the logits via weights.
route = route_ref


def permute(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (t, k) in stable expert order: (x_sorted_ND, sort_idx_N, offsets_E end offsets int32)."""
    K = experts_TK.shape[1]
    flat_N = experts_TK.flatten()
    sort_idx_N = torch.argsort(flat_N, stable=True)
    x_sorted_ND = x_TD[sort_idx_N // K]
    offsets_E = torch.cumsum(torch.bincount(flat_N, minlength=num_experts), 0).to(torch.int32)
    return x_sorted_ND, sort_idx_N, offsets_E


def unpermute(y_sorted_ND: torch.Tensor, sort_idx_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * y_sorted[row of (t, k)], summed in fp32."""
    T, K = weights_TK.shape
    D = y_sorted_ND.shape[-1]
    inverse_N = torch.empty_like(sort_idx_N)
    inverse_N[sort_idx_N] = torch.arange(sort_idx_N.numel(), device=sort_idx_N.device)
    y_TKD = y_sorted_ND[inverse_N].view(T, K, D).float()
    y_TD = torch.bmm(weights_TK.float().unsqueeze(1), y_TKD).squeeze(1)  # (T, 1, K) @ (T, K, D)
    return y_TD.to(y_sorted_ND.dtype)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad dense: grouped_mm's backward rejects
    stride-0 (expanded) grads such as those of `.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _grouped_mm_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): CPU takes fp32/bf16/fp16; CUDA builds differ by GPU and version."""
    if _grouped_mm is None:
        return False
    try:
        x = torch.zeros(8, 16, dtype=dtype, device=device_type)
        w = torch.zeros(2, 16, 16, dtype=dtype, device=device_type)
        _grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([4, 8], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _grouped_linear(x_NK: torch.Tensor, w_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of group e times w[e]^T: (N, K) x (E, M, K) -> (N, M), one grouped GEMM.

    grouped_mm wants int32 end offsets, fp32/bf16/fp16 on CPU (CUDA: what the build supports),
    and every non-unit stride a multiple of 16 bytes; dims that are not are zero-padded (exact:
    padded K columns multiply zeros, padded M columns are sliced off). Rows past offsets[-1] would
    be garbage, so callers pass offsets[-1] == N.
    """
    N, Kd = x_NK.shape
    M = w_EMK.shape[1]
    if not _grouped_mm_supports(x_NK.device.type, x_NK.dtype):
        # e.g. fp64, or fp32 where the CUDA build lacks it: same math, one matmul per group slice
        out, start = [], 0
        for e, end in enumerate(offsets_E.tolist()):
            out.append(x_NK[start:end] @ w_EMK[e].T)
            start = end
        return torch.cat(out) if out else x_NK.new_zeros(N, M)
    align = 16 // x_NK.element_size()
    Kp, Mp = -(-Kd // align) * align, -(-M // align) * align
    if Kp != Kd:
        x_NK = F.pad(x_NK, (0, Kp - Kd))
    if Kp != Kd or Mp != M:
        w_EMK = F.pad(w_EMK, (0, Kp - Kd, 0, Mp - M))
    y_NM = _grouped_mm(x_NK.contiguous(), w_EMK.transpose(-2, -1), offs=offsets_E.to(torch.int32))
    y_NM = _ContiguousGrad.apply(y_NM)
    return y_NM[:, :M] if Mp != M else y_NM


def grouped_swiglu(
    x_ND: torch.Tensor, gate_up_proj_E2ID: torch.Tensor, down_proj_EDI: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    """Per group e: (silu(x Wg^T) * (x Wu^T)) Wd^T with [Wg; Wu] = gate_up_proj[e], Wd = down_proj[e]."""
    I = down_proj_EDI.shape[-1]
    h_N2I = _grouped_linear(x_ND, gate_up_proj_E2ID.to(x_ND.dtype), offsets_E)
    a_NI = F.silu(h_N2I[:, :I]) * h_N2I[:, I:]
    return _grouped_linear(a_NI, down_proj_EDI.to(x_ND.dtype), offsets_E)


TORCH_OPS = SimpleNamespace(route=route, permute=permute, unpermute=unpermute, grouped_swiglu=grouped_swiglu)


def _grouped_swiglu_cpu(
    x_ND: torch.Tensor, gate_up_proj_E2ID: torch.Tensor, down_proj_EDI: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    return grouped_swiglu_torch(
        x_ND, gate_up_proj_E2ID.to(x_ND.dtype), down_proj_EDI.to(x_ND.dtype), offsets_E
    )


# The torch seams on CPU: kernels' CPU strategy, same math. Per-expert GEMMs single-threaded, the
# experts split over the intra-op threads (no OpenMP barrier per small GEMM); permute / unpermute
# with gather-only backwards (a stable sort is a permutation: no scatter-add), the combine in
# cache-sized chunks. The seed's layer at top-8 (benchmarks/moe_layer.py, 2 vCPUs, 2026-11-29):
# 788-850 -> 665-685 ms per step, routing 151 -> 52-62 ms.
CPU_TORCH_OPS = SimpleNamespace(
    route=route, permute=permute_torch, unpermute=unpermute_torch, grouped_swiglu=_grouped_swiglu_cpu
)


@functools.cache
def _log_choice(requested: str, chosen: str, device_type: str) -> None:
    log.info("moe_impl=%s on %s: using the %s MoE implementation", requested, device_type, chosen)


def _triton_ops() -> SimpleNamespace | None:
    try:
        import kernels
    except ImportError:
        return None
    names = ("route", "permute", "unpermute", "grouped_swiglu")
    if not all(hasattr(kernels, n) for n in names):
        return None
    return SimpleNamespace(**{n: getattr(kernels, n) for n in names})


@functools.cache  # (moe_ops runs per forward: PATH is searched once per process)
def _c_compiler() -> str | None:
    """The C compiler compiled Triton builds its kernel launchers with, by Triton's own rule (CC,
    else gcc, else clang on PATH); None when there is none (a slim image with only Python)."""
    import os
    import shutil

    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def moe_ops(moe_impl: str, device: torch.device) -> SimpleNamespace:
    """The seam functions for `moe_impl` on `device` (auto = triton on CUDA/ROCm, torch on CPU).

    Off CPU, compiled Triton needs a C compiler for its launchers at the first launch (a Triton
    traceback on every worker at the first step otherwise): without one, auto takes torch and
    says why, and an explicit triton is a one-line error."""
    if moe_impl == "torch" or (moe_impl == "auto" and device.type != "cuda"):
        if device.type == "cpu":
            _log_choice(
                moe_impl, "torch (CPU strategy: per-expert GEMMs over threads, gather backwards)", "cpu"
            )
            return CPU_TORCH_OPS
        _log_choice(moe_impl, "torch", device.type)
        return TORCH_OPS
    ops = _triton_ops()
    if ops is None:
        if moe_impl == "triton":
            raise UserError(
                "model.moe_impl='triton' but kernels.route/permute/unpermute/grouped_swiglu are not available:"
                " set model.moe_impl to 'torch' or 'auto'"
            )
        _log_choice(moe_impl, "torch (Triton kernels not available)", device.type)
        return TORCH_OPS
    if device.type != "cpu" and _c_compiler() is None:
        if moe_impl == "triton":
            raise UserError(
                f"model.moe_impl='triton' on {device.type}: Triton builds its kernel launchers with a C compiler"
                " and none was found (CC unset, no gcc or clang on PATH): install one or set CC, or set"
                " model.moe_impl to 'torch' or 'auto'"
            )
        _log_choice(
            moe_impl, "torch (no C compiler for Triton's launchers: set CC or install gcc)", device.type
        )
        return TORCH_OPS
    _log_choice(moe_impl, "triton", device.type)
    return ops


# ---------------------------------------------------------------------------------------------
# Modules (names and parameter layout as transformers 5's DeepseekV3MoE)
# ---------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Dense FFN down(silu(gate x) * up x); the dense MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        # aux-loss-free balancing bias (DeepSeek-V3 §2.1.2); a buffer: updated by a rule, not by SGD
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # `.to(bf16)` / DeepSpeed's bf16 cast must not round the bias: its updates are ~1e-3 steps
        super()._apply(fn, recurse)
        self._buffers["e_score_correction_bias"] = self.e_score_correction_bias.float()
        return self

    def forward(self, x_TD):
        return F.linear(x_TD.float(), self.weight.float())  # (T, E) fp32 logits


class Experts(nn.Module):
    """The routed experts held by this rank: global experts [first, first + e)."""

    def __init__(self, num_local: int, hidden_size: int, intermediate_size: int, first: int = 0):
        super().__init__()
        self.first = first
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden_size, intermediate_size))


class MoE(nn.Module):
    """Shared experts + fine-grained routed experts. forward(x_BSD) -> (y_BSD, counts_E, balance_loss)."""

    def __init__(self, cfg, ep: ExpertParallel | None = None):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.seq_aux_loss_alpha = cfg.seq_aux_loss_alpha
        self.moe_impl = cfg.moe_impl
        self.ep = ep
        if ep is None:
            local = range(E)
        else:
            if E % ep.ep_size:
                raise UserError(
                    f"n_routed_experts={E} is not divisible by the expert-parallel size {ep.ep_size}:"
                    " choose an expert count that is a multiple of ep_size"
                )
            local = ep.local_experts(E)
        self.gate = TopkRouter(E, D)
        self.experts = Experts(len(local), D, I, first=local.start)
        self.shared_experts = SwiGLU(D, I * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None

    def balance_loss(self, logits_TE: torch.Tensor, experts_TK: torch.Tensor, B: int, S: int) -> torch.Tensor:
        """Sequence-wise balance loss α Σ_i f_i P_i averaged over sequences (DeepSeek-V3 eq. 17-20).

        f_i = E / (K S) * #tokens of the sequence routed to i; P_i = mean over the sequence of
        s_i / Σ_j s_j with s = sigmoid(logits) (the affinities, without bias).
        """
        E, K = self.num_experts, self.top_k
        if self.seq_aux_loss_alpha == 0:
            return logits_TE.new_zeros(())
        s_BSE = logits_TE.float().sigmoid().view(B, S, E)
        P_BE = (s_BSE / s_BSE.sum(-1, keepdim=True)).mean(1)
        with torch.no_grad():
            hits_BE = torch.zeros(B, E, device=logits_TE.device)
            hits_BE.scatter_add_(1, experts_TK.view(B, S * K), torch.ones(B, S * K, device=logits_TE.device))
            f_BE = hits_BE * (E / (K * S))
        return self.seq_aux_loss_alpha * (f_BE * P_BE).sum(-1).mean()

    def forward(self, x_BSD: torch.Tensor):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ops = moe_ops(self.moe_impl, x_TD.device)
        logits_TE = self.gate(x_TD)
        weights_TK, experts_TK, counts_E = ops.route(
            logits_TE,
            self.gate.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.routed_scaling_factor,
        )
        x_sorted_ND, sort_idx_N, offsets_E = ops.permute(x_TD, experts_TK, self.num_experts)
        w = self.experts
        if self.ep is None:
            y_sorted_ND = ops.grouped_swiglu(x_sorted_ND, w.gate_up_proj, w.down_proj, offsets_E)
        else:
            x_local_MD, offsets_local_e, handle = self.ep.dispatch(x_sorted_ND, counts_E)
            y_local_MD = ops.grouped_swiglu(x_local_MD, w.gate_up_proj, w.down_proj, offsets_local_e)
            y_sorted_ND = self.ep.combine(y_local_MD, handle)
        y_TD = ops.unpermute(y_sorted_ND, sort_idx_N, weights_TK.to(torch.float32))
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        bal = self.balance_loss(logits_TE, experts_TK, B, S)
        return y_TD.view(B, S, D), counts_E.detach(), bal
