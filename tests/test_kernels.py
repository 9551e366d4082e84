"""Triton MoE kernels vs their plain torch references: outputs and every gradient, over awkward shapes.

On CPU the kernels run under the Triton interpreter (fp32 only: the interpreter has no bf16
arithmetic), on a representative subset of the grid. The `gpu` tests run the full grid, fp32
(TF32 off) and bf16, compiled. Index and permutation outputs must match exactly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import kernels  # noqa: E402
from kernels import (  # noqa: E402
    grouped_swiglu,
    grouped_swiglu_ref,
    grouped_swiglu_torch,
    permute,
    permute_ref,
    permute_torch,
    route,
    route_ref,
    unpermute,
    unpermute_ref,
    unpermute_torch,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references must be true fp32 on GPU; every test draws the same random numbers."""
    torch.manual_seed(0)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _close(got, want, dtype, what):
    """fp32: exact-ish; bf16: error relative to the largest reference magnitude (floored: all-~0 grads)."""
    got, want = got.float(), want.float()
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    err = (got - want).abs().max().item() / scale if want.numel() else 0.0
    # fp32: 1e-5 on CPU; on CUDA the kernels reduce in a different (parallel) order, and a dot
    # product over hundreds of terms that cancel (unpermute's weight gradient) drifts to ~2e-5.
    tol = (1e-5 if got.device.type == "cpu" else 5e-5) if dtype == torch.float32 else 3e-2
    assert err <= tol, f"{what}: max error {err:.2e} (relative to {scale:.2e}) > {tol:.0e}"


def _logits(T, E, hot_expert=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g)
    bias_E = 0.1 * torch.randn(E, generator=g)
    if hot_expert is not None:  # every token picks this expert first
        bias_E[hot_expert] = 10.0
    return logits_TE.to(DEV), bias_E.to(DEV)


# ---------------------------------------------------------------- router


def _check_route(T, E, K, n_group, topk_group, norm, hot_expert=None):
    logits_TE, bias_E = _logits(T, E, hot_expert)
    args = (K, n_group, topk_group, norm, 2.5)
    lt = logits_TE.clone().requires_grad_()
    lr = logits_TE.clone().requires_grad_()
    w_TK, ex_TK, counts_E = route(lt, bias_E, *args)
    w_ref, ex_ref, counts_ref = route_ref(lr, bias_E, *args)
    assert ex_TK.dtype == torch.int64 and counts_E.dtype == torch.int64 and w_TK.dtype == torch.float32
    assert torch.equal(ex_TK, ex_ref)
    assert torch.equal(counts_E, counts_ref)
    assert counts_E.sum().item() == T * K
    _close(w_TK, w_ref, torch.float32, "weights")
    g_TK = torch.randn(T, K, device=DEV)
    (w_TK * g_TK).sum().backward()
    (w_ref * g_TK).sum().backward()
    # atol: with K = 1 and normalization the true gradient is 0 and both sides hold rounding noise
    # (|g| * scale * fp32 eps ~ 1e-6); real gradients here are O(0.1)
    torch.testing.assert_close(lt.grad, lr.grad, rtol=1e-5, atol=1e-5)


ROUTE_CPU = [
    # T, E, K, n_group, topk_group, norm
    (1, 1, 1, 1, 1, True),
    (7, 3, 2, 1, 1, False),
    (600, 64, 8, 8, 4, True),
    (7, 130, 5, 1, 1, True),
    (37, 16, 3, 4, 2, True),
]


@pytest.mark.parametrize("T,E,K,n_group,topk_group,norm", ROUTE_CPU)
def test_route_matches_reference(T, E, K, n_group, topk_group, norm):
    _check_route(T, E, K, n_group, topk_group, norm)


def test_route_all_tokens_to_one_expert():
    _check_route(600, 64, 1, 1, 1, True, hot_expert=5)
    _, _, counts_E = route(*_logits(600, 64, hot_expert=5), 1, 1, 1, True, 1.0)
    assert counts_E[5].item() == 600 and counts_E.sum().item() == 600


def test_route_bias_selects_but_does_not_weigh():
    """The correction bias changes which expert wins, never the weight it gets."""
    logits_TE = torch.zeros(4, 8, device=DEV)
    logits_TE[:, 0] = 1.0
    bias_E = torch.zeros(8, device=DEV)
    bias_E[3] = 5.0
    w_TK, ex_TK, _ = route(logits_TE, bias_E, 1, 1, 1, False, 1.0)
    assert (ex_TK == 3).all()
    assert torch.allclose(w_TK, torch.full_like(w_TK, 0.5))  # sigmoid(0), unbiased


@pytest.mark.parametrize(
    "E,K,n_group,topk_group", [(8, 9, 1, 1), (10, 2, 4, 1), (8, 2, 8, 2), (8, 2, 2, 3), (8, 5, 4, 2)]
)
def test_route_rejects_impossible_setups(E, K, n_group, topk_group):
    with pytest.raises(ValueError, match="route"):
        route(torch.zeros(2, E, device=DEV), torch.zeros(E, device=DEV), K, n_group, topk_group, True, 1.0)


# ---------------------------------------------------------------- permute / unpermute


def _experts(T, E, K, hot_expert=None, seed=0):
    """Distinct experts per token (like top-k), some experts get no token when E > T*K."""
    g = torch.Generator().manual_seed(seed)
    ex_TK = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    if hot_expert is not None:
        ex_TK[:, 0] = hot_expert
        ex_TK[:, 1:] = (hot_expert + 1 + torch.arange(K - 1)) % E
    return ex_TK.to(DEV)


def _check_permute(T, D, E, K, dtype, hot_expert=None, permute=permute, unpermute=unpermute):
    ex_TK = _experts(T, E, K, hot_expert)
    x_TD = torch.randn(T, D, device=DEV, dtype=dtype)
    xt = x_TD.clone().requires_grad_()
    xr = x_TD.clone().requires_grad_()
    xs, sort_idx_N, offsets_E = permute(xt, ex_TK, E)
    xs_ref, sort_ref, offsets_ref = permute_ref(xr, ex_TK, E)
    assert sort_idx_N.dtype == torch.int64 and offsets_E.dtype == torch.int32
    assert torch.equal(sort_idx_N, sort_ref)
    assert torch.equal(offsets_E, offsets_ref)
    assert torch.equal(xs, xs_ref)
    g_ND = torch.randn_like(xs)
    (xs * g_ND).sum().backward()
    (xs_ref * g_ND).sum().backward()
    _close(xt.grad, xr.grad, dtype, "permute dx")

    # unpermute of the sorted rows with routing weights
    y_sorted = torch.randn(T * K, D, device=DEV, dtype=dtype)
    w_TK = torch.rand(T, K, device=DEV)
    yt, wt = y_sorted.clone().requires_grad_(), w_TK.clone().requires_grad_()
    yr, wr = y_sorted.clone().requires_grad_(), w_TK.clone().requires_grad_()
    out = unpermute(yt, sort_idx_N, wt)
    out_ref = unpermute_ref(yr, sort_ref, wr)
    assert out.dtype == dtype
    _close(out, out_ref, dtype, "unpermute y")
    g_TD = torch.randn_like(out)
    (out.float() * g_TD.float()).sum().backward()
    (out_ref.float() * g_TD.float()).sum().backward()
    _close(yt.grad, yr.grad, dtype, "unpermute dy_sorted")
    assert wt.grad.dtype == torch.float32
    _close(wt.grad, wr.grad, dtype, "unpermute dweights")


PERMUTE_CPU = [
    # T, D, E, K
    (1, 100, 1, 1),
    (7, 100, 3, 2),
    (600, 100, 64, 8),
    (7, 600, 130, 4),
]


@pytest.mark.parametrize("T,D,E,K", PERMUTE_CPU)
def test_permute_unpermute_match_reference(T, D, E, K):
    _check_permute(T, D, E, K, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_permute_unpermute_match_reference(dtype):
    """The gather-backward torch versions (CPU strategy), bf16 included."""
    _check_permute(60, 100, 7, 3, dtype, permute=permute_torch, unpermute=unpermute_torch)
    _check_permute(30, 64, 3, 1, dtype, hot_expert=1, permute=permute_torch, unpermute=unpermute_torch)


@pytest.mark.parametrize("chunk_rows", [16, 1024])
def test_torch_permute_unpermute_in_chunks(monkeypatch, chunk_rows):
    """On CPU the token-order work runs in chunks of CHUNK_ROWS rows: many chunks with a partial
    last one (16 rows, K=3: 5 tokens each), and the default size at more rows than one chunk."""
    import kernels.torch_experts as te

    monkeypatch.setattr(te, "CHUNK_ROWS", chunk_rows)
    T = 62 if chunk_rows == 16 else 700
    assert len(te._token_spans(T, 3, torch.device("cpu"))) > 2
    for dtype in (torch.float32, torch.bfloat16):
        _check_permute(T, 64, 7, 3, dtype, permute=permute_torch, unpermute=unpermute_torch)


def test_permute_all_tokens_to_one_expert():
    _check_permute(600, 100, 3, 1, torch.float32, hot_expert=2)


def test_unpermute_inverts_permute_with_unit_weights():
    """Permute then unpermute with weights 1/K is the identity (a plain invariant, no reference)."""
    T, D, E, K = 50, 100, 7, 3
    x_TD = torch.randn(T, D, device=DEV)
    xs, sort_idx_N, _ = permute(x_TD, _experts(T, E, K), E)
    back = unpermute(xs, sort_idx_N, torch.full((T, K), 1.0 / K, device=DEV))
    torch.testing.assert_close(back, x_TD)


# ---------------------------------------------------------------- grouped SwiGLU


def _offsets(N, E, mode, seed=0):
    """End offsets for N rows over E experts: 'random' (some empty), 'one' (all rows to the middle expert)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "one":
        counts_E = torch.zeros(E, dtype=torch.int64)
        counts_E[E // 2] = N
    else:
        ex = torch.randint(0, E, (N,), generator=g)
        if E > 2:
            ex[ex == 1] = 0  # expert 1 always empty
        counts_E = torch.bincount(ex, minlength=E)
    return torch.cumsum(counts_E, 0).to(torch.int32).to(DEV)


def _check_grouped_swiglu(N, D, I, E, dtype, mode="random", fn=grouped_swiglu):
    g = torch.Generator().manual_seed(1)
    x_ND = torch.randn(N, D, generator=g).to(DEV, dtype)
    w1_EJD = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).to(DEV, dtype)
    w2_EDI = (torch.randn(E, D, I, generator=g) / I**0.5).to(DEV, dtype)
    offsets_E = _offsets(N, E, mode)
    ins = [t.clone().requires_grad_() for t in (x_ND, w1_EJD, w2_EDI)]
    ins_ref = [t.clone().requires_grad_() for t in (x_ND, w1_EJD, w2_EDI)]
    y = fn(*ins, offsets_E)
    y_ref = grouped_swiglu_ref(*ins_ref, offsets_E)
    assert y.dtype == dtype and y.shape == (N, D)
    _close(y, y_ref, dtype, "y")
    dy = torch.randn(N, D, generator=g).to(DEV, dtype)
    y.backward(dy)
    y_ref.backward(dy)
    for name, a, b in zip(("dx", "dgate_up", "ddown"), ins, ins_ref):
        assert a.grad.dtype == dtype
        _close(a.grad, b.grad, dtype, name)


GROUPED_CPU = [
    # N, D, I, E, mode
    (1, 100, 32, 1, "random"),
    (7, 100, 40, 3, "random"),
    (600, 100, 48, 64, "random"),
    (600, 100, 24, 3, "one"),
    (56, 100, 40, 130, "random"),
    (40, 600, 40, 3, "random"),
]


@pytest.mark.parametrize("N,D,I,E,mode", GROUPED_CPU)
def test_grouped_swiglu_matches_reference(N, D, I, E, mode):
    _check_grouped_swiglu(N, D, I, E, torch.float32, mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,D,I,E,mode", [(7, 100, 40, 3, "random"), (600, 100, 48, 64, "random"), (60, 64, 24, 3, "one")]
)
def test_grouped_swiglu_torch_cpu_path_matches_reference(N, D, I, E, mode, dtype):
    """The per-expert-GEMM torch path (CPU strategy) runs bf16 on CPU too."""
    _check_grouped_swiglu(N, D, I, E, dtype, mode, fn=grouped_swiglu_torch)


def test_grouped_swiglu_torch_under_inference_mode_with_worker_threads():
    """A teacher labels under torch.inference_mode: the experts' worker threads (thread-local
    modes) write into the caller's inference tensors, and must be in inference mode too."""
    torch.manual_seed(0)
    offsets = _offsets(300, 6, "random")
    x = torch.randn(300, 64)
    w1, w2 = torch.randn(6, 48, 64) / 8, torch.randn(6, 64, 24) / 5
    want = grouped_swiglu_ref(x, w1, w2, offsets)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two chunks of experts on two pool workers
    try:
        with torch.inference_mode():
            got = grouped_swiglu_torch(x, w1, w2, offsets)
    finally:
        torch.set_num_threads(threads)
    assert got.is_inference()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_swiglu_with_other_tiles():
    """Tile sizes given by the caller (what benchmarks/grouped_mlp_tiles.py sweeps) change the
    tiling, not the result: small and odd-shaped tiles, rows split across many tiles per expert."""
    one = {"warps": 4, "stages": 1}
    tiles = {"gate_up": (16, 32, 32, one), "mm": (32, 16, 64, one), "wgrad": (32, 16, 16, one)}

    def fn(*a):
        return grouped_swiglu(*a, tiles=tiles)

    _check_grouped_swiglu(200, 100, 40, 3, torch.float32, "random", fn=fn)
    import triton

    x, w1, w2 = (torch.zeros(*shape, device=DEV) for shape in ((4, 8), (2, 6, 8), (2, 8, 3)))
    offsets = torch.tensor([2, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(triton.errors.TritonError, match="power of 2"):  # the tiles reach the launch
        grouped_swiglu(x, w1, w2, offsets, tiles={"gate_up": (24, 16, 16, one)})
    with pytest.raises(ValueError, match="tiles keys"):
        grouped_swiglu(x, w1, w2, offsets, tiles={"gateup": None})


def test_tile_table_with_surplus_tiles_matches_python():
    """The GPU launch sizes the grid without a host sync (cdiv(N, BLOCK_M) + E tiles): real tiles
    first, expert after expert, then empty ones. Checked here against a Python walk of the offsets."""
    import triton

    from kernels.grouped_mlp import _tile_table_kernel

    offsets_E = _offsets(300, 130, "random")
    block_m, E = 16, 130
    num_tiles = triton.cdiv(300, block_m) + E
    tiles = torch.empty(3, num_tiles, dtype=torch.int32, device=DEV)
    _tile_table_kernel[(triton.cdiv(num_tiles, 32),)](
        offsets_E, tiles, E, num_tiles, BLOCK_M=block_m, BLOCK_P=32, BLOCK_E=256
    )
    want, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        want += [(e, r, min(r + block_m, end)) for r in range(start, end, block_m)]
        start = end
    got = [tuple(c) for c in tiles.t().tolist()]
    assert got[: len(want)] == want
    assert all(row_end == row_start for _, row_start, row_end in got[len(want) :])


def test_grouped_swiglu_no_rows():
    """Zero routed rows: empty output, zero weight gradients."""
    E, D, I = 3, 100, 16
    w1 = torch.randn(E, 2 * I, D, device=DEV, requires_grad=True)
    w2 = torch.randn(E, D, I, device=DEV, requires_grad=True)
    x = torch.zeros(0, D, device=DEV, requires_grad=True)
    y = grouped_swiglu(x, w1, w2, torch.zeros(E, dtype=torch.int32, device=DEV))
    assert y.shape == (0, D)
    y.sum().backward()
    assert torch.count_nonzero(w1.grad) == 0 and torch.count_nonzero(w2.grad) == 0


def test_grouped_swiglu_rejects_bad_shapes():
    with pytest.raises(ValueError, match="grouped_swiglu"):
        grouped_swiglu(
            torch.zeros(4, 8, device=DEV),
            torch.zeros(2, 6, 8, device=DEV),
            torch.zeros(2, 8, 4, device=DEV),
            torch.tensor([2, 4], dtype=torch.int32, device=DEV),
        )


# ---------------------------------------------------------------- the whole routed path


def _moe(impl, x_TD, logits_TE, bias_E, w1, w2, K, n_group, topk_group):
    E = w1.shape[0]
    route_fn, permute_fn, mlp_fn, unpermute_fn = impl
    w_TK, ex_TK, counts_E = route_fn(logits_TE, bias_E, K, n_group, topk_group, True, 1.0)
    xs, sort_idx_N, offsets_E = permute_fn(x_TD, ex_TK, E)
    return unpermute_fn(mlp_fn(xs, w1, w2, offsets_E), sort_idx_N, w_TK), counts_E


TRITON = (route, permute, grouped_swiglu, unpermute)
REFERENCE = (route_ref, permute_ref, grouped_swiglu_ref, unpermute_ref)


def test_triton_moe_path_matches_reference_end_to_end():
    T, D, I, E, K = 33, 100, 32, 16, 4
    g = torch.Generator().manual_seed(3)
    base = [
        torch.randn(T, D, generator=g),
        torch.randn(T, E, generator=g),
        torch.randn(E, 2 * I, D, generator=g) / 10,
        torch.randn(E, D, I, generator=g) / 6,
    ]
    bias_E = torch.zeros(E, device=DEV)
    outs, grads = [], []
    for impl in (TRITON, REFERENCE):
        x, logits, w1, w2 = [t.to(DEV).requires_grad_() for t in base]
        y, counts_E = _moe(impl, x, logits, bias_E, w1, w2, K, 4, 2)
        y.square().sum().backward()
        outs.append((y.detach(), counts_E))
        grads.append([t.grad for t in (x, logits, w1, w2)])
    _close(outs[0][0], outs[1][0], torch.float32, "moe y")
    assert torch.equal(outs[0][1], outs[1][1])
    for name, a, b in zip(("dx", "dlogits", "dgate_up", "ddown"), *grads):
        _close(a, b, torch.float32, name)


def test_one_expert_moe_equals_dense_ffn():
    """Invariant: E = K = 1 with weight 1 is a dense SwiGLU FFN, forward and backward."""
    T, D, I = 9, 100, 48
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, D, generator=g).to(DEV).requires_grad_()
    w1 = (torch.randn(1, 2 * I, D, generator=g) / 10).to(DEV).requires_grad_()
    w2 = (torch.randn(1, D, I, generator=g) / 7).to(DEV).requires_grad_()
    # logits +inf-ish -> sigmoid 1 -> weight 1 (scaling 1, no normalization)
    w_TK, ex_TK, _ = route(
        torch.full((T, 1), 30.0, device=DEV), torch.zeros(1, device=DEV), 1, 1, 1, False, 1.0
    )
    xs, sort_idx_N, offsets_E = permute(x, ex_TK, 1)
    y = unpermute(grouped_swiglu(xs, w1, w2, offsets_E), sort_idx_N, w_TK)
    dense = torch.nn.functional.silu(x @ w1[0, :I].t()) * (x @ w1[0, I:].t()) @ w2[0].t()
    _close(y, dense, torch.float32, "1-expert y")
    got = torch.autograd.grad(y.sum(), (x, w1, w2))
    want = torch.autograd.grad(dense.sum(), (x, w1, w2))
    for name, a, b in zip(("dx", "dgate_up", "ddown"), got, want):
        _close(a, b, torch.float32, name)


def test_cpu_import_turns_on_interpreter():
    if torch.cuda.is_available():
        pytest.skip("compiled Triton on GPU")
    assert os.environ.get("TRITON_INTERPRET") == "1" and kernels.route is route


# ---------------------------------------------------------------- full grid on GPU (compiled, fp32 + bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 600, 4096])
@pytest.mark.parametrize("E,n_group,topk_group", [(1, 1, 1), (3, 1, 1), (64, 8, 4), (130, 1, 1), (256, 8, 4)])
@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_gpu_route_full_grid(T, E, K, n_group, topk_group):
    if K > min(E, topk_group * (E // n_group)):
        pytest.skip("top_k larger than the selectable experts")
    _check_route(T, E, K, n_group, topk_group, True)
    _check_route(T, E, K, n_group, topk_group, False, hot_expert=E - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 600])
@pytest.mark.parametrize("D", [100, 600])
@pytest.mark.parametrize("E,K", [(1, 1), (3, 2), (64, 8), (130, 4), (130, 1)])
def test_gpu_permute_full_grid(dtype, T, D, E, K):
    _check_permute(T, D, E, K, dtype)
    if K == 1:
        _check_permute(T, D, E, K, dtype, hot_expert=E - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 600, 4800])
@pytest.mark.parametrize("D,I", [(100, 48), (600, 344)])
@pytest.mark.parametrize("E", [1, 3, 64, 130])
@pytest.mark.parametrize("mode", ["random", "one"])
def test_gpu_grouped_swiglu_full_grid(dtype, N, D, I, E, mode):
    _check_grouped_swiglu(N, D, I, E, dtype, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_seed_shape_bf16_fp32(dtype):
    """The benchmark's shape (4096 tokens, hidden 1024, 128 experts, top-8 rows)."""
    _check_grouped_swiglu(4096 * 8, 1024, 344, 128, dtype)


def test_tile_sweep_script_runs(capsys):
    """benchmarks/grouped_mlp_tiles.py (run on a GPU to pick tiles) works end to end on tiny shapes."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import grouped_mlp_tiles

    assert grouped_mlp_tiles.main(["--smoke", "--top-k", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["stage"] for x in lines] == ["rows", "rows", "wgrad", "best"]
    assert all(x["ms"] > 0 for x in lines[:3]) and lines[-1]["best_ms"] == min(x["ms"] for x in lines[:3])
    assert set(lines[-1]["tiles"]) >= {"gate_up", "mm"}


def test_moe_profile_script_runs(tmp_path, capsys):
    """benchmarks/moe_profile.py (host vs device time per variant, run by gpu_check.sh) works end to
    end on tiny shapes, the Triton variants under the interpreter included."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import moe_profile

    assert moe_profile.main(["--smoke", "--triton-cpu", "--top-k", "2", "--out", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    names = ["layer_torch", "layer_triton", "mlp_gmm", "mlp_triton", "routing_torch", "routing_triton"]
    assert [x["variant"] for x in lines] == names
    for x in lines:
        assert "error" not in x, x
        assert x["wall_ms"] >= x["host_ms"] > 0 and x["ops"] > 0 and x["top_host"]
        assert x["device_ms"] is None and x["kernels"] is None  # no device on CPU
    # the Triton autograd functions (their launchers' host time) are what the GPU run looks for
    assert any(row[0] == "_RouteFn" for row in lines[-1]["top_host"])
    assert [json.loads(x)["variant"] for x in (tmp_path / "profile.jsonl").read_text().splitlines()] == names
    assert (tmp_path / "routing_triton_top2.txt").read_text().strip()
