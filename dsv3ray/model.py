"""The DeepSeek-V3 model: config, presets, parameter accounting, and the network itself.

Notable:
- `ModelConfig` uses the field names of Hugging Face `DeepseekV3Config` wherever the concept
  exists, so a config crosses over as-is (`from_hf_dict` / `to_hf_dict` / `to_hf_config`).
  Ours on top: `keep_ratio` (top-k = max(1, round(keep_ratio * n_routed_experts))), `moe_impl`,
  `mtp_loss_weight` (λ), `bias_update_speed` (γ), `seq_aux_loss_alpha` (α).
- Same module tree and parameter semantics as HF `DeepseekV3ForCausalLM` (MLA attention, RMSNorm,
  RoPE with `rope_interleave`, dense MLP in the first `first_k_dense_replace` layers, DeepSeekMoE
  after), so `dsv3ray.hf` maps a state dict 1:1. The MoE layer lives in `dsv3ray.moe`.
- Optional MTP (depth 1, DeepSeek-V3 report §2.2): enorm/hnorm + eh_proj + one decoder block,
  sharing the embedding and the output head, predicting token t+2.
- Auxiliary outputs (balance loss, expert load) are returned from `forward`, never kept in modules.

Parameter accounting (`count_params`): "total" counts every parameter of the main model
(embedding and lm_head once each, once in total when tied) and "activated" counts what one token
touches (all non-expert weights + router + shared experts + top-k routed experts). The MTP module
is a training-time extra and is excluded from both unless `include_mtp=True` (DeepSeek-V3's
671B / 37B figures exclude its 14B MTP module too).

Shapes: B batch, S seq, D hidden, H heads, V vocab, T = B*S tokens, E routed experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3ray.errors import ConfigError, UserError
from dsv3ray.moe import MoE, SwiGLU

MOE_IMPLS = ("torch", "triton", "auto")
ROPE_TYPES = ("default", "yarn")


@dataclass
class ModelConfig:
    # --- shape, named as in transformers.DeepseekV3Config (defaults = the `debug` preset) ---
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # MLA: always == num_attention_heads
    n_shared_experts: int = 2
    n_routed_experts: int = 16
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = 64  # None = no query compression (q_proj)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # MTP depth: 0 or 1
    # --- ours ---
    keep_ratio: float | None = None  # when set, overrides num_experts_per_tok
    moe_impl: str = "auto"
    mtp_loss_weight: float = 0.3
    bias_update_speed: float = 1e-3
    seq_aux_loss_alpha: float = 1e-4

    def __post_init__(self):
        def bad(name, allowed):
            raise ConfigError(f"model.{name}", getattr(self, name), allowed)

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "n_routed_experts",
            "n_group",
            "topk_group",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, "a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "a positive integer, or None for no query compression")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "an even number (RoPE rotates pairs)")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"equal to num_attention_heads={self.num_attention_heads} (MLA)")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", "one of " + ", ".join(MOE_IMPLS))
        if self.hidden_act != "silu":
            bad("hidden_act", "silu (DeepSeek-V3 uses SwiGLU experts)")
        if self.keep_ratio is not None:
            if not 0.0 < self.keep_ratio <= 1.0:
                bad("keep_ratio", "a fraction in (0, 1]")
            self.num_experts_per_tok = max(1, round(self.keep_ratio * self.n_routed_experts))
        E, K = self.n_routed_experts, self.num_experts_per_tok
        if isinstance(K, bool) or not isinstance(K, int) or K <= 0:
            bad("num_experts_per_tok", "a positive integer")
        if K > E:
            bad("num_experts_per_tok", f"at most n_routed_experts={E}")
        if E % self.n_group:
            bad("n_group", f"a divisor of n_routed_experts={E}")
        if self.topk_group > self.n_group:
            bad("topk_group", f"at most n_group={self.n_group}")
        if K > self.topk_group * (E // self.n_group):
            bad(
                "num_experts_per_tok",
                f"at most topk_group * n_routed_experts / n_group = {self.topk_group * (E // self.n_group)}"
                " (experts reachable in the kept groups); raise topk_group or lower keep_ratio",
            )
        if E // self.n_group < 2 and self.n_group > 1:
            bad("n_group", "such that each group holds at least 2 experts (group score = top-2 sum)")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", "a positive number")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "a positive number")
        if self.rope_theta <= 0:
            bad("rope_theta", "a positive number")
        if not 0.0 <= self.attention_dropout < 1.0:
            bad("attention_dropout", "a probability in [0, 1)")
        if self.initializer_range <= 0:
            bad("initializer_range", "a positive number")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", "0 (no MTP) or 1 (MTP depth 1)")
        if self.mtp_loss_weight < 0:
            bad("mtp_loss_weight", "a non-negative number")
        if self.bias_update_speed < 0:
            bad("bias_update_speed", "a non-negative number")
        if self.seq_aux_loss_alpha < 0:
            bad("seq_aux_loss_alpha", "a non-negative number")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rope_type = rs.get("rope_type", rs.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                bad("rope_scaling", "None, or a table with rope_type = " + " or ".join(ROPE_TYPES))
            if rope_type == "yarn" and not (isinstance(rs.get("factor"), int | float) and rs["factor"] >= 1):
                bad("rope_scaling", "yarn needs factor >= 1 (and original_max_position_embeddings)")
            if rope_type == "yarn" and not rs.get("original_max_position_embeddings"):
                bad("rope_scaling", "yarn needs original_max_position_embeddings")
            rs["rope_type"] = rope_type
            rs.pop("type", None)
            self.rope_scaling = None if rope_type == "default" else rs

    # --- derived sizes ---
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # --- presets and HF interop ---
    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ConfigError("model.preset", name, "one of " + ", ".join(MODEL_PRESETS))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(
                f"model.{unknown[0]}",
                overrides[unknown[0]],
                "unknown key; known keys: " + ", ".join(sorted(fields)),
            )
        return cls(**{**MODEL_PRESETS[name], **overrides})

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> ModelConfig:
        """Build from a `DeepseekV3Config(...).to_dict()` / config.json; non-shape keys are ignored.

        transformers 5 spells RoPE as `rope_parameters` {rope_type, rope_theta, ...} and MTP depth
        as `num_mtp_layers`; older files use `rope_theta`/`rope_scaling`/`num_nextn_predict_layers`.
        """
        d = dict(d)
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rp)
        if "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("rope_scaling") is not None:
            # HF stores the theta inside rope_parameters; keep only the scaling keys
            kwargs["rope_scaling"] = {k: v for k, v in kwargs["rope_scaling"].items() if k != "rope_theta"}
        for k in ("num_nextn_predict_layers",):  # HF may carry e.g. 1 MTP layer for 671B
            if kwargs.get(k) is not None:
                kwargs[k] = min(int(kwargs[k]), 1)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-independent `config.json` for `DeepseekV3ForCausalLM`."""
        ours = {"keep_ratio", "moe_impl", "mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ours}
        rope = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        d.pop("rope_scaling")
        d.pop("rope_theta")
        d["rope_parameters"] = rope
        d["num_mtp_layers"] = d.pop("num_nextn_predict_layers")
        d.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            torch_dtype="float32",
            bos_token_id=0,
            eos_token_id=1,
            use_cache=True,
        )
        return d

    def to_hf_config(self):
        """A `transformers.DeepseekV3Config` (transformers is imported here only)."""
        from transformers import DeepseekV3Config

        d = self.to_hf_dict()
        for k in ("model_type", "architectures", "torch_dtype"):
            d.pop(k)
        return DeepseekV3Config(**d)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # trains on 2 CPU cores in minutes
    "debug": {},
    # DeepSeek-V2-Lite / Moonlight-16B class
    "16b": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=4096,
    ),
    # the exact DeepSeek-V3 layout (used by the cost model; never instantiated on CPU)
    "671b": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=3,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=163840,
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        num_nextn_predict_layers=1,
    ),
}


# ---------------------------------------------------------------------------------------------
# Parameter accounting (exact, from the config alone)
# ---------------------------------------------------------------------------------------------


def _attention_params(cfg: ModelConfig) -> int:
    D, H, b = cfg.hidden_size, cfg.num_attention_heads, int(cfg.attention_bias)
    if cfg.q_lora_rank is None:
        q = D * H * cfg.qk_head_dim
    else:
        r = cfg.q_lora_rank
        q = D * r + b * r + r + r * H * cfg.qk_head_dim  # q_a_proj (+bias), q_a_layernorm, q_b_proj
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + b * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv = kv_a + cfg.kv_lora_rank + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = H * cfg.v_head_dim * D + b * D
    return q + kv + o


def _layer_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, activated) of one decoder block."""
    D = cfg.hidden_size
    common = 2 * D + _attention_params(cfg)  # input/post-attention norms + attention
    if not moe:
        mlp = 3 * D * cfg.intermediate_size
        return common + mlp, common + mlp
    I = cfg.moe_intermediate_size
    router = cfg.n_routed_experts * D
    shared = 3 * D * I * cfg.n_shared_experts
    expert = 3 * D * I
    total = common + router + shared + cfg.n_routed_experts * expert
    active = common + router + shared + cfg.num_experts_per_tok * expert
    return total, active


def count_params(cfg: ModelConfig, include_mtp: bool = False) -> tuple[int, int]:
    """(total, activated_per_token) parameter counts; see the module docstring for what counts."""
    D, V = cfg.hidden_size, cfg.vocab_size
    embed = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    total = active = embed + head + D  # + final norm
    for i in range(cfg.num_hidden_layers):
        t, a = _layer_params(cfg, cfg.is_moe_layer(i))
        total += t
        active += a
    if include_mtp and cfg.num_nextn_predict_layers:
        # enorm, hnorm, eh_proj (2D -> D), one block (MoE like the last layer), its final norm
        t, a = _layer_params(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))
        total += 3 * D + 2 * D * D + t
        active += 3 * D + 2 * D * D + a
    return total, active


def activation_ratio(cfg: ModelConfig) -> float:
    """Activated / total parameters per token of the main model (MTP excluded)."""
    total, active = count_params(cfg)
    return active / total


def _machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 62


def check_fits_in_memory(cfg: ModelConfig, ep_size: int = 1, bytes_per_param: int = 4) -> None:
    """Refuse (one line) a model whose fp32 parameters alone would not fit in this machine's RAM.
    With expert parallelism a rank holds 1/ep_size of the routed experts."""
    total, _ = count_params(cfg, include_mtp=True)
    moe_layers = cfg.num_moe_layers + (
        cfg.num_nextn_predict_layers if cfg.is_moe_layer(cfg.num_hidden_layers) else 0
    )
    routed = moe_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    held = total - routed + routed // ep_size
    need, have = held * bytes_per_param, _machine_memory_bytes()
    if need > 0.8 * have:
        raise UserError(
            f"model with {total / 1e9:.1f}B parameters ({held / 1e9:.1f}B on this rank) needs {need / 2**30:.0f} GiB"
            f" in fp32 but this machine has "
            f"{have / 2**30:.0f} GiB: use a smaller preset (e.g. debug) or fewer layers, or run it on a cluster with expert parallelism"
        )


# ---------------------------------------------------------------------------------------------
# The network (module names and parameter semantics as transformers' DeepseekV3ForCausalLM)
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (rope_dim/2,), cos/sin scale): plain RoPE, or YaRN when rope_scaling says so."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_scaling is None:
        return 1.0 / pos_freqs, 1.0
    rs = cfg.rope_scaling
    factor, orig = float(rs["factor"]), rs["original_max_position_embeddings"]
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # high-frequency dims keep their frequency, low ones are interpolated
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_S: torch.Tensor, dtype: torch.dtype):
        freqs_SR = positions_S.float()[:, None] * self.inv_freq[None, :].float()  # R = rope_dim / 2
        emb = torch.cat((freqs_SR, freqs_SR), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rope(x_BHSR: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, interleave: bool):
    """HF semantics: interleave=True rotates pairs (x0, x1), (x2, x3)... and writes the rotated
    halves de-interleaved ([evens', odds']); False is the rotate-half form."""
    if interleave:
        half = cos_SR.shape[-1] // 2
        cos, sin = cos_SR[..., :half], sin_SR[..., :half]
        x1, x2 = x_BHSR[..., 0::2], x_BHSR[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x_BHSR.chunk(2, dim=-1)
    return x_BHSR * cos_SR + torch.cat((-x2, x1), dim=-1) * sin_SR


class Attention(nn.Module):
    """Multi-head Latent Attention: low-rank q (optional) and kv, with a decoupled shared RoPE key."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        self.num_heads = H
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in the reference
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=bias)
        self.scaling = cfg.qk_head_dim**-0.5
        rs = cfg.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            # YaRN: attention temperature folds into the softmax scale (DeepSeek-V3 reference)
            self.scaling *= _yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"]) ** 2

    def forward(self, x_BSD, cos_SR, sin_SR):
        cfg, H = self.cfg, self.num_heads
        B, S, _ = x_BSD.shape
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BHSQ = q.view(B, S, H, cfg.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q_BHSQ.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        kv_c, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_c)).view(B, S, H, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v_BHSV = kv.transpose(1, 2).split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos_SR, sin_SR, cfg.rope_interleave)
        k_rope = apply_rope(k_rope.view(B, 1, S, cfg.qk_rope_head_dim), cos_SR, sin_SR, cfg.rope_interleave)
        q_BHSQ = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSQ = torch.cat([k_nope, k_rope.expand(B, H, S, cfg.qk_rope_head_dim)], dim=-1)
        o_BHSV = F.scaled_dot_product_attention(
            q_BHSQ,
            k_BHSQ,
            v_BHSV,
            is_causal=True,
            dropout_p=cfg.attention_dropout if self.training else 0.0,
            scale=self.scaling,
        )
        return self.o_proj(o_BHSV.transpose(1, 2).reshape(B, S, H * cfg.v_head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ep=None):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg, ep) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_BSD, cos_SR, sin_SR):
        """-> (h_BSD, counts_E or None, balance_loss or None)."""
        h_BSD = h_BSD + self.self_attn(self.input_layernorm(h_BSD), cos_SR, sin_SR)
        x = self.post_attention_layernorm(h_BSD)
        if not self.is_moe:
            return h_BSD + self.mlp(x), None, None
        y, counts_E, bal = self.mlp(x)
        return h_BSD + y, counts_E, bal


class Backbone(nn.Module):
    """`model.*` of the HF checkpoint: embed_tokens, layers, norm (rotary buffers are not saved)."""

    def __init__(self, cfg: ModelConfig, ep=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ep) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class MTP(nn.Module):
    """Multi-token prediction, depth 1 (DeepSeek-V3 §2.2): at position t, combine the main model's
    final hidden state h_t with the embedding of token t+1 and predict token t+2, sharing the
    embedding and the output head with the main model."""

    def __init__(self, cfg: ModelConfig, ep=None):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)  # [emb; h] -> D
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers, ep)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None = None  # CE + λ MTP + balance loss
    ce_loss: torch.Tensor | None = None
    loss_per_sample: torch.Tensor | None = None  # (B,) mean CE per sequence, detached
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    expert_load_LE: torch.Tensor | None = None  # (num_moe_layers, E) fp32 token counts, detached


def _ce_BS(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token CE (B, S) in fp32 (0 where ignored) and the valid mask (B, S)."""
    B, S, V = logits_BSV.shape
    ce = F.cross_entropy(
        logits_BSV.reshape(B * S, V).float(), targets_BS.reshape(B * S), ignore_index=-100, reduction="none"
    )
    return ce.view(B, S), (targets_BS != -100)


class DeepseekV3ForCausalLM(nn.Module):
    """Ours. `model(input_ids_BS, labels_BS=None) -> ModelOutput`; labels are aligned with the
    inputs (the model shifts), -100 = ignore. Trainers feed a packed row of seq_len+1 tokens as
    both input_ids and labels."""

    def __init__(self, cfg: ModelConfig, ep=None):
        super().__init__()
        self.config = cfg
        self.ep = ep
        self.model = Backbone(cfg, ep)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MTP(cfg, ep) if cfg.num_nextn_predict_layers else None
        self.activation_checkpointing = False

    # --- helpers ---
    def moe_layers(self) -> list[MoE]:
        """The main model's MoE layers, in order (rows of expert_load_LE)."""
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def set_activation_checkpointing(self, on: bool) -> None:
        self.activation_checkpointing = bool(on)

    def _run_layer(self, layer, h, cos, sin):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, cos, sin, use_reentrant=False)
        return layer(h, cos, sin)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> ModelOutput:
        cfg = self.config
        B, S = input_ids_BS.shape
        emb_BSD = self.model.embed_tokens(input_ids_BS)
        cos, sin = self.model.rotary_emb(torch.arange(S, device=input_ids_BS.device), emb_BSD.dtype)
        h = emb_BSD
        loads, bal = [], emb_BSD.new_zeros((), dtype=torch.float32)
        for layer in self.model.layers:
            h, counts_E, b = self._run_layer(layer, h, cos, sin)
            if counts_E is not None:
                loads.append(counts_E)
                bal = bal + b
        h = self.model.norm(h)
        logits_BSV = self.lm_head(h)
        E = cfg.n_routed_experts
        load_LE = torch.stack(loads).float() if loads else logits_BSV.new_zeros((0, E), dtype=torch.float32)
        out = ModelOutput(logits=logits_BSV, expert_load_LE=load_LE.detach())
        if labels_BS is None:
            return out

        ce_BS, valid_BS = _ce_BS(logits_BSV[:, :-1], labels_BS[:, 1:])
        n_valid = valid_BS.sum()
        ce = ce_BS.sum() / n_valid.clamp(min=1)
        per_sample = (ce_BS.sum(1) / valid_BS.sum(1).clamp(min=1)).detach()
        loss = ce
        mtp_loss = None
        if self.mtp is not None and S > 2:
            m = self.mtp
            # position t (0..S-2): [enorm(emb(x_{t+1})); hnorm(h_t)] -> block -> predicts x_{t+2}
            e_in = m.enorm(emb_BSD[:, 1:])
            x = m.eh_proj(torch.cat([e_in, m.hnorm(h[:, :-1])], dim=-1))
            hm, _, b = self._run_layer(m.block, x, cos[: S - 1], sin[: S - 1])
            if b is not None:
                bal = bal + b
            logits_mtp = self.lm_head(m.norm(hm))
            ce_mtp_BS, valid_mtp_BS = _ce_BS(logits_mtp[:, :-1], labels_BS[:, 2:])
            mtp_loss = ce_mtp_BS.sum() / valid_mtp_BS.sum().clamp(min=1)
            loss = loss + cfg.mtp_loss_weight * mtp_loss
        loss = loss + bal
        out.loss, out.ce_loss, out.loss_per_sample = loss, ce, per_sample
        out.mtp_loss, out.balance_loss = mtp_loss, bal
        return out

    @torch.no_grad()
    def update_routing_bias(self, load_LE: torch.Tensor, group=None, summed: bool = False) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): bias_i += γ sign(mean load - load_i).

        load_LE is the step's expert load (rows = main MoE layers); it is summed over `group`
        first when torch.distributed is initialized, so every rank applies the same update
        (`summed`: the caller already summed it over the ranks, in its own all-reduce).
        """
        layers = self.moe_layers()
        if load_LE.shape != (len(layers), self.config.n_routed_experts):
            raise ValueError(
                f"load_LE has shape {tuple(load_LE.shape)}, expected ({len(layers)}, {self.config.n_routed_experts})"
            )
        load_LE = load_LE.detach().float().clone()
        if not summed and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load_LE, group=group)
        gamma = self.config.bias_update_speed
        for moe, load_E in zip(layers, load_LE):
            bias_E = moe.gate.e_score_correction_bias
            bias_E += gamma * torch.sign(load_E.mean() - load_E).to(bias_E)


def init_weights(model: DeepseekV3ForCausalLM, std: float) -> None:
    """HF-style init: normal(0, std) for every matrix and embedding, zeros for biases, ones for norms."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, std)
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, MoE):
                mod.gate.weight.normal_(0.0, std)
                mod.gate.e_score_correction_bias.zero_()
                ex = mod.experts
                # draw the full expert tensors, keep this rank's slice: EP on/off see the same weights
                E, local = mod.num_experts, slice(ex.first, ex.first + ex.gate_up_proj.shape[0])
                ex.gate_up_proj.copy_(torch.empty((E, *ex.gate_up_proj.shape[1:])).normal_(0.0, std)[local])
                ex.down_proj.copy_(torch.empty((E, *ex.down_proj.shape[1:])).normal_(0.0, std)[local])


def build_model(cfg: ModelConfig, ep=None) -> DeepseekV3ForCausalLM:
    """The model in fp32 on CPU with HF-style init from torch's current RNG (seed before calling).
    `ep` None = this rank owns all routed experts."""
    check_fits_in_memory(cfg, ep.ep_size if ep is not None else 1)
    model = DeepseekV3ForCausalLM(cfg, ep)
    init_weights(model, cfg.initializer_range)
    return model
