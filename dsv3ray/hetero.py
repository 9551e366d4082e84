"""Heterogeneous workers and elastic resume.

Three pieces, each usable on its own by the training loop:

1. Placement (`HeteroConfig`, `scaling_config`): workers go to node types through Ray Train's
   `ScalingConfig(label_selector=..., accelerator_type=..., resources_per_worker=...)`, and
   `train.num_workers` may be a `[min, max]` pair (Ray Train v2 elastic worker group).
2. Batch balancing (`BatchBalancer`, `split_batch`, `micro_slices`, `loss_weight`, `CommTimer`):
   every step the trainer draws ONE global batch of G sample ids; rank r takes the slice
   `balancer.bounds(r)`, of n_r samples, n_r proportional to its measured throughput (samples per
   second of its own compute: step wall time minus time blocked in collectives). Each micro-batch
   loss is multiplied by `loss_weight(b, G, W, A) = b * W * A / G`, so DeepSpeed's mean over W ranks
   and A accumulation steps gives sum_r sum_m b_m * mean_m / G = the mean over the global batch:
   the same gradient (and update) as an equal split, whatever the split. Every rank runs the same
   number of micro steps (A), so EP all-to-alls and ZeRO reductions stay in lockstep; a rank's
   micro-batches just differ in size. The split changes only when the predicted step time improves
   by more than `rebalance_threshold` (hysteresis). Cost model per rank, fitted on its last
   `window` steps: t_r = a_r + b_r n_r (a fixed per-step cost: optimizer step, per-micro-step
   overheads; without it a rank given few samples looks slow per sample and the split spirals).
3. Elastic checkpoints (`save_elastic`, `load_elastic`): a consolidated copy of the model and
   optimizer state keyed by parameter name and GLOBAL expert id, independent of the data-parallel
   and expert-parallel layout that wrote it. DeepSpeed's own ZeRO files are per dp rank (and per
   expert-data-parallel rank for experts), so they load only at the same layout; DeepSpeed's
   `elastic_checkpoint` re-partitions flat ZeRO buffers by concatenation, which is wrong for expert
   groups once EP changes (an EP=2 rank's flat expert buffer holds experts [r*e, (r+1)*e) of every
   layer in a row). Layout of `<ckpt>/elastic/`:

       meta.json                 {version, world_size, ep_size, num_experts, step, expert_files}
       dense.pt                  (rank 0) fp32 values + optimizer state of every non-expert
                                 parameter, buffers, optimizer scalars (Adam's step), param-group
                                 hyper-parameters, LR-scheduler state, engine counters
       experts_{lo:05d}_{hi:05d}.pt  (one rank per EP shard) fp32 values + optimizer state of the
                                 routed experts [lo, hi) of every layer, as (hi-lo, ...) stacks

   The full fp32 values and optimizer states come from DeepSpeed's fragment API
   (`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`: ZeRO 1/2 and the bf16
   optimizer), or straight from the torch optimizer without ZeRO. Memory: rank 0 holds one fp32
   copy of the dense parameters and their optimizer state while saving (experts stay sharded).
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3ray.errors import ConfigError, UserError

# --- placement --------------------------------------------------------------------------------


@dataclass
class HeteroConfig:
    """[hetero]: where workers run and how the global batch is split between them."""

    balance: bool = True  # split the global batch by measured throughput (False: equal split)
    warmup_steps: int = 1  # steps not measured at all (first-step JIT/allocation noise)
    measure_steps: int = 2  # measured steps at the equal split before the first re-split
    window: int = 8  # recent steps the per-rank cost model is fitted on (drift ages out)
    rebalance_threshold: float = 0.1  # re-split only if the predicted step time drops by > 10%
    # Ray Train placement: one selector for all workers, or one per worker (length = max workers),
    # e.g. [{"ray.io/accelerator-type" = "H100"}, {"ray.io/accelerator-type" = "A10G"}]
    label_selector: list[dict] | dict | None = None
    accelerator_type: str = ""  # e.g. "H100": all workers on nodes with this accelerator
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {"CPU" = 8, "memory" = 6e10}

    def __post_init__(self):
        if self.warmup_steps < 0 or self.measure_steps < 1:
            raise ConfigError(
                "hetero.measure_steps" if self.measure_steps < 1 else "hetero.warmup_steps",
                self.measure_steps if self.measure_steps < 1 else self.warmup_steps,
                "warmup_steps >= 0 and measure_steps >= 1",
            )
        if self.window < 2:
            raise ConfigError("hetero.window", self.window, "an integer >= 2")
        if not 0.0 <= self.rebalance_threshold < 1.0:
            raise ConfigError("hetero.rebalance_threshold", self.rebalance_threshold, "a number in [0, 1)")
        selectors = self.label_selector if isinstance(self.label_selector, list) else [self.label_selector]
        for s in selectors:
            if s is not None and not (
                isinstance(s, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in s.items())
            ):
                raise ConfigError(
                    "hetero.label_selector", self.label_selector, "a table of string labels or a list of them"
                )
        for k, v in self.resources_per_worker.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"hetero.resources_per_worker.{k}", v, "a number >= 0")


def parse_num_workers(value) -> tuple[int, int]:
    """`train.num_workers`: an int n (fixed, = (n, n)) or a [min, max] pair (elastic)."""
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        lo, hi = value
    else:
        raise ConfigError("train.num_workers", value, "an integer >= 1 or a [min, max] pair of them")
    if not 1 <= lo <= hi:
        raise ConfigError("train.num_workers", value, "1 <= min <= max")
    return lo, hi


def elastic_ep_size(requested: int, world_size: int, num_experts: int) -> int:
    """The EP size for a worker group of `world_size` (elastic: it changes between restarts): the
    largest size <= `requested` that divides both the world size and the routed experts."""
    return max(
        d for d in range(1, min(requested, world_size) + 1) if world_size % d == 0 and num_experts % d == 0
    )


def scaling_config_kwargs(num_workers, use_gpu: bool, cpus_per_worker: float, cfg: HeteroConfig) -> dict:
    """Keyword arguments for Ray Train v2's `ScalingConfig` (kept as a dict so tests need no Ray)."""
    lo, hi = parse_num_workers(num_workers)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **cfg.resources_per_worker}
    kwargs = {
        "num_workers": lo if lo == hi else (lo, hi),
        "use_gpu": use_gpu,
        "resources_per_worker": resources,
    }
    if isinstance(cfg.label_selector, list):
        if len(cfg.label_selector) != hi:
            raise ConfigError(
                "hetero.label_selector",
                cfg.label_selector,
                f"one selector for all workers or exactly {hi} (the maximum number of workers)",
            )
        kwargs["label_selector"] = [dict(s) for s in cfg.label_selector]
    elif cfg.label_selector is not None:
        kwargs["label_selector"] = dict(cfg.label_selector)
    if cfg.accelerator_type:
        kwargs["accelerator_type"] = cfg.accelerator_type
    return kwargs


def scaling_config(num_workers, use_gpu: bool, cpus_per_worker: float, cfg: HeteroConfig):
    """`ray.train.ScalingConfig` for this run (Ray's own checks apply, e.g. selector list length)."""
    import ray.train

    return ray.train.ScalingConfig(**scaling_config_kwargs(num_workers, use_gpu, cpus_per_worker, cfg))


# --- batch balancing --------------------------------------------------------------------------


def split_batch(
    total: int, rates: list[float], min_each: int = 1, fixed_s: list[float] | None = None
) -> list[int]:
    """Split `total` samples so that the slowest rank's time max_r (fixed_s[r] + n_r / rates[r])
    is smallest (n_r proportional to rates[r] when there is no fixed cost); every rank gets at
    least `min_each`. Deterministic (ties go to the lower rank)."""
    W = len(rates)
    if total < W * min_each:
        raise UserError(
            f"global batch {total} is smaller than {W} workers x {min_each} samples each: raise the batch size"
        )
    assert all(r > 0 and math.isfinite(r) for r in rates), rates
    fixed = fixed_s or [0.0] * W
    counts = [min_each] * W
    # Greedy: each next sample goes to the rank that would finish it first. Optimal for min-max
    # of increasing per-rank costs.
    heap = [(fixed[r] + (min_each + 1) / rates[r], r) for r in range(W)]
    heapq.heapify(heap)
    for _ in range(total - W * min_each):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        heapq.heappush(heap, (fixed[r] + (counts[r] + 1) / rates[r], r))
    return counts


def micro_slices(n: int, grad_accum: int) -> list[tuple[int, int]]:
    """This rank's n samples as `grad_accum` contiguous micro-batches of near-equal size (>= 1 each)."""
    assert n >= grad_accum >= 1, (n, grad_accum)
    bounds, start = [], 0
    for m in range(grad_accum):
        stop = start + n // grad_accum + (1 if m < n % grad_accum else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def loss_weight(n_micro: int, n_global: int, world_size: int, grad_accum: int = 1) -> float:
    """Factor for a micro-batch's mean loss so that DeepSpeed's mean over ranks and accumulation
    steps equals the mean over the global batch: n_micro * world_size * grad_accum / n_global.
    n_* count samples (or label tokens when rows differ in length)."""
    return n_micro * world_size * grad_accum / n_global


class BatchBalancer:
    """Plain, deterministic: every rank holds one and feeds it the same all-gathered measurements,
    so all ranks agree on the split without another message. `state_dict` makes it resumable."""

    def __init__(
        self, world_size: int, global_batch: int, cfg: HeteroConfig | None = None, min_each: int = 1
    ):
        self.cfg = cfg or HeteroConfig()
        self.world_size, self.global_batch, self.min_each = world_size, global_batch, min_each
        self.split = split_batch(global_batch, [1.0] * world_size, min_each)
        self.history: list[list[tuple[int, float]]] = [[] for _ in range(world_size)]  # (n, seconds)
        self.model: list[tuple[float, float]] | None = None  # per rank (fixed s, s per sample)
        self.observed = 0
        self.rebalances = 0

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice of the global batch."""
        start = sum(self.split[:rank])
        return start, start + self.split[rank]

    def predicted_step_s(self, split: list[int] | None = None) -> float:
        assert self.model is not None
        return max(a + b * n for n, (a, b) in zip(split or self.split, self.model))

    def efficiency(self) -> float:
        """Predicted throughput of the current split over the ideal: the sum of the ranks'
        throughputs n_r / t_r, each as if it never waited for the others."""
        if self.model is None:
            return 1.0
        ideal = sum(n / (a + b * n) for n, (a, b) in zip(self.split, self.model))
        return self.global_batch / self.predicted_step_s() / ideal

    @staticmethod
    def _fit(obs: list[tuple[int, float]]) -> tuple[float, float]:
        """Least squares t = a + b n over the window; proportional (a = 0) while n never varied
        or when noise makes the fit unphysical."""
        ns = [float(n) for n, _ in obs]
        ts = [t for _, t in obs]
        proportional = (0.0, sum(ts) / sum(ns))
        mn, mt = sum(ns) / len(ns), sum(ts) / len(ts)
        var = sum((n - mn) ** 2 for n in ns)
        if var == 0:
            return proportional
        b = sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / var
        a = mt - b * mn
        return (a, b) if b > 0 and 0 <= a < min(ts) else proportional

    def observe(self, counts: list[int], compute_s: list[float]) -> bool:
        """One step's per-rank sample counts and compute seconds; True when the split changed."""
        assert len(counts) == len(compute_s) == self.world_size
        self.observed += 1
        if self.observed <= self.cfg.warmup_steps:
            return False
        for h, n, t in zip(self.history, counts, compute_s):
            h.append((int(n), max(float(t), 1e-9)))
            del h[: -self.cfg.window]
        self.model = [self._fit(h) for h in self.history]
        if not self.cfg.balance or self.observed < self.cfg.warmup_steps + self.cfg.measure_steps:
            return False
        proposal = split_batch(
            self.global_batch, [1.0 / b for _, b in self.model], self.min_each, [a for a, _ in self.model]
        )
        if proposal == self.split:
            return False
        if self.predicted_step_s(proposal) < (1.0 - self.cfg.rebalance_threshold) * self.predicted_step_s():
            self.split = proposal
            self.rebalances += 1
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "split": list(self.split),
            "history": [list(h) for h in self.history],
            "observed": self.observed,
            "rebalances": self.rebalances,
        }

    def load_state_dict(self, state: dict) -> bool:
        """Restore; False (and keep the fresh equal split, to be re-measured) when the world size
        or global batch changed: old per-rank timings say nothing about the new workers."""
        if state["world_size"] != self.world_size or state["global_batch"] != self.global_batch:
            return False
        self.split = list(state["split"])
        self.history = [[(int(n), float(t)) for n, t in h] for h in state["history"]]
        self.model = [self._fit(h) for h in self.history] if all(self.history) else None
        self.observed, self.rebalances = state["observed"], state["rebalances"]
        return True


_COLLECTIVES = (
    "all_reduce",
    "all_to_all_single",
    "all_to_all",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
)


class _TimedWork:
    """An async collective's handle whose wait() is charged to the timer."""

    def __init__(self, work, timer: CommTimer):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        t0 = self._timer._now()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.seconds += self._timer._now() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommTimer:
    """`with CommTimer() as t: ...` -> t.seconds spent inside torch.distributed collectives
    (DeepSpeed's comm and our EP all-to-all call them by attribute, so they are seen too).

    A rank's compute time = wall time - t.seconds: the time it would take without waiting for the
    slower ranks. On CUDA (`sync_device`), the device is synchronized around each collective so
    queued kernels count as compute and the wait for the peers as communication; that costs a
    little, so the trainer times only the steps the balancer measures.
    """

    def __init__(self, sync_device: bool = False):
        self.sync_device = sync_device and torch.cuda.is_available()
        self.seconds = 0.0
        self._saved: dict = {}

    def _now(self) -> float:
        if self.sync_device:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = self._now()
            out = fn(*args, **kwargs)
            self.seconds += self._now() - t0
            return _TimedWork(out, self) if kwargs.get("async_op") and out is not None else out

        return timed

    def __enter__(self) -> CommTimer:
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


def gather_measurements(n_local: int, compute_s: float, device=None) -> tuple[list[int], list[float]]:
    """All ranks' (samples, compute seconds) of this step, in rank order (one small all-gather)."""
    mine = torch.tensor([float(n_local), compute_s], dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [n_local], [compute_s]
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t[0]) for t in out], [float(t[1]) for t in out]


# --- elastic checkpoints ------------------------------------------------------------------------

ELASTIC_DIR = "elastic"
_VERSION = 1
_HYPER = ("lr", "betas", "eps", "weight_decay", "momentum", "initial_lr")


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the torch optimizer here


def _uses_fragments(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping")  # ZeRO 1/2 and DeepSpeed's bf16 optimizer


def _check_supported(engine) -> None:
    if engine.zero_optimization_stage() == 3:
        raise UserError(
            "elastic checkpoints support ZeRO stage 0-2 (MoE models cannot use stage 3): set deepspeed.zero_optimization.stage <= 2"
        )
    if engine.fp16_enabled() and not engine.zero_optimization():
        raise UserError(
            "elastic checkpoints need ZeRO stage 1/2 with fp16: set deepspeed.zero_optimization.stage = 1 or 2"
        )


def _optimizer_layout(engine) -> tuple[list[str], dict[str, float]]:
    """(per-parameter state keys, scalar state) of the torch optimizer; ([], {}) before its first step."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for q in group["params"]:
            st = base.state.get(q)
            if st:
                keys = sorted(
                    k for k, v in st.items() if torch.is_tensor(v) and v.shape == q.shape and v.dim() > 0
                )
                scalars = {
                    k: float(v)
                    for k, v in st.items()
                    if k not in keys and (torch.is_tensor(v) or isinstance(v, int | float))
                }
                return keys, scalars
    return [], {}


def _full(engine, p, key: str | None) -> torch.Tensor:
    """The full fp32 value (key None) or optimizer state of parameter p (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _uses_fragments(p):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:
        t = p.detach() if key is None else _base_optimizer(engine).state[p][key]
    return t.detach().to("cpu", torch.float32).clone()


def _is_writer(group) -> bool:
    """One rank per shard writes: rank 0 of the given group (or of the world)."""
    if not dist.is_initialized():
        return True
    return dist.get_rank(group=group) == 0


def save_elastic(engine, ckpt_dir: str | Path, ep=None, client_state: dict | None = None) -> Path:
    """Write `<ckpt_dir>/elastic/` (see the module docstring). Call on every rank, same order.

    `ep` is this rank's ExpertParallel (None = all experts local). `client_state` (rank 0) is
    stored in dense.pt and returned by `load_elastic`.
    """
    from dsv3ray.parallel import ExpertParallel, expert_parameters

    _check_supported(engine)
    ep = ep or ExpertParallel()
    model = engine.module
    root = Path(ckpt_dir) / ELASTIC_DIR
    root.mkdir(parents=True, exist_ok=True)
    keys, scalars = _optimizer_layout(engine)
    if keys:
        _relink_fragments(engine)
    experts = set(expert_parameters(model))
    rank0 = _is_writer(None)
    write_experts = _is_writer(ep.edp_group) if ep.edp_group is not None else rank0
    dense, shard = {}, {}
    num_experts = None
    for name, p in model.named_parameters():
        entry = {"param": _full(engine, p, None), **{k: _full(engine, p, k) for k in keys}}
        if name in experts:
            num_experts = p.shape[0] * ep.ep_size
            shard[name] = entry
        else:
            dense[name] = entry
    first = None
    if experts:
        local = ep.local_experts(num_experts)
        first, last = local.start, local.stop
        if write_experts:
            torch.save(shard, root / f"experts_{first:05d}_{last:05d}.pt")
    if rank0:
        base = _base_optimizer(engine)
        param_names = {n for n, _ in model.named_parameters()}
        groups = {}
        for g in base.param_groups:
            groups.setdefault(bool(g.get("moe", False)), {k: g[k] for k in _HYPER if k in g})
        sched = getattr(engine, "lr_scheduler", None)
        torch.save(
            {
                "params": dense,
                "buffers": {
                    n: b.detach().cpu().clone()
                    for n, b in model.state_dict().items()
                    if n not in param_names and torch.is_tensor(b) and ".ds_moe." not in n
                },
                "optim_keys": keys,
                "optim_scalars": scalars,
                "param_groups": groups,
                "lr_scheduler": sched.state_dict()
                if sched is not None and hasattr(sched, "state_dict")
                else None,
                "engine": {
                    "global_steps": engine.global_steps,
                    "global_samples": engine.global_samples,
                    "skipped_steps": engine.skipped_steps,
                },
                "client_state": client_state or {},
            },
            root / "dense.pt",
        )
        world = dist.get_world_size() if dist.is_initialized() else 1
        e = num_experts // ep.ep_size if experts else 0
        files = (
            {f"experts_{r * e:05d}_{(r + 1) * e:05d}.pt": [r * e, (r + 1) * e] for r in range(ep.ep_size)}
            if experts
            else {}
        )
        meta = {
            "version": _VERSION,
            "world_size": world,
            "ep_size": ep.ep_size,
            "num_experts": num_experts or 0,
            "step": engine.global_steps,
            "expert_files": files,
        }
        (root / "meta.json").write_text(json.dumps(meta, indent=1))
    if dist.is_initialized():
        dist.barrier()  # every shard is on disk before anyone reports the checkpoint
    return root


def read_elastic_meta(ckpt_dir: str | Path) -> dict | None:
    p = Path(ckpt_dir) / ELASTIC_DIR / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _read_experts(root: Path, meta: dict, local: range) -> dict[str, dict[str, torch.Tensor]]:
    """{param name: {"param"/state key: (len(local), ...)}} for the global experts in `local`."""
    pieces: dict[str, dict[str, list]] = {}
    for fname, (lo, hi) in sorted(meta["expert_files"].items(), key=lambda kv: kv[1][0]):
        a, b = max(lo, local.start), min(hi, local.stop)
        if a >= b:
            continue
        shard = torch.load(root / fname, map_location="cpu", weights_only=True)
        for name, entry in shard.items():
            for key, t in entry.items():
                pieces.setdefault(name, {}).setdefault(key, []).append(t[a - lo : b - lo])
    out = {n: {k: torch.cat(v) for k, v in d.items()} for n, d in pieces.items()}
    for n, d in out.items():
        assert d["param"].shape[0] == len(local), f"{n}: experts {local} not all found in {root}"
    return out


def _relink_fragments(engine) -> None:
    """Point DeepSpeed's per-parameter optimizer-state views at the current state. ZeRO 1/2 links
    them after the step of the FIRST param group, when the expert groups have no state yet, and
    never again: without this, expert params have no `exp_avg` view (DeepSpeed 0.19)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _init_optimizer_state(engine, keys: list[str], scalars: dict[str, float]) -> None:
    """Create the torch optimizer's state (zeros + the saved scalars, e.g. Adam's step) for every
    parameter it holds, then let DeepSpeed re-link its fragment views onto it."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for q in group["params"]:
            st = {k: torch.zeros_like(q, memory_format=torch.preserve_format) for k in keys}
            st.update({k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()})
            base.state[q] = st
    _relink_fragments(engine)


def load_elastic(engine, ckpt_dir: str | Path, ep=None, load_optimizer_states: bool = True) -> dict:
    """Restore weights, buffers, optimizer state, LR schedule and engine counters written by
    `save_elastic` at ANY world size / EP size; returns the saved client_state. Every rank calls it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from dsv3ray.parallel import ExpertParallel, expert_parameters

    _check_supported(engine)
    ep = ep or ExpertParallel()
    root = Path(ckpt_dir) / ELASTIC_DIR
    meta = read_elastic_meta(ckpt_dir)
    if meta is None or meta.get("version") != _VERSION:
        raise UserError(
            f"{ckpt_dir} holds no elastic checkpoint ({root}/meta.json): resume it at its own worker and EP sizes"
        )
    from dsv3ray.checkpoint import load_state_file  # weights_only=True, numpy arrays allow-listed

    dense = load_state_file(root / "dense.pt")
    model = engine.module
    experts = set(expert_parameters(model))
    E = meta["num_experts"]
    if experts:
        any_expert = model.get_parameter(next(iter(experts)))
        if any_expert.shape[0] * ep.ep_size != E:
            raise UserError(
                f"checkpoint {ckpt_dir} has {E} routed experts, the model {any_expert.shape[0] * ep.ep_size}: resume with the same model config"
            )
    shard = _read_experts(root, meta, ep.local_experts(E)) if experts else {}
    keys = dense["optim_keys"] if load_optimizer_states else []
    if keys:
        _init_optimizer_state(engine, keys, dense["optim_scalars"])
    base = _base_optimizer(engine)
    with torch.no_grad():
        for name, p in model.named_parameters():
            entry = shard[name] if name in experts else dense["params"].get(name)
            if entry is None:
                raise UserError(
                    f"checkpoint {ckpt_dir} has no parameter {name}: resume with the same model config"
                )
            value = entry["param"].to(p.device)
            if value.shape != p.shape:
                raise UserError(
                    f"checkpoint {ckpt_dir}: {name} has shape {tuple(value.shape)}, the model {tuple(p.shape)}: resume with the same model config"
                )
            p.data.copy_(value.to(p.dtype))
            if _uses_fragments(p):
                safe_set_full_fp32_param(p, value)
            for k in keys:
                if _uses_fragments(p):
                    safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
                else:
                    base.state[p][k].copy_(entry[k].to(p.device))
        for name, b in model.named_buffers():
            if name in dense["buffers"]:
                b.copy_(dense["buffers"][name].to(b.device, b.dtype))
    if load_optimizer_states:
        for g in base.param_groups:
            g.update(dense["param_groups"].get(bool(g.get("moe", False)), {}))
        sched = getattr(engine, "lr_scheduler", None)
        if sched is not None and dense["lr_scheduler"] is not None:
            sched.load_state_dict(dense["lr_scheduler"])
        c = dense["engine"]
        engine.global_steps, engine.global_samples = c["global_steps"], c["global_samples"]
        engine.skipped_steps = c["skipped_steps"]
        engine.micro_steps = c["global_steps"] * engine.gradient_accumulation_steps()
    return dense["client_state"]
