"""End-of-run report: `report.json` (machine-readable), `report.md` (for people), `loss_curve.png`.

Everything comes from the run itself: the summary the workers return, the TensorBoard scalars and
the prepared data's meta.json (unigram entropy = the loss of a model that knows only token
frequencies; a trained LM must beat it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dsv3ray.metrics import read_scalars


def plot_losses(
    scalars: dict[str, list[tuple[int, float]]], path: Path, unigram_entropy: float | None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, label in (("train/ce_loss", "train CE"), ("eval/loss", "held-out CE")):
        pts = scalars.get(tag, [])
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if tag.startswith("eval") else None, label=label)
    if unigram_entropy is not None:
        ax.axhline(
            unigram_entropy, color="gray", linestyle="--", label=f"unigram entropy {unigram_entropy:.2f}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def write_report(
    run_dir: str | Path, summary: dict[str, Any], config: dict[str, Any], meta: dict[str, Any] | None
) -> dict[str, Path]:
    """Write report.json / report.md / loss_curve.png into run_dir and return their paths.

    `summary`: what the run measured (steps, tokens, tokens_per_s, final_eval_loss, activation_ratio,
    expert-load balance, bad_steps, sampler stats, tensorboard_dir, checkpoint).
    """
    run_dir = Path(run_dir)
    tb_dir = Path(summary.get("tensorboard_dir", run_dir / "tb"))
    scalars = read_scalars(tb_dir) if tb_dir.is_dir() else {}
    unigram = meta.get("unigram_entropy") if meta else None
    final_eval = summary.get("final_eval_loss")
    body = {
        **summary,
        "unigram_entropy": unigram,
        "beats_unigram": (final_eval is not None and unigram is not None and final_eval < unigram),
        "tensorboard_dir": str(tb_dir),
        "config": config,
    }
    png = plot_losses(scalars, run_dir / "loss_curve.png", unigram)
    body["loss_curve"] = str(png)
    jpath = run_dir / "report.json"
    jpath.write_text(json.dumps(body, indent=2, default=str))

    rows = [
        ("steps", summary.get("steps")),
        ("tokens", summary.get("tokens")),
        ("tokens/s", summary.get("tokens_per_s")),
        ("final train loss (CE)", summary.get("final_train_loss")),
        ("final held-out loss (CE)", final_eval),
        ("unigram entropy of the corpus (nats/token)", unigram),
        ("activation ratio (activated / total params per token)", summary.get("activation_ratio")),
        ("expert load max/mean (last step, mean over layers)", summary.get("load_max_over_mean")),
        ("expert load coefficient of variation", summary.get("load_cv")),
        ("MFU (measured tokens/s vs the catalog peak)", summary.get("mfu")),
        ("spend: GPU-hours (device-hours)", (summary.get("cost") or {}).get("gpu_hours")),
        ("spend: energy (kWh)", (summary.get("cost") or {}).get("energy_kwh")),
        ("spend: total cost", (summary.get("cost") or {}).get("total_cost")),
        ("bad (skipped) steps", summary.get("bad_steps")),
        ("worker restarts survived", summary.get("restarts")),
        ("sampler", summary.get("sampler")),
        ("last checkpoint", summary.get("checkpoint")),
    ]
    md = [f"# dsv3ray run report: {summary.get('name', run_dir.name)}", "", "| what | value |", "|---|---|"]
    md += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    md += [
        "",
        f"Held-out loss {'beats' if body['beats_unigram'] else 'does NOT beat'} the unigram entropy.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        f"TensorBoard: `tensorboard --logdir {tb_dir}`",
        "",
        "## config",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    mpath = run_dir / "report.md"
    mpath.write_text("\n".join(md))
    return {"json": jpath, "md": mpath, "png": png}
