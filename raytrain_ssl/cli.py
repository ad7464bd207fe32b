"""`raytrain-ssl`: one command, one subcommand per stage.

Configuration errors are caught before Ray starts and printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from raytrain_ssl.config import STAGE_CONFIGS, ConfigError, config_to_yaml, describe_options, load_config

EPILOG_OVERRIDES = "Overrides are key=value with dotted keys, e.g. train.epochs=5 optim.name=sgd ray.num_workers=1."
STAGES = {
    "pretrain": (
        "contrastive pretraining of a ResNet without labels",
        "Contrastive SimCLRv2 pretraining on Ray Train workers (DDP, global BatchNorm, LARS).",
    ),
    "finetune": (
        "fine-tune a pretrained model on a label fraction (or train the supervised baseline)",
        "SimCLRv2 fine-tuning from projection-head layer k with a new linear classifier, on a class-balanced\n"
        "label fraction or a subset file; without `pretrained` the supervised baseline from scratch.\n"
        "  raytrain-ssl finetune CONFIG pretrained=RUN_DIR label_fraction=0.1",
    ),
    "distill": (
        "distil a fine-tuned teacher into a student on unlabeled images",
        "SimCLRv2 distillation: the frozen teacher's softened predictions teach the student.\n"
        "  raytrain-ssl distill CONFIG teacher=FINETUNE_RUN_DIR student=r18_1x_sk0",
    ),
}


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (e.g. experiments/quickstart_digits.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (after a driver crash)"
    )
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray); same as ray.address="
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytrain-ssl",
        description="Self-supervised pretraining (SimCLRv2), fine-tuning and distillation on Ray.",
        epilog="Run `raytrain-ssl <command> --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for stage, (summary, description) in STAGES.items():
        cls = STAGE_CONFIGS[stage]
        aliases = getattr(cls, "ALIASES", {})
        alias_text = ("\nShort keys: " + ", ".join(f"{a}= means {k}=" for a, k in aliases.items())) if aliases else ""
        stage_parser = sub.add_parser(
            stage,
            help=summary,
            description=description + "\n" + EPILOG_OVERRIDES + alias_text + "\n\nConfig keys:\n"
            + "\n".join(describe_options(cls)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_run_arguments(stage_parser)
        stage_parser.set_defaults(handler=_cmd_stage, stage=stage)
    _register_commands(sub)
    return parser


def _register_commands(sub) -> None:
    from raytrain_ssl.commands import evaluate, export, pipeline, shards, sweep

    shards.register(sub)
    evaluate.register(sub)
    export.register(sub)
    pipeline.register(sub)
    sweep.register(sub)


def _resolve_config(args, stage: str):
    """CONFIG + overrides, or with --resume the run's saved config.yaml + overrides."""
    overrides = list(args.overrides)
    config_file = args.config
    if config_file and "=" in config_file:  # no file, only overrides: `pretrain train.epochs=1`
        overrides.insert(0, config_file)
        config_file = None
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.resume:
        from raytrain_ssl.launch import CONFIG_FILE

        if config_file:
            raise ConfigError("give either a CONFIG file or --resume RUN_DIR, not both")
        config_file = os.path.join(args.resume, CONFIG_FILE)
        if not os.path.isfile(config_file):
            raise ConfigError(f"--resume: no {CONFIG_FILE} in {args.resume} (is it a run directory?)")
    return load_config(config_file, overrides, stage=stage)


def _cmd_stage(args) -> int:
    import importlib

    cfg = _resolve_config(args, args.stage)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    stage = importlib.import_module(f"raytrain_ssl.stages.{args.stage}")
    summary = stage.run(cfg, resume=bool(args.resume))
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    metrics = summary["metrics"]
    print(json.dumps(summary, indent=2))
    if "val_top1" in metrics:
        print(f"validation top-1 accuracy: {100 * metrics['val_top1']:.2f}% (top-5 {100 * metrics['val_top5']:.2f}%)")
    if "knn_top1" in metrics:
        print(f"kNN top-1 accuracy: {100 * metrics['knn_top1']:.2f}% (top-5 {100 * metrics['knn_top5']:.2f}%)")
    print(f"run directory: {summary['run_dir']}   (tensorboard --logdir {summary['run_dir']})")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also follow a flag (`CONFIG --resume k=v`): argparse
    ends a `*` positional at the first flag and would call the rest unrecognized."""
    args, extra = parser.parse_known_args(argv)
    late = [text for text in extra if "=" in text and not text.startswith("-")]
    if extra != late or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*(args.overrides or []), *late]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints would show twice
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"raytrain-ssl: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a resource error or a failed run: one line, then the cause
        from raytrain_ssl.launch import ResourceError

        if isinstance(exc, ResourceError):
            print(f"raytrain-ssl: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
