"""Ingestion rate of `raytrain-ssl shards` on CIFAR-10 (60,000 32x32 JPEGs).

    python benchmarks/ingest_throughput.py [--data ../shared/data/cifar10-jpg.tar.gz] [--repeat 3]

Each run is the job of `raytrain-ssl shards SRC OUT --labels-from-folders --holdout-folder test` (all 60,000
images: listing, Ray Data decode/validate, dedup, Parquet and manifest), timed end to end, on:
- the tar.gz as it ships (decompressed once into the scratch folder, then read by byte ranges);
- the same images extracted into a folder tree under --work (60,000 small files);
and, for comparison, a single-process loop doing the same per-image work (read, sha256, full decode)
without Ray or Parquet. Ray is started once and warmed up, so worker start-up is not timed. On a shared
machine the figures move with the load (printed): --repeat gives the median and best of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA.resolve()), help="cifar10-jpg.tar.gz")
    parser.add_argument("--work", default="/tmp/ingest-bench", help="scratch folder (extracted images, shards)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs for the local Ray")
    parser.add_argument("--num-tasks", type=int, default=None, help="concurrent Ray Data tasks (default: Ray's)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind; median and best are reported")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        print(f"error: {args.data} not found (the CIFAR-10 tarball from ../shared/data)", file=sys.stderr)
        return 2

    import ray

    from raytrain_ssl.data.shards import IngestOptions, write_shards

    work = Path(args.work)
    folder = work / "cifar10"
    if not (folder / "test").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.data) as tar:
            tar.extractall(folder, filter="data")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False)
    options = IngestOptions(labels_from_folders=True, holdout_folder="test", overwrite=True, num_tasks=args.num_tasks)
    write_shards(str(folder / "test" / "cat"), str(work / "warmup"), options)  # start the workers

    results: dict = {"cores": os.cpu_count(), "ray_num_cpus": args.num_cpus, "load_avg_1min": []}
    rates: dict[str, list[float]] = {"tar.gz": [], "folder": [], "single_process": []}
    for _ in range(args.repeat):
        for name, src in (("tar.gz", args.data), ("folder", str(folder))):
            results["load_avg_1min"].append(round(os.getloadavg()[0], 1))
            summary = write_shards(src, str(work / f"shards-{name}"), options)
            print(f"{name:7s} {summary.line()}", flush=True)
            rates[name].append(summary.images / summary.seconds)
        rates["single_process"].append(_single_process(folder))
    for name, values in rates.items():
        results[f"{name}_images_per_s"] = {"median": round(statistics.median(values)), "best": round(max(values))}
    print(json.dumps(results))
    shutil.rmtree(work / "warmup", ignore_errors=True)
    return 0


def _single_process(folder: Path) -> float:
    """The per-image work of the job (read, hash, full decode) in one plain loop, for comparison."""
    from raytrain_ssl.data.shards import IngestOptions, normalise
    from raytrain_ssl.data.sources import Reader, list_source

    start = time.perf_counter()
    entries = [dict(e, label=None) for e in list_source(str(folder), "/tmp/unused").entries]
    reader, options = Reader(str(folder), "/tmp/unused"), IngestOptions()
    for i in range(0, len(entries), 1000):
        chunk = entries[i : i + 1000]
        for entry, data in zip(chunk, reader.read(chunk)):
            normalise(entry, data, options)
    return len(entries) / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
