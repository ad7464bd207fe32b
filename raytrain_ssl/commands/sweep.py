"""`raytrain-ssl sweep SWEEP_FILE [--resume]`: model size x label fraction through every stage, on Ray Tune."""

from __future__ import annotations

import argparse

from raytrain_ssl.config import describe_options

DESCRIPTION = """\
Produce SimCLRv2's table for your data: pretrain every model once, fine-tune each at every label fraction
(one shared class-balanced subset per fraction), distil the best fine-tuned teacher of each into every
student, and write results.csv / results.md / results.png in the sweep directory. Trials are Ray Train
runs inside Ray Tune with the resources the sweep file gives one trial; trials beyond what fits wait in
Tune's queue. After an interruption, run the same command with --resume: finished trials are not run again.

Review:  tensorboard --logdir <sweep dir>   (every trial's curves; its settings in the HParams tab)
Overrides are key=value, e.g. label_fractions=[0.01,0.1] max_concurrent_trials=2 finetune.train.epochs=5.
"""


def register(subparsers) -> None:
    from raytrain_ssl.sweep.config import SweepConfig

    parser = subparsers.add_parser(
        "sweep", help="Ray Tune sweep of model size x label fraction through pretrain, fine-tune and distill",
        description=DESCRIPTION + "\nKeys:\n" + "\n".join(describe_options(SweepConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", help="sweep YAML (e.g. experiments/sweeps/digits_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in the same directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved sweep and exit")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.set_defaults(handler=run_command)


def run_command(args) -> int:
    import yaml

    from raytrain_ssl.sweep.config import load_sweep

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"shared.ray.address={args.address}")
    sweep = load_sweep(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
        return 0
    from raytrain_ssl.sweep.report import markdown_table
    from raytrain_ssl.sweep.runner import SweepInterrupted, run_sweep

    try:
        summary = run_sweep(sweep, resume=args.resume)
    except SweepInterrupted as exc:
        print(f"raytrain-ssl: {exc}")
        return 130
    print(markdown_table(summary["rows"]))
    root = summary["sweep_dir"]
    print(f"sweep directory: {root}   (results.md, results.png; tensorboard --logdir {root})")
    return 0
