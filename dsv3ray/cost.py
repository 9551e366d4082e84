"""The cost model: FLOPs, memory, throughput, time, energy and money of a training run.

Notable:
- FLOPs come from the model config's shapes, one matmul of (m x k) @ (k x n) = 2*m*k*n FLOPs.
  Forward FLOPs per token (no approximation by 6N):
    attention projections   2 * (q_a + q_b | q_proj) + 2 * kv_a_proj_with_mqa + 2 * kv_b + 2 * o_proj
                            (MLA's real projections: the low-rank q/kv paths as they run in training)
    attention core          2 * H * (qk_head_dim + v_head_dim) * ctx, ctx = (S + 1) / 2, the mean
                            number of keys a query sees under the causal mask (QK^T and P @ V)
    dense MLP layers        2 * 3 * D * intermediate_size (SwiGLU: gate, up, down)
    MoE layers              router 2 * D * E (fp32 logits) + experts 2 * 3 * D * I * (K + n_shared):
                            only the K activated routed experts and the shared ones compute
    lm_head                 2 * D * V (the embedding lookup is free)
    MTP (depth 1)           eh_proj 2 * 2D * D + one more (MoE) block + the shared lm_head again;
                            it is trained, so it is in the training FLOPs (not in "activated params")
  Training = forward + backward = 3 x forward (backward = grad wrt inputs + grad wrt weights).
  These are MODEL FLOPs: norms, RoPE, softmax, SiLU and top-k (< 1%) are not counted, and neither
  is the recompute of activation checkpointing (MFU is always model FLOPs / peak).
- "dense" in the cost table = a dense model with the MoE's TOTAL parameters: every routed expert
  computes for every token (a SwiGLU of width E * I next to the shared ones), no router. It is
  what the same parameter count costs without sparsity; "saving" is 1 - MoE / dense.
- Throughput = MFU * peak(device, dtype) * devices / training FLOPs per token. The MFU is measured
  (`--from-run RUN_DIR`: the `mfu` its report.json logged, or one computed from its `tokens_per_s`)
  or assumed (`cost.mfu`); every report says which.
- Energy = device-hours * board power * PUE; money = device-hours * price_per_hour (hardware,
  without electricity) + kWh * electricity_price. Device figures come from `devices.toml`,
  extendable with `cost.catalog`.
- Memory per device (an estimate, ZeRO paper accounting): parameters, gradients, optimizer states
  (Adam: fp32 master + m + v = 12 bytes/param in mixed precision, m + v = 8 in fp32), split by ZeRO
  stage over the data-parallel group; expert parameters split over ep_size first, and their ZeRO
  group is the expert-data-parallel group (devices / ep_size); offload moves optimizer states
  (and, at stage 3, parameters) to host memory. Activations: the tensors each layer saves for
  backward (flash-attention style: no S x S scores), all layers or, with activation
  checkpointing, each layer's input plus one layer being recomputed; plus the logits (bf16 and
  fp32 for the loss). No pipeline / tensor parallelism is modelled.

Shapes: D hidden, H heads, S sequence length, V vocab, E routed experts, K top-k, I expert width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dsv3ray.config import deep_merge
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.model import MODEL_PRESETS, ModelConfig, activation_ratio, count_params

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 2, "int8": 2}  # weights stay >= 16 bit
# DeepSeek-V3 technical report: 2.788M H800 GPU-hours for the full training (14.8T pre-training
# tokens + context extension + post-training).
DEEPSEEK_V3_GPU_HOURS = 2.788e6
DEEPSEEK_V3_TOKENS = 14.8e12


# ---------------------------------------------------------------------------------------------
# Device catalog
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    memory_gb: float
    power_w: float
    price_per_hour: float
    peak_tflops: dict[str, float]

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; ConfigError when the device has no such mode."""
        if dtype not in self.peak_tflops:
            raise ConfigError(
                "cost.dtype", dtype, f"{self.name} supports {', '.join(sorted(self.peak_tflops))}"
            )
        return self.peak_tflops[dtype] * 1e12


def _read_catalog_file(path: Path, key: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(key, str(path), "an existing TOML device catalog file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(key, str(path), f"valid TOML ({e})") from None
    devices = data.get("devices")
    if not isinstance(devices, dict) or set(data) - {"devices"}:
        raise ConfigError(key, str(path), "a TOML file of [devices.NAME] tables (see dsv3ray/devices.toml)")
    return devices


def load_catalog(extra: str = "") -> dict[str, DeviceSpec]:
    """The built-in catalog, with the user's `extra` file merged over it key by key."""
    builtin = resources.files("dsv3ray").joinpath("devices.toml")
    with resources.as_file(builtin) as p:
        devices = _read_catalog_file(Path(p), "cost.catalog")
    if extra:
        user = _read_catalog_file(Path(extra), "cost.catalog")
        # match user names to built-in ones case-insensitively so [devices.h800] overrides H800
        by_lower = {k.lower(): k for k in devices}
        devices = deep_merge(devices, {by_lower.get(k.lower(), k): v for k, v in user.items()})
    out = {}
    for name, d in devices.items():
        where = f"device {name!r} in the catalog"
        if not isinstance(d, dict):
            raise ConfigError("cost.catalog", extra or "devices.toml", f"{where} must be a table")
        try:
            peak = {str(k): float(v) for k, v in dict(d.get("peak_tflops", {})).items()}
            spec = DeviceSpec(
                name=name,
                description=str(d.get("description", name)),
                memory_gb=float(d["memory_gb"]),
                power_w=float(d["power_w"]),
                price_per_hour=float(d["price_per_hour"]),
                peak_tflops=peak,
            )
        except KeyError as e:
            raise ConfigError("cost.catalog", extra or "devices.toml", f"{where} needs {e.args[0]}") from None
        except (TypeError, ValueError):
            raise ConfigError("cost.catalog", extra or "devices.toml", f"{where} needs numbers") from None
        if not peak or min(peak.values()) <= 0 or spec.memory_gb <= 0 or spec.power_w < 0:
            raise ConfigError(
                "cost.catalog",
                extra or "devices.toml",
                f"{where} needs memory_gb > 0, power_w >= 0 and a [peak_tflops] table of positive numbers",
            )
        if spec.price_per_hour < 0:
            raise ConfigError("cost.catalog", extra or "devices.toml", f"{where} needs price_per_hour >= 0")
        out[name] = spec
    return out


def get_device(name: str, catalog: dict[str, DeviceSpec]) -> DeviceSpec:
    for key, spec in catalog.items():
        if key.lower() == name.lower():
            return spec
    raise ConfigError("cost.device", name, f"one of the catalog's devices: {', '.join(catalog)}")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class CostConfig:
    device: str = "H800"
    num_devices: int = 0  # 0 = train.num_workers (the max of a [min, max] pair)
    ep_size: int = 0  # 0 = train.ep_size
    dtype: str = "bf16"  # compute dtype: which peak the MFU refers to, and bytes per param/activation
    tokens: float = 0.0  # token budget; 0 = the run's own (train.tokens, else steps * global batch)
    seq_len: int = 0  # 0 = [prepare] seq_len if set, else the model's pre-training context
    mfu: float = 0.35  # assumed model-FLOPs utilization when no --from-run measurement is given
    electricity_price: float = 0.10  # currency per kWh
    pue: float = 1.2  # data-center power usage effectiveness (facility / IT power)
    currency: str = "USD"
    catalog: str = ""  # extra device catalog TOML merged over the built-in dsv3ray/devices.toml
    # published GPU-hours to compare against (prints the MFU they imply); 0 = DeepSeek-V3's
    # 2.788M when the model is the 671b layout, else none
    reference_gpu_hours: float = 0.0

    def __post_init__(self):
        for key in ("num_devices", "ep_size", "seq_len"):
            if getattr(self, key) < 0:
                raise ConfigError(f"cost.{key}", getattr(self, key), "an integer >= 0 (0 = from the run)")
        for key in ("tokens", "electricity_price", "reference_gpu_hours"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"cost.{key}", v, "a finite number >= 0")
        if not 0.0 < self.mfu <= 1.0:
            raise ConfigError("cost.mfu", self.mfu, "a fraction in (0, 1], e.g. 0.35")
        if not (math.isfinite(self.pue) and self.pue >= 1.0):
            raise ConfigError("cost.pue", self.pue, "a number >= 1 (1.0 = no facility overhead)")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError("cost.dtype", self.dtype, " | ".join(DTYPE_BYTES))
        # the device is checked here so a bad name fails when the config is read, naming the catalog
        self.spec.peak_flops(self.dtype)

    @property
    def spec(self) -> DeviceSpec:
        return get_device(self.device, load_catalog(self.catalog))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def _attention_proj_macs(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = D * H * cfg.qk_head_dim if cfg.q_lora_rank is None else (D + H * cfg.qk_head_dim) * cfg.q_lora_rank
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = H * cfg.v_head_dim * D
    return q + kv_a + kv_b + o


def forward_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = True, include_mtp: bool = True, dense: bool = False
) -> dict[str, float]:
    """Forward FLOPs per token by component (see the module docstring for each formula).

    dense=True: the dense model with the same total parameters (all routed experts compute for
    every token, no router). causal=False counts every query against all S keys.
    """
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    K = E if dense else cfg.num_experts_per_tok
    ctx = (seq_len + 1) / 2 if causal else float(seq_len)
    n_dense, n_moe = cfg.first_k_dense_replace, cfg.num_moe_layers
    n_dense = min(n_dense, cfg.num_hidden_layers)
    blocks = cfg.num_hidden_layers
    if include_mtp and cfg.num_nextn_predict_layers:
        blocks += 1
        if cfg.is_moe_layer(cfg.num_hidden_layers):
            n_moe += 1
        else:
            n_dense += 1
    out = {
        "attention_proj": 2.0 * _attention_proj_macs(cfg) * blocks,
        "attention_core": 2.0 * H * (cfg.qk_head_dim + cfg.v_head_dim) * ctx * blocks,
        "dense_mlp": 2.0 * 3 * D * cfg.intermediate_size * n_dense,
        "router": 0.0 if dense else 2.0 * D * E * n_moe,
        "routed_experts": 2.0 * 3 * D * I * K * n_moe,
        "shared_experts": 2.0 * 3 * D * I * cfg.n_shared_experts * n_moe,
        "lm_head": 2.0 * D * V,
        "mtp_extra": 0.0,
    }
    if include_mtp and cfg.num_nextn_predict_layers:
        out["mtp_extra"] = 2.0 * 2 * D * D + 2.0 * D * V  # eh_proj + the shared head on the MTP branch
    return out


def train_flops_per_token(
    cfg: ModelConfig, seq_len: int, include_mtp: bool = True, dense: bool = False
) -> float:
    """Model FLOPs of one training token: forward + backward = 3 x forward."""
    return 3.0 * sum(forward_flops_per_token(cfg, seq_len, True, include_mtp, dense).values())


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model-FLOPs utilization: achieved model FLOP/s over the devices' dense peak."""
    return tokens_per_s * flops_per_token / (peak_flops_per_device * num_devices)


def throughput_report(
    cfg: ModelConfig,
    seq_len: int,
    tokens_per_s: float,
    num_devices: int,
    device: str,
    dtype: str,
    catalog: str = "",
) -> dict[str, Any]:
    """The keys a run's report.json carries for `dsv3ray cost --from-run` (the trainer merges them in).

    device: a catalog name ("CPU" for CPU workers); dtype: the run's compute dtype (falls back to
    the device's first listed one when the catalog has no peak for it).
    """
    spec = get_device(device, load_catalog(catalog))
    dt = dtype if dtype in spec.peak_tflops else next(iter(spec.peak_tflops))
    flops = train_flops_per_token(cfg, seq_len)
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, flops, spec.peak_flops(dt), num_devices),
        "device": spec.name,
        "num_devices": num_devices,
        "flops_per_token": flops,
        "mfu_dtype": dt,
    }


def is_671b_layout(cfg: ModelConfig) -> bool:
    ref = ModelConfig.from_preset("671b")
    shape = (
        "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
        "num_attention_heads n_shared_experts n_routed_experts num_experts_per_tok first_k_dense_replace "
        "q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim"
    ).split()
    return "671b" in MODEL_PRESETS and all(getattr(cfg, k) == getattr(ref, k) for k in shape)


def pretraining_context(cfg: ModelConfig) -> int:
    """The context the model is pre-trained at: YaRN's original length, else max_position_embeddings."""
    rs = cfg.rope_scaling or {}
    return int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """How one run places the model on devices (from [train], [deepspeed] and [cost])."""

    num_devices: int = 1
    ep_size: int = 1
    micro_batch_size: int = 1
    seq_len: int = 512
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    activation_checkpointing: bool = False
    dtype: str = "bf16"

    def __post_init__(self):
        if self.ep_size < 1 or self.num_devices % self.ep_size:
            raise ConfigError(
                "cost.ep_size", self.ep_size, f"a divisor of the device count {self.num_devices}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_optimization.stage", self.zero_stage, "0, 1, 2 or 3")


def _act_bytes_per_token(cfg: ModelConfig, moe: bool, b: int) -> float:
    """Bytes one token's activations saved for backward take in one decoder block."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    r_q = cfg.q_lora_rank or 0
    attn = (
        2 * D  # residual input + input_layernorm output
        + 2 * r_q  # q_a_proj out + q_a_layernorm out
        + H * cfg.qk_head_dim  # q (q_b_proj / q_proj out)
        + 2 * cfg.kv_lora_rank
        + cfg.qk_rope_head_dim  # kv_a out + kv_a_layernorm out
        + H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b out
        + 2 * H * cfg.qk_head_dim  # q, k after RoPE (attention inputs)
        + H * cfg.v_head_dim  # attention output (o_proj input)
        + 2 * D  # residual + post_attention_layernorm output
    ) * b + 4 * H  # fp32 logsumexp per head
    if not moe:
        return attn + 3 * cfg.intermediate_size * b  # gate, up, silu(gate)*up
    K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    router = 2 * cfg.n_routed_experts * 4  # fp32 logits + scores
    routed = K * (D + 3 * I + D) * b  # permuted x, gate/up/act, down out (before unpermute)
    shared = cfg.n_shared_experts * 3 * I * b
    return attn + router + routed + shared


def memory_per_device(cfg: ModelConfig, layout: Layout) -> dict[str, float]:
    """Bytes per device for parameters, gradients, optimizer states, activations (see docstring)."""
    b = DTYPE_BYTES[layout.dtype]
    opt_b = 8 if b == 4 else 12
    total, _ = count_params(cfg, include_mtp=True)
    n_moe_blocks = cfg.num_moe_layers + int(
        bool(cfg.num_nextn_predict_layers) and cfg.is_moe_layer(cfg.num_hidden_layers)
    )
    expert = n_moe_blocks * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    non_expert = total - expert
    dp, edp = layout.num_devices, layout.num_devices // layout.ep_size
    # parameter counts held per device, before (full) and after ZeRO partitioning (part)
    full = non_expert + expert / layout.ep_size
    part = non_expert / dp + expert / layout.ep_size / edp
    s = layout.zero_stage
    params = (part if s >= 3 else full) * b
    grads = (part if s >= 2 else full) * b
    optim = (part if s >= 1 else full) * opt_b
    host = 0.0
    if layout.offload_optimizer:
        host += optim
        optim = 0.0
    if layout.offload_param and s == 3:
        host += params
        params = 0.0

    tokens = layout.micro_batch_size * layout.seq_len
    per_block = [_act_bytes_per_token(cfg, cfg.is_moe_layer(i), b) for i in range(cfg.num_hidden_layers)]
    if cfg.num_nextn_predict_layers:
        per_block.append(
            _act_bytes_per_token(cfg, cfg.is_moe_layer(cfg.num_hidden_layers), b) + 3 * cfg.hidden_size * b
        )
    if layout.activation_checkpointing:
        blocks = len(per_block) * cfg.hidden_size * b + max(per_block)
    else:
        blocks = sum(per_block)
    heads = 1 + int(bool(cfg.num_nextn_predict_layers))
    logits = heads * cfg.vocab_size * (b + 4)  # logits + their fp32 copy for the loss
    acts = tokens * (blocks + logits + cfg.hidden_size * b)  # + embedding output
    return {
        "parameters": params,
        "gradients": grads,
        "optimizer_states": optim,
        "activations": acts,
        "total": params + grads + optim + acts,
        "host_offload": host,
    }


# ---------------------------------------------------------------------------------------------
# Time, energy, money
# ---------------------------------------------------------------------------------------------


def run_cost(
    flops_per_token: float,
    tokens: float,
    spec: DeviceSpec,
    num_devices: int,
    utilization: float,
    dtype: str,
    electricity_price: float,
    pue: float,
) -> dict[str, float]:
    """Days, device-hours, kWh and money to train `tokens` at MFU `utilization`."""
    tokens_per_s = utilization * spec.peak_flops(dtype) * num_devices / flops_per_token
    seconds = tokens / tokens_per_s
    out = {"tokens_per_s": tokens_per_s, "training_days": seconds / 86400.0}
    out.update(_spend(seconds, spec, num_devices, electricity_price, pue))
    return out


def _spend(
    seconds: float, spec: DeviceSpec, num_devices: int, price_kwh: float, pue: float
) -> dict[str, float]:
    gpu_hours = num_devices * seconds / 3600.0
    kwh = gpu_hours * spec.power_w / 1000.0 * pue
    hardware = gpu_hours * spec.price_per_hour
    electricity = kwh * price_kwh
    return {
        "gpu_hours": gpu_hours,
        "energy_kwh": kwh,
        "electricity_cost": electricity,
        "hardware_cost": hardware,
        "total_cost": hardware + electricity,
    }


class RunningCost:
    """Spend so far of a running job, for TensorBoard and the run report (call it each log step).

    >>> RunningCost("H800", 8).at(3600.0)["gpu_hours"]
    8.0
    """

    def __init__(self, device: str, num_devices: int, cfg: CostConfig | None = None):
        cfg = cfg or CostConfig(device=device)
        self.spec = get_device(device, load_catalog(cfg.catalog))
        if num_devices < 1:
            raise ConfigError("num_devices", num_devices, "an integer >= 1")
        self.num_devices = num_devices
        self.electricity_price, self.pue, self.currency = cfg.electricity_price, cfg.pue, cfg.currency

    def at(self, elapsed_s: float) -> dict[str, float]:
        """{gpu_hours, energy_kwh, electricity_cost, hardware_cost, total_cost} after elapsed_s seconds."""
        assert elapsed_s >= 0, elapsed_s
        return _spend(elapsed_s, self.spec, self.num_devices, self.electricity_price, self.pue)


# ---------------------------------------------------------------------------------------------
# The report (`dsv3ray cost`)
# ---------------------------------------------------------------------------------------------


def read_run_throughput(run_dir: str) -> dict[str, Any]:
    """tokens_per_s / mfu / device / num_devices (+ config) from RUN_DIR/report.json."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise UserError(f"--from-run {run_dir}: {path} does not exist; pass a finished run's directory")
    try:
        rep = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"--from-run {run_dir}: {path} is not readable JSON ({e})") from None
    if not isinstance(rep, dict) or not (rep.get("mfu") or rep.get("tokens_per_s")):
        raise UserError(
            f"--from-run {run_dir}: {path} has neither mfu nor tokens_per_s; was the run finished?"
        )
    return rep


def _layout(run, cost: CostConfig, cfg: ModelConfig) -> tuple[Layout, list[str]]:
    """The parallel layout from [cost] > [train]/[deepspeed] > defaults, and where each came from."""
    notes = []
    train = getattr(run, "train", None)
    raw = getattr(run, "raw", {}) or {}
    ds = dict(getattr(run, "deepspeed", None) or raw.get("deepspeed", {}) or {})
    zero = ds.get("zero_optimization", {}) or {}
    num_devices = cost.num_devices or getattr(train, "max_workers", 1)
    if isinstance(num_devices, list | tuple):  # elastic (min, max): price the max
        num_devices = num_devices[-1]
    ep = cost.ep_size or getattr(train, "ep_size", 1)
    if cost.seq_len:
        seq_len = cost.seq_len
    elif "seq_len" in raw.get("prepare", {}):
        seq_len = int(raw["prepare"]["seq_len"])
        notes.append(f"seq_len {seq_len} from [prepare]")
    else:
        seq_len = pretraining_context(cfg)
        notes.append(f"seq_len {seq_len} = the model's pre-training context (set cost.seq_len)")
    if cfg.n_routed_experts % ep:
        raise ConfigError("cost.ep_size", ep, f"a divisor of model.n_routed_experts={cfg.n_routed_experts}")
    layout = Layout(
        num_devices=int(num_devices),
        ep_size=int(ep),
        micro_batch_size=int(getattr(train, "micro_batch_size", 1)),
        seq_len=int(seq_len),
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        offload_param=(zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        activation_checkpointing=bool(getattr(train, "activation_checkpointing", False)),
        dtype=cost.dtype,
    )
    if layout.zero_stage == 3:
        # as dsv3ray.engine does: DeepSpeed refuses ZeRO-3 with MoE layers, the trainer runs stage 2
        layout.zero_stage = 2
        notes.append(
            "ZeRO-3 asked: DeepSpeed refuses it with MoE layers, costed at stage 2 as the trainer runs it"
        )
    return layout, notes


def _token_budget(run, cost: CostConfig, layout: Layout) -> tuple[float, str]:
    if cost.tokens:
        return cost.tokens, "cost.tokens"
    train = getattr(run, "train", None)
    if train is not None and getattr(train, "tokens", 0):
        return float(train.tokens), "train.tokens"
    steps = getattr(train, "steps", 100)
    workers = getattr(train, "max_workers", layout.num_devices)
    if isinstance(workers, list | tuple):
        workers = workers[-1]
    per_step = workers * layout.micro_batch_size * getattr(train, "grad_accum", 1) * layout.seq_len
    return float(steps * per_step), f"train.steps {steps} x {per_step} tokens/step"


def estimate(run, cost: CostConfig, from_run: str | None = None) -> dict[str, Any]:
    """Everything `dsv3ray cost` prints, as plain data (the --json output)."""
    cfg: ModelConfig = run.model
    spec = cost.spec
    layout, notes = _layout(run, cost, cfg)
    tokens, tokens_src = _token_budget(run, cost, layout)
    total, active = count_params(cfg)
    flops_moe = train_flops_per_token(cfg, layout.seq_len)
    flops_dense = train_flops_per_token(cfg, layout.seq_len, dense=True)
    peak = spec.peak_flops(cost.dtype)

    if from_run:
        rep = read_run_throughput(from_run)
        where = f"{rep.get('device', '?')} x {rep.get('num_devices', '?')}"
        if rep.get("mfu"):
            util, src = float(rep["mfu"]), f"measured: mfu logged by {from_run} ({where})"
        else:
            run_spec = get_device(str(rep.get("device", cost.device)), load_catalog(cost.catalog))
            n = int(rep.get("num_devices") or 1)
            util = mfu(float(rep["tokens_per_s"]), flops_moe, run_spec.peak_flops(cost.dtype), n)
            src = f"measured: {rep['tokens_per_s']:.4g} tokens/s of {from_run} ({where}) for this model"
        if not 0 < util <= 1:
            raise UserError(f"--from-run {from_run}: its MFU {util:.3g} is outside (0, 1]; check its device")
        measured = True
    else:
        util, src, measured = cost.mfu, "assumed (cost.mfu)", False

    moe = run_cost(
        flops_moe, tokens, spec, layout.num_devices, util, cost.dtype, cost.electricity_price, cost.pue
    )
    dense = run_cost(
        flops_dense, tokens, spec, layout.num_devices, util, cost.dtype, cost.electricity_price, cost.pue
    )
    saving = {k: 1.0 - moe[k] / dense[k] for k in moe if k != "tokens_per_s" and dense[k] > 0}

    out: dict[str, Any] = {
        "model": {
            "total_params": total,
            "activated_params": active,
            "activation_ratio": activation_ratio(cfg),
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "n_routed_experts": cfg.n_routed_experts,
            "mtp_in_training_flops": bool(cfg.num_nextn_predict_layers),
        },
        "flops_per_token": {
            "train_moe": flops_moe,
            "train_dense_same_total_params": flops_dense,
            "forward_breakdown": forward_flops_per_token(cfg, layout.seq_len),
        },
        "tokens": tokens,
        "tokens_source": tokens_src,
        "device": {**dataclasses.asdict(spec), "dtype": cost.dtype, "peak_tflops_dtype": peak / 1e12},
        "num_devices": layout.num_devices,
        "mfu": util,
        "mfu_source": src,
        "mfu_measured": measured,
        "electricity_price": cost.electricity_price,
        "pue": cost.pue,
        "currency": cost.currency,
        "moe": moe,
        "dense": dense,
        "saving": saving,
        "layout": dataclasses.asdict(layout),
        "memory_bytes": memory_per_device(cfg, layout),
        "notes": notes,
    }
    ref = cost.reference_gpu_hours
    ref_label = "cost.reference_gpu_hours"
    if not ref and is_671b_layout(cfg):
        ref, ref_label = DEEPSEEK_V3_GPU_HOURS, "DeepSeek-V3 published H800 GPU-hours (14.8T tokens)"
    if ref:
        out["reference"] = {
            "gpu_hours": ref,
            "label": ref_label,
            "implied_mfu": flops_moe * tokens / (ref * 3600.0 * peak),
            "estimate_vs_reference": moe["gpu_hours"] / ref - 1.0,
        }
    return out


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:,.3f}M"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.3g}"


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:g}"


def format_table(rep: dict[str, Any]) -> str:
    m, dev, cur = rep["model"], rep["device"], rep["currency"]
    fl = rep["flops_per_token"]
    lay, mem = rep["layout"], rep["memory_bytes"]
    lines = [
        f"model: {_count(m['total_params'])} params total, {_count(m['activated_params'])} activated "
        f"per token (activation ratio {m['activation_ratio']:.2%}; top-{m['num_experts_per_tok']} of "
        f"{m['n_routed_experts']} experts)",
        f"training FLOPs per token (fwd+bwd, attention at seq_len {lay['seq_len']}"
        f"{', MTP included' if m['mtp_in_training_flops'] else ''}): MoE {fl['train_moe']:.4g}, "
        f"dense {fl['train_dense_same_total_params']:.4g}",
        f"token budget: {_count(rep['tokens'])} tokens ({rep['tokens_source']})",
        f"device: {rep['num_devices']} x {dev['name']} ({dev['description']}), {dev['dtype']} peak "
        f"{dev['peak_tflops_dtype']:g} TFLOPS, {dev['power_w']:g} W, {dev['price_per_hour']:g} {cur}/device-hour; "
        f"PUE {rep['pue']:g}, electricity {rep['electricity_price']:g} {cur}/kWh",
        f"MFU {rep['mfu']:.1%} — {rep['mfu_source']}; MoE throughput {rep['moe']['tokens_per_s']:.4g} tokens/s",
        "",
    ]
    rows = [
        ("training days", "training_days"),
        ("GPU-hours", "gpu_hours"),
        ("energy (kWh)", "energy_kwh"),
        (f"electricity cost ({cur})", "electricity_cost"),
        (f"hardware cost ({cur})", "hardware_cost"),
        (f"total cost ({cur})", "total_cost"),
    ]
    head = ("", "dense (same total params)", "MoE (this model)", "saving")
    table = [head] + [
        (label, _num(rep["dense"][k]), _num(rep["moe"][k]), f"{rep['saving'].get(k, 0.0):.1%}")
        for label, k in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for i, r in enumerate(table):
        lines.append(f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:])))
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    if "reference" in rep:
        ref = rep["reference"]
        lines += [
            "",
            f"reference: {ref['label']} = {_num(ref['gpu_hours'])} GPU-hours -> implied MFU "
            f"{ref['implied_mfu']:.1%} at {dev['dtype']} peak; this estimate is "
            f"{ref['estimate_vs_reference']:+.1%} off it",
        ]
    gb = 1e9
    where = "host (offloaded)"
    lines += [
        "",
        f"memory per device (estimate): ZeRO-{lay['zero_stage']}, {lay['num_devices']} devices, ep {lay['ep_size']}, "
        f"micro-batch {lay['micro_batch_size']} x seq {lay['seq_len']}, {lay['dtype']}, activation checkpointing "
        f"{'on' if lay['activation_checkpointing'] else 'off'}",
    ]
    for label, k in (
        ("parameters", "parameters"),
        ("gradients", "gradients"),
        ("optimizer states", "optimizer_states"),
        ("activations", "activations"),
    ):
        lines.append(f"  {label:<18}{mem[k] / gb:>12,.2f} GB")
    fits = "fits" if mem["total"] <= dev["memory_gb"] * gb else "DOES NOT FIT"
    lines.append(
        f"  {'total on device':<18}{mem['total'] / gb:>12,.2f} GB of {dev['memory_gb']:g} GB: {fits}"
    )
    if mem["host_offload"]:
        lines.append(f"  {where:<18}{mem['host_offload'] / gb:>12,.2f} GB")
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


def cli_cost(run, args) -> int:
    """`dsv3ray cost`: the cost table (or --json) for the run config."""
    rep = estimate(run, run.cost, getattr(args, "from_run", None))
    print(json.dumps(rep, indent=2) if getattr(args, "json", False) else format_table(rep))
    return 0
