"""The shard format: what every Parquet shard written or read by raytrain_ssl holds.

One row per image:
    id      string   stable id (path relative to the source root, or the member name in a tar)
    image   binary   encoded image bytes (original bytes unless re-encoding was needed)
    label   int64    class index into the manifest's `classes`, or null for unlabeled images
    hash    string   sha256 hex of the original bytes (exact-duplicate detection)
    width   int32
    height  int32

Beside the shards, `manifest.json` (see `MANIFEST_NAME`) records counts per class, total bytes and every
rejected file with its path and reason.
"""

from __future__ import annotations

import pyarrow as pa

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("hash", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "*.parquet"
