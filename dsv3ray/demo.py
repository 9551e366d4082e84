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

# Two-stage distillation demo (`dsv3ray demo --config configs/distill_demo.toml`): that file is
# the student's run; the teacher's run is the same file with these overrides (a dense model of
# the same size, no EP, no teacher of its own, preparing the corpus itself, exported when done).
TEACHER_OVERRIDES = [
    "model.first_k_dense_replace=4",
    "train.ep_size=1",
    'distill.teacher=""',
    "distill.save_as_teacher=true",
    'data.prepared=""',
    'data.inputs=["corpus:stdlib:2000000"]',
    "train.name=distill-teacher",
    "train.run_dir=runs/distill-teacher",
]


def _teacher_to_train(run) -> bool:
    """A distillation demo whose teacher run has not produced its export yet."""
    distill = run.sections.get("distill")
    if distill is None or not distill.teacher:
        return False
    teacher = Path(distill.teacher)
    return not ((teacher / "hf" / "config.json").is_file() or (teacher / "config.json").is_file())


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
    if _teacher_to_train(run):
        from dsv3ray.runconfig import resolve_run_config

        user = getattr(args, "overrides", None) or []
        teacher_run = resolve_run_config(
            getattr(args, "preset", None), args.config, [*user, *TEACHER_OVERRIDES]
        )
        print(f"[dsv3ray] demo stage 1/2: training the teacher into {teacher_run.train.run_dir}", flush=True)
        train(teacher_run)
        print("[dsv3ray] demo stage 2/2: the MoE student, distilled from the teacher", flush=True)
    summary = train(run)
    rep = json.loads(Path(summary["run_dir"], "report.json").read_text())
    print(
        f"[dsv3ray] demo done in {summary['wall_s']:.0f}s: held-out loss {rep['final_eval_loss']:.3f} nats/token, "
        f"unigram entropy of the corpus {rep['unigram_entropy']:.3f} "
        f"({'beaten' if rep['beats_unigram'] else 'NOT beaten'}); report {summary['report']}, plot {rep['loss_curve']}",
        flush=True,
    )
    return 0
