"""Datasets that ship inside an installed package, so the main command needs no download.

`builtin:digits` is scikit-learn's bundled copy of the UCI handwritten digits (1,797 real 8x8 greyscale
scans, 10 classes). It is written once as shards in the project's format (`schema.py`), split into
`train/` and `test/` with a fixed, class-stratified rule, so every run and every test sees the same split.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raytrain_ssl.data.schema import MANIFEST_NAME, SHARD_SCHEMA

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("digits",)
TEST_EVERY = 5  # every 5th image of each class goes to test/: 20% held out, stratified, deterministic


def is_builtin(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(BUILTIN_PREFIX)


def builtin_name(spec: str) -> str:
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin dataset '{spec}'; known: {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}")
    return name


def materialize_builtin(spec: str, root: str | Path) -> dict[str, Path]:
    """Write the builtin dataset's shards under `root/<name>/` if absent; return {'train': dir, 'test': dir}."""
    name = builtin_name(spec)
    base = Path(root) / name
    splits = {split: base / split for split in ("train", "test")}
    if all((d / MANIFEST_NAME).is_file() for d in splits.values()):
        return splits
    log.info("writing builtin dataset %s to %s", spec, base)
    images, labels = _load_digits()
    per_class_index = _index_within_class(labels)
    is_test = per_class_index % TEST_EVERY == TEST_EVERY - 1
    classes = [str(c) for c in range(10)]
    for split, mask in (("train", ~is_test), ("test", is_test)):
        if not (splits[split] / MANIFEST_NAME).is_file():
            _publish_split(splits[split], images[mask], labels[mask], np.flatnonzero(mask), classes, name)
    return splits


def _publish_split(out: Path, images, labels, source_index, classes, name) -> None:
    """Write into a private directory, then rename it into place: runs that start together (sweep trials)
    may both write the dataset, and a reader must never see another writer's half-written shard."""
    import shutil
    import uuid

    staging = out.parent / f".{out.name}.{uuid.uuid4().hex}"
    _write_split(staging, images, labels, source_index, classes, name)
    if out.is_dir() and not (out / MANIFEST_NAME).is_file():  # left half-written by an older crash
        shutil.rmtree(out, ignore_errors=True)
    try:
        staging.rename(out)
    except OSError:  # another run published it first (same bytes): keep theirs
        shutil.rmtree(staging, ignore_errors=True)
        if not (out / MANIFEST_NAME).is_file():
            raise


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 (4-bit scans); stretch them to 8-bit greyscale.
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _index_within_class(labels: np.ndarray) -> np.ndarray:
    index = np.zeros_like(labels)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        index[where] = np.arange(len(where))
    return index


def _encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_split(out: Path, images, labels, source_index, classes, name) -> None:
    out.mkdir(parents=True, exist_ok=True)
    encoded = [_encode_png(im) for im in images]
    table = pa.table(
        {
            "id": [f"{name}:{i:04d}" for i in source_index],
            "image": encoded,
            "label": labels.tolist(),
            "hash": [hashlib.sha256(b).hexdigest() for b in encoded],
            "width": [im.shape[1] for im in images],
            "height": [im.shape[0] for im in images],
        },
        schema=SHARD_SCHEMA,
    )
    # Several shards so Ray Data has more than one block to stream and split across workers.
    num_shards = 4
    bounds = np.linspace(0, len(table), num_shards + 1).astype(int)
    for i in range(num_shards):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), out / f"shard-{i:05d}.parquet")
    manifest = {
        "source": f"{BUILTIN_PREFIX}{name}",
        "num_images": len(table),
        "classes": classes,
        "class_counts": {classes[c]: int((labels == c).sum()) for c in range(len(classes))},
        "total_bytes": int(sum(len(b) for b in encoded)),
        "num_duplicates": 0,
        "rejected": [],
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
