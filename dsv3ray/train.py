"""Training on Ray Train + DeepSpeed.

The driver (`train`) validates the run, prepares data if needed, starts (or joins) Ray, creates
the curriculum sampler actor and runs a Ray Train `TorchTrainer`; each worker (`train_loop`)
builds a DeepSpeed engine over our DeepSeek-V3 model and runs the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3ray.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    name: str = "run"
    run_dir: str = ""  # "" = runs/<name>-<timestamp>
    num_workers: int = 2
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
        for key in (
            "num_workers",
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
        if self.num_workers % self.ep_size:
            raise ConfigError(
                "train.ep_size", self.ep_size, f"must divide train.num_workers={self.num_workers}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError("train.dtype", self.dtype, " | ".join(DTYPES))
        if self.corrupt_shard not in ("fail", "skip"):
            raise ConfigError("train.corrupt_shard", self.corrupt_shard, '"fail" or "skip"')
        if not self.resume:
            raise ConfigError("train.resume", self.resume, '"auto", "never" or a checkpoint directory')
