"""Pretraining images/s: one Ray Train worker (data from Ray Data) against a bare PyTorch loop.

Both sides run the same model, global batch, SimCLR augmentation, NT-Xent and LARS step, with the same
number of torch threads. The bare loop decodes and augments in its own process, serially, the way a
single-process script would; the Ray worker receives views from Ray Data tasks (or, with `--decode-on
worker`, encoded bytes that it decodes and augments itself, like the bare loop). Prints both rates and
their ratio (target: at least 0.95, i.e. Ray overhead under 5%).

    python benchmarks/pretrain_throughput.py                          # builtin digits, 16 px
    python benchmarks/pretrain_throughput.py --data /tmp/cifar10-shards/train --image-size 32 \
        --model r18_0.5x_sk0                                          # CIFAR-10 shards (raytrain-ssl shards)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="builtin:digits", help="shard directory, or builtin:digits")
    p.add_argument("--model", default="r18_0.25x_sk0")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray worker")
    p.add_argument("--shuffle-buffer-rows", type=int, default=None,
                   help="data.shuffle_buffer_rows of the Ray side (default: the config default)")  # fmt: skip
    p.add_argument("--decode-on", choices=["ray_data", "worker"], default="ray_data",
                   help="data.decode_on of the Ray side: views cut by Ray Data tasks, or in the worker "
                   "(encoded bytes through Ray Data; then both sides do the same decode work in-process)")  # fmt: skip
    return p.parse_args()


def overrides(args, storage: str, steps: int) -> list[str]:
    return [
        f"model.name={args.model}",
        f"data.train={args.data}",
        f"data.image_size={args.image_size}",
        f"train.global_batch_size={args.batch_size}",
        f"train.max_steps={steps}",
        "train.epochs=1000",
        "train.log_every_steps=1",
        "eval.knn_every_epochs=null",
        "eval.view_grid_pairs=0",
        "ray.num_workers=1",
        f"ray.cpus_per_worker={args.threads}",
        f"ray.storage_path={storage}",
        "ray.name=bench",
        f"data.decode_on={args.decode_on}",
    ] + ([f"data.shuffle_buffer_rows={args.shuffle_buffer_rows}"] if args.shuffle_buffer_rows is not None else [])


def ray_rate(args, storage: str) -> float:
    """Images/s of the Ray Train worker, from its own per-step TensorBoard scalars after warm-up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raytrain_ssl.config import load_config
    from raytrain_ssl.stages import pretrain

    summary = pretrain.run(load_config(None, overrides(args, storage, args.warmup + args.steps)))
    acc = EventAccumulator(str(Path(summary["run_dir"]) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rates = [e.value for e in acc.Scalars("train/images_per_second") if e.step > args.warmup]
    waits = [e.value for e in acc.Scalars("train/data_wait_fraction") if e.step > args.warmup]
    print(f"Ray worker: mean share of step time waiting for data {100 * np.mean(waits):.1f}%")
    # Per-step rates: the harmonic mean is the rate over the whole timed span.
    return len(rates) / sum(1.0 / r for r in rates)


def bare_rate(args, storage: str) -> float:
    """The same step in one process: decode + two views in-process, then forward/backward/LARS."""
    from raytrain_ssl.config import load_config
    from raytrain_ssl.data.augment import to_float_images
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.stream import ViewSpec, parquet_files, two_view_batch_fn
    from raytrain_ssl.losses import nt_xent
    from raytrain_ssl.optim import build_optimizer, build_scheduler, scaled_learning_rate
    from raytrain_ssl.stages.pretrain import build_model

    torch.set_num_threads(args.threads)
    cfg = load_config(None, overrides(args, storage, args.warmup + args.steps))
    paths = resolve_data_paths(cfg.data, storage)
    table = pq.read_table(parquet_files(paths.train), columns=["image", "id"]).to_pydict()
    spec = ViewSpec(cfg.data.image_size, cfg.augment.color_jitter_strength, cfg.augment.min_crop_scale,
                    cfg.use_gaussian_blur, cfg.augment.grayscale_probability)  # fmt: skip
    augment = two_view_batch_fn(spec)
    model = build_model(cfg)
    lr = scaled_learning_rate(cfg.optim.base_learning_rate, args.batch_size, cfg.optim.learning_rate_scaling)
    optimizer = build_optimizer("lars", model, lr, cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, 10, args.warmup + args.steps)
    n, order = len(table["id"]), np.random.default_rng(0).permutation(len(table["id"]))
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        idx = order[(step * args.batch_size + np.arange(args.batch_size)) % n]
        views = augment({"image": [table["image"][i] for i in idx], "id": [table["id"][i] for i in idx]})
        v1, v2 = (to_float_images(torch.from_numpy(views[k])) for k in ("view1", "view2"))
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
        loss, _ = nt_xent(z1, z2, cfg.contrastive.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> int:
    args = parse_args()
    if not args.data.startswith("builtin:") and not Path(args.data).exists():
        print(f"data not found: {args.data} (make shards with `raytrain-ssl shards`)", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    with tempfile.TemporaryDirectory() as storage:
        bare = bare_rate(args, storage)
        print(f"bare PyTorch loop, 1 process:   {bare:8.1f} images/s", flush=True)
        ray_ = ray_rate(args, storage)
    print(f"bare PyTorch loop, 1 process:   {bare:8.1f} images/s")
    print(f"Ray Train, 1 worker + Ray Data: {ray_:8.1f} images/s  (data.decode_on={args.decode_on})")
    print(f"ratio Ray / bare: {ray_ / bare:.3f}  (target >= 0.95)")
    print(f"model {args.model}, {args.image_size} px, batch {args.batch_size}, {args.threads} torch thread(s), "
          f"{args.steps} timed steps after {args.warmup} warm-up")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
