"""`raytrain-ssl export RUN_DIR`: the deployable files of a finished fine-tune or distill run."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Write RUN_DIR/export/ for a finished fine-tune or distill run, from its final checkpoint:
  model.pt    plain state dict (torch.load(..., weights_only=True))
  model.json  architecture, input convention, source checkpoint
  model.pt2   torch.export program: torch.export.load("model.pt2").module()(images), torch alone
Stage runs export by themselves; sweeps export the program of their best trials only (export_programs),
so this is how another trial of a sweep is made deployable. No Ray is started.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="torch.export program + state dict of a finished fine-tune/distill run",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a fine-tune or distill run directory (with result.json)")
    parser.set_defaults(handler=run_command)


def run_command(args) -> int:
    from raytrain_ssl.export import export_finished_run

    summary = export_finished_run(args.run_dir)
    print(json.dumps(summary["export"], indent=2))
    return 0
