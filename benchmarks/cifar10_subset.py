"""Extract a class-balanced subset of ../shared/data/cifar10-jpg.tar.gz into train/<class>/ and test/<class>/
folders, for recipes that must fit a 2-core CPU machine (the full 50,000 images take hours per epoch of a
ResNet there). The same first N files of each class folder (sorted names) are taken every time.

    python benchmarks/cifar10_subset.py --train-per-class 1000 --test-per-class 200 /tmp/cifar10-10k-src
    raytrain-ssl shards /tmp/cifar10-10k-src /tmp/cifar10-10k --labels-from-folders --subdir train --holdout-folder test --shard-size-mb 1
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        print(f"cifar10_subset: archive not found: {args.archive} (pass --archive PATH)", file=sys.stderr)
        return 2
    quota = {"train": args.train_per_class, "test": args.test_per_class}
    with tarfile.open(args.archive) as tar:  # pass 1: names only, to pick the first N per class by name
        names = sorted(m.name for m in tar if m.isfile())
    wanted, taken = set(), defaultdict(int)
    for name in names:
        key = _split_and_label(name, quota)
        if key and taken[key] < quota[key[0]]:
            wanted.add(name)
            taken[key] += 1
    # Pass 2 streams the archive in its own order: random access into a .gz re-reads it from the start.
    with tarfile.open(args.archive, mode="r|*") as tar:
        for member in tar:
            if member.name in wanted:
                split, label = _split_and_label(member.name, quota)
                target = args.out_dir / split / label / PurePosixPath(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    for split in quota:
        counts = sorted(n for (s, _), n in taken.items() if s == split)
        print(f"{split}: {sum(counts)} images in {len(counts)} classes ({counts[0] if counts else 0} per class)")
    return 0


def _split_and_label(name: str, quota: dict) -> tuple[str, str] | None:
    """`.../train/cat/0001.jpg` -> ("train", "cat"); None for anything else."""
    parts = PurePosixPath(name).parts
    at = next((i for i, p in enumerate(parts) if p in quota), None)
    return (parts[at], parts[at + 1]) if at is not None and len(parts) == at + 3 else None


if __name__ == "__main__":
    sys.exit(main())
