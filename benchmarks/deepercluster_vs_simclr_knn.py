"""kNN top-1 on the held-out digits after DeeperCluster pretraining beside SimCLRv2 pretraining, same budget.

    python benchmarks/deepercluster_vs_simclr_knn.py [--epochs 15] [--storage /tmp/dc_vs_simclr] [key=value ...]

Runs the two quickstarts one after the other on the same embedded local Ray (2 CPU workers, builtin digits,
r18_0.25x, 16 px, global batch 256): experiments/quickstart_digits.yaml (contrastive) and
experiments/quickstart_digits_deepercluster.yaml, both with train.epochs=--epochs, and prints for each the kNN
top-1 of the random-init encoder (the run's own baseline), after pretraining, and the wall time. Extra
key=value overrides go to the DeeperCluster run only (e.g. deepercluster.num_rotations=1 for DeepCluster).
Same epochs is the same number of images seen, not the same compute: SimCLR forwards two views per image.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "simclr": ROOT / "experiments" / "quickstart_digits.yaml",
    "deepercluster": ROOT / "experiments" / "quickstart_digits_deepercluster.yaml",
}


def _baseline_knn(run_dir: Path) -> float | None:
    """The kNN top-1 the run logged before its first step (eval.knn_at_start), from its TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if "eval/knn_top1" not in acc.Tags()["scalars"]:
        return None
    return min(acc.Scalars("eval/knn_top1"), key=lambda e: e.step).value


def run_one(method: str, epochs: int, storage: str, extra: list[str]) -> dict:
    from raytrain_ssl.config import load_config
    from raytrain_ssl.stages import pretrain

    name = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"train.epochs={epochs}", f"ray.storage_path={storage}", f"ray.name={name}",
                 "eval.knn_at_start=true", *extra]  # fmt: skip
    start = time.perf_counter()
    summary = pretrain.run(load_config(RUNS[method], overrides))
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "epochs": epochs,
        "knn_top1_random_init": _baseline_knn(Path(summary["run_dir"])),
        "knn_top1": summary["metrics"].get("knn_top1"),
        "knn_top5": summary["metrics"].get("knn_top5"),
        "seconds": round(seconds, 1),
        "run_dir": summary["run_dir"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="epochs of both runs (the quickstarts say 20)")
    parser.add_argument("--storage", default="/tmp/deepercluster_vs_simclr", help="where the run directories go")
    parser.add_argument("--only", choices=sorted(RUNS), help="run one method only")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the DeeperCluster run")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    results = []
    for method in [args.only] if args.only else ["simclr", "deepercluster"]:
        results.append(run_one(method, args.epochs, args.storage, args.overrides if method == "deepercluster" else []))
        print(json.dumps(results[-1]), flush=True)
    for r in results:
        baseline = 100 * (r["knn_top1_random_init"] or float("nan"))
        print(f"{r['method']:>14}: kNN top-1 {100 * r['knn_top1']:.2f}% after {r['epochs']} epochs "
              f"(random init {baseline:.2f}%), {r['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
