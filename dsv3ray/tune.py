"""`dsv3ray tune`: a Ray Tune sweep of keep_ratio, n_routed_experts (and lr) against measured cost.

Each trial is a real training run of the config's model (`dsv3ray.train.train`: a TorchTrainer with
DeepSpeed workers) at the sweep's token budget, in its own run directory under OUTPUT/trials/.
Two objectives, both minimized:
  eval_loss   the run's held-out CE (final_eval_loss)
  cost        the measured money of the run's training time: `RunningCost` of the trial's device
              ("CPU" workers unless train.use_gpu, then cost.device) x num_workers over
              tokens / measured tokens_per_s (start-up time excluded: it is the same for every trial)
Optuna's multi-objective sampler (NSGA-II-style TPE) proposes trials through Ray Tune's
`OptunaSearch`; ASHA stops poor trials early: a trial trains in `tune.rungs` stages (each stage
resumes the previous one's checkpoint and reports its held-out loss), and ASHA may stop it after
any stage. Concurrency is limited to what the cluster holds. A failed trial is recorded (status
ERROR with its message) and the sweep goes on. Re-running the same command on the same --output
resumes an interrupted sweep (finished trials are kept, unfinished ones resume from their
checkpoints).

Outputs in OUTPUT/: trials.csv (every trial), pareto.csv (the non-dominated finished trials on
(eval_loss, cost)), pareto.png.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3ray.errors import ConfigError, UserError

SCHEDULERS = ("asha", "fifo")
OBJECTIVES = ("eval_loss", "cost")
CSV_FIELDS = [
    "trial_id",
    "status",
    "stopped_early",
    "keep_ratio",
    "n_routed_experts",
    "num_experts_per_tok",
    "lr",
    "eval_loss",
    "cost",
    "gpu_hours",
    "energy_kwh",
    "train_s",
    "tokens",
    "tokens_per_s",
    "mfu",
    "activation_ratio",
    "params_total",
    "params_activated",
    "stages",
    "run_dir",
    "error",
]


@dataclass
class TuneConfig:
    num_samples: int = 8
    keep_ratio: list[float] = field(default_factory=lambda: [0.05, 0.5])  # [low, high], uniform
    n_routed_experts: list[int] = field(default_factory=lambda: [8, 16])  # choices
    lr: list[float] = field(default_factory=list)  # [low, high] log-uniform; [] = not searched
    tokens: int = 0  # training tokens per trial; 0 = the run's own train.tokens / train.steps
    rungs: int = 2  # stages per trial where ASHA may stop it (1 = no early stopping)
    scheduler: str = "asha"  # "asha" (early stopping) | "fifo" (none)
    max_concurrent: int = 0  # 0 = as many trials as the cluster's CPUs (GPUs) hold
    seed: int = 0
    output: str = ""  # sweep directory; --output overrides; "" = runs/tune-<train.name>

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError("tune.num_samples", self.num_samples, "an integer >= 1")
        if len(self.keep_ratio) != 2 or not 0 < self.keep_ratio[0] <= self.keep_ratio[1] <= 1:
            raise ConfigError("tune.keep_ratio", self.keep_ratio, "[low, high] with 0 < low <= high <= 1")
        if not self.n_routed_experts or min(self.n_routed_experts) < 1:
            raise ConfigError(
                "tune.n_routed_experts", self.n_routed_experts, "a non-empty list of integers >= 1"
            )
        if self.lr and (len(self.lr) != 2 or not 0 < self.lr[0] <= self.lr[1]):
            raise ConfigError("tune.lr", self.lr, "[] (not searched) or [low, high] with 0 < low <= high")
        if self.tokens < 0:
            raise ConfigError("tune.tokens", self.tokens, "an integer >= 0 (0 = the run's own budget)")
        if self.rungs < 1:
            raise ConfigError("tune.rungs", self.rungs, "an integer >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("tune.scheduler", self.scheduler, " | ".join(SCHEDULERS))
        if self.max_concurrent < 0:
            raise ConfigError(
                "tune.max_concurrent", self.max_concurrent, "an integer >= 0 (0 = fit the cluster)"
            )


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


def routing_overrides(model_raw: dict[str, Any], n_experts: int, keep_ratio: float) -> dict[str, Any]:
    """Model keys for a trial: expert count and keep_ratio, with group-limited routing kept valid.

    Keeps the config's n_group / topk_group when they still fit the new expert count (each group
    >= 2 experts, the top-k reachable in the kept groups); otherwise routing is ungrouped (1, 1).
    """
    k = max(1, round(keep_ratio * n_experts))
    n_group, topk_group = int(model_raw.get("n_group", 1)), int(model_raw.get("topk_group", 1))
    ok = (
        n_experts % n_group == 0
        and (n_group == 1 or n_experts // n_group >= 2)
        and topk_group <= n_group
        and k <= topk_group * (n_experts // n_group)
    )
    if not ok:
        n_group, topk_group = 1, 1
    return {
        "n_routed_experts": n_experts,
        "keep_ratio": keep_ratio,
        "n_group": n_group,
        "topk_group": topk_group,
    }


def _trial_device(run) -> tuple[str, int]:
    device = run.cost.device if run.train.use_gpu else "CPU"
    return device, run.train.max_workers


def trial_metrics(run, summaries: list[dict[str, Any]], seq_len: int) -> dict[str, Any]:
    """Objectives and bookkeeping of a trial after its stages so far (summaries of train())."""
    from dsv3ray.cost import RunningCost, get_device, load_catalog, mfu, train_flops_per_token

    last = summaries[-1]
    device, n = _trial_device(run)
    # measured training time: each stage's own tokens over its measured steady-state throughput.
    # A stage resumes the previous one: its summary's tokens/steps are cumulative, its own steps
    # are those after resumed_from_step.
    train_s, tokens = 0.0, 0
    for s in summaries:
        total, steps = int(s.get("tokens") or 0), int(s.get("steps") or 0)
        own_steps = steps - int(s.get("resumed_from_step") or 0)
        t = total * own_steps // steps if steps and 0 <= own_steps <= steps else total
        tps = s.get("tokens_per_s") or (t / s["wall_s"] if s.get("wall_s") else None)
        if tps:
            train_s += t / float(tps)
        tokens += t
    spend = RunningCost(device, n, run.cost).at(train_s)
    spec = get_device(device, load_catalog(run.cost.catalog))
    dtype = run.train.dtype if run.train.dtype in spec.peak_tflops else next(iter(spec.peak_tflops))
    tps = tokens / train_s if train_s > 0 else None
    flops = train_flops_per_token(run.model, seq_len)
    eval_loss = last.get("final_eval_loss")
    return {
        "eval_loss": float(eval_loss) if eval_loss is not None else float("nan"),
        "cost": spend["total_cost"],
        "gpu_hours": spend["gpu_hours"],
        "energy_kwh": spend["energy_kwh"],
        "train_s": train_s,
        "tokens": tokens,
        "tokens_per_s": tps,
        "mfu": mfu(tps, flops, spec.peak_flops(dtype), n) if tps else None,
        "activation_ratio": last.get("activation_ratio"),
        "params_total": last.get("params_total"),
        "params_activated": last.get("params_activated"),
        "num_experts_per_tok": run.model.num_experts_per_tok,
        "stages": len(summaries),
    }


def run_trial(
    raw: dict[str, Any],
    params: dict[str, Any],
    run_dir: str,
    tokens: int,
    seq_len: int,
    rungs: int,
    report,
    train_fn=None,
):
    """Train one trial in `rungs` stages, calling report(metrics) after each (Tune may stop it).

    raw: the sweep's merged run config (plain dict); params: keep_ratio, n_routed_experts, lr.
    """
    from dsv3ray.config import deep_merge
    from dsv3ray.runconfig import resolve_run_config

    if train_fn is None:
        from dsv3ray.train import train as train_fn
    model = routing_overrides(
        raw.get("model", {}), int(params["n_routed_experts"]), float(params["keep_ratio"])
    )
    over: dict[str, Any] = {"model": model, "train": {"run_dir": run_dir, "resume": "auto"}}
    if params.get("lr") is not None:
        over["deepspeed"] = {"optimizer": {"params": {"lr": float(params["lr"])}}}
    base = deep_merge(raw, over)
    summaries = []
    for stage in range(1, rungs + 1):
        stage_raw = deep_merge(base, {"train": {"tokens": max(1, math.ceil(tokens * stage / rungs))}})
        run = _resolve(stage_raw, resolve_run_config)
        summaries.append(train_fn(run))
        report(trial_metrics(run, summaries, seq_len))


def _resolve(raw: dict[str, Any], resolve_run_config):
    """A RunConfig from a plain merged dict (through a TOML file: the one public way in)."""
    import tempfile

    from dsv3ray.runconfig import dump_toml

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(dump_toml(raw))
    try:
        return resolve_run_config(config=f.name)
    finally:
        os.unlink(f.name)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated on (eval_loss, cost), both minimized, among the trials that trained their
    whole budget: failed ones and ones ASHA stopped early (fewer tokens, so cheaper) are left out."""
    ok = [
        r
        for r in rows
        if r.get("status", "TERMINATED") == "TERMINATED"
        and not r.get("stopped_early")
        and all(isinstance(r.get(k), float) and math.isfinite(r[k]) for k in OBJECTIVES)
    ]
    front = []
    for r in ok:
        dominated = any(
            all(o[k] <= r[k] for k in OBJECTIVES) and any(o[k] < r[k] for k in OBJECTIVES)
            for o in ok
            if o is not r
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["cost"], r["eval_loss"]))


def write_outputs(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """trials.csv, pareto.csv and pareto.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out / "trials.csv", "pareto": out / "pareto.csv", "png": out / "pareto.png"}
    front = pareto_front(rows)
    for path, data in ((paths["trials"], rows), (paths["pareto"], front)):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in data:
                w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if all(math.isfinite(r[k]) for k in OBJECTIVES)]
    if done:
        sc = ax.scatter(
            [r["cost"] for r in done],
            [r["eval_loss"] for r in done],
            c=[r["keep_ratio"] for r in done],
            cmap="viridis",
        )
        fig.colorbar(sc, ax=ax, label="keep_ratio")
        for r in done:
            ax.annotate(
                f"E={r['n_routed_experts']} k={r['num_experts_per_tok']}",
                (r["cost"], r["eval_loss"]),
                fontsize=7,
            )
    if front:
        ax.plot([r["cost"] for r in front], [r["eval_loss"] for r in front], "r--", label="Pareto front")
        ax.legend()
    ax.set_xlabel("measured cost of the trial's training")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"dsv3ray tune: {len(rows)} trials, {len(front)} on the Pareto front")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


def _rows_from_results(grid, out: Path) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        cfg = dict(result.config or {})
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or Path(str(result.path)).name.split("_")[1]
        params = out / "trials" / str(trial_id) / "params.json"
        if not cfg and params.is_file():
            cfg = json.loads(params.read_text())
        err = result.error
        stages = m.get("stages") or 0
        row = {
            "trial_id": trial_id,
            "keep_ratio": cfg.get("keep_ratio"),
            "n_routed_experts": cfg.get("n_routed_experts"),
            "lr": cfg.get("lr"),
            "run_dir": m.get("run_dir") or (str(params.parent) if params.is_file() else ""),
            **{k: m.get(k) for k in CSV_FIELDS if k in m},
        }
        row["status"] = "ERROR" if err is not None else "TERMINATED"
        row["stopped_early"] = err is None and 0 < stages < m.get("rungs", stages)
        row["error"] = "" if err is None else _one_line(err)
        for k in OBJECTIVES:
            row[k] = float(row[k]) if row.get(k) is not None else float("nan")
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def _one_line(err: BaseException) -> str:
    """The innermost cause of a trial's error (Ray wraps it in task/actor errors), on one line."""
    seen, e = set(), err
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    text = str(e) if type(e).__name__ in str(e) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def _max_concurrent(tcfg: TuneConfig, run) -> int:
    import ray

    res = ray.cluster_resources()
    if run.train.use_gpu:
        fit = int(res.get("GPU", 0) // run.train.max_workers)
    else:  # one CPU per worker, one left for Ray Data reads and the sampler
        fit = int((res.get("CPU", 1) - 1) // run.train.max_workers)
    fit = max(1, fit)
    return min(fit, tcfg.max_concurrent) if tcfg.max_concurrent else fit


def _trial_tokens(tcfg: TuneConfig, run) -> int:
    if tcfg.tokens:
        return tcfg.tokens
    if run.train.tokens:
        return run.train.tokens
    raise ConfigError("tune.tokens", tcfg.tokens, "a token budget per trial > 0 (or set train.tokens)")


def sweep(run, output: str | None = None, train_fn=None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {rows, pareto, paths}."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from dsv3ray.config import deep_merge
    from dsv3ray.data import resolve_data

    tcfg: TuneConfig = run.tune
    out = Path(output or tcfg.output or f"runs/tune-{run.train.name}").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokens = _trial_tokens(tcfg, run)
    for e in tcfg.n_routed_experts:
        if run.train.max_workers % run.train.ep_size or e % run.train.ep_size:
            raise ConfigError(
                "tune.n_routed_experts",
                tcfg.n_routed_experts,
                f"values divisible by train.ep_size={run.train.ep_size}",
            )
    # prepare the data once for every trial (each trial would otherwise prepare its own copy)
    data = resolve_data(run.data, getattr(run, "prepare", None), out, run.train.corrupt_shard)
    raw = deep_merge(run.raw, {"data": {"prepared": str(data.dir), "inputs": []}})
    raw.pop("tune", None)
    # the resolved grouping (a preset's too), so routing_overrides keeps it where it still fits
    raw["model"] = {**raw.get("model", {}), "n_group": run.model.n_group, "topk_group": run.model.topk_group}
    if tcfg.lr:
        # a trial overrides only optimizer.params.lr: start from the complete optimizer table
        from dsv3ray.engine import DEFAULT_OPTIMIZER

        opt = json.loads(json.dumps(dict(run.deepspeed).get("optimizer") or DEFAULT_OPTIMIZER))
        raw["deepspeed"] = {**raw.get("deepspeed", {}), "optimizer": opt}
    if not ray.is_initialized():
        from dsv3ray.train import _init_ray

        _init_ray(run.train)

    rungs = tcfg.rungs if tcfg.scheduler == "asha" else 1

    def trainable(config: dict[str, Any]) -> None:
        params = {k: config.get(k) for k in ("keep_ratio", "n_routed_experts", "lr")}
        trial_id = tune.get_context().get_trial_id()
        # keyed by trial id: a resumed sweep finds the same trial's checkpoints again
        run_dir = str(out / "trials" / trial_id)
        # the trial's parameters on disk: a trial that fails before its first report has no result config
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "params.json").write_text(json.dumps(params))

        def report(metrics):
            tune.report({**metrics, "rungs": rungs, "trial_id": trial_id, "run_dir": run_dir})

        try:
            run_trial(raw, params, run_dir, tokens, int(data.meta["seq_len"]), rungs, report, train_fn)
        except UserError as e:
            # a plain error crosses Ray's process boundary intact (ConfigError's __init__ does not copy)
            raise RuntimeError(f"{type(e).__name__}: {e}") from None

    space: dict[str, Any] = {
        "keep_ratio": tune.uniform(*tcfg.keep_ratio),
        "n_routed_experts": tune.choice(list(tcfg.n_routed_experts)),
    }
    if tcfg.lr:
        space["lr"] = tune.loguniform(*tcfg.lr)
    searcher = OptunaSearch(metric=list(OBJECTIVES), mode=["min", "min"], seed=tcfg.seed)
    limiter = ConcurrencyLimiter(searcher, max_concurrent=_max_concurrent(tcfg, run))
    if tcfg.scheduler == "asha":
        scheduler = ASHAScheduler(
            metric="eval_loss",
            mode="min",
            time_attr="training_iteration",
            max_t=rungs,
            grace_period=1,
            reduction_factor=2,
        )
    else:
        scheduler = FIFOScheduler()
    # the trial process only drives its TorchTrainer (a sliver of a CPU); the workers request their own
    fn = tune.with_resources(trainable, {"cpu": 0.1})
    exp = out / "ray"
    name = "sweep"
    if tune.Tuner.can_restore(str(exp / name)):
        print(f"[dsv3ray] resuming the sweep in {exp / name}", flush=True)
        tuner = tune.Tuner.restore(str(exp / name), trainable=fn, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            fn,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=limiter, scheduler=scheduler, num_samples=tcfg.num_samples
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(exp),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        )
    t0 = time.perf_counter()
    grid = tuner.fit()
    rows = _rows_from_results(grid, out)
    paths = write_outputs(rows, out)
    return {"rows": rows, "pareto": pareto_front(rows), "paths": paths, "wall_s": time.perf_counter() - t0}


def cli_tune(run, args) -> int:
    """`dsv3ray tune [--output DIR]`: sweep, then print where trials.csv / pareto.csv / pareto.png are."""
    if getattr(run, "tune", None) is None:
        raise UserError("the [tune] section is not available in this install")
    res = sweep(run, getattr(args, "output", None))
    failed = sum(r["status"] == "ERROR" for r in res["rows"])
    print(
        f"[dsv3ray] {len(res['rows'])} trials ({failed} failed), {len(res['pareto'])} on the Pareto front: "
        f"{res['paths']['trials']}, {res['paths']['pareto']}, {res['paths']['png']}",
        flush=True,
    )
    for r in res["pareto"]:
        print(
            f"  E={r['n_routed_experts']} keep_ratio={r['keep_ratio']:.3f} (top-{r['num_experts_per_tok']}) "
            f"eval_loss={r['eval_loss']:.4f} cost={r['cost']:.4g}",
            flush=True,
        )
    return 0
