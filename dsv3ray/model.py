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
import os
from dataclasses import dataclass
from typing import Any

from dsv3ray.errors import ConfigError, UserError

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


def check_fits_in_memory(cfg: ModelConfig, bytes_per_param: int = 4) -> None:
    """Refuse (one line) a model whose fp32 parameters alone would not fit in this machine's RAM."""
    total, _ = count_params(cfg, include_mtp=True)
    need, have = total * bytes_per_param, _machine_memory_bytes()
    if need > 0.8 * have:
        raise UserError(
            f"model with {total / 1e9:.1f}B parameters needs {need / 2**30:.0f} GiB in fp32 but this machine has "
            f"{have / 2**30:.0f} GiB: use a smaller preset (debug, 16b) or run it on a GPU cluster"
        )
