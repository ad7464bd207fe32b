"""Ray Data streams from shards to training workers: read_parquet -> decode -> augment -> workers.

Nothing is materialised: Parquet blocks stream through CPU tasks that decode and augment, and each Train
worker pulls its part with `get_dataset_shard(...).iter_torch_batches(...)`. A bad image is a logged skip
with its id and reason; it never fails the task.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from raytrain_ssl.data.augment import eval_transform, finetune_transform, simclr_view_transform
from raytrain_ssl.data.decode import BadImageError, decode_rgb
from raytrain_ssl.data.schema import SHARD_GLOB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewSpec:
    """Everything a decode+augment task needs; small and picklable, shipped with each Ray Data task."""

    image_size: int
    color_jitter_strength: float = 1.0
    min_crop_scale: float = 0.08
    gaussian_blur: bool = False
    grayscale_probability: float = 0.2
    max_pixels: int = 64_000_000


def parquet_files(path: str) -> list[str]:
    """The shard files of a local directory (sorted); a missing or empty path is a one-line error."""
    if "://" in path:
        return [path]  # URIs are listed by Ray Data itself
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"shard directory not found: {root}")
    # Not recursive: `OUT_DIR/heldout/` holds the held-out split's shards, which training must not read.
    files = sorted(str(p) for p in root.glob(SHARD_GLOB)) if root.is_dir() else [str(root)]
    if not files:
        raise FileNotFoundError(f"no .parquet shards under {root}")
    return files


def count_rows(path: str) -> int:
    """Rows in the shards, from Parquet footers only (no image is read)."""
    import pyarrow.fs

    if "://" in path:
        fs, base = pyarrow.fs.FileSystem.from_uri(path)
        dataset = pq.ParquetDataset(base, filesystem=fs)
        return sum(frag.metadata.num_rows for frag in dataset.fragments)
    return rows_in(parquet_files(path))


def rows_in(files: list[str]) -> int:
    """Rows in local shard files, from their Parquet footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def has_labels(path: str) -> bool:
    """True when the first shard has at least one non-null label."""
    first = parquet_files(path)[0]
    if "://" in first:
        return True
    labels = pq.read_table(first, columns=["label"]).column("label")
    return labels.null_count < len(labels)


# Rows per block when a shard holds more: Ray Data reads a Parquet file in one task, and a file of N rows
# would otherwise be one block, decoded by one task at a time (CIFAR-10's 50,000 images are one 48 MB
# shard). About 1,000 rows is seconds of decode per task, small next to its scheduling cost.
ROWS_PER_BLOCK = 1024


def read_blocks(files: list[str], rows: int) -> int:
    """Blocks for Ray Data to cut the shards into: one per file at least, and at most ROWS_PER_BLOCK
    rows each on average, so that `decode_concurrency` tasks decode in parallel even from one shard."""
    return max(len(files), -(-rows // ROWS_PER_BLOCK))


def read_shards(path: str, columns: list[str], shuffle_seed: int | None):
    """A lazy Ray Dataset over the shards; files are shuffled per epoch, reproducibly from the seed."""
    import ray.data
    from ray.data import DataContext, FileShuffleConfig

    # Ray 2.60's default Parquet reader (datasource v2) merged small files into one block and ignored
    # override_num_blocks, so nothing streamed until the end (see shared/design/RAY.md).
    DataContext.get_current().use_datasource_v2 = False
    files = parquet_files(path)
    shuffle = (
        FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    )
    # More blocks than files: each read task splits its file's rows into equal blocks (Ray Data's
    # "additional split factor"), which the decode tasks then take in parallel.
    ds = ray.data.read_parquet(
        files if "://" not in path else path,
        shuffle=shuffle,
        override_num_blocks=read_blocks(files, rows_in(files)) if "://" not in path else None,
    )
    return ds.select_columns(columns)


def _reseed_task_rng() -> None:
    """Ray Data reuses worker processes that all start with torch's same default seed: without this,
    every process would draw the same crops for the same batch position."""
    import torch  # here, not at the top: see data/augment.py

    torch.manual_seed(int.from_bytes(os.urandom(8), "little") % (2**63))


def _decode_rows(batch: dict, spec: ViewSpec):
    """Yield (index, PIL image) for the decodable rows of a batch; log a skip for every bad one."""
    for i, (data, image_id) in enumerate(zip(batch["image"], batch["id"])):
        try:
            yield i, decode_rgb(data, max_pixels=spec.max_pixels)
        except BadImageError as exc:
            log.warning("skipping image %s: %s", image_id, exc)


def two_view_batch_fn(spec: ViewSpec) -> Callable[[dict], dict]:
    """Ray Data map_batches function: encoded images -> two uint8 SimCLR views per image."""

    def fn(batch: dict) -> dict:
        _reseed_task_rng()
        transform = simclr_view_transform(
            spec.image_size,
            spec.color_jitter_strength,
            spec.min_crop_scale,
            spec.gaussian_blur,
            spec.grayscale_probability,
        )
        view1, view2, ids = [], [], []
        for i, image in _decode_rows(batch, spec):
            view1.append(transform(image).numpy())
            view2.append(transform(image).numpy())
            ids.append(batch["id"][i])
        views = {"view1": _stack(view1, spec.image_size), "view2": _stack(view2, spec.image_size)}
        return {**views, "key": image_keys(ids)}

    return fn


def _is_null(label) -> bool:
    return label is None or (isinstance(label, float) and np.isnan(label))


def _keep_rows(batch: dict, keep_ids: frozenset[str] | None) -> dict:
    """Only the rows of a label subset; filtered before decoding, so skipped rows cost no decode."""
    if keep_ids is None:
        return batch
    mask = np.fromiter((str(i) in keep_ids for i in batch["id"]), dtype=bool, count=len(batch["id"]))
    return {name: column[mask] for name, column in batch.items()}


def labeled_batch_fn(spec: ViewSpec, train: bool, keep_ids: frozenset[str] | None = None) -> Callable[[dict], dict]:
    """Ray Data map_batches function: encoded images with labels -> one uint8 view + label.

    Rows without a label are dropped (a labeled split may still hold a few unlabeled images), and so are
    rows outside `keep_ids` when a label subset is given."""

    def fn(batch: dict) -> dict:
        _reseed_task_rng()
        batch = _keep_rows(batch, keep_ids)
        transform = finetune_transform(spec.image_size, spec.min_crop_scale) if train else eval_transform(spec.image_size)
        images, labels, ids = [], [], []
        for i, image in _decode_rows(batch, spec):
            label = batch["label"][i]
            if _is_null(label):
                continue
            images.append(transform(image).numpy())
            labels.append(int(label))
            ids.append(batch["id"][i])
        return {
            "image": _stack(images, spec.image_size),
            "label": np.asarray(labels, dtype=np.int64),
            "key": image_keys(ids),
        }

    return fn


def distill_batch_fn(spec: ViewSpec, labeled_ids: frozenset[str]) -> Callable[[dict], dict]:
    """Ray Data map_batches function for distillation: one crop+flip view of every image, and its label
    where the image belongs to the teacher's labeled subset (-1 elsewhere: only the teacher teaches)."""

    def fn(batch: dict) -> dict:
        _reseed_task_rng()
        transform = finetune_transform(spec.image_size, spec.min_crop_scale)
        images, labels, ids = [], [], []
        for i, image in _decode_rows(batch, spec):
            label = batch["label"][i]
            known = str(batch["id"][i]) in labeled_ids and not _is_null(label)
            images.append(transform(image).numpy())
            labels.append(int(label) if known else -1)
            ids.append(batch["id"][i])
        return {
            "image": _stack(images, spec.image_size),
            "label": np.asarray(labels, dtype=np.int64),
            "key": image_keys(ids),
        }

    return fn


def _stack(arrays: list[np.ndarray], size: int) -> np.ndarray:
    if not arrays:
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    return np.stack(arrays)


def image_keys(ids) -> np.ndarray:
    """A stable int64 key per image id (every stream carries it: the pseudo-label lookup of DeeperCluster,
    the batch audit of `train.record_batch_ids`): the first 8 bytes of blake2b(id), sign bit cleared.

    Ids are strings, which `iter_torch_batches` and torch collectives cannot carry; the key can. It depends on
    the id alone (not on the order of a pass or on Python's per-process hash seed), so every Ray Data task and
    every worker computes the same key. Two ids sharing a key are detected where the keys are gathered."""
    keys = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in ids]
    return np.asarray(keys, dtype=np.uint64).astype(np.int64) & np.int64(2**63 - 1)


def pretrain_dataset(path: str, spec: ViewSpec, shuffle_seed: int, batch_size: int, concurrency: int | None):
    """Unlabeled two-view stream for contrastive pretraining."""
    ds = read_shards(path, ["image", "id"], shuffle_seed)
    return ds.map_batches(two_view_batch_fn(spec), batch_size=batch_size, compute=_task_pool(concurrency))


def encoded_batch_fn(max_pixels: int) -> Callable[[dict], dict]:
    """Ray Data map_batches function of `data.decode_on: worker`: the encoded bytes pass through undecoded
    (the worker decodes them, see data/worker_decode.py) with their id and key. Images whose stored size
    exceeds the pixel limit are dropped here, as the Ray Data decoder would refuse them."""

    def fn(batch: dict) -> dict:
        pixels = batch["width"].astype(np.int64) * batch["height"].astype(np.int64)
        for image_id, size in zip(batch["id"][pixels > max_pixels], pixels[pixels > max_pixels]):
            log.warning("skipping image %s: decompression bomb (%d > %d pixels)", image_id, size, max_pixels)
        keep = pixels <= max_pixels
        return {"image": batch["image"][keep], "id": batch["id"][keep], "key": image_keys(batch["id"][keep])}

    return fn


def encoded_dataset(path: str, spec: ViewSpec, shuffle_seed: int, batch_size: int, concurrency: int | None):
    """Unlabeled encoded images for pretraining with `data.decode_on: worker`: no decode in Ray Data."""
    ds = read_shards(path, ["image", "id", "width", "height"], shuffle_seed)
    return ds.map_batches(encoded_batch_fn(spec.max_pixels), batch_size=batch_size, compute=_task_pool(concurrency))


def labeled_dataset(
    path: str,
    spec: ViewSpec,
    train: bool,
    batch_size: int,
    concurrency: int | None,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    keep_ids: frozenset[str] | None = None,
):
    """Labeled single-view stream: random crop+flip when `train`, centre crop otherwise; only the rows
    of `keep_ids` (a label subset) when given."""
    ds = read_shards(path, ["image", "id", "label"], shuffle_seed)
    if limit is not None:
        ds = ds.limit(limit)
    fn = labeled_batch_fn(spec, train, keep_ids)
    return ds.map_batches(fn, batch_size=batch_size, compute=_task_pool(concurrency))


def distill_dataset(
    path: str,
    spec: ViewSpec,
    labeled_ids: frozenset[str],
    shuffle_seed: int,
    batch_size: int,
    concurrency: int | None,
):
    """Every image of `path` (labeled or not) as one crop+flip view, for the teacher to label."""
    ds = read_shards(path, ["image", "id", "label"], shuffle_seed)  # the shard schema always has `label`
    fn = distill_batch_fn(spec, labeled_ids)
    return ds.map_batches(fn, batch_size=batch_size, compute=_task_pool(concurrency))


def _task_pool(size: int | None):
    from ray.data import TaskPoolStrategy

    return TaskPoolStrategy(size=size)


# ---------------------------------------------------------------------------------------------------------
# DeeperCluster streams: a worker looks up the pseudo-label of every image it trains on by its key, and the
# clustering round tells which features belong to whom.


def rotation_batch_fn(spec: ViewSpec, num_rotations: int) -> Callable[[dict], dict]:
    """Ray Data map_batches function: encoded images -> one crop+flip view turned by a random multiple of 90
    degrees, its rotation index (0..num_rotations-1, counter-clockwise quarter turns) and its key.

    The rotation is drawn per image here, in the data task, so the worker only reads it; num_rotations=1
    leaves every image upright (DeepCluster)."""
    if num_rotations not in (1, 2, 4):
        raise ValueError(f"num_rotations must be 1, 2 or 4, got {num_rotations}")

    def fn(batch: dict) -> dict:
        _reseed_task_rng()
        import torch

        # DeepCluster's augmentation: random resized crop and flip, no colour changes.
        transform = finetune_transform(spec.image_size, spec.min_crop_scale)
        images, rotations, ids = [], [], []
        for i, image in _decode_rows(batch, spec):
            rotation = int(torch.randint(num_rotations, ()))
            # 4 // num_rotations quarter turns per rotation step: 2 rotations are 0 and 180 degrees.
            view = torch.rot90(transform(image), rotation * (4 // num_rotations), dims=(1, 2))
            images.append(view.numpy())
            rotations.append(rotation)
            ids.append(batch["id"][i])
        return {
            "image": _stack(images, spec.image_size),
            "rotation": np.asarray(rotations, dtype=np.int64),
            "key": image_keys(ids),
        }

    return fn


def keyed_eval_batch_fn(spec: ViewSpec) -> Callable[[dict], dict]:
    """Ray Data map_batches function: encoded images -> deterministic centre crop, key, and label (-1 when
    the image has none), for extracting the features a clustering round clusters."""

    def fn(batch: dict) -> dict:
        transform = eval_transform(spec.image_size)
        images, labels, ids = [], [], []
        raw_labels = batch.get("label")
        for i, image in _decode_rows(batch, spec):
            label = None if raw_labels is None else raw_labels[i]
            images.append(transform(image).numpy())
            labels.append(-1 if _is_null(label) else int(label))
            ids.append(batch["id"][i])
        return {
            "image": _stack(images, spec.image_size),
            "key": image_keys(ids),
            "label": np.asarray(labels, dtype=np.int64),
        }

    return fn


def rotation_dataset(
    path: str, spec: ViewSpec, num_rotations: int, shuffle_seed: int, batch_size: int, concurrency: int | None
):
    """Training stream of DeeperCluster / DeepCluster / RotNet: rotated crops with rotation index and key."""
    ds = read_shards(path, ["image", "id"], shuffle_seed)
    return ds.map_batches(
        rotation_batch_fn(spec, num_rotations), batch_size=batch_size, compute=_task_pool(concurrency)
    )


def keyed_eval_dataset(path: str, spec: ViewSpec, batch_size: int, concurrency: int | None):
    """Every training image once, centre-cropped, with key and label (-1: none): the clustering input."""
    ds = read_shards(path, ["image", "id", "label"], shuffle_seed=None)
    return ds.map_batches(keyed_eval_batch_fn(spec), batch_size=batch_size, compute=_task_pool(concurrency))
