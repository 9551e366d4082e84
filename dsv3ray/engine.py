"""The DeepSpeed side: the [deepspeed] section, what of it can run here, and the engine over our MoE.

- `load_deepspeed_section(section)`: inline DeepSpeed keys, or `path = "x.json"` (+ inline overrides).
- `resolve_deepspeed_config(ds, device=..., has_moe=..., world_size=...)`: a DeepSpeed config
  that works on this device, plus one note per setting that was changed and why (the seed
  article's JSON asks for ZeRO-3 + NVMe param offload + fp16, which cannot all hold for a MoE
  model on CPU). Impossible combinations are a one-line UserError, never a DeepSpeed traceback.
- `build_engine(model, ds_config, ep)`: `deepspeed.initialize` with expert params in their own
  MoE optimizer groups and the engine's MoE machinery switched on for OUR MoE layer.
- `grads_are_finite(engine)` / `skip_step(engine)`: the non-finite guard of the training loop.

Why an adapter (`deepspeed_moe_view_class()`): DeepSpeed turns on everything MoE (ZeRO 1/2 partitioning of
expert groups over the expert-data-parallel group, expert gradient reduction, per-expert
checkpoint files) only when it finds a `deepspeed.moe.layer.MoE` module (`engine.has_moe_layers`,
read during `__init__`, before the optimizer is built; setting it afterwards is too late). Our MoE
keeps its own parameter layout (`experts.gate_up_proj` (e, 2I, D), HF's), so each `experts`
module gets a parameter-less child that *is* a DeepSpeed MoE for detection and, when DeepSpeed
saves experts, shows this rank's slices as DeepSpeed-style per-expert tensors (one file per global
expert); a load pre-hook on `experts` stacks them back. Our model's own state_dict is unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsv3ray.errors import ConfigError, UserError
from dsv3ray.parallel import ExpertParallel, expert_parameters, group_name, mark_expert_params

DEVICES = ("cpu", "cuda")
# Used when the [deepspeed] section names no optimizer (the seed's AdamW settings).
DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}}


# --- the [deepspeed] section ----------------------------------------------------------------------


def load_deepspeed_section(section: dict[str, Any] | None) -> dict[str, Any]:
    """`[deepspeed]` as a DeepSpeed config dict: the keys inline, or `path = "file.json"` (relative
    to the working directory) whose content the other inline keys override (deep-merged)."""
    section = dict(section or {})
    path = section.pop("path", None)
    if path is None:
        return section
    if not isinstance(path, str) or not path:
        raise ConfigError("deepspeed.path", path, "a path to a DeepSpeed JSON file")
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"deepspeed.path {p} does not exist (relative to {Path.cwd()}): point it to a DeepSpeed JSON file"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed.path {p} is not valid JSON ({e}): fix the file") from None
    except OSError as e:
        raise UserError(f"deepspeed.path {p} cannot be read ({e.strerror}): check its permissions") from None
    if not isinstance(data, dict):
        raise UserError(f"deepspeed.path {p} holds a JSON {type(data).__name__}, not an object: use {{...}}")
    return _deep_merge(data, section)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _positive_int(ds: dict, key: str) -> int | None:
    v = ds.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError(f"deepspeed.{key}", v, "an integer >= 1")
    return v


def _cpu_bf16_supported() -> bool:
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return CPU_Accelerator().is_bf16_supported()


def resolve_deepspeed_config(
    ds: dict[str, Any],
    *,
    device: str,
    has_moe: bool,
    world_size: int,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    dtype: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The DeepSpeed config to use on `device` for `world_size` ranks, and one note per change.

    micro_batch_size / grad_accum / dtype ("fp32" | "bf16" | "fp16"), when given (the [train]
    section), take precedence over the DeepSpeed keys; a differing DeepSpeed value is noted.
    train_batch_size is always recomputed = micro * grad_accum * world_size (DeepSpeed's
    data-parallel size is the world size; expert parallelism runs inside it).
    """
    if device not in DEVICES:
        raise ConfigError("train.device", device, " | ".join(DEVICES))
    ds, notes = copy.deepcopy(ds), []

    # --- batch ---
    micro, gas, tbs = (
        _positive_int(ds, k)
        for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    )
    for key, given, own in (
        ("train_micro_batch_size_per_gpu", micro_batch_size, micro),
        ("gradient_accumulation_steps", grad_accum, gas),
    ):
        if given is not None and own is not None and given != own:
            notes.append(f"deepspeed.{key}={own} differs from the [train] section; using {given}")
    micro = micro_batch_size or micro
    gas = grad_accum or gas or 1
    if micro is None:
        if tbs is None:
            micro = 1
        elif tbs % (gas * world_size):
            raise UserError(
                f"deepspeed.train_batch_size={tbs} is not divisible by gradient_accumulation_steps*world_size="
                f"{gas}*{world_size}: set train_micro_batch_size_per_gpu instead"
            )
        else:
            micro = tbs // (gas * world_size)
    if tbs is not None and tbs != micro * gas * world_size:
        notes.append(
            f"deepspeed.train_batch_size={tbs} does not match micro {micro} x grad_accum {gas} x {world_size}"
            f" workers; using {micro * gas * world_size}"
        )
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, gas
    ds["train_batch_size"] = micro * gas * world_size

    # --- precision ---
    fp16 = ds.get("fp16") or {}
    bf16_key = "bf16" if "bf16" in ds or "bfloat16" not in ds else "bfloat16"
    bf16 = ds.get(bf16_key) or {}
    if fp16.get("enabled") and bf16.get("enabled"):
        raise UserError("deepspeed: fp16.enabled and bf16.enabled are both true: enable at most one")
    if dtype is not None:
        own = "fp16" if fp16.get("enabled") else "bf16" if bf16.get("enabled") else "fp32"
        if own != dtype:
            notes.append(f"deepspeed precision {own} differs from train.dtype; using {dtype}")
        ds.pop("fp16", None)
        ds.pop(bf16_key, None)
        if dtype == "fp16":
            ds["fp16"] = {**fp16, "enabled": True}
        elif dtype == "bf16":
            ds["bf16"] = {**bf16, "enabled": True}
    if device == "cpu" and (ds.get("fp16") or {}).get("enabled"):
        ds.pop("fp16")
        if _cpu_bf16_supported():
            ds["bf16"] = {"enabled": True}
            notes.append(
                "deepspeed.fp16: fp16 with loss scaling is not supported on CPU; using bf16 (no loss scale needed)"
            )
        else:
            notes.append("deepspeed.fp16: fp16 is not supported on CPU and this CPU lacks bf16; using fp32")

    # --- ZeRO ---
    zero = ds.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        raise ConfigError("deepspeed.zero_optimization", zero, "a table with at least `stage`")
    zero = dict(zero or {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed.zero_optimization.stage", stage, "0, 1, 2 or 3")
    if has_moe and stage == 3:
        stage = 2
        notes.append(
            "deepspeed.zero_optimization.stage=3: DeepSpeed does not support MoE (expert-parallel) layers"
            " under ZeRO-3; using stage 2 (optimizer states and gradients partitioned)"
        )
    for key in ("offload_param", "offload_optimizer"):
        off = zero.get(key)
        if not off:
            continue
        if not isinstance(off, dict):
            raise ConfigError(f"deepspeed.zero_optimization.{key}", off, 'a table like {device = "cpu"}')
        where = off.get("device", "none")
        why = None
        if where == "none":
            continue
        if key == "offload_param" and stage != 3:
            why = f"parameter offload needs ZeRO stage 3 (using stage {stage})"
        elif key == "offload_optimizer" and stage == 0:
            why = "optimizer offload needs ZeRO stage 1-3"
        elif where == "cpu" and device == "cpu":
            why = "training runs on CPU, so this state is in CPU memory already"
        elif where == "nvme" and not Path(str(off.get("nvme_path", ""))).is_dir():
            why = f"nvme_path {off.get('nvme_path')!r} is not an existing directory on this machine"
        if why:
            zero.pop(key)
            notes.append(f"deepspeed.zero_optimization.{key} (device {where}) dropped: {why}")
        elif off.get("pin_memory") and device != "cuda":
            zero[key] = {**off, "pin_memory": False}
            notes.append(f"deepspeed.zero_optimization.{key}.pin_memory=true needs CUDA; using false")
    if zero or "zero_optimization" in ds:
        ds["zero_optimization"] = {**zero, "stage": stage}

    if has_moe and ds.pop("use_data_before_expert_parallel_", False):
        notes.append(
            "deepspeed.use_data_before_expert_parallel_=true dropped: dsv3ray's expert dispatch uses"
            " DeepSpeed's default expert-then-data rank layout"
        )

    # --- optimizer ---
    opt = ds.get("optimizer")
    if opt is None:
        ds["optimizer"] = opt = copy.deepcopy(DEFAULT_OPTIMIZER)
        notes.append(f"deepspeed.optimizer not set; using {opt['type']} {opt['params']}")
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise ConfigError("deepspeed.optimizer", opt, 'a table with `type` (e.g. "AdamW") and `params`')
    offloaded = bool((ds.get("zero_optimization") or {}).get("offload_optimizer"))
    if device == "cpu" and opt["type"].lower() in ("adam", "adamw") and not offloaded:
        # DeepSpeed's default Adam is FusedAdam (a CUDA kernel); torch's AdamW is the same math.
        opt["params"] = {**opt.get("params", {}), "torch_adam": True}
    _check_with_deepspeed(ds)
    return ds, notes


def _check_with_deepspeed(ds: dict[str, Any]) -> None:
    """Let DeepSpeed's own config parser judge every key now (on the driver, as one line), not in
    the workers' `deepspeed.initialize` as a traceback."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # train_batch_size left out: DeepSpeed derives it from the world size it sees, here maybe 1.
    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except AssertionError as e:
        raise UserError(
            f"deepspeed config rejected by DeepSpeed: {str(e).splitlines()[0]}: fix the [deepspeed] section"
        ) from None
    except Exception as e:
        if type(e).__name__ != "ValidationError":  # pydantic's, for a bad key or value
            raise
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(
            f"deepspeed config: {e.title} field {where!r}: {err['msg']} (got {err.get('input')!r}): fix the [deepspeed] section"
        ) from None


# --- the engine -----------------------------------------------------------------------------------

_VIEW_PREFIX = "deepspeed_moe.experts.deepspeed_experts."  # what DeepSpeed's expert checkpointing parses
_VIEW_NAME = "ds_moe"


@functools.cache
def deepspeed_moe_view_class() -> type:
    """`DeepSpeedMoEView`, built on first use: importing DeepSpeed takes seconds and prints, which
    config loading and the CLI should not pay."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEView(DeepSpeedMoE):
        """A parameter-less child of our `experts` module that DeepSpeed recognizes as an MoE layer.

        Holds no weights (MoE.__init__, which builds DeepSpeed's own gate and experts, is skipped);
        exposes the attributes the engine reads and this rank's expert slices for checkpointing.
        """

        def __init__(self, experts: torch.nn.Module, num_experts: int, ep_size: int):
            torch.nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = group_name(ep_size)
            self.enable_expert_tensor_parallelism = False
            object.__setattr__(self, "_experts", experts)  # not a submodule: its params are not ours

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by the engine: make sure DeepSpeed's expert / expert-data groups exist."""
            from deepspeed.utils import groups

            assert not use_data_before_expert_parallel_, (
                "our dispatch assumes DeepSpeed's default E+D topology"
            )
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(self.ep_size)

        def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
            if destination is not None or prefix or args:  # inside a parent's state_dict: contributes nothing
                return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
            # Called directly by DeepSpeed's save_checkpoint: local expert j as `...deepspeed_experts.{j}.*`.
            return {
                f"{_VIEW_PREFIX}{j}.{name}": getattr(self._experts, name)[j].detach()
                for j in range(self.num_local_experts)
                for name in ("gate_up_proj", "down_proj")
            }

    return DeepSpeedMoEView


def _stack_expert_views(module, state_dict, prefix, *_):
    """Load pre-hook of `experts`: DeepSpeed's per-expert tensors -> our stacked (e, ...) params."""
    view = f"{prefix}{_VIEW_NAME}.{_VIEW_PREFIX}"
    if not any(k.startswith(view) for k in state_dict):
        return
    e = getattr(module, _VIEW_NAME).num_local_experts
    for name in ("gate_up_proj", "down_proj"):
        state_dict[prefix + name] = torch.stack([state_dict.pop(f"{view}{j}.{name}") for j in range(e)])


def attach_deepspeed_moe(model: torch.nn.Module, ep: ExpertParallel) -> int:
    """Give every routed `experts` module its DeepSpeedMoEView; returns the number of MoE layers."""
    owners = {n.rsplit(".", 1)[0] for n in expert_parameters(model)}
    for path in sorted(owners):
        experts = model.get_submodule(path)
        if hasattr(experts, _VIEW_NAME):
            continue
        e = experts.gate_up_proj.shape[0]
        assert experts.down_proj.shape[0] == e
        owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        num_experts = getattr(owner, "num_experts", e * ep.ep_size)
        if num_experts != e * ep.ep_size:
            raise ValueError(
                f"{path} holds {e} of {num_experts} experts but ep_size={ep.ep_size}: build the model with the same ep"
            )
        experts.add_module(_VIEW_NAME, deepspeed_moe_view_class()(experts, e * ep.ep_size, ep.ep_size))
        experts.register_load_state_dict_pre_hook(_stack_expert_views)
    return len(owners)


STALE_BUILD_LOCK_S = 600.0  # the op DeepSpeed JIT-builds on CPU takes well under a minute


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove DeepSpeed op build locks older than `max_age_s`; the paths removed.

    `deepspeed.init_distributed` JIT-builds an op (torch cpp_extension) under a lock file that the
    builder removes when done; a process killed while holding it (a worker SIGKILLed during its
    build) leaves the file, and every later start on this machine waits on it forever. A build
    takes well under a minute, so a lock that old is one nobody will remove."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # (torch's own rule)
    removed = []
    for lock in Path(root).glob("*/deepspeed_*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                print(f"dsv3ray: removed a stale DeepSpeed op build lock {lock} (left by a killed build)")
        except FileNotFoundError:  # another worker removed it first
            pass
    return removed


def init_deepspeed_comm(backend: str) -> None:
    """`deepspeed.init_distributed` (over the existing torch.distributed group, or a new one), without
    the C++ op it would JIT-build on CPU.

    On DeepSpeed's CPU accelerator, init builds a shared-memory all-reduce op (torch cpp_extension)
    that only `inference_all_reduce` calls: DeepSpeed's inference path, never training, whose
    collectives go through torch.distributed (gloo) either way. Building it needs a C++ compiler
    (on a machine with only Python, init failed: "c++: not found") and took 25-37 s on a cold
    cache here (every new venv, container or CI clone). So on CPU it is marked unavailable for this
    process. Other accelerators build nothing at init."""
    import deepspeed
    import deepspeed.comm as ds_dist
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if ds_dist.is_initialized():
        return
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        shm = accel.create_op_builder("ShareMemCommBuilder")
        if shm is not None:  # (deepspeed.comm.torch.build_shm_op reads this table at init)
            deepspeed.ops.__compatible_ops__[shm.NAME] = False
    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _init_distributed(backend: str) -> None:
    """DeepSpeed needs a process group even for one process: create a 1-rank one if none exists."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    init_deepspeed_comm(backend)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@functools.cache  # once per process
def _quiet_deepspeed_noise() -> None:
    """Two lines every worker printed every run that say nothing a user can act on:
    - DeepSpeed's init reports progress at step 0 and so asks a scheduler that has not stepped
      yet for its lr ("Attempting to get learning rate from scheduler before it has started");
    - torch 2.13 deprecates `all_gather_into_tensor`, which DeepSpeed's ZeRO calls (a FutureWarning
      with its source line). Both are DeepSpeed's to change; the rest of their output stays."""
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.addFilter(_DropMessage("Attempting to get learning rate from scheduler before it has started"))
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`torch.distributed.all_gather_into_tensor` is deprecated"),
        category=FutureWarning,
    )


def build_engine(
    model: torch.nn.Module, ds_config: dict[str, Any], ep: ExpertParallel | None = None, *, lr_schedule=None
):
    """`deepspeed.initialize` over our model -> (engine, optimizer, lr_scheduler).

    `ds_config` is a resolved config (`resolve_deepspeed_config`). Routed-expert params are
    marked (allreduce=False, group_name=ep_size_{n}) and split into their own optimizer param
    groups (DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`), so ZeRO 1/2
    partitions them over the expert-data-parallel group. `lr_schedule`: a torch LR scheduler or a
    callable(optimizer) -> scheduler; or put DeepSpeed's `scheduler` (WarmupCosineLR, ...) in the config.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    _init_distributed("nccl" if get_accelerator().device_name() == "cuda" else "gloo")
    ep = ep or ExpertParallel()
    if mark_expert_params(model, ep):
        attach_deepspeed_moe(model, ep)
        stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
        assert stage != 3, "resolve_deepspeed_config moves MoE models to ZeRO stage 2"
    params = [p for p in model.parameters() if p.requires_grad]
    param_groups = split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "params"})
    param_groups = [g for g in param_groups if g["params"]]
    _quiet_deepspeed_noise()
    try:
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups, config=ds_config, lr_scheduler=lr_schedule
        )
    except Exception as e:
        # pydantic's ValidationError (a bad key/value in the [deepspeed] section) is a user error.
        if type(e).__name__ == "ValidationError":
            first = str(e).splitlines()
            raise UserError(
                f"deepspeed config is invalid: {' '.join(first[:3])}: fix the [deepspeed] section"
            ) from None
        raise
    return engine, optimizer, scheduler


# --- non-finite guard -----------------------------------------------------------------------------


def _local_gradients(engine) -> list[torch.Tensor]:
    """Every gradient tensor this rank holds after backward: module grads, ZeRO 1/2's reduced
    partitions, the bf16 optimizer's fp32 gradient partitions."""
    opt = engine.optimizer
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    averaged = getattr(opt, "averaged_gradients", None)
    if isinstance(averaged, dict):
        grads += [g for gs in averaged.values() if gs for g in gs if g is not None]
    grads += [g for g in getattr(opt, "fp32_groups_gradient_flat_partition", None) or [] if g is not None]
    return grads


def grads_are_finite(engine, loss: torch.Tensor | None = None, local_bad: bool = False) -> bool:
    """True when, on every rank, the loss (if given) and every gradient are finite and `local_bad`
    is False (a rank-local reason to skip, e.g. a non-finite micro-batch loss earlier in the
    accumulation).

    Call on EVERY rank, after `engine.backward` on the accumulation boundary and before
    `engine.step()` / `skip_step(engine)`: it is one MAX all-reduce over the world, so all ranks
    take the same decision (never short-circuit it behind a rank-local condition).
    """
    bad = torch.full((), float(local_bad), dtype=torch.float32, device=engine.device)
    if loss is not None:
        bad = bad + (~torch.isfinite(loss.detach().float())).float()
    for g in _local_gradients(engine):
        bad = bad + (~torch.isfinite(g)).any().float()
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


_MISSING = object()


def skip_step(engine) -> None:
    """Finish this step without updating the weights (use instead of `engine.step()` when
    `grads_are_finite` is False): gradients discarded, DeepSpeed's counters advance exactly as for
    its own overflow skip (`engine.skipped_steps` += 1, no LR-scheduler step, global_steps += 1)."""
    opt, saved = engine.optimizer, {}

    def shadow(name, value):
        saved[name] = opt.__dict__.get(name, _MISSING)
        setattr(opt, name, value)

    if hasattr(opt, "check_grad_overflow") and hasattr(opt, "has_overflow"):
        # ZeRO 1/2: take DeepSpeed's own overflow branch (clears partitions, buffers, micro-step id).
        shadow("check_grad_overflow", True)
        shadow("has_overflow", lambda *args, **kwargs: True)
    else:

        def discard(*args, **kwargs):
            for clear in ("clear_hp_grads", "clear_lp_grads"):  # bf16 optimizer's own grad buffers
                if hasattr(opt, clear):
                    getattr(opt, clear)()
            if not hasattr(opt, "clear_lp_grads"):
                opt.zero_grad(set_to_none=True)
            opt.overflow = True  # what DeepSpeed's engine reads to count a skipped step

        saved.setdefault("overflow", opt.__dict__.get("overflow", _MISSING))
        shadow("step", discard)
    try:
        engine.step()
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, value)
