"""A faster plain-torch grouped SwiGLU for CPU: per-expert GEMMs run single-threaded, experts split over threads.

Why not `grouped_mm` (or one multi-threaded GEMM per expert) on CPU: at fine-grained MoE shapes an
expert gets a few dozen rows, and a GEMM that small is dominated by per-call fixed costs; when
each such call also splits over the OpenMP team, every one of the hundreds of calls ends in a
barrier, which on a shared machine (another process holding a core) stalls for a whole time
slice. Measured here at 4096 x 1024 -> 688 bf16 over 128 experts: one thread per GEMM is ~10x
faster than two threads per GEMM under load. So: experts are cut into contiguous chunks of about
equal rows, one chunk per intra-op thread; each chunk runs its whole pipeline (GEMMs into
preallocated slices, SwiGLU on its rows) on its own single-threaded worker. Weight grads are
written only once (no zero fill of experts that have rows: at top-1 the weight grads are most of
the bytes moved). The offsets go to the host (`.tolist()`): free on CPU, a sync on GPU, where the
Triton kernels or `grouped_mm` are the right tools.

Same signature and semantics as `kernels.grouped_swiglu` (the seam contract).
Legend: N rows, D hidden, I intermediate, J = 2I, E experts; T tokens, K top-k, C tokens of a chunk.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _in_dispatch_mode
except ImportError:  # pragma: no cover - older torch

    def _in_dispatch_mode() -> bool:
        return False


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    # set_num_threads in a worker sets that thread's OpenMP team size only (the caller keeps its own);
    # keyed by pid: a forked child must not reuse the parent's pool (its threads do not exist there)
    return ThreadPoolExecutor(
        workers, thread_name_prefix="experts", initializer=torch.set_num_threads, initargs=(1,)
    )


def _groups(offsets_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, row_start, row_end) of every expert that has rows."""
    out, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


def _chunks(groups, parts: int) -> list[list[tuple[int, int, int]]]:
    """Contiguous runs of experts with about N/parts rows each (an expert is never split)."""
    if not groups:
        return []
    total = groups[-1][2] - groups[0][1]
    chunks, cur = [], []
    for g in groups:
        cur.append(g)
        if len(chunks) < parts - 1 and g[2] - groups[0][1] >= total * (len(chunks) + 1) / parts:
            chunks.append(cur)
            cur = []
    if cur:
        chunks.append(cur)
    return chunks


def _run(fn, chunks) -> None:
    workers = torch.get_num_threads()
    # a dispatch mode (FlopCounterMode, FakeTensorMode, ...) is thread-local: the pool's workers
    # would run the GEMMs outside it, so under one every chunk runs in the caller's thread
    if workers <= 1 or len(chunks) <= 1 or _in_dispatch_mode():
        for c in chunks:
            fn(c)
        return

    # grad and inference mode are thread-local: a fresh worker has grad on and inference off,
    # and writing into the caller's inference-mode tensors outside inference mode is an error
    inference = torch.is_inference_mode_enabled()

    def no_grad_fn(c):
        with torch.inference_mode(inference), torch.no_grad():
            fn(c)

    for f in [_pool(workers, os.getpid()).submit(no_grad_fn, c) for c in chunks]:
        f.result()


class _GroupedSwiGLUTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EJD, w2_EDI, offsets_E):
        N = x_ND.shape[0]
        E, D, I = w2_EDI.shape
        groups = _groups(offsets_E)
        assert not groups or groups[-1][2] == N, "offsets_E must end at the number of rows"
        chunks = _chunks(groups, max(1, torch.get_num_threads()))
        gu_NJ = x_ND.new_empty(N, 2 * I)
        h_NI = x_ND.new_empty(N, I)
        y_ND = x_ND.new_zeros(N, D) if not groups else x_ND.new_empty(N, D)

        def fwd(chunk):
            for e, s, t in chunk:
                torch.mm(x_ND[s:t], w1_EJD[e].t(), out=gu_NJ[s:t])
            s, t = chunk[0][1], chunk[-1][2]
            torch.mul(F.silu(gu_NJ[s:t, :I]), gu_NJ[s:t, I:], out=h_NI[s:t])
            for e, s, t in chunk:
                torch.mm(h_NI[s:t], w2_EDI[e].t(), out=y_ND[s:t])

        _run(fwd, chunks)
        ctx.save_for_backward(x_ND, w1_EJD, w2_EDI, gu_NJ, h_NI)
        ctx.chunks = chunks
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w1_EJD, w2_EDI, gu_NJ, h_NI = ctx.saved_tensors
        chunks = ctx.chunks
        N = x_ND.shape[0]
        E, D, I = w2_EDI.shape
        dy_ND = dy_ND.contiguous().to(x_ND.dtype)
        dw2_EDI = torch.empty_like(w2_EDI)
        dw1_EJD = torch.empty_like(w1_EJD)
        empty = sorted(set(range(E)) - {e for c in chunks for e, _, _ in c})
        if empty:  # experts with rows are fully written by their GEMM below
            dw2_EDI[empty] = 0
            dw1_EJD[empty] = 0
        dh_NI = x_ND.new_empty(N, I)
        dgu_NJ = torch.empty_like(gu_NJ)
        dx_ND = x_ND.new_zeros(N, D) if not chunks else x_ND.new_empty(N, D)

        def bwd(chunk):
            for e, s, t in chunk:
                torch.mm(dy_ND[s:t], w2_EDI[e], out=dh_NI[s:t])
                torch.mm(dy_ND[s:t].t(), h_NI[s:t], out=dw2_EDI[e])
            # SwiGLU backward on the chunk's rows: dg = dh * u * silu'(g), du = dh * silu(g)
            s, t = chunk[0][1], chunk[-1][2]
            g, u, dh = gu_NJ[s:t, :I], gu_NJ[s:t, I:], dh_NI[s:t]
            torch.ops.aten.silu_backward(dh * u, g, grad_input=dgu_NJ[s:t, :I])
            torch.mul(dh, F.silu(g), out=dgu_NJ[s:t, I:])
            for e, s, t in chunk:
                torch.mm(dgu_NJ[s:t], w1_EJD[e], out=dx_ND[s:t])
                torch.mm(dgu_NJ[s:t].t(), x_ND[s:t], out=dw1_EJD[e])

        _run(bwd, chunks)
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


# --------------------------------------------------------------------------- permute / unpermute
# The plain-indexing versions (x[idx] forward) get a scatter-add backward (index_put with
# accumulate: a sort of N indices plus an atomic-style add), the slow part of the torch path at
# top-8. A stable sort by expert is a permutation, so every backward here is a gather too.
# On CPU the token-order work runs in chunks of about CHUNK_ROWS routed rows: a chunk's gathered
# rows and their fp32 products (~4 MiB) stay in cache, where the whole step's (64 + 128 MiB at 4096
# tokens, top-8, hidden 1024) went to memory and back once per op. Measured at that shape:
# unpermute forward + backward 64 -> 35 ms, permute 23 -> 13 ms. On other devices: one chunk.

CHUNK_ROWS = 1024


def _token_spans(T: int, K: int, device: torch.device) -> list[tuple[int, int]]:
    """Token ranges [a, b) of about CHUNK_ROWS routed rows each (all T tokens at once off CPU)."""
    step = max(1, CHUNK_ROWS // max(K, 1)) if device.type == "cpu" else max(T, 1)
    return [(a, min(T, a + step)) for a in range(0, T, step)]


def _inverse(sort_idx_N: torch.Tensor) -> torch.Tensor:
    inv_N = torch.empty_like(sort_idx_N)
    inv_N[sort_idx_N] = torch.arange(sort_idx_N.numel(), device=sort_idx_N.device)
    return inv_N


class _PermuteTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, sort_idx_N, K):
        ctx.save_for_backward(sort_idx_N)
        ctx.K = K
        return x_TD.index_select(0, sort_idx_N // K)

    @staticmethod
    def backward(ctx, g_ND):
        (sort_idx_N,) = ctx.saved_tensors
        K = ctx.K
        N, D = g_ND.shape
        T = N // K
        dest_N = _inverse(sort_idx_N)  # row of (t, k) in the sorted order
        g_TD = g_ND.new_empty(T, D)
        for a, b in _token_spans(T, K, g_ND.device):  # dx[t] = sum_k g[dest[t, k]] (fp32 sum)
            rows_CKD = g_ND.index_select(0, dest_N[a * K : b * K]).view(b - a, K, D)
            g_TD[a:b] = rows_CKD.sum(1, dtype=torch.float32)
        return g_TD, None, None


def permute_torch(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch permute with a gather backward -> (x_sorted_ND, sort_idx_N int64, offsets_E int32 end offsets)."""
    K = experts_TK.shape[1]
    flat_N = experts_TK.flatten()
    sort_idx_N = torch.argsort(flat_N, stable=True)
    offsets_E = torch.cumsum(torch.bincount(flat_N, minlength=num_experts), 0).to(torch.int32)
    return _PermuteTorch.apply(x_TD, sort_idx_N, K), sort_idx_N, offsets_E


class _UnpermuteTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted_ND, sort_idx_N, weights_TK):
        T, K = weights_TK.shape
        D = y_sorted_ND.shape[1]
        dest_N = _inverse(sort_idx_N)
        w32_TK = weights_TK.float()
        y_TD = y_sorted_ND.new_empty(T, D)
        for a, b in _token_spans(T, K, y_sorted_ND.device):  # y[t] = sum_k w[t, k] y_sorted[dest[t, k]]
            rows_CKD = y_sorted_ND.index_select(0, dest_N[a * K : b * K]).view(b - a, K, D)
            y_TD[a:b] = torch.bmm(w32_TK[a:b].unsqueeze(1), rows_CKD.float()).squeeze(1)  # fp32 sum over k
        ctx.save_for_backward(y_sorted_ND, dest_N, weights_TK)
        return y_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_sorted_ND, dest_N, weights_TK = ctx.saved_tensors
        T, K = weights_TK.shape
        D = y_sorted_ND.shape[1]
        g_TD = g_TD.contiguous()
        w32_TK = weights_TK.float()
        grad_ys_ND = torch.empty_like(y_sorted_ND)
        grad_w_TK = torch.empty(T, K, device=weights_TK.device, dtype=torch.float32)
        for a, b in _token_spans(T, K, y_sorted_ND.device):
            dest_CK = dest_N[a * K : b * K]  # (flat: C * K rows)
            g32_C1D = g_TD[a:b].float().unsqueeze(1)
            # grad_w[t, k] = <g[t], y_sorted[dest[t, k]]> in fp32 (a bf16 row times an fp32 row is fp32)
            torch.sum(
                y_sorted_ND.index_select(0, dest_CK).view(b - a, K, D) * g32_C1D, -1, out=grad_w_TK[a:b]
            )
            # grad_y_sorted[dest[t, k]] = w[t, k] * g[t]: dest is a permutation, each row written once
            grad_CKD = (w32_TK[a:b].unsqueeze(-1) * g32_C1D).to(y_sorted_ND.dtype)
            grad_ys_ND.index_copy_(0, dest_CK, grad_CKD.view(-1, D))
        return grad_ys_ND, None, grad_w_TK.to(weights_TK.dtype)


def unpermute_torch(
    y_sorted_ND: torch.Tensor, sort_idx_N: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """Torch weighted combine (fp32 sum) with gather-only backward; grads to y_sorted and weights."""
    return _UnpermuteTorch.apply(y_sorted_ND, sort_idx_N, weights_TK)
