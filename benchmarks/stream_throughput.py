"""Streaming images/s: Ray Data (the training stream) against a plain torch DataLoader, same work.

Both sides read the same Parquet shards, decode and make two SimCLR views with the very same function
(`two_view_batch_fn`, what the training stream runs), in the same number of CPU processes, and hand
uint8 torch tensors of `--batch-size` to a consumer in this process that only touches them. Row groups
(DataLoader) and files (Ray Data) are shuffled per epoch; no row-level buffer on either. A shard is split
into chunks on both sides (Ray Data: blocks of about 1,000 rows, see data/stream.read_blocks; DataLoader:
batches of --batch-size dealt round-robin to its workers), so that one-file datasets keep every process busy. The first epoch is warm-up (Ray Data
starts its task processes, the DataLoader forks its persistent workers); the later ones are timed.

    python benchmarks/stream_throughput.py                                   # builtin digits, 16 px
    raytrain-ssl shards ../shared/data/cifar10-jpg.tar.gz /tmp/cifar10-shards --labels-from-folders \
        --subdir train --holdout-folder test
    python benchmarks/stream_throughput.py --data /tmp/cifar10-shards --image-size 32

Prints both rates and their ratio (target: Ray Data at least as fast as the DataLoader, ratio >= 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--processes", type=int, default=2, help="decode+augment processes on each side")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3, help="epochs in all; the first is warm-up")
    return p.parse_args()


def view_spec(image_size: int):
    from raytrain_ssl.data.stream import ViewSpec

    return ViewSpec(image_size=image_size, gaussian_blur=image_size > 32)  # blur off at small sizes, as SimCLR


class ShardViews(torch.utils.data.IterableDataset):
    """The DataLoader side: the (per-epoch shuffled) Parquet row groups are read in chunks of `batch_size`
    rows, and worker k decodes and augments chunks k, k + workers, ... with the training stream's function.
    Chunks, not files, are what the workers share: a small dataset is one shard (CIFAR-10's 50,000 images:
    one file of 6 row groups), and by files one worker would do all the work. Each worker reads every
    chunk's bytes (cheap next to decoding them) so that the work splits evenly."""

    def __init__(self, files: list[str], spec, batch_size: int):
        self.spec, self.batch_size, self.epoch = spec, batch_size, 0
        self.units = [(f, g) for f in files for g in range(pq.ParquetFile(f).metadata.num_row_groups)]

    def __iter__(self):
        from raytrain_ssl.data.stream import two_view_batch_fn

        info = torch.utils.data.get_worker_info()
        rank, world = (info.id, info.num_workers) if info else (0, 1)
        # Persistent workers keep their own copy of this object: each counts its epochs itself.
        order, self.epoch = np.random.default_rng(self.epoch).permutation(len(self.units)), self.epoch + 1
        fn = two_view_batch_fn(self.spec)
        chunk = 0
        for f, group in [self.units[i] for i in order]:
            reader = pq.ParquetFile(f)
            for rows in reader.iter_batches(batch_size=self.batch_size, row_groups=[group], columns=["image", "id"]):
                chunk += 1
                if (chunk - 1) % world == rank:
                    out = fn(rows.to_pydict())
                    yield {k: torch.from_numpy(v) for k, v in out.items()}


def consume(batches) -> int:
    """Touch every batch (as a training step would take it) and count its images."""
    n = 0
    for batch in batches:
        n += int(batch["view1"].shape[0])
        _ = batch["view2"][:, 0, 0, 0].sum()
    return n


def timed_epochs(run_epoch, epochs: int, label: str) -> list[float]:
    """Images/s of each epoch; also the CPU this (consuming) process used, as a share of one core."""
    rates = []
    for epoch in range(epochs):
        start, cpu = time.perf_counter(), time.process_time()
        n = run_epoch(epoch)
        wall = time.perf_counter() - start
        rate = n / wall
        print(f"{label} epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: {n} images, {rate:8.1f} images/s, "
              f"consumer process {100 * (time.process_time() - cpu) / wall:.0f}% of a core", flush=True)  # fmt: skip
        if epoch > 0:
            rates.append(rate)
    return rates


def dataloader_rates(files: list[str], args) -> list[float]:
    dataset = ShardViews(files, view_spec(args.image_size), args.batch_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=args.processes, persistent_workers=True, prefetch_factor=2
    )
    return timed_epochs(lambda e: consume(loader), args.epochs, "torch DataLoader")


def ray_rates(path: str, args) -> list[float]:
    import ray

    from raytrain_ssl.data.stream import pretrain_dataset

    ray.init(num_cpus=args.processes + 1, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = pretrain_dataset(path, view_spec(args.image_size), shuffle_seed=0, batch_size=args.batch_size,
                          concurrency=args.processes)  # fmt: skip
    return timed_epochs(lambda e: consume(ds.iter_torch_batches(batch_size=args.batch_size)), args.epochs, "Ray Data")


def main() -> int:
    args = parse_args()
    from raytrain_ssl.data.builtin import materialize_builtin
    from raytrain_ssl.data.stream import parquet_files

    with tempfile.TemporaryDirectory() as scratch:
        path = str(materialize_builtin(args.data, Path(scratch))["train"]) if args.data.startswith("builtin:") else args.data
        if not Path(path).exists():
            print(f"data not found: {path} (make shards with `raytrain-ssl shards`)", file=sys.stderr)
            return 2
        files = parquet_files(path)
        torch.set_num_threads(1)
        loader = dataloader_rates(files, args)  # first: forking after ray.init would copy Ray's threads
        ray_ = ray_rates(path, args)
    dl, rd = statistics.median(loader), statistics.median(ray_)
    print(f"torch DataLoader, {args.processes} workers: {dl:8.1f} images/s (median of {len(loader)} epochs)")
    print(f"Ray Data, {args.processes} tasks:         {rd:8.1f} images/s (median of {len(ray_)} epochs)")
    print(f"ratio Ray Data / DataLoader: {rd / dl:.3f}  (target >= 1)")
    print(f"{len(files)} files, {args.image_size} px, batch {args.batch_size}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
