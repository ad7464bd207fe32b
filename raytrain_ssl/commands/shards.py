"""`raytrain-ssl shards`: ingest an image collection into Parquet shards, or describe shards already made."""

from __future__ import annotations

import argparse
import json
import logging
import sys

DESCRIPTION = """\
Turn an image collection that nobody cleaned into Parquet shards for training, on Ray Data.

SRC is a folder of images (any depth), a tar archive (plain, .gz, .bz2, .xz, .zst), an idx images
file (MNIST/Fashion-MNIST form, plain or .gz; labels come from the matching *-labels-idx1-ubyte file)
or a folder of idx files; a local path or a URI pyarrow reads (s3://, gs://, file://).

Every image is fully decoded once. A bad file (empty, truncated, corrupt, not an image, a
decompression bomb, too small) is skipped, logged and listed in the manifest with its reason; the
job never stops for one. Rows are written in a fixed pseudo-random order (by a hash of the id), so a
shard read front to back already mixes classes. Exact duplicates (same bytes) are dropped: the first
in that order is kept (held-out images come first) and every dropped one is listed with the id it
duplicates.

Bytes are kept as they are unless they must change: images in a format other than JPEG/PNG/WebP, in
a mode other than RGB or 8-bit greyscale (CMYK, palette, alpha, 16-bit...), or larger than
--image-size are re-encoded (to RGB, or 8-bit greyscale for greyscale sources; JPEG quality 95 if the
source was a JPEG, else lossless PNG). idx records are stored as greyscale PNGs.

Labels (--labels-from-folders): the first folder below the split's root names the class, as in
torchvision's ImageFolder (root = SRC, --subdir or --holdout-folder); images directly in the root
are unlabeled. Labels index the sorted class names, listed as `classes` in the manifest and shared
by both splits.

Evaluation split: images under --holdout-folder, or whose ids are listed in --holdout-ids, are
written to OUT_DIR/heldout/ (its own shards and manifest) instead of OUT_DIR/. Ids are those of the
shards' id column: the path below SRC, the tar member name, or idx:<file>:<index>. A training image that
duplicates a held-out one is dropped, so held-out images never leak into training. For idx
sources each idx file counts as a folder. Alternatively run the command once per split folder with
--subdir; class indices then agree only if every split has every class.

Output: OUT_DIR/shard-NNNNN.parquet (id, image, label, hash, width, height) and manifest.json
(classes, counts per class, total bytes, shards, duplicates, rejected files with reasons), written
last. OUT_DIR may be a URI; a compressed archive is decompressed into OUT_DIR/_scratch meanwhile.
"""

EPILOG = """\
examples:
  raytrain-ssl shards photos/ shards/photos                              # unlabeled
  raytrain-ssl shards imagenet/train shards/inet --labels-from-folders --image-size 512
  raytrain-ssl shards ../shared/data/cifar10-jpg.tar.gz shards/cifar10 \\
      --labels-from-folders --subdir train --holdout-folder test
  raytrain-ssl shards /usr/share/datasets/fashion-mnist shards/fmnist \\
      --holdout-folder t10k-images-idx3-ubyte.gz
  raytrain-ssl shards s3://bucket/raw.tar shards/raw --holdout-ids eval_ids.txt
  raytrain-ssl shards --info shards/cifar10
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "shards",
        help="ingest images (folder, tar, idx; local or URI) into Parquet shards",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", metavar="SRC", help="images: folder, tar archive or idx file(s)")
    parser.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="where the shards go")
    parser.add_argument("--info", metavar="OUT_DIR", help="describe OUT_DIR's shards and exit")
    parser.add_argument("--json", action="store_true", help="with --info: print JSON")
    parser.add_argument("--labels-from-folders", action="store_true", help="class sub-folders give labels")
    parser.add_argument("--subdir", metavar="PATH", help="only images under this folder of SRC")
    parser.add_argument(
        "--holdout-folder", metavar="PATH", help="images under this folder of SRC go to OUT_DIR/heldout/"
    )
    parser.add_argument(
        "--holdout-ids", metavar="FILE", help="a file of ids (one per line, # comments) that go to OUT_DIR/heldout/"
    )
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=256.0,
        metavar="MB",
        help="image bytes per shard (default 256)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="shrink images whose longer side exceeds N (default: keep sizes); "
        "about 2x the training resolution keeps random crops sharp",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        default=None,
        help="reject images declaring more pixels, as decompression bombs "
        "(default 64,000,000; PIL's own limit of about 89M applies too)",
    )
    parser.add_argument(
        "--min-size",
        type=int,
        default=8,
        metavar="N",
        help="reject images whose shorter side is below N pixels (default 8)",
    )
    parser.add_argument(
        "--num-tasks", type=int, metavar="N", help="concurrent decoding tasks (default: as many as Ray Data sees CPUs)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")


def run(args: argparse.Namespace) -> int:
    from raytrain_ssl.data.shards import IngestError, IngestOptions, shard_info, write_shards
    from raytrain_ssl.data.sources import SourceError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.info:
            if args.src or args.out_dir:
                return _error("--info takes OUT_DIR alone: raytrain-ssl shards --info OUT_DIR")
            info = shard_info(args.info)
            print(json.dumps(info, indent=1) if args.json else format_info(info))
            return 0
        if not (args.src and args.out_dir):
            return _error("give SRC and OUT_DIR (or --info OUT_DIR); see raytrain-ssl shards --help")
        options = IngestOptions(
            labels_from_folders=args.labels_from_folders,
            subdir=args.subdir,
            holdout_folder=args.holdout_folder,
            holdout_ids=_read_ids(args.holdout_ids) if args.holdout_ids else frozenset(),
            shard_size_mb=args.shard_size_mb,
            image_size=args.image_size,
            min_size=args.min_size,
            num_tasks=args.num_tasks,
            overwrite=args.overwrite,
            **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}),
        )
        summary = write_shards(args.src, args.out_dir, options)
    except (SourceError, IngestError) as exc:
        return _error(str(exc))
    print(summary.line())
    return 0


def _error(message: str) -> int:
    print(f"raytrain-ssl shards: error: {message}", file=sys.stderr)
    return 2


def _read_ids(uri: str) -> frozenset[str]:
    from raytrain_ssl.data.sources import SourceError, open_uri

    fs, path = open_uri(uri)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            text = f.read().decode()
    except FileNotFoundError:
        raise SourceError(f"--holdout-ids file not found: {uri}") from None
    lines = (line.strip() for line in text.splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def format_info(info: dict) -> str:
    """`shard_info` as a few aligned lines."""
    splits = info["splits"]
    lines = [
        f"{info['out_dir']}  (from {info['source']})",
        f"classes ({len(info['classes'])}): " + (" ".join(info["classes"]) or "none: unlabeled"),
    ]
    header = (
        f"{'split':8s} {'images':>10s} {'MB':>9s} {'shards':>6s} {'re-encoded':>10s} "
        f"{'duplicates':>10s} {'rejected':>8s} {'unlabeled':>9s}"
    )
    lines += ["", header]
    for name, s in splits.items():
        lines.append(
            f"{name:8s} {s['num_images']:>10,} {s['total_bytes'] / 1e6:>9,.1f} {s['num_shards']:>6} "
            f"{s['num_reencoded']:>10,} {s['num_duplicates']:>10,} {s['num_rejected']:>8,} "
            f"{s['num_unlabeled']:>9,}"
        )
    if info["classes"]:
        lines += ["", f"{'class':20s}" + "".join(f"{name:>10s}" for name in splits)]
        for cls in info["classes"]:
            lines.append(f"{cls[:20]:20s}" + "".join(f"{s['class_counts'].get(cls, 0):>10,}" for s in splits.values()))
    for name, s in splits.items():
        if s["rejected_by_reason"]:
            reasons = ", ".join(f"{reason} {n:,}" for reason, n in s["rejected_by_reason"].items())
            lines.append(f"rejected ({name}): {reasons}")
    return "\n".join(lines)
