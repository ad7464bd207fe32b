"""Decode + augmentation functions of the training stream, and the builtin digits shards."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raytrain_ssl.data.builtin import materialize_builtin
from raytrain_ssl.data.schema import SHARD_SCHEMA
from raytrain_ssl.data.stream import ViewSpec, count_rows, has_labels, labeled_batch_fn, two_view_batch_fn


def _png(size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=128 if mode == "L" else (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def test_two_views_are_uint8_random_and_bad_images_are_logged_skips(caplog):
    batch = {
        "image": np.array([_png(), b"not an image", _png(mode="L"), b""], dtype=object),
        "id": np.array(["good.png", "bad.jpg", "grey.png", "empty.png"], dtype=object),
    }
    fn = two_view_batch_fn(ViewSpec(image_size=16, min_crop_scale=0.2))
    with caplog.at_level(logging.WARNING):
        out = fn(batch)
    assert out["view1"].shape == (2, 3, 16, 16) and out["view1"].dtype == np.uint8
    assert out["view2"].shape == (2, 3, 16, 16)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "bad.jpg" in messages and "empty.png" in messages and "good.png" not in messages


def test_all_bad_batch_gives_empty_arrays():
    out = two_view_batch_fn(ViewSpec(image_size=8))({"image": np.array([b"x"], dtype=object), "id": np.array(["a"])})
    assert out["view1"].shape == (0, 3, 8, 8)


def test_labeled_fn_keeps_labels_aligned_and_drops_unlabeled():
    batch = {
        "image": np.array([_png(), b"broken", _png(), _png()], dtype=object),
        "id": np.array(["a", "b", "c", "d"], dtype=object),
        "label": np.array([3, 4, None, 7], dtype=object),
    }
    out = labeled_batch_fn(ViewSpec(image_size=12), train=False)(batch)
    assert out["image"].shape == (2, 3, 12, 12)
    assert out["label"].tolist() == [3, 7]


def test_eval_view_is_deterministic():
    batch = {"image": np.array([_png((40, 30))], dtype=object), "id": np.array(["a"]), "label": np.array([1])}
    fn = labeled_batch_fn(ViewSpec(image_size=16), train=False)
    np.testing.assert_array_equal(fn(batch)["image"], fn(batch)["image"])


def test_builtin_digits_split_is_stratified_and_in_shard_format(tmp_path):
    splits = materialize_builtin("builtin:digits", tmp_path)
    assert count_rows(str(splits["train"])) + count_rows(str(splits["test"])) == 1797
    assert has_labels(str(splits["test"]))
    table = pq.read_table(sorted(splits["test"].glob("*.parquet"))[0])
    assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
    test_labels = np.concatenate([pq.read_table(f).column("label").to_numpy() for f in splits["test"].glob("*.parquet")])
    counts = np.bincount(test_labels, minlength=10)
    assert counts.min() >= 30 and counts.max() - counts.min() <= 3  # ~20% of each class
    ids = set()
    for split in splits.values():
        for f in split.glob("*.parquet"):
            ids |= set(pq.read_table(f).column("id").to_pylist())
    assert len(ids) == 1797  # no image in both splits


def test_builtin_dataset_written_by_runs_starting_together_is_whole(tmp_path):
    """Sweep trials start together and both write the dataset: each split appears at once, complete."""
    from concurrent.futures import ThreadPoolExecutor

    stale = tmp_path / "digits" / "train"
    stale.mkdir(parents=True)
    (stale / "shard-00009.parquet").write_bytes(b"half a file")  # an older crash's leftover, no manifest
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: materialize_builtin("builtin:digits", tmp_path), range(4)))
    assert all(r == results[0] for r in results)
    assert count_rows(str(results[0]["train"])) + count_rows(str(results[0]["test"])) == 1797
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["test", "train"]  # no staging left


def test_a_one_file_dataset_is_cut_into_blocks_that_decode_in_parallel(ray_local, tmp_path, monkeypatch):
    """Ray Data reads a Parquet file in one task and would make it one block, decoded by one task (CIFAR-10
    is one 48 MB shard): the reader cuts it into blocks of about ROWS_PER_BLOCK rows instead."""
    from raytrain_ssl.data import stream

    splits = materialize_builtin("builtin:digits", tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    table = pa.concat_tables(pq.read_table(f) for f in sorted(splits["train"].glob("*.parquet")))
    pq.write_table(table, one / "shard-00000.parquet")
    monkeypatch.setattr(stream, "ROWS_PER_BLOCK", 200)
    assert stream.read_blocks([str(one / "shard-00000.parquet")], table.num_rows) == 8  # 1437 rows
    assert stream.read_blocks([f"f{i}" for i in range(20)], table.num_rows) == 20  # never fewer than files
    ds = stream.pretrain_dataset(str(one), ViewSpec(16), shuffle_seed=0, batch_size=64, concurrency=2)
    out = ds.materialize()
    assert out.count() == table.num_rows and out.num_blocks() >= 8
    keys = np.concatenate([b["key"] for b in out.iter_batches(batch_format="numpy")])
    assert len(set(keys.tolist())) == table.num_rows  # every image once
