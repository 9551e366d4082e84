"""`dsv3ray` command line: a small CLI; new knobs go into config files, not new flags.

Every command takes `--preset NAME`, `--config FILE` and repeatable `--set section.key=value`.
A user mistake prints one line (what, where, what to do) and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from dsv3ray.errors import UserError

EXIT_USER_ERROR = 2

# command -> (handler "module:function", one-line help). Handlers take (run, args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("dsv3ray.cli:cmd_config", "print the resolved, validated run config"),
    "train": ("dsv3ray.train:cli_train", "train on Ray Train + DeepSpeed"),
    "demo": ("dsv3ray.demo:cli_demo", "end-to-end demo on a local Ray with a built-in corpus"),
    "prepare": ("pipelines.prepare:cli_prepare", "clean, dedup, filter, tokenize and pack a corpus"),
    "quality": ("pipelines.quality:cli_quality_train", "train the fastText quality classifier"),
    "export": ("dsv3ray.hf:cli_export", "export a checkpoint to the Hugging Face DeepseekV3 format"),
    "cost": ("dsv3ray.cost:cli_cost", "FLOPs, memory, GPU-hours, energy and money for a run"),
    "tune": ("dsv3ray.tune:cli_tune", "Ray Tune sweep of keep_ratio / experts / lr against cost"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line with exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset (debug, 16b, 671b)")
    p.add_argument("--config", help="run config TOML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set model.keep_ratio=0.25",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv3ray", description="Train DeepSeek-V3-style MoE models on Ray; cost first.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    subs = {
        name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()
    }
    for name, p in subs.items():
        if name != "quality":
            _common(p)
    subs["config"].add_argument("--json", action="store_true", help="print JSON instead of TOML")
    subs["prepare"].add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="files, dirs or globs"
    )
    subs["prepare"].add_argument("--output", required=True, metavar="DIR", help="prepared dataset directory")
    qsub = subs["quality"].add_subparsers(dest="quality_command", metavar="ACTION", parser_class=_Parser)
    qsub.required = True
    qtrain = qsub.add_parser("train", help="train a fastText quality model from a labeled file")
    _common(qtrain)
    qtrain.add_argument(
        "--input", required=True, metavar="FILE", help="labeled file (__label__good text ...)"
    )
    qtrain.add_argument("--output", required=True, metavar="MODEL.bin", help="where to write the model")
    subs["export"].add_argument(
        "--checkpoint", required=True, metavar="RUN_DIR", help="run or checkpoint dir"
    )
    subs["export"].add_argument("--out", required=True, metavar="DIR", help="output directory")
    subs["cost"].add_argument("--json", action="store_true", help="print JSON instead of a table")
    subs["cost"].add_argument("--from-run", metavar="RUN_DIR", help="use the throughput a run measured")
    subs["tune"].add_argument("--output", metavar="DIR", help="sweep output directory")
    return parser


def cmd_config(run, args) -> int:
    from dsv3ray.runconfig import dump_toml

    data = run.to_dict()
    print(json.dumps(data, indent=2, default=str) if args.json else dump_toml(data), end="")
    return 0


def _handler(command: str):
    spec, _ = COMMANDS[command]
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("dsv3ray", "pipelines", "actors", "kernels"):
            raise UserError(
                f"`dsv3ray {command}` is not built in this version yet ({e.name} is missing)"
            ) from None
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsv3ray.malloc import tune_this_process

    tune_this_process()  # large tensors reuse freed heap memory (dsv3ray.malloc)
    try:
        from dsv3ray.runconfig import resolve_run_config

        handler = _handler(args.command)
        run = resolve_run_config(args.preset, args.config, args.overrides)
        return int(handler(run, args) or 0)
    except UserError as e:
        print(f"dsv3ray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"dsv3ray {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    console_main()
