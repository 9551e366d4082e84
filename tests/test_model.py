"""ModelConfig validation, presets, parameter accounting, MLA, loss outputs, balancing, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3ray.config import section_from_dict
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.model import (
    MODEL_PRESETS,
    ModelConfig,
    activation_ratio,
    build_model,
    count_params,
    rope_frequencies,
)

SMALL = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2
)


pytestmark = pytest.mark.usefixtures("exact_fp32")


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(keep_ratio=0.0), "model.keep_ratio"),
        (dict(keep_ratio=1.5), "model.keep_ratio"),
        (dict(num_experts_per_tok=17), "model.num_experts_per_tok"),
        (dict(n_group=3), "model.n_group"),
        (dict(topk_group=5), "model.topk_group"),
        (dict(num_experts_per_tok=9, topk_group=2), "model.num_experts_per_tok"),
        (dict(hidden_size=0), "model.hidden_size"),
        (dict(num_hidden_layers=-1), "model.num_hidden_layers"),
        (dict(q_lora_rank=0), "model.q_lora_rank"),
        (dict(moe_impl="cuda"), "model.moe_impl"),
        (dict(first_k_dense_replace=-1), "model.first_k_dense_replace"),
        (dict(num_nextn_predict_layers=2), "model.num_nextn_predict_layers"),
        (dict(num_key_value_heads=2), "model.num_key_value_heads"),
        (dict(qk_rope_head_dim=15), "model.qk_rope_head_dim"),
        (dict(rope_scaling={"rope_type": "longrope"}), "model.rope_scaling"),
    ],
)
def test_config_errors_name_key_value_and_allowed(kw, key):
    with pytest.raises(ConfigError) as ei:
        ModelConfig(**kw)
    e = ei.value
    msg = str(e)
    assert e.key == key and "\n" not in msg
    assert key in msg and repr(kw[key.split(".")[1]]) in msg and e.allowed in msg


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_preset("7b")
    assert ei.value.key == "model.preset" and ei.value.allowed == "one of debug, 16b, 671b"


def test_keep_ratio_sets_top_k_and_presets_build():
    assert (
        ModelConfig(n_routed_experts=128, n_group=1, topk_group=1, keep_ratio=0.008).num_experts_per_tok == 1
    )
    assert ModelConfig(keep_ratio=0.25).num_experts_per_tok == 4
    assert ModelConfig.from_preset("debug", keep_ratio=0.5).num_experts_per_tok == 8
    for name in MODEL_PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert 0 < activation_ratio(cfg) < 1
    cfg = section_from_dict(
        ModelConfig, {"keep_ratio": 0.125, "q_lora_rank": None, "rope_theta": 5e4}, "model"
    )
    assert cfg.num_experts_per_tok == 2 and cfg.q_lora_rank is None


def test_671b_counts_match_deepseek_v3_and_refuses_to_build():
    cfg = ModelConfig.from_preset("671b")
    total, active = count_params(cfg)
    assert 670e9 < total < 672e9 and 37e9 < active < 38e9  # the report's 671B / 37B
    with pytest.raises(UserError) as ei:
        build_model(cfg)
    assert "\n" not in str(ei.value) and "smaller preset" in str(ei.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(q_lora_rank=None, tie_word_embeddings=True, attention_bias=True, first_k_dense_replace=0),
        dict(num_nextn_predict_layers=1, n_shared_experts=0),
    ],
)
def test_count_params_equals_built_numel(kw):
    cfg = ModelConfig(**{**SMALL, **kw})
    model = build_model(cfg)
    numel = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert count_params(cfg, include_mtp=True)[0] == numel
    if cfg.num_nextn_predict_layers:
        assert count_params(cfg)[0] == numel - sum(p.numel() for p in model.mtp.parameters())
    # activated = everything except the routed experts not chosen
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    experts = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers())
    total, active = count_params(cfg)
    assert total - active == experts * (E - K) // E


# --- MLA --------------------------------------------------------------------------------------


def _rotate(x, theta, interleave):
    """Rotate pairs by theta (complex multiply); interleaved pairs (2i, 2i+1) come out as
    [real parts; imaginary parts], the HF/DeepSeek layout; otherwise pairs are (i, i + R/2)."""
    R = x.shape[-1]
    if interleave:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        z = torch.complex(x[..., : R // 2], x[..., R // 2 :])
    z = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], dim=-1)


def mla_reference(attn, x, cfg):
    B, S, _ = x.shape
    H = cfg.num_attention_heads
    q = attn.q_proj(x) if cfg.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.view(B, S, H, cfg.qk_head_dim)
    c, kr = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(c)).view(B, S, H, -1)
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]
    inv_freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, cfg.qk_rope_head_dim, 2).float() / cfg.qk_rope_head_dim
    )
    theta = torch.arange(S).float()[:, None] * inv_freq  # (S, R/2)
    q_rope = _rotate(q[..., cfg.qk_nope_head_dim :], theta[None, :, None], cfg.rope_interleave)
    k_rope = _rotate(kr, theta[None], cfg.rope_interleave)  # one key shared by all heads
    out = torch.zeros(B, S, H, cfg.v_head_dim)
    for h in range(H):
        s = q[:, :, h, : cfg.qk_nope_head_dim] @ k_nope[:, :, h].transpose(1, 2)
        s = s + q_rope[:, :, h] @ k_rope.transpose(1, 2)
        s = s / math.sqrt(cfg.qk_head_dim)
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = s.softmax(-1) @ v[:, :, h]
    return attn.o_proj(out.reshape(B, S, -1))


@pytest.mark.parametrize("q_lora_rank,interleave", [(16, True), (None, True), (None, False)])
def test_mla_matches_naive_reference(q_lora_rank, interleave):
    cfg = ModelConfig(**SMALL, q_lora_rank=q_lora_rank, rope_interleave=interleave)
    model = build_model(cfg).eval()
    for p in model.parameters():  # bigger weights: make the attention pattern matter
        p.data.normal_(0, 0.2)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj if q_lora_rank is None else attn.q_a_proj) is not None
    x = torch.randn(2, 9, cfg.hidden_size)
    cos, sin = model.model.rotary_emb(torch.arange(9), x.dtype)
    torch.testing.assert_close(attn(x, cos, sin), mla_reference(attn, x, cfg), rtol=1e-5, atol=1e-5)


def test_yarn_scales_frequencies_and_softmax():
    rs = dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0
    )
    plain, _ = rope_frequencies(ModelConfig(**SMALL))
    cfg = ModelConfig(**SMALL, rope_scaling=rs)
    yarn, attn_factor = rope_frequencies(cfg)
    assert yarn[0] == plain[0] and torch.allclose(
        yarn[-1], plain[-1] / 8
    )  # fast dims kept, slow interpolated
    assert attn_factor == 1.0  # mscale == mscale_all_dim cancel on cos/sin...
    attn = build_model(cfg).model.layers[0].self_attn
    m = 0.1 * math.log(8.0) + 1.0
    assert attn.scaling == pytest.approx(cfg.qk_head_dim**-0.5 * m * m)  # ...and land on the softmax scale


# --- forward, losses ----------------------------------------------------------------------------


def test_forward_outputs_shapes_and_loss_terms():
    cfg = ModelConfig(**SMALL, num_nextn_predict_layers=1, seq_aux_loss_alpha=0.01)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    out = model(ids)
    assert out.logits.shape == (3, 12, cfg.vocab_size) and out.loss is None
    assert out.expert_load_LE.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert out.expert_load_LE.dtype == torch.float32
    assert (out.expert_load_LE.sum(1) == 3 * 12 * cfg.num_experts_per_tok).all()
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels)
    expected_ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.ce_loss, expected_ce)
    row0 = F.cross_entropy(out.logits[0, :4], labels[0, 1:5])
    torch.testing.assert_close(out.loss_per_sample[0], row0)
    assert out.loss_per_sample.shape == (3,) and not out.loss_per_sample.requires_grad
    assert out.mtp_loss is not None and out.balance_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + cfg.mtp_loss_weight * out.mtp_loss + out.balance_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal():
    cfg = ModelConfig(**SMALL, num_nextn_predict_layers=1)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 1) % cfg.vocab_size
    a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_seeded_debug_model_reproduces_its_loss_exactly():
    def run():
        torch.manual_seed(1234)
        model = build_model(ModelConfig.from_preset("debug", num_nextn_predict_layers=1))
        ids = torch.randint(0, 4096, (2, 17))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):
            out = model(ids, ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            model.update_routing_bias(out.expert_load_LE)
            losses.append(out.loss.item())
        return losses

    assert run() == run()


def test_activation_checkpointing_same_loss_and_grads():
    cfg = ModelConfig(**SMALL, num_nextn_predict_layers=1)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_activation_checkpointing(True)
    out2 = model(ids, ids)
    out2.loss.backward()
    assert out2.loss.item() == out.loss.item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_training_reduces_loss():
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(ids, ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.ce_loss.item()
    assert out.ce_loss.item() < 0.7 * first


# --- aux-loss-free balancing ---------------------------------------------------------------------


def _cv(load_LE):
    """Coefficient of variation of the per-expert load, averaged over layers."""
    return (load_LE.std(1) / load_LE.mean(1)).mean().item()


def test_bias_balancer_shrinks_load_imbalance():
    cfg = ModelConfig(**{**SMALL, "num_hidden_layers": 3}, bias_update_speed=0.005)
    model = build_model(cfg).eval()
    zipf = 1.0 / torch.arange(1, cfg.vocab_size + 1).float() ** 1.2
    ids = torch.multinomial(zipf, 8 * 32, replacement=True).view(8, 32)  # skewed tokens
    with torch.no_grad():
        for moe in model.moe_layers():  # and a router that prefers experts 0..3
            moe.gate.weight[:4] += 0.3
        start = model(ids).expert_load_LE
        for _ in range(40):
            model.update_routing_bias(model(ids).expert_load_LE)
        end = model(ids).expert_load_LE
    assert _cv(start) > 0.8
    assert _cv(end) < 0.5 * _cv(start)
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias.abs().max() > 0 and bias.dtype == torch.float32
    with pytest.raises(ValueError):
        model.update_routing_bias(torch.zeros(5, cfg.n_routed_experts))


def test_bf16_model_keeps_router_bias_in_fp32():
    cfg = ModelConfig(**SMALL, num_nextn_predict_layers=1)
    model = build_model(cfg).to(torch.bfloat16)
    gate = model.moe_layers()[0].gate
    assert gate.e_score_correction_bias.dtype == torch.float32 and gate.weight.dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(ids, ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for _ in range(3):
        model.update_routing_bias(out.expert_load_LE)
    assert gate.e_score_correction_bias.abs().max().item() == pytest.approx(3 * cfg.bias_update_speed)
