"""`raytrain-ssl pipeline CONFIG`: pretrain -> fine-tune (each label fraction) -> distill -> report."""

from __future__ import annotations

DESCRIPTION = """\
The whole SimCLRv2 recipe in one command: pretrain once; for each label fraction draw one class-balanced
subset, train the supervised baseline on it, probe the pretrained encoder on it, fine-tune on it and
distil the fine-tuned teacher into each student; then print and save one table (results.md/.csv/.json
and results.png in the pipeline directory). Re-running the same command continues an interrupted
pipeline: finished steps are reused, interrupted ones resumed.

Overrides are key=value, e.g. label_fractions=[0.01,0.1] pretrain.train.epochs=5 shared.ray.num_workers=1.
"""


def register(subparsers) -> None:
    from raytrain_ssl.commands import add_recipe_parser
    from raytrain_ssl.stages.pipeline import PipelineConfig

    add_recipe_parser(subparsers, "pipeline", "pretrain -> fine-tune -> distill -> results table, in one command",
                      DESCRIPTION, PipelineConfig, "pipeline YAML (e.g. experiments/quickstart_pipeline.yaml)",
                      run_command)  # fmt: skip


def run_command(args) -> int:
    from raytrain_ssl.config import config_to_yaml
    from raytrain_ssl.stages.pipeline import load_pipeline, markdown_table, plan, run_pipeline

    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config:
        overrides.insert(0, config)
        config = None
    if args.address:
        overrides.append(f"shared.ray.address={args.address}")
    pipe = load_pipeline(config, overrides)
    steps = plan(pipe)  # validates every stage config before Ray starts
    if args.print_config:
        for step in steps:
            print(f"# ---- step {step.key} ({step.stage})\n{config_to_yaml(step.config)}")
        return 0
    summary = run_pipeline(pipe)
    print(markdown_table(summary["table"]))
    print(f"pipeline directory: {summary['pipeline_dir']}   (tensorboard --logdir {summary['pipeline_dir']})")
    return 0
