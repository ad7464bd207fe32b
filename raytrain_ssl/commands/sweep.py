"""`raytrain-ssl sweep SWEEP_FILE [--resume]`: model size x label fraction through every stage, on Ray Tune."""

from __future__ import annotations

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
    from raytrain_ssl.commands import add_recipe_parser
    from raytrain_ssl.sweep.config import SweepConfig

    parser = add_recipe_parser(
        subparsers, "sweep", "Ray Tune sweep of model size x label fraction through pretrain, fine-tune and distill",
        DESCRIPTION, SweepConfig, "sweep YAML (e.g. experiments/sweeps/digits_tiny.yaml)", run_command,
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in the same directory")


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
    for method, program in summary["exported"].items():
        print(f"best {method} model, deployable with torch alone: {program}")
    root = summary["sweep_dir"]
    print(f"sweep directory: {root}   (results.md, results.png; tensorboard --logdir {root})")
    return 0
