"""The training stream on a dataset several times larger than the object store: it streams (read ->
decode -> two views -> batches) through a whole epoch on the test run's 300 MB store without running out
of memory, every image exactly once, without materialising the dataset."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain_ssl.data.schema import SHARD_SCHEMA
from raytrain_ssl.data.stream import ViewSpec, image_keys, pretrain_dataset

pytestmark = pytest.mark.ray

DISTINCT = 16  # noise PNGs (incompressible: ~1.8 MB each at 768 px); rows repeat them under their own ids
ROWS_PER_SHARD = 40
SHARDS = 16  # 640 images, about 1.1 GB of encoded bytes


def _noise_png(rng: np.random.Generator, size: int = 768) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_big_shards(directory) -> tuple[list[str], int]:
    rng = np.random.default_rng(0)
    images = [_noise_png(rng) for _ in range(DISTINCT)]
    ids, total = [], 0
    for s in range(SHARDS):
        rows = [f"big/{s:02d}/{r:03d}.png" for r in range(ROWS_PER_SHARD)]
        data = [images[(s * ROWS_PER_SHARD + r) % DISTINCT] for r in range(ROWS_PER_SHARD)]
        table = pa.table(
            {
                "id": rows,
                "image": data,
                "label": pa.nulls(len(rows), pa.int64()),
                "hash": [f"{s}-{r}" for r in range(len(rows))],  # not read by the stream
                "width": pa.array([768] * len(rows), pa.int32()),
                "height": pa.array([768] * len(rows), pa.int32()),
            },
            schema=SHARD_SCHEMA,
        )
        pq.write_table(table, directory / f"shard-{s:03d}.parquet", compression="none")
        ids += rows
        total += sum(len(d) for d in data)
    return ids, total


def _spilled_mib() -> float:
    from ray._private.internal_api import memory_summary

    match = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(match.group(1)) if match else 0.0


def test_a_dataset_several_times_the_object_store_streams_through_an_epoch(ray_local, tmp_path):
    ids, encoded_bytes = _write_big_shards(tmp_path)
    store = ray_local.cluster_resources()["object_store_memory"]
    assert encoded_bytes > 3 * store, (encoded_bytes, store)  # the premise: it could never fit at once

    spilled_before = _spilled_mib()
    ds = pretrain_dataset(str(tmp_path), ViewSpec(image_size=16), shuffle_seed=0, batch_size=32, concurrency=1)
    seen = []
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        assert batch["view1"].shape[1:] == (3, 16, 16) and batch["view1"].dtype == np.uint8
        seen.append(batch["key"])
    keys = np.concatenate(seen)
    assert len(keys) == len(ids) and set(keys.tolist()) == set(image_keys(ids).tolist())  # each image once
    # Ray Data's backpressure kept the in-flight blocks within the store: nothing had to go to disk either.
    assert _spilled_mib() == spilled_before
