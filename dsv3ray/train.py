"""Training on Ray Train + DeepSpeed.

The driver (`train`) validates the run, prepares data if needed, starts (or joins) Ray, creates
the curriculum sampler actor and runs a Ray Train `TorchTrainer`; each worker (`train_loop`)
builds a DeepSpeed engine over our DeepSeek-V3 model and runs the step loop.
"""

from __future__ import annotations

import math
import os
import random
import re
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsv3ray import checkpoint as ckpt
from dsv3ray.data import (
    PreparedData,
    hold_tables,
    load_table,
    release_table,
    resolve_data,
    size_text,
    table_spec,
)
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.hetero import (
    BatchBalancer,
    CommTimer,
    HeteroConfig,
    elastic_ep_size,
    load_elastic,
    loss_weight,
    micro_slices,
    parse_num_workers,
    read_elastic_meta,
    save_elastic,
    scaling_config,
)
from dsv3ray.malloc import worker_env
from dsv3ray.report import write_report

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    name: str = "run"
    run_dir: str = ""  # "" = runs/<name>-<timestamp>
    # n (fixed) or [min, max] (elastic: Ray Train starts as many as the cluster fits, restarts
    # resize the group; the global batch stays micro_batch_size x grad_accum x max)
    num_workers: int | list[int] = 2
    ep_size: int = 1
    use_gpu: bool = False
    steps: int = 100
    tokens: int = 0  # > 0: train this many tokens instead (steps derived from the global batch)
    micro_batch_size: int = 4  # sequences per worker per micro step
    grad_accum: int = 1
    dtype: str = "fp32"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False
    max_bad_steps: int = 3  # K consecutive non-finite steps stop the run
    resume: str = "auto"  # "auto" (latest in run_dir) | "never" | path to a checkpoint dir
    max_failures: int = 2  # worker-group restarts Ray Train may do
    corrupt_shard: str = "fail"  # "fail" | "skip": a bad checkpoint/data shard stops or is skipped
    # Test-only fault hooks: NaN-inject these steps' loss; SIGKILL a worker at a step / mid-checkpoint.
    inject_nan_steps: list[int] = field(default_factory=list)
    kill_at_step: int = 0
    kill_in_checkpoint_step: int = 0

    def __post_init__(self):
        parse_num_workers(self.num_workers)  # ConfigError("train.num_workers", ...) on a bad value/pair
        for key in (
            "ep_size",
            "micro_batch_size",
            "grad_accum",
            "log_every",
            "keep_checkpoints",
            "max_bad_steps",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", getattr(self, key), "an integer >= 1")
        for key in (
            "steps",
            "tokens",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "max_failures",
            "seed",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}", getattr(self, key), "an integer >= 0")
        if self.steps == 0 and self.tokens == 0:
            raise ConfigError("train.steps", self.steps, "set train.steps or train.tokens > 0")
        if self.max_workers % self.ep_size:
            # a smaller elastic world uses the largest EP size it supports (hetero.elastic_ep_size)
            raise ConfigError(
                "train.ep_size",
                self.ep_size,
                f"must divide train.num_workers={self.max_workers}"
                + (" (the maximum)" if self.elastic else ""),
            )
        if self.dtype not in DTYPES:
            raise ConfigError("train.dtype", self.dtype, " | ".join(DTYPES))
        if self.corrupt_shard not in ("fail", "skip"):
            raise ConfigError("train.corrupt_shard", self.corrupt_shard, '"fail" or "skip"')
        if not self.resume:
            raise ConfigError("train.resume", self.resume, '"auto", "never" or a checkpoint directory')

    @property
    def min_workers(self) -> int:
        return parse_num_workers(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        """What resources, the EP check and the global batch are sized for."""
        return parse_num_workers(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


def ds_config_for_world(ds_config: dict, global_batch: int, world_size: int) -> dict:
    """The DeepSpeed config for the group Ray actually started (elastic: <= max workers).

    DeepSpeed asserts train_batch_size == micro x grad_accum x world. The global batch of the
    run (G, sized for the max workers) stays fixed; each rank takes G / world samples per step
    in grad_accum micro-batches. When that divides evenly DeepSpeed's micro size is exact and
    train_batch_size = G (its sample counters match the run's); otherwise it is the largest
    slice, rounded up: the numbers are nominal there, the loss weights (hetero.loss_weight) keep
    the update equal to the mean over the G samples either way.
    """
    ds = dict(ds_config)
    gas = int(ds["gradient_accumulation_steps"])
    micro = max(1, math.ceil(global_batch / (gas * world_size)))
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["train_batch_size"] = micro * gas * world_size
    return ds


# --- driver --------------------------------------------------------------------------------------


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve()
    return (Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def _print_env() -> dict[str, str]:
    """Ray Train V2 replaces `print` in its workers; where `sys.stdout` is redirected (Ray's own
    worker process does that) its print writes the line and logs it too, so every line a worker
    printed (our step lines, DeepSpeed's) reached the driver twice. Off unless the user set it."""
    key = "RAY_TRAIN_ENABLE_PRINT_PATCH"
    return {} if key in os.environ else {key: "0"}


def _value(x) -> float:
    """A loss as a Python float (a tensor that requires grad: detached first, as torch asks)."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _init_ray(cfg: TrainConfig) -> None:
    """Join the cluster under `ray job submit` / RAY_ADDRESS, else start a local Ray sized for the run."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # Logical CPUs: one per worker plus one for Ray Data and the sampler (CPUs may be oversubscribed).
    num_cpus = max(os.cpu_count() or 1, cfg.max_workers + 1)
    # address="local": a new Ray for this run, even if some `ray start` cluster runs on this machine.
    # With the dashboard (None: where its packages are installed, as with ray[default]): Ray Train's
    # placement-group cleaner asks the State API (served by the dashboard) every second whether the
    # controller lives; without it, it warned each time.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=None if cfg.use_gpu else 0,
        include_dashboard=None,
        log_to_driver=True,
    )


def _cpus_per_worker(cfg: TrainConfig) -> float:
    """One CPU per worker, less when the cluster is smaller (leave one CPU for Ray Data reads)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    n = cfg.max_workers  # sized so the largest group fits; a smaller elastic group fits too
    return max(0.1, min(1.0, (total - 1.0) / n)) if total - 1.0 < n else 1.0


def _first_user_error(exc: BaseException) -> UserError | None:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values())
        stack.append(getattr(e, "controller_failure", None))
        stack.append(getattr(e, "cause", None))
    return None


def plan(run) -> dict:
    """Everything checked and derived before any worker starts (user errors are one line here)."""
    from dsv3ray.engine import resolve_deepspeed_config
    from dsv3ray.model import activation_ratio, count_params
    from dsv3ray.parallel import check_ep_size

    cfg: TrainConfig = run.train
    model_cfg = run.model
    if not run.data.prepared and not run.data.inputs:
        raise ConfigError(
            "data.prepared",
            run.data.prepared,
            "set data.prepared to a prepared directory or data.inputs to raw input files",
        )
    check_ep_size(cfg.ep_size, model_cfg.n_routed_experts, cfg.max_workers)
    run_dir = resolve_run_dir(cfg)
    ckpt_root = run_dir / "checkpoints"
    if cfg.resume == "never" and ckpt.list_checkpoints(ckpt_root):
        raise UserError(
            f'run directory {run_dir} already holds checkpoints and train.resume = "never": choose another train.run_dir or set train.resume = "auto"'
        )
    resume_from = None
    if cfg.resume not in ("auto", "never"):
        p = Path(cfg.resume).expanduser().resolve()
        if not p.is_dir():
            raise ConfigError(
                "train.resume", cfg.resume, '"auto", "never" or an existing checkpoint directory'
            )
        resume_from = str(p)
    spent_before = _spent_before_start(cfg, ckpt_root, resume_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.data.prepared:
        _init_ray(cfg)  # preparing raw inputs runs on Ray Data: start (or join) Ray first
    data = resolve_data(run.data, getattr(run, "prepare", None), run_dir, cfg.corrupt_shard)
    seq_len = int(data.meta["seq_len"])
    if int(data.meta["vocab_size"]) > model_cfg.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            model_cfg.vocab_size,
            f"at least the tokenizer's vocab_size={data.meta['vocab_size']} (from {data.dir}/meta.json)",
        )
    if seq_len + 1 > model_cfg.max_position_embeddings:
        raise ConfigError(
            "model.max_position_embeddings",
            model_cfg.max_position_embeddings,
            f"at least seq_len + 1 = {seq_len + 1} (the prepared rows)",
        )
    # Fixed for the run at the MAX worker count: a smaller elastic group takes larger slices of the
    # same global batch (BatchBalancer), so a step's math does not depend on the group size.
    global_batch = cfg.micro_batch_size * cfg.grad_accum * cfg.max_workers
    steps = cfg.steps if cfg.tokens == 0 else max(1, math.ceil(cfg.tokens / (global_batch * seq_len)))
    ds_config, notes = resolve_deepspeed_config(
        dict(run.deepspeed),
        device="cuda" if cfg.use_gpu else "cpu",
        has_moe=model_cfg.n_routed_experts > 0 and model_cfg.num_moe_layers > 0,
        world_size=cfg.max_workers,  # re-fitted to the actual group size in each worker
        micro_batch_size=cfg.micro_batch_size,
        grad_accum=cfg.grad_accum,
        dtype=cfg.dtype,
    )
    for note in notes:
        print(f"[dsv3ray] {note}", flush=True)
    total, activated = count_params(model_cfg)
    return {
        "run_dir": str(run_dir),
        "ckpt_root": str(ckpt_root),
        "resume_from": resume_from,
        "spent_before": spent_before,  # the spend of the checkpoint the first start resumes from
        "data": data,
        "seq_len": seq_len,
        "global_batch": global_batch,
        "steps": steps,
        "ds_config": ds_config,
        "params_total": total,
        "params_activated": activated,
        "activation_ratio": activation_ratio(model_cfg),
    }


def train(run) -> dict:
    """Run training for a resolved run config; returns the summary (also in run_dir/report.json)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.teacher import start_teacher_pool, stop_teacher_pool
    from pipelines.dataset import quiet_ray_data_console, read_prepared
    from pipelines.sampler import CurriculumSampler

    cfg: TrainConfig = run.train
    p = plan(run)
    run_dir = Path(p["run_dir"])
    data: PreparedData = p["data"]
    print(
        f"[dsv3ray] run directory {run_dir}; {p['steps']} steps x {p['global_batch']} sequences x {p['seq_len']} tokens",
        flush=True,
    )
    _init_ray(cfg)
    total_samples = p["steps"] * p["global_batch"]
    sampler = ray.remote(num_cpus=0)(CurriculumSampler).remote(
        data.num_train, cfg.seed, getattr(run, "curriculum", None), total_samples
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    loud = quiet_ray_data_console()
    # Read once here; every worker then copies the same blocks out of the object store.
    try:
        datasets = {
            "train": read_prepared(data.dir, "train", files=data.train_files).materialize(),
        }
        eval_on_train = run.data.eval_split == "train"  # evaluates on training rows (a memorization check)
        if not eval_on_train:
            datasets["eval"] = read_prepared(data.dir, "eval", files=data.eval_files).materialize()
    finally:
        loud()
    mailbox = ray.remote(num_cpus=0)(Mailbox).remote()
    loop_config = {
        "mailbox": mailbox,
        "train": cfg,
        "model": run.model,
        "ds_config": p["ds_config"],
        "sampler": sampler,
        "run_dir": str(run_dir),
        "ckpt_root": p["ckpt_root"],
        "resume_from": p["resume_from"],
        "steps": p["steps"],
        "seq_len": p["seq_len"],
        # where each worker keeps the splits' id -> tokens tables ([data] table)
        "tables": {
            split: table_spec(run.data, data, split, p["seq_len"] + 1)
            for split in ("train", *(() if eval_on_train else ("eval",)))
        },
        "eval_on_train": eval_on_train,
        "global_batch": p["global_batch"],
        "activation_ratio": p["activation_ratio"],
        "cpus_per_worker": 0.0,
        # running cost (GPU-hours, kWh, money so far) priced from the device catalog
        "cost": getattr(run, "cost", None),
        "cost_device": _cost_device(run),
    }
    for spec in loop_config["tables"].values():
        if spec.disk:
            where = spec.table_dir or "the system temp dir"
            print(
                f"[dsv3ray] {spec.split} table on disk ({size_text(spec.nbytes)}, data.table = {run.data.table!r}):"
                f" one memory-mapped file per node under {where}, shared by the node's workers and its other runs on this data",
                flush=True,
            )
    # [distill]: teacher actors start before the workers; their handles travel in the loop config
    distill = getattr(run, "distill", None)
    teachers = []
    if distill is not None and distill.enabled:
        teachers = start_teacher_pool(distill, student_vocab_size=run.model.vocab_size)
    loop_config.update(distill=distill, teachers=teachers)
    cpus = 1.0 if cfg.use_gpu else _cpus_per_worker(cfg)
    loop_config["cpus_per_worker"] = cpus
    hetero = getattr(run, "hetero", None) or HeteroConfig()
    loop_config["hetero"] = hetero
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        # label_selector / accelerator_type / extra resources per worker from [hetero]
        scaling_config=scaling_config(cfg.num_workers, cfg.use_gpu, cpus, hetero),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # At least 2: a newest checkpoint found incomplete on load never leaves zero valid ones.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(2, cfg.keep_checkpoints)),
            # glibc keeps freed tensors' memory for the next step (dsv3ray.malloc); one copy of each line
            worker_runtime_env={"env_vars": {**worker_env(one_arena=not cfg.use_gpu), **_print_env()}},
        ),
        datasets=datasets,
        # Not split: the sampler may hand any sample id to any worker.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        box = ray.get(mailbox.get.remote())
        sampler_stats = ray.get(sampler.stats.remote())
    except Exception as e:
        msg = ray.get(mailbox.get.remote()).get("user_error")
        ue = _first_user_error(e)
        if msg or ue is not None:
            raise UserError(msg or str(ue)) from None
        raise
    finally:
        for actor in (sampler, mailbox):
            ray.kill(actor)
        stop_teacher_pool(teachers)
    if box.get("user_error"):
        raise UserError(box["user_error"])
    # Ray's result carries the metrics of the newest checkpoint; a stopped run has none newer.
    summary = dict(box.get("summary") or result.metrics or {})
    summary["wall_s"] = time.perf_counter() - t0
    summary.update(
        name=cfg.name,
        params_total=p["params_total"],
        params_activated=p["params_activated"],
        skipped_shards=data.skipped,
        checkpoint=str(result.checkpoint.path) if result.checkpoint else None,
        tensorboard_dir=str(run_dir / "tb"),
        run_dir=str(run_dir),
        prepared=str(data.dir),
    )
    summary["sampler"] = sampler_stats
    summary.update(_cost_summary(run, summary, p["seq_len"], p["spent_before"]))
    paths = write_report(run_dir, summary, run.to_dict() if hasattr(run, "to_dict") else {}, data.meta)
    summary["report"] = str(paths["md"])
    print(
        f"[dsv3ray] report: {paths['md']} (loss curve {paths['png']}); TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
        flush=True,
    )
    if summary.get("stopped"):
        raise UserError(summary["stopped"])
    return summary


def _cost_device(run) -> str:
    """The catalog device a run's workers are priced as: CPU workers unless train.use_gpu."""
    cost = getattr(run, "cost", None)
    return cost.device if run.train.use_gpu and cost is not None else "CPU"


def _spent_before_start(cfg, ckpt_root: Path, resume_from: str | None) -> dict[str, float]:
    """What the checkpoint this invocation starts from had spent (earlier invocations of the run,
    carried in its state), {} for a fresh start. The same choice of checkpoint as the workers'
    first start (`_restore`); time after that checkpoint in an earlier invocation is not in it."""
    if resume_from:
        path = ckpt.choose_checkpoint(resume_from, None)
    elif cfg.resume == "auto":
        path = ckpt.choose_checkpoint(None, ckpt_root)
    else:
        path = None
    if path is None:
        return {}
    return {k: float(v) for k, v in (ckpt.load_train_state(path).get("spent") or {}).items()}


def _cost_summary(run, summary: dict, seq_len: int, spent_before: dict[str, float]) -> dict:
    """MFU of the measured throughput and the run's spend, for report.json: this invocation's wall
    time x workers (start-up and restarts included) plus what the run had spent before it."""
    from dsv3ray.cost import RunningCost, throughput_report

    workers = int(summary.get("world_size") or run.train.max_workers)
    cost_cfg = getattr(run, "cost", None)
    catalog = cost_cfg.catalog if cost_cfg is not None else ""
    this = RunningCost(_cost_device(run), workers, cost_cfg).at(float(summary["wall_s"]))
    out = {
        "cost": {k: v + spent_before.get(k, 0.0) for k, v in this.items()},
        "cost_this_invocation": this,
        "cost_before_resume": spent_before or None,
    }
    if summary.get("tokens_per_s"):
        t = throughput_report(
            run.model,
            seq_len,
            float(summary["tokens_per_s"]),
            workers,
            _cost_device(run),
            run.train.dtype,
            catalog,
        )
        out.update(mfu=t["mfu"], flops_per_token=t["flops_per_token"], cost_device=t["device"])
    return out


def cli_train(run, args) -> int:
    """`dsv3ray train --config FILE`: train, write the report, print where it is."""
    summary = train(run)
    ev = summary.get("final_eval_loss")
    print(
        f"[dsv3ray] done: {summary.get('steps')} steps, final eval loss {ev:.4f}"
        if ev is not None
        else "[dsv3ray] done",
        flush=True,
    )
    return 0


# --- worker --------------------------------------------------------------------------------------


def _kill_once(run_dir: str, what: str) -> None:
    """Test-only fault: SIGKILL this worker process the first time `what` happens in this run."""
    marker = Path(run_dir) / f".killed-{what}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    print(f"[dsv3ray] fault injection: SIGKILL worker pid {os.getpid()} at {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


STAGING_PREFIX = "dsv3ray-ckpt-"  # a rank's checkpoint is staged in a temp dir, then reported


def _staging_dir(step: int, rank: int) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{step}-r{rank}-p{os.getpid()}-"))


def remove_stale_staging(root: str | Path | None = None) -> list[Path]:
    """Remove the checkpoint staging dirs (under root, default the temp dir) of processes that no
    longer exist: a worker killed while saving never runs its cleanup, and a large model's staged
    checkpoint would stay in /tmp. Dirs of live (or unknown) processes are kept. Returns the removed."""
    root = Path(root or tempfile.gettempdir())
    pattern = re.compile(rf"^{STAGING_PREFIX}\d+-r\d+-p(\d+)-")
    removed = []
    for d in root.glob(f"{STAGING_PREFIX}*"):
        m = pattern.match(d.name)
        if not m or not d.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:  # e.g. another user's process: alive
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def gather_distiller_states(distiller, world: int) -> list[dict] | None:
    """Every rank's Distiller counters, for rank 0 to save (collective: all ranks call it)."""
    if distiller is None:
        return None
    states = [None] * world
    dist.all_gather_object(states, distiller.state_dict())
    return states


def restore_distiller(distiller, state: dict, rank: int) -> None:
    """This rank's Distiller counters from a checkpoint's run state, so the run totals (KD batches,
    CE fallbacks, timeouts, ...) continue across a restart; a rank the checkpoint did not have
    (a larger elastic group) starts at 0."""
    saved = state.get("distiller")
    if distiller is not None and saved and rank < len(saved) and saved[rank] is not None:
        distiller.load_state_dict(saved[rank])


class Mailbox:
    """Worker -> driver values that are not checkpoint metrics (the final summary, a user error)."""

    def __init__(self):
        self.values: dict = {}

    def put(self, key: str, value) -> None:
        self.values[key] = value

    def get(self) -> dict:
        return self.values


def train_loop(config: dict) -> None:
    """Ray Train worker entry point."""
    import ray

    mailbox = config["mailbox"]
    if ray.get(mailbox.get.remote()).get("user_error"):
        return  # a restart after a user error: the driver reports it, retrying cannot help
    _quiet_report_log()
    try:
        _Worker(config).run()
    except UserError as e:
        ray.get(mailbox.put.remote("user_error", str(e)))
        _release_tables(config)
        raise
    _release_tables(config)


def _quiet_report_log() -> None:
    """Ray Train logs each report of each rank at INFO with its whole metrics dict: every
    checkpoint once per worker, the final summary (~30 keys) once per worker. Our step lines and
    the run's report say it once; its warnings still show."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # (another Ray layout: its lines stay)
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _release_tables(config: dict) -> None:
    """This run is done with its node's disk tables (a restart after a failure keeps them)."""
    import ray.train

    if ray.train.get_context().get_local_rank() == 0:
        for spec in config["tables"].values():
            release_table(spec)


class _Worker:
    def __init__(self, config: dict):
        import ray.train

        self.c = config
        self.cfg: TrainConfig = config["train"]
        self.distiller = None  # dsv3ray.distill.Distiller when [distill] names a teacher
        self._next_ids: dict = {}  # rank 0: step -> ObjectRef of its global batch, asked one step ahead
        self._carried: dict = {}  # every rank: step -> its global batch, carried by the last step's all-reduce
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.cfg.use_gpu else torch.device("cpu")
        )
        if not self.cfg.use_gpu:
            torch.set_num_threads(max(1, int(round(config["cpus_per_worker"]))))

    # -- setup --
    def _build(self):
        from dsv3ray.engine import build_engine
        from dsv3ray.model import build_model
        from dsv3ray.parallel import create_expert_parallel

        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed + self.rank)
        random.seed(self.cfg.seed + self.rank)
        mcfg = self.c["model"]
        # An elastic group may be smaller than the max the run was checked for: the largest EP
        # size <= train.ep_size that this world and the routed experts support.
        ep_size = elastic_ep_size(self.cfg.ep_size, self.world, mcfg.n_routed_experts)
        self.ep = create_expert_parallel(ep_size, mcfg.n_routed_experts)
        model = build_model(mcfg, ep=self.ep)
        model.set_activation_checkpointing(self.cfg.activation_checkpointing)
        ds_config = ds_config_for_world(self.c["ds_config"], self.c["global_batch"], self.world)
        self.engine, _, _ = build_engine(model, ds_config, ep=self.ep)
        if self.rank == 0 and (self.world != self.cfg.max_workers or ep_size != self.cfg.ep_size):
            print(
                f"[dsv3ray] {self.world} of max {self.cfg.max_workers} workers (train.num_workers = "
                f"{self.cfg.num_workers}), EP size {ep_size}: each rank takes "
                f"{self.c['global_batch'] / self.world:g} of the {self.c['global_batch']} samples per step",
                flush=True,
            )
        self.model = self.engine.module
        # This rank's slice of each global batch: proportional to measured throughput ([hetero]).
        self.balancer = BatchBalancer(
            self.world, self.c["global_batch"], self.c.get("hetero") or HeteroConfig(), self.cfg.grad_accum
        )

    def _load_data(self):
        import ray.data
        import ray.train

        from pipelines.dataset import quiet_ray_data_console

        ray.data.DataContext.get_current().enable_progress_bars = False
        quiet_ray_data_console()  # (this worker's process: for good)
        local_rank = ray.train.get_context().get_local_rank()
        tables = self.c["tables"]
        if local_rank == 0:
            hold_tables(list(tables.values()))
        self.train_NS = load_table(ray.train.get_dataset_shard("train"), tables["train"], local_rank)
        if self.c["eval_on_train"]:
            self.eval_NS = self.train_NS
        else:
            self.eval_NS = load_table(ray.train.get_dataset_shard("eval"), tables["eval"], local_rank)

    def _restore(self) -> int:
        """Load the checkpoint to resume from; returns the step it holds (0 = fresh start)."""
        import ray
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is not None:  # a restart after a failure, or Ray restoring this run directory
            path = ckpt.choose_checkpoint(reported.path, self.c["ckpt_root"])
            # Ray registers a checkpoint only after its report is processed: a worker killed right
            # after a complete write leaves a newer valid checkpoint on disk than the one Ray hands back.
            newest = ckpt.latest_valid(self.c["ckpt_root"])
            if newest is not None and (path is None or ckpt.validate(newest).step > ckpt.validate(path).step):
                path = newest
        elif self.c["resume_from"]:
            path = ckpt.choose_checkpoint(self.c["resume_from"], None)
            if path is None:
                raise UserError(
                    f"train.resume={self.cfg.resume!r} is not a complete checkpoint: pass a step_XXXXXXXX directory whose manifests are all present"
                )
        elif self.cfg.resume == "auto":
            path = ckpt.choose_checkpoint(None, self.c["ckpt_root"])
        else:
            path = None
        if path is None:
            return 0
        v = ckpt.validate(path)
        elastic = read_elastic_meta(path)
        same_world = v.world_size == self.world and (elastic is None or elastic["ep_size"] == self.ep.ep_size)
        if not same_world and elastic is not None:
            # Another DP/EP layout: weights + optimizer state resharded by global expert id.
            load_elastic(self.engine, path, self.ep)
        else:
            self.engine.load_checkpoint(
                str(path / "ds"),
                tag="step",
                load_optimizer_states=same_world,
                load_lr_scheduler_states=True,
                load_module_strict=True,
            )
        if not ckpt.load_rank_state(path, self.rank):
            torch.manual_seed(self.cfg.seed + v.step * 1000 + self.rank)
        state = ckpt.load_train_state(path)
        if state.get("balancer"):
            self.balancer.load_state_dict(state["balancer"])  # ignored (re-measured) on a new world size
        if self.rank == 0:
            ray.get(self.c["sampler"].load_state_dict.remote(state["sampler"]))
            msg = f"[dsv3ray] resumed from {path} (step {state['step']})"
            if not same_world:
                msg += f"; world size changed {v.world_size} -> {self.world}: " + (
                    "optimizer state resharded" if elastic is not None else "optimizer state re-initialized"
                )
            print(msg, flush=True)
        self.tokens = state["tokens"]
        self.bad_total = state["bad_steps"]
        self.resume_ce = state.get("last_ce")
        self.resumed_from = state["step"]
        self.spent_before = dict(state.get("spent") or {})
        restore_distiller(self.distiller, state, self.rank)
        return int(state["step"])

    # -- one step --
    def _batch(self, table_NS: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        # The model shifts: the seq_len+1 row is both input_ids and labels (positions aligned).
        return torch.from_numpy(table_NS[ids].astype(np.int64)).to(self.device)

    def _draw(self, step: int) -> np.ndarray:
        """The global batch of `step`: carried in the previous step's closing all-reduce, or (the
        first step after a (re)start) got by rank 0 from the sampler and broadcast.

        Rank 0 asks for step + 1 here, before this step computes, and takes the answer at this
        step's end (into the closing all-reduce), so the sampler's round trip overlaps the compute
        and needs no collective of its own. The draw stays deterministic: the sampler runs one
        caller's requests in order, so step s + 1 is always drawn after commit(s - 1) and before
        commit(s) (while s is pending), at a fresh start and after a restore alike; a checkpoint
        keeps such pending draws (sampler state_dict).
        """
        import ray

        G = self.c["global_batch"]
        carried = self._carried.pop(step, None)
        ids_G = torch.empty(G, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            sampler = self.c["sampler"]
            ref = self._next_ids.pop(step, None)
            if ref is None and carried is None:  # the first step after a (re)start
                ref = sampler.batch_for_step.remote(step, G)
            if step < self.c["steps"]:
                self._next_ids = {step + 1: sampler.batch_for_step.remote(step + 1, G)}
            if carried is None:
                ids_G.copy_(torch.tensor(ray.get(ref), dtype=torch.int64))  # (a read-only object-store array)
        if carried is not None:  # (every rank holds it: no broadcast)
            return carried
        dist.broadcast(ids_G, src=0)
        return ids_G.cpu().numpy()

    def _future_micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches of a coming step under the current split, for the teachers (the
        sampler answers a step the same until it is committed; if the split moves before that step,
        the Distiller sees other rows and asks again)."""
        import ray

        ids_G = ray.get(self.c["sampler"].batch_for_step.remote(step, self.c["global_batch"]))
        start, stop = self.balancer.bounds(self.rank)
        mine = ids_G[start:stop]
        return [
            torch.from_numpy(self.train_NS[mine[a:b]].astype(np.int64))
            for a, b in micro_slices(stop - start, self.cfg.grad_accum)
        ]

    def _train_step(self, step: int) -> dict:
        import ray

        from dsv3ray.engine import grads_are_finite, skip_step

        cfg = self.cfg
        ids_G = self._draw(step)
        G = len(ids_G)
        start, stop = self.balancer.bounds(self.rank)  # this step's split; observe() below may move it
        mine = ids_G[start:stop]
        sums = torch.zeros(5, dtype=torch.float64)  # sample-weighted loss, ce, mtp, balance; non-finite
        losses_per_sample, load_LE = [], None
        distill_metrics = {}
        if self.distiller is not None:
            self.distiller.prefetch(step, self.tokens, self._future_micro_batches)
        self.model.train()
        t0 = time.perf_counter()
        with CommTimer(sync_device=self.device.type == "cuda") as comm:  # time blocked in collectives
            for m, (a, b) in enumerate(micro_slices(stop - start, cfg.grad_accum)):
                ids = mine[a:b]
                x_BS = self._batch(self.train_NS, ids)
                out = self.engine(x_BS, labels_BS=x_BS)
                loss, difficulty_B = out.loss, out.loss_per_sample
                if self.distiller is not None:  # KD + CE in stage 1 (CE if labels are late), CE in stage 2
                    loss, distill_metrics, difficulty_B = self.distiller.loss(step, self.tokens, m, out, x_BS)
                if step in cfg.inject_nan_steps and self.rank == 0:
                    loss = loss * float("nan")  # test-only: a poisoned batch on one rank
                # x n_micro * W * A / G: DeepSpeed's mean over ranks and micro steps = the global mean
                self.engine.backward(loss * loss_weight(b - a, G, self.world, cfg.grad_accum))
                self.engine.step() if m < cfg.grad_accum - 1 else None  # DeepSpeed counts micro steps here
                sums += torch.tensor(
                    [
                        _value(loss) * (b - a),
                        _value(out.ce_loss) * (b - a),
                        _value(out.mtp_loss) * (b - a) if out.mtp_loss is not None else 0.0,
                        _value(out.balance_loss) * (b - a),
                        0.0 if math.isfinite(_value(loss)) else 1.0,
                    ],
                    dtype=torch.float64,
                )
                losses_per_sample.append(difficulty_B.detach().float().to(self.device))
                load_LE = out.expert_load_LE if load_LE is None else load_LE + out.expert_load_LE
            # One MAX all-reduce inside: every rank takes the same skip decision.
            # Every rank must join the all-reduce, also one whose own loss was already non-finite.
            is_bad = not grads_are_finite(self.engine, local_bad=bool(sums[4] > 0))
            if is_bad:
                skip_step(self.engine)  # gradients dropped, DeepSpeed counts a skipped step
            else:
                self.engine.step()
        compute_s = time.perf_counter() - t0 - comm.seconds  # this rank's time without waiting for others
        applied = not is_bad and getattr(self.engine, "was_step_applied", lambda: True)()
        # One all-reduce closes the step, each rank filling its own slots (zeros elsewhere): the
        # loss sums, every rank's (samples, compute seconds) for the balancer, the per-sample
        # losses in ids_G order for the sampler, the expert load for the routing bias, and
        # (from rank 0) the next step's global batch — one collective instead of five.
        W, r = self.world, self.rank
        E = load_LE.numel() if load_LE is not None else 0
        has_next = step < self.c["steps"]
        vec = torch.zeros(4 + 2 * W + G + E + (G if has_next else 0), dtype=torch.float64)
        vec[:4] = sums[:4]
        vec[4 + 2 * r], vec[5 + 2 * r] = float(stop - start), compute_s
        at = 4 + 2 * W
        vec[at + start : at + stop] = torch.cat(losses_per_sample).double().cpu()
        if E:
            vec[at + G : at + G + E] = load_LE.detach().double().cpu().reshape(-1)
        if has_next and r == 0:
            vec[at + G + E :] = torch.tensor(ray.get(self._next_ids.pop(step + 1)), dtype=torch.float64)
        vec = vec.to(self.device)
        dist.all_reduce(vec)
        vec = vec.cpu()
        measured = vec[4 : 4 + 2 * W].reshape(W, 2)
        self.balancer.observe([int(n) for n in measured[:, 0]], measured[:, 1].tolist())
        if applied and E:
            summed = vec[at + G : at + G + E].reshape(load_LE.shape).float().to(self.device)
            self.model.update_routing_bias(summed, group=None, summed=True)
        if has_next:
            self._carried = {step + 1: vec[at + G + E :].long().numpy()}
        stats = vec[:4] / G
        if self.rank == 0:
            if not is_bad:
                self.c["sampler"].report_losses.remote(ids_G, vec[at : at + G].float().numpy())
            # A skipped step's samples count as consumed: the batch that poisoned it is not retried.
            self.c["sampler"].commit.remote(step)
        return {
            "bad": is_bad,
            "loss": float(stats[0]),
            "ce": float(stats[1]),
            "mtp": float(stats[2]),
            "balance": float(stats[3]),
            "load_LE": load_LE,
            "distill": distill_metrics,
        }

    @torch.no_grad()
    def _eval(self) -> float:
        cfg = self.cfg
        self.model.eval()
        # The same held-out rows at every eval, whatever the (elastic) group size: sized for the
        # max workers, split over the actual ones; every rank runs eval_batches forwards (EP
        # all-to-alls stay in lockstep), a smaller group in larger batches.
        n = cfg.eval_batches * cfg.micro_batch_size * cfg.max_workers
        ids_all = np.arange(n) % len(self.eval_NS)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        mine = ids_all[lo:hi]
        acc = torch.zeros(2, dtype=torch.float64)
        for a, b in micro_slices(hi - lo, cfg.eval_batches) if cfg.eval_batches else []:
            ids = mine[a:b]
            x_BS = self._batch(self.eval_NS, ids)
            out = self.model(x_BS, labels_BS=x_BS)
            acc += torch.tensor([float(out.loss_per_sample.sum()), len(ids)], dtype=torch.float64)
        acc = acc.to(self.device)
        dist.all_reduce(acc)
        self.model.train()
        return float(acc[0] / acc[1])

    # -- checkpoint --
    def _save(self, step: int, last: dict, metrics: dict) -> None:
        import ray
        import ray.train

        tmp = _staging_dir(step, self.rank)
        distill_states = gather_distiller_states(self.distiller, self.world)  # collective
        try:
            self.engine.save_checkpoint(str(tmp / "ds"), tag="step", save_latest=True)
            # + a layout-free copy (model + optimizer by global expert id) for another DP/EP size
            save_elastic(self.engine, tmp, self.ep)
            # DeepSpeed writes one file per global expert (layer_*_expert_*_model_states.pt), so a
            # resume with another EP size still finds every expert.
            ckpt.save_rank_state(tmp, self.rank)
            if self.rank == 0:
                state = {
                    "step": step,
                    "tokens": self.tokens,
                    "bad_steps": self.bad_total,
                    "last_ce": last.get("ce"),
                    "balancer": self.balancer.state_dict(),
                    "sampler": ray.get(self.c["sampler"].state_dict.remote()),
                    "distiller": distill_states,  # one per rank, None without [distill]
                    "spent": self._spent(),  # running cost so far, continued on resume
                }
                ckpt.save_train_state(tmp, state)
            if self.cfg.kill_in_checkpoint_step == step and self.rank == self.world - 1:
                _kill_once(self.c["run_dir"], f"checkpoint-{step}")
            ckpt.write_manifest(tmp, self.rank, self.world, step)  # LAST: this rank's part is complete
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=ckpt.step_dir_name(step),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the loop --
    def run(self) -> None:
        import ray

        from dsv3ray.metrics import MetricsWriter, bias_norm, expert_load_stats

        cfg = self.cfg
        if self.rank == 0:
            with (Path(self.c["run_dir"]) / ".starts").open("a") as f:
                f.write(f"{os.getpid()}\n")
        stale = remove_stale_staging()  # left by a worker killed while saving (this node)
        if stale:
            print(
                f"[dsv3ray] removed {len(stale)} checkpoint staging dir(s) of dead workers: {stale}",
                flush=True,
            )
        self._build()
        self._load_data()
        steps, seq_len = self.c["steps"], self.c["seq_len"]
        tokens_per_step = self.c["global_batch"] * seq_len
        if self.c.get("teachers"):
            from dsv3ray.distill import Distiller

            self.distiller = Distiller(
                self.c["distill"], self.c["teachers"], self.rank, tokens_per_step, steps
            )
        self.tokens, self.bad_total, self.resume_ce, self.resumed_from = 0, 0, None, 0
        self.spent_before = {}
        start = self._restore()  # also restores the Distiller's counters and the spend so far
        dist.barrier()  # the sampler holds the checkpoint's ledger before anyone draws
        writer = MetricsWriter(Path(self.c["run_dir"]) / "tb" if self.rank == 0 else None)
        from dsv3ray.cost import RunningCost

        self.running_cost = RunningCost(self.c["cost_device"], self.world, self.c["cost"])
        self.t_loop = time.perf_counter()  # spend of this (re)start of the worker group
        consecutive_bad, last, eval_loss, first_ce_after_resume = 0, {}, None, None
        stopped, t_train, steps_timed = "", 0.0, 0
        step = start
        for step in range(start + 1, steps + 1):
            if cfg.kill_at_step == step and self.rank == self.world - 1:
                _kill_once(self.c["run_dir"], f"step-{step}")
            t0 = time.perf_counter()
            r = self._train_step(step)
            dt = time.perf_counter() - t0
            if step > start + 1:  # the first step after (re)start pays one-time warmup
                t_train += dt
                steps_timed += 1
            self.tokens += tokens_per_step
            if r["bad"]:
                self.bad_total += 1
                consecutive_bad += 1
                if self.rank == 0:
                    print(
                        f"[dsv3ray] step {step}: non-finite loss or gradient, update skipped ({consecutive_bad} in a row)",
                        flush=True,
                    )
            else:
                consecutive_bad = 0
                last = r
                if first_ce_after_resume is None:
                    first_ce_after_resume = r["ce"]
            row = {"train/bad_steps": self.bad_total}
            if step % cfg.log_every == 0 or step == steps:
                load_LE = r["load_LE"]
                if load_LE is not None and load_LE.numel():
                    load_LE = load_LE.to(self.device).float()
                    dist.all_reduce(load_LE)
                    row.update(expert_load_stats(load_LE))
                if not r["bad"]:
                    row.update(
                        {
                            "train/loss": r["loss"],
                            "train/ce_loss": r["ce"],
                            "train/balance_loss": r["balance"],
                        }
                    )
                    if self.c["model"].num_nextn_predict_layers:
                        row["train/mtp_loss"] = r["mtp"]
                row.update(
                    {
                        "train/lr": float(self.engine.get_lr()[0]) if self.engine.get_lr() else 0.0,
                        "train/tokens_per_s": tokens_per_step / dt,
                        "model/activation_ratio": self.c["activation_ratio"],
                        "moe/bias_norm": bias_norm(self.model),
                        **r["distill"],
                        **{f"cost/{k}": v for k, v in self._spent().items()},
                    }
                )
                if self.rank == 0:
                    s = ray.get(self.c["sampler"].stats.remote())
                    row.update({"sampler/epoch": s["epoch"], "sampler/consumed": s["consumed"]})
                    print(
                        f"[dsv3ray] step {step}/{steps} loss {r['loss']:.4f} ce {r['ce']:.4f} {tokens_per_step / dt:.0f} tok/s",
                        flush=True,
                    )
            if consecutive_bad >= cfg.max_bad_steps:
                stopped = (
                    f"training stopped at step {step}: {consecutive_bad} consecutive steps with a non-finite loss or gradient "
                    f"(train.max_bad_steps={cfg.max_bad_steps}); the last good checkpoint is under {self.c['ckpt_root']}: "
                    "lower the learning rate or check the data, then resume"
                )
                writer.scalars(row, step)
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                eval_loss = self._eval()
                row["eval/loss"] = eval_loss
            writer.scalars(row, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != steps:
                writer.flush()
                self._save(step, last, {"step": step, "ce_loss": last.get("ce", float("nan"))})
        final = {}
        if not stopped:
            eval_loss = self._eval()
            writer.scalars({"eval/loss": eval_loss}, steps)
        load_stats = {}
        if last.get("load_LE") is not None and last["load_LE"].numel():
            load = last["load_LE"].to(self.device).float()
            dist.all_reduce(load)
            load_stats = expert_load_stats(load)
        writer.close()
        # peak resident memory of the most loaded worker (ru_maxrss is KiB on Linux)
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        final = {
            "peak_rss_mb_per_worker": float(peak),
            # the glibc malloc settings the workers ran with (dsv3ray.malloc; {}: glibc's defaults)
            "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
            "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if self.cfg.use_gpu else None,
            "device": "cuda" if self.cfg.use_gpu else "cpu",
            "num_devices": self.world,
            "steps": step,
            "tokens": self.tokens,
            "final_train_loss": last.get("ce"),
            "final_eval_loss": eval_loss,
            "tokens_per_s": tokens_per_step * steps_timed / t_train if t_train > 0 else None,
            "step_time_s": t_train / steps_timed if steps_timed else None,
            "activation_ratio": self.c["activation_ratio"],
            "load_max_over_mean": load_stats.get("moe/load_max_over_mean"),
            "load_cv": load_stats.get("moe/load_cv"),
            "bias_norm": bias_norm(self.model),
            "bad_steps": self.bad_total,
            "resumed_from_step": self.resumed_from,
            "resume_ce": self.resume_ce,
            "first_ce_after_resume": first_ce_after_resume,
            "restarts": self._count_start(),
            "stopped": stopped,
            "world_size": self.world,  # workers that ran (elastic: between min and max)
            "num_workers": [self.cfg.min_workers, self.cfg.max_workers],
            "ep_size": self.ep.ep_size,
            "global_batch": self.c["global_batch"],
            "data_tables": {split: "disk" if t.disk else "memory" for split, t in self.c["tables"].items()},
            **(self.distiller.summary() if self.distiller is not None else {}),
        }
        if self.rank == 0:
            ray.get(self.c["mailbox"].put.remote("summary", final))
        # No checkpoint of a poisoned state (the last good one stays newest), nor a second copy
        # of the checkpoint a finished run was resumed from.
        if not stopped and step != start:
            self._save(step, last, final)
        if not stopped and getattr(self.c.get("distill"), "save_as_teacher", False):
            from dsv3ray.distill import TEACHER_EXPORT_DIR, export_model

            export_model(
                self.model, Path(self.c["run_dir"]) / TEACHER_EXPORT_DIR, self.ep, write=self.rank == 0
            )

    def _spent(self) -> dict[str, float]:
        """GPU-hours, kWh, money so far: this (re)start's time priced at its world size, plus what
        the checkpoint it resumed from had spent (time between that checkpoint and a crash is lost)."""
        now = self.running_cost.at(time.perf_counter() - self.t_loop)
        return {k: v + float(self.spent_before.get(k, 0.0)) for k, v in now.items()}

    def _count_start(self) -> int:
        """Times this run's worker group started (1 + restarts), counted from a marker file."""
        p = Path(self.c["run_dir"]) / ".starts"
        return max(0, len(p.read_text().split()) - 1) if p.exists() else 0
