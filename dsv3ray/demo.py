"""`dsv3ray demo` (`make demo`): the whole system end to end on a laptop-sized budget.

Local Ray → the built-in stdlib-docs corpus → `pipelines.prepare` (cleaning, dedup, tokenizer
training, packing) → the `debug` DeepSeek-V3 model, EP=2 on 2 Ray Train workers with DeepSpeed
→ report.md / report.json / loss_curve.png, printed at the end. Settings: configs/demo.toml;
`--config` replaces it, `--set` adjusts it (e.g. `--set train.steps=20`).
"""

from __future__ import annotations

import json
from pathlib import Path

from dsv3ray.errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def demo_run(args):
    """The demo's run config: configs/demo.toml under the user's --preset/--set (or their --config)."""
    from dsv3ray.runconfig import resolve_run_config

    config = getattr(args, "config", None)
    if config is None:
        if not DEMO_CONFIG.is_file():
            raise UserError(
                f"demo config {DEMO_CONFIG} is missing: run from a dsv3ray checkout or pass --config"
            )
        config = str(DEMO_CONFIG)
    return resolve_run_config(getattr(args, "preset", None), config, getattr(args, "overrides", None) or [])


def cli_demo(run, args) -> int:
    """Run the demo and say where its report, plot and TensorBoard logs are."""
    from dsv3ray.train import train

    run = demo_run(args)
    summary = train(run)
    rep = json.loads(Path(summary["run_dir"], "report.json").read_text())
    print(
        f"[dsv3ray] demo done in {summary['wall_s']:.0f}s: held-out loss {rep['final_eval_loss']:.3f} nats/token, "
        f"unigram entropy of the corpus {rep['unigram_entropy']:.3f} "
        f"({'beaten' if rep['beats_unigram'] else 'NOT beaten'}); report {summary['report']}, plot {rep['loss_curve']}",
        flush=True,
    )
    return 0
