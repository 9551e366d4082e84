"""MoE seams (route / permute / grouped_swiglu / unpermute) against plain loop references, and MoE invariants."""

import pytest
import torch
import torch.nn.functional as F

from dsv3ray.errors import UserError
from dsv3ray.model import ModelConfig

try:  # import before anything pulls in triton: kernels switches on TRITON_INTERPRET without a GPU
    import kernels
except ImportError:  # pragma: no cover - kernels not written yet
    kernels = None
from dsv3ray.moe import MoE, SwiGLU, grouped_swiglu, moe_ops, permute, route, unpermute

pytestmark = pytest.mark.usefixtures("exact_fp32")


def route_loop(logits_TE, bias_E, top_k, n_group, topk_group, norm, scale):
    """Token by token, straight from the DeepSeek-V3 report's description."""
    T, E = logits_TE.shape
    per_group = E // n_group
    weights, experts = [], []
    for t in range(T):
        s = [torch.sigmoid(logits_TE[t, i]) for i in range(E)]
        b = [float(s[i].detach()) + float(bias_E[i]) for i in range(E)]
        if n_group > 1:
            gscore = []
            for g in range(n_group):
                members = sorted((b[i] for i in range(g * per_group, (g + 1) * per_group)), reverse=True)
                gscore.append(members[0] + members[1])
            kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
            cand = [i for g in kept for i in range(g * per_group, (g + 1) * per_group)]
        else:
            cand = list(range(E))
        chosen = sorted(cand, key=lambda i: -b[i])[:top_k]
        w = torch.stack([s[i] for i in chosen])
        if norm:
            w = w / (w.sum() + 1e-20)
        weights.append(w * scale)
        experts.append(chosen)
    return torch.stack(weights), torch.tensor(experts)


def _by_expert(weights_TK, experts_TK):
    order = experts_TK.argsort(dim=1)
    return weights_TK.gather(1, order), experts_TK.gather(1, order)


@pytest.mark.parametrize(
    "E,K,n_group,topk_group,norm,scale",
    [(16, 2, 4, 2, True, 1.0), (16, 3, 1, 1, False, 2.5), (12, 4, 3, 2, True, 2.5), (8, 1, 2, 1, False, 1.0)],
)
def test_route_matches_loop_reference(E, K, n_group, topk_group, norm, scale):
    g = torch.Generator().manual_seed(E * 10 + K)
    T = 37
    logits = torch.randn(T, E, generator=g, dtype=torch.float64).float().requires_grad_(True)
    bias = torch.randn(E, generator=g) * 0.3  # large enough to change selections
    w, ex, counts = route(logits, bias, K, n_group, topk_group, norm, scale)
    assert w.dtype == torch.float32 and ex.dtype == torch.int64 and counts.dtype == torch.int64
    logits_ref = logits.detach().clone().requires_grad_(True)
    w_ref, ex_ref = route_loop(logits_ref, bias, K, n_group, topk_group, norm, scale)
    w_s, ex_s = _by_expert(w, ex)
    w_ref_s, ex_ref_s = _by_expert(w_ref, ex_ref)
    assert torch.equal(ex_s, ex_ref_s)
    torch.testing.assert_close(w_s, w_ref_s, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts, torch.bincount(ex_ref.flatten(), minlength=E))
    # gradients reach the logits through the weights, the same as the reference's
    upstream = torch.randn(T, K, generator=g)
    (w_s * upstream).sum().backward()
    (w_ref_s * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, logits_ref.grad, rtol=1e-5, atol=1e-6)
    if norm:
        torch.testing.assert_close(w.sum(1), torch.full((T,), scale), rtol=1e-6, atol=1e-6)


def test_bias_steers_selection_only():
    T, E = 20, 8
    logits = torch.randn(T, E)
    bias = torch.zeros(E)
    bias[5] = 10.0  # expert 5 wins every token's selection...
    w, ex, counts = route(logits, bias, 2, 1, 1, False, 1.0)
    assert (ex == 5).any(1).all() and counts[5] == T
    # ...but its weight is its unbiased sigmoid score
    w5 = w[ex == 5]
    torch.testing.assert_close(w5, torch.sigmoid(logits[:, 5]))


def test_group_limited_selection_stays_in_kept_groups():
    T, E, n_group = 50, 16, 4
    logits = torch.randn(T, E)
    _, ex, _ = route(logits, torch.zeros(E), 4, n_group, 2, True, 1.0)
    groups = ex // (E // n_group)
    assert all(len(set(row.tolist())) <= 2 for row in groups)


@pytest.mark.parametrize("T,K,E", [(37, 3, 8), (1, 1, 4), (64, 2, 16)])
def test_permute_unpermute_exact(T, K, E):
    g = torch.Generator().manual_seed(T)
    D = 5
    x = torch.randn(T, D, generator=g)
    # skewed assignment: leaves some experts empty
    experts = torch.randint(0, max(1, E // 2), (T, K), generator=g) * 2 % E
    x_sorted, sort_idx, offsets = permute(x, experts, E)
    flat = experts.flatten()
    ref_idx = [i for e in range(E) for i in range(T * K) if flat[i] == e]  # stable order
    assert sort_idx.dtype == torch.int64 and offsets.dtype == torch.int32
    assert sort_idx.tolist() == ref_idx
    assert torch.equal(x_sorted, x[torch.tensor(ref_idx) // K])
    assert offsets.tolist() == torch.cumsum(torch.bincount(flat, minlength=E), 0).tolist()
    # unpermute: weighted sum per token, fp32 accumulation, gradients to rows and weights
    w = torch.rand(T, K, generator=g, requires_grad=True)
    y_sorted = torch.randn(T * K, D, generator=g, requires_grad=True)
    y = unpermute(y_sorted, sort_idx, w)
    ref = torch.zeros(T, D)
    for n, pos in enumerate(ref_idx):
        ref[pos // K] += w[pos // K, pos % K] * y_sorted[n]
    torch.testing.assert_close(y, ref)
    gy = torch.randn(T, D, generator=g)
    gs, gw = torch.autograd.grad((y * gy).sum(), (y_sorted, w))
    gs_ref, gw_ref = torch.autograd.grad((ref * gy).sum(), (y_sorted, w))
    torch.testing.assert_close(gs, gs_ref)
    torch.testing.assert_close(gw, gw_ref)
    assert unpermute(y_sorted.bfloat16(), sort_idx, w).dtype == torch.bfloat16


def swiglu_loop(x, gu, dn, offsets):
    I = dn.shape[-1]
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        xe = x[start:end]
        out.append((F.silu(xe @ gu[e, :I].T) * (xe @ gu[e, I:].T)) @ dn[e].T)
        start = end
    return torch.cat(out)


@pytest.mark.parametrize(
    "N,D,I,counts", [(30, 16, 8, [10, 0, 20]), (23, 7, 5, [0, 3, 0, 20]), (9, 12, 6, [9])]
)
def test_grouped_swiglu_forward_and_grads(N, D, I, counts):
    g = torch.Generator().manual_seed(N + D)
    E = len(counts)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    gu = (torch.randn(E, 2 * I, D, generator=g) * 0.3).requires_grad_(True)
    dn = (torch.randn(E, D, I, generator=g) * 0.3).requires_grad_(True)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_swiglu(x, gu, dn, offsets)
    ref = swiglu_loop(x, gu, dn, offsets)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), (x, gu, dn))  # .sum() gives stride-0 grads
    grads_ref = torch.autograd.grad(ref.sum(), (x, gu, dn))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    y64 = grouped_swiglu(
        x.detach().double(), gu.detach().double(), dn.detach().double(), offsets
    )  # fallback path
    torch.testing.assert_close(y64.float(), ref.detach(), rtol=1e-5, atol=1e-5)
    y16 = grouped_swiglu(x.detach().bfloat16(), gu.detach().bfloat16(), dn.detach().bfloat16(), offsets)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref.detach(), rtol=5e-2, atol=5e-2)


def _moe_cfg(**kw):
    base = dict(
        hidden_size=16,
        moe_intermediate_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
    )
    return ModelConfig(**{**base, **kw})


def _init(mod, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_one_expert_moe_equals_dense_swiglu_forward_and_grads():
    cfg = _moe_cfg(
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        n_shared_experts=0,
        seq_aux_loss_alpha=0.0,
    )
    moe = MoE(cfg)
    _init(moe)
    I = cfg.moe_intermediate_size
    dense = SwiGLU(cfg.hidden_size, I)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.gate_up_proj[0, :I])
        dense.up_proj.weight.copy_(moe.experts.gate_up_proj[0, I:])
        dense.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(3, 5, cfg.hidden_size)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, counts, bal = moe(x1)
    ref = dense(x2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [15] and bal.item() == 0.0
    gy = torch.randn_like(ref)
    (y * gy).sum().backward()
    (ref * gy).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    gu = torch.cat([dense.gate_proj.weight.grad, dense.up_proj.weight.grad])
    torch.testing.assert_close(moe.experts.gate_up_proj.grad[0], gu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        moe.experts.down_proj.grad[0], dense.down_proj.weight.grad, rtol=1e-5, atol=1e-6
    )
    # normalized single weight is exactly 1: the router gets no gradient through it
    assert moe.gate.weight.grad.abs().max() < 1e-4 * x1.grad.abs().max()


def test_moe_forward_equals_per_token_reference():
    cfg = _moe_cfg(n_shared_experts=1, routed_scaling_factor=2.5)
    moe = MoE(cfg)
    _init(moe, 1)
    moe.gate.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(2, 7, cfg.hidden_size)
    y, counts, _ = moe(x)
    x_TD = x.view(-1, cfg.hidden_size)
    logits = x_TD @ moe.gate.weight.T
    w, ex = route_loop(logits, moe.gate.e_score_correction_bias, 2, 2, 1, True, 2.5)
    I = cfg.moe_intermediate_size
    ref = moe.shared_experts(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(2):
            e = ex[t, k]
            h = x_TD[t] @ moe.experts.gate_up_proj[e].T
            ref[t] = ref[t] + w[t, k] * ((F.silu(h[:I]) * h[I:]) @ moe.experts.down_proj[e].T)
    torch.testing.assert_close(y.view(-1, cfg.hidden_size), ref, rtol=1e-5, atol=1e-5)
    assert counts.sum() == 14 * 2


def test_sequence_balance_loss_value():
    cfg = _moe_cfg(seq_aux_loss_alpha=0.01)
    moe = MoE(cfg)
    B, S, E, K = 2, 6, 8, 2
    logits = torch.randn(B * S, E)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    loss = moe.balance_loss(logits, experts, B, S)
    ref = 0.0
    for b in range(B):
        s = torch.sigmoid(logits[b * S : (b + 1) * S])
        P = (s / s.sum(1, keepdim=True)).mean(0)
        f = torch.zeros(E)
        for t in range(b * S, (b + 1) * S):
            for e in experts[t]:
                f[e] += E / (K * S)
        ref += 0.01 * float((f * P).sum())
    assert loss.item() == pytest.approx(ref / B, rel=1e-5)
    # perfectly uniform routing and affinities give exactly alpha
    flat = torch.zeros(B * S, E)
    uniform = torch.arange(B * S * K).view(B * S, K) % E
    assert moe.balance_loss(flat, uniform, B, S).item() == pytest.approx(0.01, rel=1e-6)


def test_moe_impl_choice(monkeypatch):
    import dsv3ray.moe as moe_mod

    # torch on CPU: the CPU strategy (kernels.torch_experts); the plain seams elsewhere
    assert moe_ops("torch", torch.device("cpu")) is moe_mod.CPU_TORCH_OPS
    assert moe_ops("auto", torch.device("cpu")) is moe_mod.CPU_TORCH_OPS
    assert moe_ops("torch", torch.device("meta")) is moe_mod.TORCH_OPS
    assert moe_ops("torch", torch.device("cpu")).route is route

    # off CPU, compiled Triton needs a C compiler for its launchers: without one, auto takes torch
    # and an explicit triton is one line (moe_ops only reads the device type: no GPU needed here)
    cuda = torch.device("cuda")
    monkeypatch.setenv("CC", "/usr/bin/some-cc")
    moe_mod._c_compiler.cache_clear()
    assert moe_ops("auto", cuda).grouped_swiglu is kernels.grouped_swiglu
    assert moe_ops("triton", cuda).permute is kernels.permute
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", "/nonexistent")
    moe_mod._c_compiler.cache_clear()
    assert moe_ops("auto", cuda) is moe_mod.TORCH_OPS
    assert moe_ops("triton", torch.device("cpu")).route is kernels.route  # the interpreter compiles nothing
    with pytest.raises(UserError, match="C compiler") as ei:
        moe_ops("triton", cuda)
    assert "\n" not in str(ei.value)
    moe_mod._c_compiler.cache_clear()  # (the next test's PATH again)

    monkeypatch.setattr(moe_mod, "_triton_ops", lambda: None)  # as if kernels/ lacked the seams
    with pytest.raises(UserError, match="moe_impl='triton'") as ei:
        moe_ops("triton", torch.device("cpu"))
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_torch_seams_equal_the_plain_torch_seams(monkeypatch, dtype):
    """The layer through CPU_TORCH_OPS (what runs on CPU) and through TORCH_OPS (grouped_mm,
    indexing): same output and gradients, with experts that get no token and bf16 weights."""
    import dsv3ray.moe as moe_mod

    torch.manual_seed(0)
    cfg = _moe_cfg(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1, n_shared_experts=1)
    moe = MoE(cfg)
    _init(moe, 1)
    with torch.no_grad():  # half the experts unreachable: some groups are empty
        moe.gate.e_score_correction_bias[:4] = -100.0
    x = torch.randn(2, 9, cfg.hidden_size).to(dtype)
    gy = torch.randn(2, 9, cfg.hidden_size).to(dtype)
    results = []
    for ops in (moe_mod.TORCH_OPS, moe_mod.CPU_TORCH_OPS):
        monkeypatch.setattr(moe_mod, "moe_ops", lambda impl, dev, ops=ops: ops)
        moe.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y, counts, _ = moe(xi)
        (y.float() * gy.float()).sum().backward()
        grads = [p.grad.clone() for p in (moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj)]
        results.append((y.detach(), counts, xi.grad, *grads))
    assert results[0][1][:4].sum() == 0 and torch.equal(results[0][1], results[1][1])
    for a, b in zip(results[0], results[1]):
        a, b = a.float(), b.float()
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        else:  # bf16 GEMMs summing in another order: a few ulps of the tensor's scale
            torch.testing.assert_close(b, a, rtol=2e-2, atol=4e-2 * float(a.abs().max()))


def test_triton_impl_matches_torch_when_available():
    if kernels is None or not hasattr(kernels, "grouped_swiglu"):
        pytest.skip("Triton kernels not available yet")
    torch.manual_seed(0)
    cfg = _moe_cfg(hidden_size=16, moe_intermediate_size=16)
    moe_t = MoE(cfg)
    _init(moe_t, 2)
    moe_k = MoE(ModelConfig(**{**cfg.__dict__, "moe_impl": "triton"}))
    moe_k.load_state_dict(moe_t.state_dict())
    x = torch.randn(1, 8, cfg.hidden_size)
    y_t, c_t, _ = moe_t(x)
    y_k, c_k, _ = moe_k(x)
    assert torch.equal(c_t, c_k)
    torch.testing.assert_close(y_k, y_t, rtol=1e-4, atol=1e-4)


def test_expert_parallel_size_one_is_identity():
    parallel = pytest.importorskip("dsv3ray.parallel")
    cfg = _moe_cfg()
    moe = MoE(cfg)
    _init(moe, 3)
    moe_ep = MoE(cfg, ep=parallel.ExpertParallel(ep_size=1, ep_rank=0))
    moe_ep.load_state_dict(moe.state_dict())
    x = torch.randn(2, 5, cfg.hidden_size)
    torch.testing.assert_close(moe_ep(x)[0], moe(x)[0])


# --- GPU (skipped without CUDA) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("D,I,counts", [(256, 176, [300, 0, 17, 700]), (100, 36, [0, 5, 0, 64])])
def test_grouped_swiglu_cuda(dtype, tol, D, I, counts):
    g = torch.Generator(device="cuda").manual_seed(0)
    E, N = len(counts), sum(counts)
    x = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_(True)
    gu = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(True)
    dn = (torch.randn(E, D, I, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(True)
    offsets = torch.cumsum(torch.tensor(counts, device="cuda"), 0).to(torch.int32)
    y = grouped_swiglu(x, gu, dn, offsets)
    ref = swiglu_loop(x.float(), gu.float(), dn.float(), offsets)
    scale = ref.abs().max()
    assert y.dtype == dtype and (y.float() - ref).abs().max() <= tol * scale
    grads = torch.autograd.grad(y.float().sum(), (x, gu, dn))
    grads_ref = torch.autograd.grad(ref.sum(), (x, gu, dn))
    for a, b in zip(grads, grads_ref):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@pytest.mark.gpu
def test_model_on_cuda_torch_and_triton_agree():
    from dsv3ray.model import build_model

    losses = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(moe_impl=impl, num_nextn_predict_layers=1)).cuda()
        ids = torch.randint(0, 4096, (4, 65), device="cuda")
        out = model(ids, ids)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        losses[impl] = (out.loss.item(), out.expert_load_LE.cpu())
    assert losses["torch"][0] == pytest.approx(losses["triton"][0], rel=1e-4)
    assert torch.equal(losses["torch"][1], losses["triton"][1])
