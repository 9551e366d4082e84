"""Curriculum controller: per-sample difficulty (EMA of reported losses) and the sampling schedule.

Seed rule: uniform early, hard samples later. For the first `warmup_fraction` of training every
sample weighs the same; afterwards sample i weighs exp(z_i / temperature), z = the standardized
difficulty (so the temperature does not depend on the loss scale), clipped to ±max_z. Samples
never reported yet get the mean difficulty (z = 0).

A plain class: no Ray import. The training entry layer wraps the sampler that holds it in an actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv3ray.errors import ConfigError


@dataclass
class CurriculumConfig:
    """Section [curriculum]."""

    enabled: bool = True  # False = uniform order for the whole run (still exactly-once per epoch)
    warmup_fraction: float = 0.3  # fraction of training (in samples drawn) that samples uniformly
    temperature: float = 1.0  # lower = stronger preference for hard samples
    ema_decay: float = 0.9  # difficulty = decay * old + (1 - decay) * new loss
    max_z: float = 3.0  # clip of the standardized difficulty

    def __post_init__(self):
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ConfigError("curriculum.warmup_fraction", self.warmup_fraction, "in [0, 1]")
        if self.temperature <= 0.0:
            raise ConfigError("curriculum.temperature", self.temperature, "greater than 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("curriculum.ema_decay", self.ema_decay, "in [0, 1)")
        if self.max_z <= 0.0:
            raise ConfigError("curriculum.max_z", self.max_z, "greater than 0")


class CurriculumController:
    """Difficulty per sample (EMA of per-sample losses) and the weights the sampler draws by."""

    def __init__(self, num_samples: int, cfg: CurriculumConfig):
        if num_samples < 1:
            raise ValueError(f"CurriculumController needs at least one sample, got {num_samples}")
        self.cfg = cfg
        self.num_samples = num_samples
        self.difficulty_N = np.zeros(num_samples, dtype=np.float32)
        self.seen_N = np.zeros(num_samples, dtype=bool)
        self.num_reports = 0

    def report(self, ids, losses) -> None:
        """Fold per-sample losses (one per id; repeated ids are folded in order) into the EMA."""
        ids_M = np.asarray(ids, dtype=np.int64).reshape(-1)
        losses_M = np.asarray(losses, dtype=np.float32).reshape(-1)
        if ids_M.shape != losses_M.shape:
            raise ValueError(f"report: {ids_M.size} ids but {losses_M.size} losses")
        if ids_M.size and (ids_M.min() < 0 or ids_M.max() >= self.num_samples):
            raise ValueError(f"report: sample ids must be in [0, {self.num_samples})")
        finite = np.isfinite(losses_M)  # a NaN loss says nothing about difficulty
        decay = self.cfg.ema_decay
        for i, loss in zip(ids_M[finite].tolist(), losses_M[finite].tolist()):
            if self.seen_N[i]:
                self.difficulty_N[i] = decay * self.difficulty_N[i] + (1.0 - decay) * loss
            else:
                self.difficulty_N[i] = loss
                self.seen_N[i] = True
        self.num_reports += int(finite.sum())

    def in_warmup(self, progress: float) -> bool:
        return not self.cfg.enabled or progress < self.cfg.warmup_fraction or not self.seen_N.any()

    def weights(self, progress: float) -> np.ndarray | None:
        """Sampling weights (N,) float64 at `progress` in [0, 1] of training; None = uniform."""
        if self.in_warmup(progress):
            return None
        d = self.difficulty_N[self.seen_N].astype(np.float64)
        mean, std = d.mean(), d.std()
        z_N = np.zeros(self.num_samples, dtype=np.float64)  # unseen samples: the mean difficulty
        if std > 0:
            z_N[self.seen_N] = (d - mean) / std
        z_N = np.clip(z_N, -self.cfg.max_z, self.cfg.max_z)
        return np.exp(z_N / self.cfg.temperature)

    def state_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "difficulty": self.difficulty_N.copy(),
            "seen": np.packbits(self.seen_N),
            "num_reports": self.num_reports,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"curriculum state is for {state['num_samples']} samples, this dataset has {self.num_samples}"
            )
        self.difficulty_N = np.asarray(state["difficulty"], dtype=np.float32).copy()
        self.seen_N = np.unpackbits(np.asarray(state["seen"], dtype=np.uint8), count=self.num_samples).astype(
            bool
        )
        self.num_reports = int(state["num_reports"])
