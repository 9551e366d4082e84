"""Training metrics: expert-load statistics and TensorBoard scalars (rank 0 writes).

L = MoE layers, E = routed experts. Tags (all under the run directory's `tb/`):
    train/loss, train/ce_loss, train/mtp_loss, train/balance_loss, train/lr, train/tokens_per_s,
    train/bad_steps, model/activation_ratio, moe/bias_norm, moe/load_max_over_mean (mean over
    layers), moe/load_cv, moe/layer{l}/max_over_mean, moe/layer{l}/cv, eval/loss,
    sampler/epoch, sampler/consumed
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def expert_load_stats(load_LE: torch.Tensor) -> dict[str, float]:
    """Balance of one step's per-layer token counts: max/mean and coefficient of variation.

    A perfectly balanced layer has max/mean = 1 and cv = 0. Layers that saw no tokens count as balanced.
    """
    load_LE = load_LE.detach().float().cpu()
    assert load_LE.dim() == 2, f"expected (L, E), got {tuple(load_LE.shape)}"
    mean_L = load_LE.mean(dim=1)
    safe_L = mean_L.clamp_min(1e-12)
    max_over_mean_L = torch.where(mean_L > 0, load_LE.max(dim=1).values / safe_L, torch.ones_like(mean_L))
    cv_L = torch.where(mean_L > 0, load_LE.std(dim=1, unbiased=False) / safe_L, torch.zeros_like(mean_L))
    out = {
        "moe/load_max_over_mean": float(max_over_mean_L.mean()) if len(mean_L) else 1.0,
        "moe/load_cv": float(cv_L.mean()) if len(mean_L) else 0.0,
    }
    for l in range(load_LE.shape[0]):
        out[f"moe/layer{l}/max_over_mean"] = float(max_over_mean_L[l])
        out[f"moe/layer{l}/cv"] = float(cv_L[l])
    return out


def bias_norm(model: torch.nn.Module) -> float:
    """L2 norm over all routers' `e_score_correction_bias` buffers (the aux-loss-free balance state)."""
    sq = 0.0
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            sq += float(buf.detach().float().pow(2).sum())
    return math.sqrt(sq)


class MetricsWriter:
    """TensorBoard scalars for rank 0; other ranks get a writer that drops everything."""

    def __init__(self, log_dir: str | Path | None):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._w = None
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._w = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._w is None:
            return
        for tag, v in values.items():
            if v is not None and isinstance(v, int | float) and math.isfinite(v):
                self._w.add_scalar(tag, float(v), step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars under a TensorBoard log directory (every event file; a resumed run appends files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                # A resumed run rewrites steps after the checkpoint: the later file wins.
                out.setdefault(tag, {})[ev.step] = ev.value
    return {tag: sorted(d.items()) for tag, d in out.items()}
