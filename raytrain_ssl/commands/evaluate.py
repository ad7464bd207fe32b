"""`raytrain-ssl eval RUN_DIR`: kNN, linear probe and classifier accuracy of a finished run."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Score a finished run of any stage on frozen features, with Ray Data batch inference.

  --knn           weighted kNN (faiss) of the validation images against the labeled training images
  --linear-probe  logistic regression (scikit-learn) fitted on frozen features of the labeled training
                  images (or of --label-subset), scored on the validation images
Fine-tune and distill runs are also scored by their own classifier (top-1/top-5). With neither flag,
both are run. Results: RUN_DIR/eval.json and RUN_DIR/tensorboard (eval_offline/...).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="kNN / linear-probe / top-1 evaluation of a finished run",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one of its checkpoint_* dirs)")
    parser.add_argument("--knn", action="store_true", help="kNN accuracy on frozen features")
    parser.add_argument("--linear-probe", action="store_true", help="offline linear probe on frozen features")
    parser.add_argument("--label-subset", help="file of image ids the linear probe trains on (default: all)")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours (default 20)")
    parser.add_argument("--knn-temperature", type=float, default=0.07, help="kNN weighting temperature")
    parser.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the probe")
    parser.add_argument("--actors", type=int, default=1, help="inference actors (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per inference actor")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.set_defaults(handler=run_command)


def run_command(args) -> int:
    from raytrain_ssl import launch
    from raytrain_ssl.config import RaySection
    from raytrain_ssl.evaluation.offline import EvalRequest, evaluate_run

    both = not (args.knn or args.linear_probe)
    request = EvalRequest(
        run_dir=args.run_dir,
        knn=args.knn or both,
        linear_probe=args.linear_probe or both,
        label_subset=args.label_subset,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        probe_c=args.probe_c,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
    )
    launch.connect(RaySection(address=args.address, num_workers=1))
    print(json.dumps(evaluate_run(request), indent=2))
    return 0
